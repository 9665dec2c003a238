"""The fair line: waiting clients are served in the order they began to wait."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import WAIT, release

import filechat


def in_line(directory: Path) -> list:  # type: ignore[type-arg]
    line = directory / "server.lock.line"
    return sorted(p.name for p in line.iterdir()) if line.exists() else []


def tickets(directory: Path) -> list:  # type: ignore[type-arg]
    return [name for name in in_line(directory) if not name.endswith(".request")]


def test_clients_are_served_in_arrival_order(holder, server, start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply-cmd", "cat")
    clients = []
    for n in range(6):
        client = start("client", "buf.txt", "-m", f"client {n}")
        client.expect(f"Server busy, please wait... ({n + 1} ahead of you)")
        clients.append(client)
    assert len(tickets(tmp_path)) == 6
    release(holder)
    for n, client in enumerate(clients):
        assert client.wait() == 0
        assert client.out == f"client {n}"
    order = [line for line in srv.out.splitlines() if line.startswith("client ")]
    assert order == [f"client {n}" for n in range(6)]
    assert tickets(tmp_path) == []
    assert not (tmp_path / "server.lock.line").exists()     # the last to leave removed it


def test_a_crashed_waiter_does_not_block_the_line(holder, server, start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply-cmd", "cat")
    first = start("client", "buf.txt", "-m", "first")
    first.expect("(1 ahead of you)")
    doomed = start("client", "buf.txt", "-m", "doomed")
    doomed.expect("(2 ahead of you)")
    last = start("client", "buf.txt", "-m", "last")
    last.expect("(3 ahead of you)")
    doomed.popen.send_signal(signal.SIGKILL)
    assert doomed.wait() == -signal.SIGKILL
    release(holder)
    assert first.wait() == 0 and last.wait() == 0
    assert last.out == "last"
    order = [line for line in srv.out.splitlines() if line in ("first", "doomed", "last")]
    assert order == ["first", "last"]
    assert in_line(tmp_path) == []          # the dead waiter's ticket and request too


def test_a_spec_peer_still_gets_its_turn(holder, server, start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "ok")
    peer = subprocess.Popen([sys.executable, str(Path(__file__).with_name("spec_peer.py")),
                             "client", "buf.txt", "peer.txt", "from the peer"],
                            cwd=tmp_path, stdout=subprocess.PIPE)
    assert peer.stdout is not None
    assert peer.stdout.readline() == b"Server busy, please wait...\n"
    queued = [start("client", "buf.txt", "-m", f"c{n}") for n in range(3)]
    for client in queued:
        client.expect("ahead of you")
    release(holder)
    assert peer.wait(30) == 0
    assert b"Server response:\nok" in peer.stdout.read()
    assert all(client.wait() == 0 for client in queued)


def test_polling_clients_wait_at_the_retry_pace(holder, server, start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "ok", "--poll", "--poll-interval", "0.05")
    client = start("client", "buf.txt", "-m", "hi", "--poll", "--poll-interval", "0.05",
                   "--lock-retry-interval", "0.1")
    client.expect("Server busy, please wait... (1 ahead of you)")
    client.expect("Server busy, please wait... (1 ahead of you)")
    release(holder)
    assert client.wait() == 0
    assert client.out == "ok"


