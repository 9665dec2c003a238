"""The fair line: waiting clients are served in the order they began to wait."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from conftest import ROOT, SAFETY_NET, WAIT, ended, interrupt, printed, release, reply

import filechat


def in_line(directory: Path) -> list:  # type: ignore[type-arg]
    line = directory / "server.lock.line"
    return sorted(p.name for p in line.iterdir()) if line.exists() else []


def tickets(directory: Path) -> list:  # type: ignore[type-arg]
    return [name for name in in_line(directory) if not name.endswith(".request")]


def test_clients_are_served_in_arrival_order(holder, server, start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply-cmd", "cat", "-v")
    clients = []
    for n in range(6):
        client = start("client", "buf.txt", "-m", f"client {n}", "-v")
        client.expect_exact(f"Server busy, please wait... ({n + 1} ahead of you)")
        clients.append(client)
    assert len(tickets(tmp_path)) == 6
    release(holder)
    for n, client in enumerate(clients):
        assert ended(client) == 0
        assert reply(client) == f"client {n}"
    assert interrupt(srv) == 0
    order = [line for line in printed(srv).splitlines() if line.startswith("client ")]
    assert order == [f"client {n}" for n in range(6)]
    assert tickets(tmp_path) == []
    assert not (tmp_path / "server.lock.line").exists()     # the last to leave removed it
    for proc in [srv, *clients]:                            # every wait ended by its event
        assert "debug:" in printed(proc) and SAFETY_NET not in printed(proc)


def test_a_crashed_waiter_does_not_block_the_line(holder, server, start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply-cmd", "cat")
    first = start("client", "buf.txt", "-m", "first")
    first.expect_exact("(1 ahead of you)")
    doomed = start("client", "buf.txt", "-m", "doomed")
    doomed.expect_exact("(2 ahead of you)")
    last = start("client", "buf.txt", "-m", "last", "-v")
    last.expect_exact("(3 ahead of you)")
    line = tmp_path / "server.lock.line"
    with filechat.Waiter([str(line / name) for name in tickets(tmp_path)]) as waiter:
        doomed.kill(signal.SIGKILL)
        assert ended(doomed) == -signal.SIGKILL
        # The client behind it, woken by its death, clears its ticket.
        while len(tickets(tmp_path)) == 3:
            assert waiter.wait(WAIT) != "deadline"
    release(holder)
    assert ended(first) == 0 and ended(last) == 0
    assert reply(last) == "last"
    assert interrupt(srv) == 0
    order = [line for line in printed(srv).splitlines() if line in ("first", "doomed", "last")]
    assert order == ["first", "last"]
    assert in_line(tmp_path) == []          # the dead waiter's ticket too
    assert "debug:" in printed(last) and SAFETY_NET not in printed(last)


def test_a_spec_peer_still_gets_its_turn(holder, server, start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "ok")
    peer = subprocess.Popen([sys.executable, str(Path(__file__).with_name("spec_peer.py")),
                             "client", "buf.txt", "peer.txt", "from the peer"],
                            cwd=tmp_path, stdout=subprocess.PIPE)
    assert peer.stdout is not None
    assert peer.stdout.readline() == b"Server busy, please wait...\n"
    queued = [start("client", "buf.txt", "-m", f"c{n}") for n in range(3)]
    for client in queued:
        client.expect_exact("ahead of you")
    release(holder)
    assert peer.wait(30) == 0
    assert b"Server response:\nok" in peer.stdout.read()
    assert all(ended(client) == 0 for client in queued)


def test_polling_clients_wait_at_the_retry_pace(holder, server, start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "ok", "--poll", "--poll-interval", "0.05")
    client = start("client", "buf.txt", "-m", "hi", "--poll", "--poll-interval", "0.05",
                   "--lock-retry-interval", "0.1")
    client.expect_exact("Server busy, please wait... (1 ahead of you)")
    client.expect_exact("Server busy, please wait... (1 ahead of you)")
    release(holder)
    assert ended(client) == 0
    assert reply(client) == "ok"




def test_a_newcomer_joins_a_waiting_line_rather_than_take_the_free_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = str(tmp_path / "server.lock")
    waiting = filechat.WaitingLine(lock)
    assert waiting.tickets() == []
    waiting.join()                         # alive, first in line; the lock is free
    mine = waiting.tickets()
    assert len(mine) == 1
    tried: List[str] = []
    try_acquire = filechat.Lock.try_acquire
    monkeypatch.setattr(filechat.Lock, "try_acquire",
                        lambda self: tried.append(self.path) or try_acquire(self))
    with pytest.raises(filechat.LockTimeout):
        filechat.send(str(tmp_path / "buf.txt"), "late", str(tmp_path / "late.txt"),
                      lock_timeout=0.2)
    assert tried == [] and not os.path.exists(lock)     # never taken, not even for a moment
    assert filechat.WaitingLine(lock).tickets() == mine   # the newcomer's ticket gone
    waiting.leave()
    assert os.listdir(tmp_path) == []


def test_a_stopping_server_clears_a_dead_waiters_ticket(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "ok")
    line = tmp_path / "server.lock.line"
    line.mkdir()
    record = {"pid": 999999, "host": os.uname().nodename, "token": "ab", "created": 1.0}
    (line / f"{1:020d}-999999").write_text(json.dumps(record) + "\n")   # nobody flocks it
    assert interrupt(srv) == 0
    assert not line.exists()


def test_a_client_queued_under_a_spec_server_sends_its_own_request(  # type: ignore[no-untyped-def]
        holder, start, tmp_path: Path) -> None:
    client = start("client", "buf.txt", "resp.txt", "-m", "hello")
    client.expect_exact("(1 ahead of you)")
    peer = subprocess.Popen([sys.executable, str(Path(__file__).with_name("spec_peer.py")),
                             "server", "buf.txt", "from the peer\n"],
                            cwd=tmp_path, stdout=subprocess.PIPE)
    release(holder)
    assert ended(client) == 0
    assert reply(client) == "from the peer\n"
    assert peer.wait(WAIT) == 0
    assert not (tmp_path / "server.lock.line").exists()


def test_two_servers_sharing_the_default_lock_answer_only_their_own_clients(  # type: ignore[no-untyped-def]
        server, start, tmp_path: Path) -> None:
    # The spec's lock is server.lock in the directory, whatever the buffer:
    # both buffers' clients take turns on it, and each server answers its own.
    servers = [server("--auto-reply-cmd", f"sed 's/^/{name}:/'", "-v", buffer=f"{name}.txt")
               for name in ("a", "b")]
    clients = [start("client", f"{name}.txt", "-m", f"{name}{n}", "--timeout", "30")
               for n in range(4) for name in ("a", "b")]
    for client in clients:
        assert ended(client, 30) == 0, printed(client)
    assert sorted(reply(client) for client in clients) == sorted(
        f"{name}:{name}{n}" for n in range(4) for name in ("a", "b"))
    for srv in servers:
        assert interrupt(srv) == 0
        assert SAFETY_NET not in printed(srv)


FORKED = """
import logging, multiprocessing, os, sys
import filechat
buffer, log_dir = sys.argv[1], sys.argv[2]
filechat.send(buffer, "from the parent")     # the parent has used filechat before it forks

def client(n, count):
    logging.basicConfig(filename=os.path.join(log_dir, f"{n}.log"), level=logging.DEBUG)
    for i in range(count):
        assert filechat.send(buffer, f"{n}-{i}", timeout=30) == f"{n}-{i}"

if __name__ == "__main__":
    fork = multiprocessing.get_context("fork")
    # Each finishes when its own messages are done, at a different time.
    procs = [fork.Process(target=client, args=(n, 10 * (n + 1))) for n in range(int(sys.argv[3]))]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    print(" ".join(str(proc.exitcode) for proc in procs))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and inotify")
@pytest.mark.parametrize("clients", [2, 4])
def test_clients_forked_after_their_parent_used_filechat_each_wait_on_their_own(
        clients: int, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply-cmd", "cat", "-v")
    result = subprocess.run([sys.executable, "-c", FORKED, str(tmp_path / "buf.txt"),
                             str(tmp_path), str(clients)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                            timeout=120)
    assert result.stdout == b" ".join([b"0"] * clients) + b"\n", result.stderr
    logs = [p.read_text() for p in sorted(tmp_path.glob("*.log"))]
    assert len(logs) == clients and all("waiting with inotify" in text for text in logs)
    assert not [text for text in logs if SAFETY_NET in text]
    assert interrupt(srv) == 0
    assert SAFETY_NET not in printed(srv)


def test_a_line_removed_as_it_was_made_is_made_again(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The last waiter to leave removes the empty directory; one who made it an
    # instant before has to make it again, not fail (seen with 4 forked clients).
    chmod, removed = os.chmod, []

    def leaver_first(path: str, mode: int) -> None:
        if not removed:
            removed.append(path)
            os.rmdir(path)            # as the last to leave does, between mkdir and chmod
        chmod(path, mode)
    monkeypatch.setattr(os, "chmod", leaver_first)
    line = filechat.WaitingLine(str(tmp_path / "server.lock"))
    line.join()
    # Its ticket, named <nanoseconds>-<pid>, is in the directory made again.
    assert removed and line.tickets() == in_line(tmp_path)
    assert [name.split("-")[1] for name in in_line(tmp_path)] == [str(os.getpid())]
    line.leave()
    assert os.listdir(tmp_path) == []
