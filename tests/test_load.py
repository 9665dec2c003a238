"""Load: 32 client processes x 10 messages against one echoing server, some of them killed."""

import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List

import pytest
from conftest import SAFETY_NET, ended, interrupt, printed, spawn, stop
from pexpect.popen_spawn import PopenSpawn

import filechat

CLIENTS = 32
MESSAGES = 10
DRIVER = """
import logging, sys
sys.path.insert(0, sys.argv[1])
import filechat
logging.basicConfig(level=logging.DEBUG)       # on stderr: a wait no event ended would show
buffer, name = sys.argv[2], sys.argv[3]
for i in range(int(sys.argv[4])):
    message = f"{name}-{i}\\n"
    reply = filechat.send(buffer, message, timeout=120)
    print(("ok " if reply == message else "WRONG ") + message, end="", flush=True)
"""


def run_load(pyz: Path, tmp_path: Path, victims: int, seed: int) -> None:
    server = spawn([sys.executable, str(pyz), "server", "buf.txt", "--auto-reply-cmd", "cat",
                    "-v"], tmp_path)
    clients: List[PopenSpawn] = []
    try:
        server.expect_exact("Waiting for clients...")
        clients += [spawn([sys.executable, "-c", DRIVER, str(pyz), "buf.txt", f"c{n}",
                           str(MESSAGES)], tmp_path) for n in range(CLIENTS)]
        check_load(server, clients, tmp_path, victims, seed)
    finally:
        for child in [server, *clients]:
            stop(child)


def sent(output: str) -> str:
    """The driver's own lines, one a message, out of its output and debug log."""
    return "".join(line for line in output.splitlines(keepends=True)
                   if line.startswith(("ok ", "WRONG ")))


def check_load(server: PopenSpawn, clients: List[PopenSpawn], tmp_path: Path, victims: int,
               seed: int) -> None:
    rng = random.Random(seed)
    doomed = rng.sample(range(CLIENTS), victims)
    killers: List[threading.Thread] = []
    for n in doomed:
        after, delay = rng.randrange(MESSAGES - 1), rng.random() * 0.02

        def kill(proc: PopenSpawn = clients[n], after: int = after, delay: float = delay,
                 name: str = f"c{n}") -> None:
            proc.expect_exact(f"ok {name}-{after}", timeout=120)
            time.sleep(delay)            # lands somewhere inside the next exchange
            proc.kill(signal.SIGKILL)
        killers.append(threading.Thread(target=kill, daemon=True))
    for killer in killers:
        killer.start()
    for killer in killers:          # each alone reads its client's output meanwhile
        killer.join(130)
        assert not killer.is_alive()
    for n, client in enumerate(clients):
        code = ended(client, 240)
        lines = sent(printed(client))
        assert "WRONG" not in lines, f"c{n} got another client's reply: {lines}"
        assert "waiting with inotify" in printed(client)      # the debug log is on
        assert SAFETY_NET not in printed(client), printed(client)
        if n in doomed:
            assert code == -signal.SIGKILL
        else:
            assert code == 0, printed(client)
            assert lines == "".join(f"ok c{n}-{i}\n" for i in range(MESSAGES))
    assert interrupt(server) == 0
    assert "filechat: debug: message claimed" in printed(server)
    assert SAFETY_NET not in printed(server)
    for n in range(CLIENTS):
        for i in range(MESSAGES):
            shown = printed(server).count(f"{'=' * 60}\nc{n}-{i}\n{'=' * 60}\n")
            # A killed client's message may have been shown before it died, never twice.
            assert shown == 1 or (n in doomed and shown == 0), f"c{n}-{i} shown {shown} times"
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # no lock, buffer or stray file


def test_32_clients_10_messages_each(pyz: Path, tmp_path: Path) -> None:
    run_load(pyz, tmp_path, victims=0, seed=0)


@pytest.mark.parametrize("seed", [1, 2])
def test_32_clients_with_10_percent_killed(pyz: Path, tmp_path: Path, seed: int) -> None:
    run_load(pyz, tmp_path, victims=3, seed=seed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/PID/fd")
def test_the_server_holds_no_descriptor_per_answered_client(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "ok")
    buffer = str(tmp_path / "buf.txt")

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{srv.pid}/fd"))

    assert filechat.send(buffer, "first") == "ok"
    before = descriptors()
    for n in range(200):
        assert filechat.send(buffer, f"m{n}") == "ok"
    # Its last client's lock at most, if it is still watching that reply being read.
    assert descriptors() <= before + 1
    assert interrupt(srv) == 0
