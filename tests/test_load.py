"""Load: 32 client processes x 10 messages against one echoing server, some of them killed."""

import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List

import pytest
from conftest import Proc

CLIENTS = 32
MESSAGES = 10
DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
import filechat
buffer, name = sys.argv[2], sys.argv[3]
for i in range(int(sys.argv[4])):
    message = f"{name}-{i}\\n"
    reply = filechat.send(buffer, message, timeout=120)
    print(("ok " if reply == message else "WRONG ") + message, end="", flush=True)
"""


def run_load(pyz: Path, tmp_path: Path, victims: int, seed: int) -> None:
    server = Proc([sys.executable, str(pyz), "server", "buf.txt", "--auto-reply-cmd", "cat"],
                  tmp_path)
    clients: List[Proc] = []
    try:
        server.expect("Waiting for clients...")
        clients += [Proc([sys.executable, "-c", DRIVER, str(pyz), "buf.txt", f"c{n}",
                          str(MESSAGES)], tmp_path) for n in range(CLIENTS)]
        check_load(server, clients, tmp_path, victims, seed)
    finally:
        for proc in [server, *clients]:
            proc.kill()


def check_load(server: Proc, clients: List[Proc], tmp_path: Path, victims: int,
               seed: int) -> None:
    rng = random.Random(seed)
    doomed = rng.sample(range(CLIENTS), victims)
    killers: List[threading.Thread] = []
    for n in doomed:
        after, delay = rng.randrange(MESSAGES - 1), rng.random() * 0.02

        def kill(proc: Proc = clients[n], after: int = after, delay: float = delay,
                 name: str = f"c{n}") -> None:
            proc.expect(f"ok {name}-{after}", timeout=120)
            time.sleep(delay)            # lands somewhere inside the next exchange
            proc.popen.send_signal(signal.SIGKILL)
        killers.append(threading.Thread(target=kill, daemon=True))
    for killer in killers:
        killer.start()
    for n, client in enumerate(clients):
        code = client.wait(timeout=240)
        assert "WRONG" not in client.out, f"c{n} got another client's reply: {client.out}"
        if n in doomed:
            assert code == -signal.SIGKILL
        else:
            assert code == 0, client.err
            assert client.out == "".join(f"ok c{n}-{i}\n" for i in range(MESSAGES))
    for killer in killers:
        killer.join(10)
    assert server.interrupt() == 0
    for n in range(CLIENTS):
        for i in range(MESSAGES):
            shown = server.out.count(f"{'=' * 60}\nc{n}-{i}\n{'=' * 60}\n")
            assert shown == (1 if n not in doomed else shown), f"c{n}-{i} shown {shown} times"
            assert shown <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # no lock, buffer or stray file


def test_32_clients_10_messages_each(pyz: Path, tmp_path: Path) -> None:
    run_load(pyz, tmp_path, victims=0, seed=0)


@pytest.mark.parametrize("seed", [1, 2])
def test_32_clients_with_10_percent_killed(pyz: Path, tmp_path: Path, seed: int) -> None:
    run_load(pyz, tmp_path, victims=3, seed=seed)
