"""Beside programs written from the spec alone, each with the quirk of one seen in use.

tests/spec_peer.py plays them: one that reads the message format as drawn
(ESC on a line of its own), a client that opens the buffer without O_CREAT,
a server that removes the lock before it clears the buffer, and one that
never removes the lock.
"""

import errno
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, List

import pytest
from conftest import WAIT, ended, interrupt, leftovers, printed, reply, served, spawn
from pexpect.popen_spawn import PopenSpawn

import filechat

PEER = str(Path(__file__).with_name("spec_peer.py"))


def peer(tmp_path: Path, *args: str) -> PopenSpawn:
    """Start the spec peer in tmp_path."""
    return spawn([sys.executable, PEER, *args], tmp_path)


def test_a_server_reading_esc_as_a_line_sees_the_end_of_a_message_sent_with_message(
        run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = peer(tmp_path, "server", "buf.txt", "seen", "--drawn")
    result = run("client", "buf.txt", "-m", "hello", "--timeout", "10")
    assert (result.returncode, result.stdout) == (0, b"seen\n"), result.stderr
    server.expect_exact("Message received from client")
    assert ended(server) == 0
    assert not (tmp_path / "server.lock").exists()      # the next client is not locked out


def test_a_client_reading_esc_as_a_line_sees_the_end_of_a_reply(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "no final newline")
    client = peer(tmp_path, "client", "buf.txt", "r.txt", "hi", "--drawn")
    assert ended(client) == 0
    assert printed(client).endswith("Server response:\nno final newline\n")
    served(srv)
    assert leftovers(tmp_path) == []


def test_filechat_to_filechat_stays_byte_exact(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply-cmd", "cat", "--log", "log.jsonl")
    (tmp_path / "m.txt").write_bytes(b"from a file, no final newline")
    for args, sent in ((["-m", "hello"], b"hello"), (["-m", "two\n\n"], b"two\n\n"),
                       (["--message-file", "m.txt"], b"from a file, no final newline"),
                       (["-m", ""], b"")):
        result = run("client", "buf.txt", *args)
        assert (result.returncode, result.stdout) == (0, sent), result.stderr
    interrupt(srv)
    logged = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["message"] for line in logged] == [
        "hello", "two\n\n", "from a file, no final newline", ""]


def test_a_client_that_opens_the_buffer_without_o_creat_is_answered(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "ok")
    clients: List[PopenSpawn] = []
    for n in range(3):                  # the first, and those after a claim
        clients.append(peer(tmp_path, "client", "buf.txt", f"r{n}.txt", f"m{n}",
                            "--no-create"))
        assert ended(clients[-1]) == 0
        assert printed(clients[-1]).endswith("Server response:\nok\n")
    served(srv, 3)
    assert leftovers(tmp_path) == []


def test_the_buffer_a_server_leaves_for_such_clients_goes_with_it(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "ok")
    assert (tmp_path / "buf.txt").read_bytes() == b""
    assert interrupt(srv) == 0
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_removes_the_lock_before_clearing_the_buffer_loses_no_message(
        start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Between its removing the lock and clearing the buffer, the next client
    # takes the lock; it waits for the buffer to be cleared before writing.
    server = peer(tmp_path, "server", "buf.txt", "answered", "--esc", "--lock-first",
                  "--gap=0.5", "--count=2", "--think=1")
    server.expect_exact("Waiting for clients...")
    first = start("client", "buf.txt", "-m", "first", "--timeout", "20")
    server.expect_exact("first")
    second = start("client", "buf.txt", "-m", "second", "--timeout", "20")
    second.expect_exact("Server busy")
    assert ended(first, 20) == 0 and reply(first) == "answered"
    assert ended(second, 20) == 0 and reply(second) == "answered"
    server.expect_exact("second")
    assert ended(server) == 0


def test_a_reply_under_a_lock_never_released_is_reported_and_left(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = peer(tmp_path, "server", "buf.txt", "complete", "--esc", "--keep-lock")
    result = run("client", "buf.txt", "r.txt", "-m", "hi", "--timeout", "2")
    assert result.returncode == filechat.EXIT_TIMEOUT
    error = result.stderr.decode()
    assert (f"a reply arrived in {tmp_path / 'r.txt'} but the lock server.lock was never "
            "released; the reply is left there") in error, error
    assert "withdrawn" not in error and "no other" not in error
    assert (tmp_path / "r.txt").read_bytes() == b"complete\x1b"
    assert ended(server, WAIT) == 0


@pytest.mark.parametrize("waiting", [[], ["--poll", "--poll-interval", "0.02"]],
                         ids=["events", "polling"])
def test_a_message_with_no_lock_in_place_is_answered(server, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                     waiting: List[str]) -> None:
    # As a spec client interrupted after sending leaves it: it removes its lock.
    srv = server("--auto-reply", "ok", *waiting)
    client = peer(tmp_path, "client", "buf.txt", "r.txt", "hi", "--no-lock")
    assert ended(client) == 0
    assert printed(client).endswith("Server response:\nok\n")
    served(srv)


class _Idle(Exception):
    """Ends a serve() that has waited long enough."""


def test_a_polling_server_reads_the_buffer_only_while_a_lock_is_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With no lock, no client's message can be on its way: reading the buffer
    # at every poll would cost a file server several requests for nothing.
    buffer = str(tmp_path / "buf.txt")
    reads: List[float] = []
    real_open = os.open

    def counting_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path) == buffer and not flags & (os.O_WRONLY | os.O_RDWR):
            reads.append(time.monotonic())
        return real_open(path, flags, *args, **kwargs)

    idle: List[float] = []

    def report(event: str, **info: object) -> None:
        if event == "idle":
            idle.append(time.monotonic())
            if len(idle) == 60:
                raise _Idle
    monkeypatch.setattr(os, "open", counting_open)
    with pytest.raises(_Idle):
        filechat.serve(buffer, lambda request: "", poll=True, poll_interval=0.01, report=report)
    # A read for a message and one by the once-a-second look at the buffer, at
    # the start and again each second, and two as the server stops and removes
    # it; reading at every poll, it would be over 60.
    seconds = (idle[-1] - reads[0]) // filechat.PRESENCE_INTERVAL
    assert len(reads) <= 2 * (1 + seconds) + 2, (len(reads), seconds)


def test_a_server_woken_by_events_looks_at_its_presence_file_only_when_it_may_have_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every exchange wakes the server several times; looking at its presence
    # file (and at the buffer being there) at each wake cost a local exchange
    # about 12 of the server's 71 system calls (bench.py).
    buffer = str(tmp_path / "buf.txt")
    presence = buffer + filechat.PRESENCE_SUFFIX
    looks: List[float] = []
    real_open = os.open

    def counting_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if (os.fspath(path) == presence and not flags & (os.O_WRONLY | os.O_RDWR)
                and threading.current_thread().name == "server"):
            looks.append(time.monotonic())
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    server = threading.Thread(target=filechat.serve, name="server", daemon=True,
                              args=(buffer, lambda request: request.message.upper()),
                              kwargs={"max_messages": 40, "poll": False})
    began = time.monotonic()
    server.start()
    for n in range(40):
        assert filechat.send(buffer, f"m{n}", timeout=WAIT, poll=False) == f"M{n}"
    server.join(WAIT)
    assert not server.is_alive()
    # One look at the start, and the net's once a second; looking at each
    # wake, it made 67 here.
    seconds = (time.monotonic() - began) // filechat.PRESENCE_INTERVAL
    assert len(looks) <= 2 + seconds, (len(looks), seconds)


@pytest.mark.parametrize("links", [True, False])
def test_a_buffer_name_that_leads_to_a_file_gone_is_claimed_through_a_link(
        links: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GlusterFS's default mount, about once in 150 rounds of 12 clients, kept
    # leading the buffer's name to the file a client's rename had replaced:
    # every read through the name failed with ENOENT until the client gave up,
    # while a hard link made to a new name read the message. Here every read of
    # a file opened by the buffer's name fails so, on a mount that caches names.
    buffer = str(tmp_path / "buf.txt")
    (tmp_path / "server.lock").write_text("")                # its client's, a spec peer's
    Path(buffer).write_bytes(filechat.encode_request(str(tmp_path / "r.txt"), "hello"))
    real_framed = filechat._framed

    def stale(fd: int, limit: int, size: int) -> Any:
        if os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath(buffer):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return real_framed(fd, limit, size)
    idle: List[float] = []
    said: List[str] = []

    def report(event: str, **info: object) -> None:
        said.append(event)
        if event == "idle":
            idle.append(time.monotonic())
            if len(idle) == 300:                                # 3 s: never answered
                raise _Idle
    monkeypatch.setattr(filechat, "_framed", stale)
    monkeypatch.setattr(filechat, "_names_cached", lambda path: True)
    if not links:                  # a filesystem without hard links: looked at again, as before
        def refused(*args: Any, **kwargs: Any) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", refused)
        with pytest.raises(_Idle):
            filechat.serve(buffer, lambda request: "", poll=True, poll_interval=0.01,
                           report=report)
        assert sorted(path.name for path in tmp_path.iterdir()) == ["buf.txt", "server.lock"]
        assert set(said) == {"ready", "idle"}        # no error said, nor a note to the client
        return
    filechat.serve(buffer, lambda request: request.message.upper(), max_messages=1, poll=True,
                   poll_interval=0.01, report=report)
    assert (tmp_path / "r.txt").read_bytes() == filechat.encode_reply("HELLO")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r.txt"]   # no link left
