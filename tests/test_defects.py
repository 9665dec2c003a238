"""Defects found by attacking filechat and running it beside other implementations.

One test per defect, named for what must hold; each failed before its fix.
"""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from conftest import (
    ROOT,
    WAIT,
    Gate,
    ended,
    hold_lock,
    interrupt,
    kill,
    leftovers,
    printed,
    release,
    reply,
)

import filechat

PEER = str(Path(__file__).with_name("spec_peer.py"))


# --- Files that are not what they should be ---

def test_an_empty_presence_file_is_not_a_running_server(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "buf.txt.server").write_bytes(b"")          # what a power loss leaves
    os.utime(tmp_path / "buf.txt.server", (time.time() - 60,) * 2)
    state = json.loads(run("status", "buf.txt", "--json").stdout)
    assert state["server"] is None
    server("--auto-reply", "started anyway")
    assert run("client", "buf.txt", "-m", "hi").stdout == b"started anyway"


def test_a_truncated_presence_file_is_not_a_running_server(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "buf.txt.server").write_bytes(b'{"pid": 12')
    os.utime(tmp_path / "buf.txt.server", (time.time() - 60,) * 2)
    assert run("status", "buf.txt").returncode == filechat.EXIT_NO_SERVER
    server("--auto-reply", "started anyway")


def test_an_empty_ticket_does_not_block_the_line(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "served")
    line = tmp_path / "server.lock.line"
    line.mkdir()
    ticket = line / f"{time.time_ns():020d}-1"
    ticket.write_bytes(b"")
    os.utime(ticket, (time.time() - 60,) * 2)
    result = run("client", "buf.txt", "-m", "hi", "--lock-timeout", "5")
    assert (result.returncode, result.stdout) == (0, b"served"), result.stderr
    assert not line.exists()


def test_a_lock_dated_in_the_future_still_grows_stale(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lock = tmp_path / "server.lock"
    lock.write_bytes(b"")
    os.utime(lock, (time.time() + 3600,) * 2)
    state = json.loads(run("status", "buf.txt", "--json").stdout)
    assert 0 <= state["lock"]["age"] < WAIT          # neither -3600 s nor 3600 s
    result = run("client", "buf.txt", "-m", "hi", "--stale-after", "0.5", "--timeout", "0.5")
    assert "removed stale lock" in result.stderr.decode()
    assert result.returncode == filechat.EXIT_TIMEOUT      # taken; no server to answer


@pytest.mark.parametrize("what", ["buffer", "lock"])
def test_the_response_path_cannot_be_a_protocol_file(what: str, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    response = "buf.txt" if what == "buffer" else "server.lock"
    result = run("client", "buf.txt", response, "-m", "hi", "--timeout", "5")
    assert result.returncode == filechat.EXIT_USAGE, result.stderr
    assert f"response file {response} is the {what}" in result.stderr.decode()
    assert list(tmp_path.iterdir()) == []


def test_a_buffer_named_like_the_lock_is_refused(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for command in (["client", "server.lock", "-m", "hi"], ["server", "server.lock"]):
        result = run(*command, timeout=10)
        assert result.returncode == filechat.EXIT_USAGE, result.stderr
        assert "buffer file server.lock is the lock file" in result.stderr.decode()
    assert list(tmp_path.iterdir()) == []


def test_a_file_name_too_long_is_named(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    long = "r" * 300 + ".txt"
    result = run("client", "buf.txt", long, "-m", "hi", "--timeout", "5")
    assert result.returncode == filechat.EXIT_USAGE
    assert long in result.stderr.decode() and "too long" in result.stderr.decode()
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("responder", [lambda request: None, lambda request: b"bytes"])
def test_a_responder_that_returns_no_text_gets_an_error_reply(responder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    buffer = str(tmp_path / "buf.txt")
    server = threading.Thread(target=filechat.serve, args=(buffer, responder),
                              kwargs=dict(max_messages=1), daemon=True)
    server.start()
    with pytest.raises(filechat.ServerError, match="the responder returned"):
        filechat.send(buffer, "hi", timeout=WAIT)
    server.join(WAIT)


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_a_strange_file_at_the_response_path_is_refused_and_the_server_goes_on(  # type: ignore[no-untyped-def]
        kind: str, server, run, tmp_path: Path) -> None:
    srv = server("--auto-reply", "ok")
    # A spec client names the path; the thing appears there after the client's checks.
    target = tmp_path / "r.txt"
    make = {"fifo": lambda: os.mkfifo(target), "directory": target.mkdir,
            "symlink": lambda: target.symlink_to(tmp_path / "elsewhere")}[kind]
    make()
    peer = subprocess.run([sys.executable, PEER, "client", "buf.txt", str(target), "hi",
                           "--send-only"], cwd=tmp_path, capture_output=True, timeout=WAIT)
    assert peer.stdout == b"Message sent to server.\n", peer.stderr
    srv.expect_exact("the client was told")
    assert run("client", "buf.txt", "-m", "still serving").stdout == b"ok"


def test_a_fifo_at_the_lock_is_named_at_once_and_served_once_it_is_gone(  # type: ignore[no-untyped-def]
        server, start, run, tmp_path: Path) -> None:
    server("--auto-reply", "ok")
    os.mkfifo(tmp_path / "server.lock")
    status = run("status", "buf.txt", "--json", timeout=10)
    assert json.loads(status.stdout)["lock"] == {
        "path": "server.lock", "held": False, "pid": None, "host": None, "age": None,
        "state": "not a lock file: a FIFO", "stale_reason": None}
    client = start("client", "buf.txt", "-m", "hi", "--lock-timeout", "20")
    client.expect_exact("server.lock is a FIFO, not a lock file: no client makes one (it is "
                        "created with O_CREAT|O_EXCL); remove it, and this client goes on")
    os.unlink(tmp_path / "server.lock")
    assert ended(client) == 0 and reply(client) == "ok"


@pytest.mark.parametrize("make", [os.mkdir, os.mkfifo], ids=["directory", "fifo"])
def test_what_is_not_a_ticket_in_the_line_is_ignored(make, holder, server, start,  # type: ignore[no-untyped-def]
                                                      tmp_path: Path) -> None:
    server("--auto-reply", "ok")
    (tmp_path / "server.lock.line").mkdir()
    make(str(tmp_path / "server.lock.line" / f"{1:020d}-1"))      # named as the first ticket
    client = start("client", "buf.txt", "-m", "hi")
    client.expect_exact("Server busy, please wait... (1 ahead of you)")
    release(holder)
    assert ended(client) == 0 and reply(client) == "ok", printed(client)


# --- Exceptions in a long-lived process ---

def test_an_exception_just_after_joining_the_line_leaves_no_ticket(holder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    buffer = str(tmp_path / "buf.txt")

    def status(event: str, **info: object) -> None:
        if event == "queued":
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        filechat.send(buffer, "hi", status=status)
    assert not (tmp_path / "server.lock.line").exists()


def test_an_exception_after_the_reply_leaks_no_file_or_descriptor(tmp_path: Path) -> None:
    buffer = str(tmp_path / "buf.txt")
    server = threading.Thread(target=filechat.serve, daemon=True, kwargs=dict(
        buffer=buffer, responder=lambda request: "ok", max_messages=20))
    server.start()

    def status(event: str, **info: object) -> None:
        if event == "received":
            raise RuntimeError("the caller's own failure")
    filechat.send(buffer, "warm up", timeout=WAIT)   # the waiter's descriptors, made once
    before = len(os.listdir("/proc/self/fd"))
    for n in range(19):
        with pytest.raises(RuntimeError):
            filechat.send(buffer, f"m{n}", str(tmp_path / f"r{n}.txt"), status=status,
                          timeout=WAIT)
    server.join(WAIT)
    assert leftovers(tmp_path) == []
    assert not any(p.name.startswith("r") for p in tmp_path.iterdir())
    assert len(os.listdir("/proc/self/fd")) <= before + 1


@pytest.mark.parametrize("start_daemon", ["setsid sleep 60", "sleep 60"])
def test_a_hook_that_leaves_a_daemon_behind_is_answered_once_it_has_ended(  # type: ignore[no-untyped-def]
        start_daemon: str, server, run, tmp_path: Path) -> None:
    # The daemon keeps the hook's stdout open; the hook itself ends at once.
    srv = server("--auto-reply-cmd", f"{start_daemon} & echo $! >> daemons; echo started",
                 "--hook-timeout", "60")
    try:
        result = run("client", "buf.txt", "-m", "hi", "--timeout", "10")
        assert (result.returncode, result.stdout) == (0, b"started\n"), result.stderr
        assert run("client", "buf.txt", "-m", "again", "--timeout", "10").returncode == 0
    finally:
        for pid in (tmp_path / "daemons").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
    assert interrupt(srv) == 0


def test_a_hook_past_its_timeout_is_stopped_whatever_its_daemon_holds(  # type: ignore[no-untyped-def]
        server, run, tmp_path: Path) -> None:
    server("--auto-reply-cmd", "setsid sleep 60 & echo $! > daemons; sleep 30",
           "--hook-timeout", "1")
    try:
        result = run("client", "buf.txt", "-m", "hi", "--timeout", "10")
        assert result.returncode == filechat.EXIT_ERROR, result.stderr
        assert "ran longer than 1 s and was stopped" in result.stderr.decode()
    finally:
        os.kill(int((tmp_path / "daemons").read_text()), signal.SIGKILL)


# --- A server keeps serving through secondary failures ---

def test_a_server_whose_output_reader_went_away_serves_on(pyz: Path, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = subprocess.Popen([sys.executable, str(pyz), "server", "buf.txt", "--auto-reply",
                               "still here"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert server.stdout is not None and server.stderr is not None
    assert server.stdout.readline() == b"Server starting...\n"
    server.stdout.close()                       # as `filechat server ... | head -1` does
    try:
        for n in range(3):
            assert run("client", "buf.txt", "-m", f"m{n}").stdout == b"still here"
        assert server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(WAIT) == 0
    assert b"cannot write to standard output" in server.stderr.read()


def test_a_log_that_cannot_be_written_is_said_and_serving_goes_on(server, run) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "ok", "--log", "/dev/full")
    for n in range(2):
        assert run("client", "buf.txt", "-m", f"m{n}").stdout == b"ok"
    srv.expect_exact("cannot write --log /dev/full (No space left on device)")
    assert interrupt(srv) == 0
    assert printed(srv).count("cannot write --log") == 1


def test_a_presence_count_that_cannot_be_updated_is_said_and_serving_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    buffer = str(tmp_path / "buf.txt")
    failing, failed, updated = threading.Event(), threading.Event(), threading.Event()
    failing.set()                               # the disk full, for a while
    write = os.write

    def flaky(fd: int, data: bytes) -> int:        # a write to the presence file fails
        try:
            held, named = os.fstat(fd), os.stat(f"{buffer}.server")
            presence = (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
        except OSError:
            presence = False
        if presence and failing.is_set():
            failed.set()
            raise OSError(28, "No space left on device")
        written = write(fd, data)
        if presence:
            updated.set()
        return written
    monkeypatch.setattr(os, "write", flaky)
    server = threading.Thread(target=filechat.serve, daemon=True, kwargs=dict(
        buffer=buffer, responder=lambda request: "ok", max_messages=3))
    server.start()
    assert filechat.send(buffer, "m0", timeout=WAIT) == "ok"
    assert failed.wait(WAIT)
    assert filechat.send(buffer, "m1", timeout=WAIT) == "ok"      # it serves on
    failing.clear()
    assert updated.wait(WAIT)
    assert filechat.status(buffer)["server"]["answered"] == 2     # type: ignore[index]
    assert filechat.send(buffer, "m2", timeout=WAIT) == "ok"
    server.join(WAIT)
    assert not server.is_alive()
    assert [r.getMessage() for r in caplog.records].count(
        f"cannot update {buffer}.server (No space left on device); status shows an old count "
        "until it can be") == 1


def _small_disk() -> None:
    """In the server's process: files may grow to 4 KiB only, as on a nearly full disk."""
    import resource
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past it fails, with EFBIG


def test_a_reply_that_cannot_be_written_is_told_to_the_client_at_once(  # type: ignore[no-untyped-def]
        pyz: Path, run, tmp_path: Path) -> None:
    server = subprocess.Popen([sys.executable, str(pyz), "server", "buf.txt",
                               "--auto-reply-cmd", "cat"], cwd=tmp_path, preexec_fn=_small_disk,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        result = run("client", "buf.txt", "r.txt", "-m", "x" * 8000, "--timeout", "60")
        assert result.returncode == filechat.EXIT_USAGE, result.stderr
        assert ("the server could not write the reply to " + str(tmp_path / "r.txt") +
                ": File too large") in result.stderr.decode()
        assert run("client", "buf.txt", "-m", "small").stdout == b"small"   # it serves on
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(WAIT)
    assert not (tmp_path / "r.txt").exists()


def ended_clients_reply_name(run, tmp_path: Path) -> Tuple[str, str]:  # type: ignore[no-untyped-def]
    """The default response file name of a client that has ended, and its host's tag.

    The client, run elsewhere, finds no server and says in its --json record
    which response file it would have used: filechat-reply-HOST-PID-RANDOM.txt.
    """
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    done = run("client", "buf.txt", "-m", "hi", "--server-timeout", "0", "--json", cwd=elsewhere)
    assert done.returncode == filechat.EXIT_NO_SERVER, done.stderr
    name = os.path.basename(json.loads(done.stdout)["response_path"])
    found = re.fullmatch(r"filechat-reply-([0-9a-f]{8})-(\d+)-[0-9a-f]{8}\.txt", name)
    assert found is not None, name
    return name, found[1]


def test_replies_nobody_read_are_swept_when_a_server_starts(start, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    old = tmp_path / "filechat-reply-4242-0badcafe.txt"          # named before names said whose
    fresh = tmp_path / "filechat-reply-4243-0badcafe.txt"
    name, host = ended_clients_reply_name(run, tmp_path)
    ended = tmp_path / name
    live = tmp_path / f"filechat-reply-{host}-{os.getpid()}-0badcafe.txt"
    elsewhere = tmp_path / "filechat-reply-0badf00d-4244-0badcafe.txt"     # another host's
    mine = tmp_path / "filechat-reply-notes.txt"          # a user's file, not a reply
    for path in (old, fresh, ended, live, elsewhere):
        path.write_bytes(b"an orphan reply\x1b")
    mine.write_bytes(b"keep me")
    for path in (old, mine):
        os.utime(path, (time.time() - 3600,) * 2)
    srv = start("server", "buf.txt", "--auto-reply", "ok")
    srv.expect_exact("removed the reply")         # the two, in the order they are listed...
    srv.expect_exact("removed the reply")
    srv.expect_exact("Waiting for clients...")    # ...before it is ready
    assert f"removed the reply {old}: nobody read it for over 300 s" in printed(srv)
    assert f"removed the reply {ended}: its client, process" in printed(srv)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("filechat-reply")) \
        == sorted(p.name for p in (fresh, live, elsewhere, mine))


def test_a_live_process_s_temp_files_are_never_swept(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Whatever was judged of a file it held: a holder may have let go of it and
    # gone on to its next exchange, whose pending request is such a file.
    name, host = ended_clients_reply_name(run, tmp_path)
    dead = name.split("-")[3]
    mine = tmp_path / f".buf.txt.{host}.{os.getpid()}.0badf00d.tmp"
    theirs = tmp_path / f".buf.txt.{host}.{dead}.0badf00d.tmp"
    mine.write_bytes(b"a pending request")
    theirs.write_bytes(b"a killed writer's")
    assert interrupt(server("--auto-reply", "ok")) == 0      # it sweeps as it starts and stops
    assert os.listdir(tmp_path) == [mine.name]


def test_a_running_server_sweeps_the_reply_of_a_client_that_ended(  # type: ignore[no-untyped-def]
        server, run, tmp_path: Path) -> None:
    # Its sweeps come once a minute: this test waits for the first.
    srv = server("--auto-reply", "ok")
    orphan = tmp_path / ended_clients_reply_name(run, tmp_path)[0]
    orphan.write_bytes(b"a reply its client never read\x1b")
    srv.expect_exact(f"removed the reply {orphan}: its client, process", timeout=80)
    assert not orphan.exists()
    assert interrupt(srv) == 0


def test_a_server_stopped_at_any_moment_leaves_nothing(start, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for n in range(20):
        srv = start("server", "buf.txt", "--auto-reply", "ok")
        srv.expect_exact("Waiting for clients...")
        assert run("client", "buf.txt", "-m", "hi").stdout == b"ok"
        # Just after an exchange: the count in the presence file is being updated.
        assert interrupt(srv) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == [], n


def test_a_reply_is_delivered_to_a_live_client_whose_lock_another_removed(  # type: ignore[no-untyped-def]
        server, start, gate: Gate, tmp_path: Path) -> None:
    srv = server("--auto-reply-cmd", gate.hook("echo answered"))
    client = start("client", "buf.txt", "-m", "hi")
    srv.expect_exact("Message received from client")
    (tmp_path / "server.lock").unlink()         # a buggy peer
    gate.open()
    assert ended(client) == 0
    assert reply(client) == "answered\n"


# --- Locks being answered, and spec-following peers ---

def _spec_client(tmp_path: Path, message: str) -> "subprocess.Popen[bytes]":
    """A client written from the spec alone: an empty lock, no ticket, no flock."""
    return subprocess.Popen([sys.executable, PEER, "client", "buf.txt", "peer.txt", message],
                            cwd=tmp_path, stdout=subprocess.PIPE)


def test_a_lock_being_answered_is_never_stale(server, start, run, gate: Gate,  # type: ignore[no-untyped-def]
                                              tmp_path: Path) -> None:
    srv = server("--auto-reply-cmd", gate.hook("echo answered"))
    peer = _spec_client(tmp_path, "from the peer")
    srv.expect_exact("Message received from client")
    os.utime(tmp_path / "server.lock", (time.time() - 100,) * 2)    # answered for a long time
    state = json.loads(run("status", "buf.txt", "--json", "--stale-after", "1").stdout)
    assert (state["lock"]["state"], state["lock"]["stale_reason"]) == ("being answered", None)
    waiter = start("client", "buf.txt", "-m", "after the peer", "--stale-after", "1")
    waiter.expect_exact("Server busy, please wait... (1 ahead of you)")
    gate.open()
    assert peer.wait(WAIT) == 0
    assert peer.stdout is not None and b"answered" in peer.stdout.read()
    assert ended(waiter) == 0 and reply(waiter) == "answered\n"
    assert "removed stale lock" not in printed(waiter)


def test_a_file_a_stranger_makes_at_the_response_path_is_never_taken_for_the_reply(  # type: ignore[no-untyped-def]
        start, server, tmp_path: Path) -> None:
    client = start("client", "buf.txt", "r.txt", "-m", "hi")
    client.expect_exact("No filechat server is running")
    (tmp_path / "r.txt").write_bytes(b"forged\x1b")     # another program, meanwhile
    srv = server("--auto-reply", "real")
    srv.expect_exact("the client was told")
    assert ended(client) == filechat.EXIT_USAGE
    assert reply(client) == ""
    assert "the file already exists, and the server never overwrites a file" in printed(client)
    assert (tmp_path / "r.txt").read_bytes() == b"forged\x1b"       # not the client's to remove


def test_two_clients_given_one_response_path_never_get_each_others_reply(  # type: ignore[no-untyped-def]
        server, start, gate: Gate, tmp_path: Path) -> None:
    srv = server("--auto-reply-cmd", gate.hook("cat"))
    first = start("client", "buf.txt", "r.txt", "-m", "from the first")
    srv.expect_exact("Message received from client")
    second = start("client", "buf.txt", "r.txt", "-m", "from the second")
    second.expect_exact("Server busy, please wait...")
    first.kill(signal.SIGSTOP)             # slow to read its reply
    try:
        gate.open()
        assert ended(second) == filechat.EXIT_USAGE
        assert reply(second) == ""
        assert "appeared while this client waited for the lock" in printed(second)
    finally:
        first.kill(signal.SIGCONT)
    assert ended(first) == 0 and reply(first) == "from the first"
    assert "answered before a restart" not in printed(srv)


def _spec_server(tmp_path: Path, *options: str) -> "subprocess.Popen[bytes]":
    """A server written from the spec alone, polling at the spec's 0.5 s, for two messages."""
    peer = subprocess.Popen([sys.executable, PEER, "server", "buf.txt", "from the peer\n",
                             "--interval=0.5", "--count=2", *options], cwd=tmp_path,
                            stdout=subprocess.PIPE)
    assert peer.stdout is not None and peer.stdout.readline() == b"Waiting for clients...\n"
    return peer


def _shown(peer: "subprocess.Popen[bytes]", message: str) -> None:
    """Wait until the peer server has shown message (read it from the buffer)."""
    assert peer.stdout is not None
    for line in peer.stdout:
        if line.decode().strip() == message:
            return
    raise AssertionError(f"the peer server never showed {message!r}")


@pytest.mark.parametrize("quirk", ["", "--lock-first"])
@pytest.mark.parametrize("how", ["timeout", "interrupt"])
def test_a_client_giving_up_under_a_spec_server_leaves_it_the_message_and_the_lock(  # type: ignore[no-untyped-def]
        how: str, quirk: str, start, run, tmp_path: Path) -> None:
    peer = _spec_server(tmp_path, "--think=5", *[q for q in (quirk,) if q])
    # The peer looks every 0.5 s: it has read the message well before 2 s are up.
    first = start("client", "buf.txt", "-m", "first", "--timeout", "60" if how == "interrupt"
                  else "2")
    _shown(peer, "first")                # read: the peer's operator is typing its reply
    if how == "interrupt":
        first.expect_exact("Waiting for server response...")
        assert interrupt(first) == filechat.EXIT_INTERRUPTED
        assert ("a server that is not filechat had read the message; it and the lock are "
                "left to that server") in printed(first)
    else:
        assert ended(first) == filechat.EXIT_TIMEOUT
        assert "it and the lock are left to that server" in printed(first)
    assert (tmp_path / "server.lock").exists() and (tmp_path / "buf.txt").exists()
    if quirk:
        # A peer that removes the lock before it clears the buffer clears the
        # message of a client quick enough to take the lock in between (seen
        # once under load): its own race, which no client can prevent. The
        # next client starts once the peer is done with the first.
        assert peer.stdout is not None
        assert any(line.startswith(b"Response sent to: ") for line in peer.stdout)
    # The next client waits for the peer to finish with the first, then is answered.
    second = run("client", "buf.txt", "-m", "second", "--timeout", "30")
    assert (second.returncode, second.stdout) == (0, b"from the peer\n"), second.stderr
    assert peer.wait(WAIT) == 0


def test_with_no_server_at_all_a_timed_out_message_is_still_withdrawn(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run("client", "buf.txt", "-m", "anyone?", "--timeout", "0.5")
    assert result.returncode == filechat.EXIT_TIMEOUT
    assert ("no filechat server was running on buf.txt, and no other read the message; it was "
            "withdrawn") in result.stderr.decode()
    assert list(tmp_path.iterdir()) == []


def test_filechats_own_looks_at_the_buffer_are_not_a_peers_read(start, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = start("client", "buf.txt", "-m", "anyone?", "--timeout", "2")
    client.expect_exact("Waiting for server response...")
    state = json.loads(run("status", "buf.txt", "--json").stdout)    # reads the buffer
    assert state["message_waiting"]
    assert ended(client) == filechat.EXIT_TIMEOUT
    assert "no other read the message; it was withdrawn" in printed(client)
    assert list(tmp_path.iterdir()) == []


# --- A buffer replaced as it is claimed ---

Report = Tuple[str, Dict[str, object]]          # a server's report: its event and info


def _replaced_as_claimed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         then_gives_up: bool) -> Tuple[filechat.Paths, List[Report],
                                                       filechat.Lock, filechat.Lock]:
    """Serve one message: A's, which A withdraws and B replaces as the server claims it.

    The race is opened at the OS: once the server has read A's message, its
    read of the lock (A's) is followed by A withdrawing (the buffer unlinked,
    its lock released) and B sending (its lock taken, its request published),
    all before the server renames the buffer to its claim. Inside the rename
    itself would be too late: a lock made once the rename has begun is, for
    the server, another client's (see then_gives_up).

    then_gives_up: B also gives up just after the rename, removing its lock as
    a spec client does (a filechat client leaves it to the server), and C
    takes the lock. Returns the paths, the server's reports, B and C.
    """
    paths = filechat.Paths(str(tmp_path / "buf.txt"))
    a, b, c = (filechat.Lock(paths.lock) for _ in range(3))

    def send(lock: filechat.Lock, text: str) -> None:
        assert lock.try_acquire()
        filechat.publish(paths.buffer, filechat.encode_request(f"{text}.txt", text),
                         replace=True)
    send(a, "A")
    a_message, a_lock = os.stat(paths.buffer), os.stat(paths.lock)
    real_read, real_rename = os.read, os.rename
    seen: List[str] = []                  # "message", "race", "claimed": in that order

    def read(fd: int, size: int) -> bytes:
        data = real_read(fd, size)
        if "race" not in seen:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (a_message.st_dev, a_message.st_ino) and data:
                seen[:] = ["message"]
            elif (st.st_dev, st.st_ino) == (a_lock.st_dev, a_lock.st_ino) and seen:
                seen.append("race")       # the server read A's message, then A's lock...
                os.unlink(paths.buffer)   # ...then A withdraws and lets go, and B sends
                a.release()
                send(b, "B")
        return data

    def rename(source: str, target: str) -> None:
        real_rename(source, target)
        if target.startswith(paths.claim_prefix) and "claimed" not in seen:
            seen.append("claimed")
            if then_gives_up:
                b.release()
                assert c.try_acquire()
    monkeypatch.setattr(os, "read", read)         # filechat's os: the seam at the OS
    monkeypatch.setattr(os, "rename", rename)
    reports: List[Report] = []
    server = threading.Thread(target=filechat.serve, daemon=True, kwargs=dict(
        buffer=paths.buffer, responder=lambda request: f"for {request.message}",
        max_messages=1, report=lambda event, **info: reports.append((event, info))))
    server.start()
    server.join(WAIT)
    assert not server.is_alive(), reports
    assert seen == ["message", "race", "claimed"]          # the race was run as meant
    assert not (tmp_path / "A.txt").exists()               # A withdrew: nothing for it
    return paths, reports, b, c


def test_a_message_that_replaced_the_one_read_is_claimed_with_its_own_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The server read A's message and A's lock, then A gave up and B sent: it
    # claimed B's message with A's (gone) lock, resolved B's path as a spec
    # client's, and B, its lock never removed, waited out its timeout.
    _, reports, b, _ = _replaced_as_claimed(tmp_path, monkeypatch, then_gives_up=False)
    # B's lock removed by the server, which B waits for, and its reply where B
    # asked (relative to the buffer, as a filechat client's): B is served.
    assert sorted(os.listdir(tmp_path)) == ["B.txt"]
    assert filechat.parse_reply((tmp_path / "B.txt").read_bytes()) == ("for B\n", False)
    assert [info["reply"] for event, info in reports if event == "replied"] == ["for B\n"]
    b.close()


def test_a_replacing_message_whose_sender_gave_up_is_never_tied_to_the_next_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, reports, _, c = _replaced_as_claimed(tmp_path, monkeypatch, then_gives_up=True)
    # C's lock is never removed for B's message, which is its gone sender's:
    # discarded, with no reply to B.txt.
    assert sorted(os.listdir(tmp_path)) == ["server.lock"]
    assert filechat.token_at(paths.lock) == c.token
    assert [info["reason"] for event, info in reports if event == "discarded"] == [
        "the client for B.txt has gone"]
    c.release()


INTERRUPTED = str(Path(__file__).with_name("interrupted_sends.py"))


@pytest.mark.parametrize(("mode", "sends"), [("every-line", 1200), ("random", 2000)])
def test_an_interrupted_send_leaves_no_descriptor_or_temp_file(  # type: ignore[no-untyped-def]
        mode: str, sends: int, server, tmp_path: Path) -> None:
    # Every line of a whole exchange and more, or at random moments, as a
    # person pressing Ctrl+C would: every way out of send() closes what it
    # opened and removes its own temp files.
    server("--auto-reply", "ok")
    result = subprocess.run([sys.executable, INTERRUPTED, mode, str(tmp_path / "buf.txt"),
                             str(sends)], capture_output=True, timeout=240,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    summary = result.stdout.decode().splitlines()[-1].split()
    assert summary[-2:] == ["0", "leaks"], result.stdout.decode()[-3000:]
    assert int(summary[2]) > sends // 10           # it did interrupt them


@pytest.mark.parametrize("waiting", [[], ["--poll"]], ids=["events", "polling"])
def test_a_server_whose_directory_is_removed_says_so_and_stops(  # type: ignore[no-untyped-def]
        waiting: List[str], start, tmp_path: Path) -> None:
    (tmp_path / "gone").mkdir()
    srv = start("server", "gone/buf.txt", "--auto-reply", "ok", *waiting)
    srv.expect_exact("Waiting for clients...")
    subprocess.run(["rm", "-rf", str(tmp_path / "gone")], check=True)
    srv.expect_exact("filechat: error: directory gone was removed while this server ran; "
                     "make it again and start the server anew")
    assert ended(srv) == filechat.EXIT_ERROR
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("waiting", [[], ["--poll"]], ids=["events", "polling"])
def test_a_server_puts_back_its_presence_file_when_its_directory_is_made_anew(  # type: ignore[no-untyped-def]
        waiting: List[str], start, run, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    first = start("server", "shared/buf.txt", "--auto-reply", "first", *waiting)
    first.expect_exact("Waiting for clients...")
    subprocess.run(["rm", "-rf", str(shared)], check=True)
    shared.mkdir()
    first.expect_exact("shared/buf.txt.server was removed while this server ran; it is back")
    second = run("server", "shared/buf.txt", "--auto-reply", "second")
    assert second.returncode == filechat.EXIT_ERROR
    assert "already serves this buffer" in second.stderr.decode()
    assert run("client", "shared/buf.txt", "-m", "hi").stdout == b"first"
    assert (shared / "buf.txt").read_bytes() == b""          # for spec clients, again
    assert interrupt(first) == 0
    assert list(shared.iterdir()) == []


@pytest.mark.parametrize("waiting", [[], ["--poll"]], ids=["events", "polling"])
@pytest.mark.parametrize("removed", ["buf.txt.server", "buf.txt"])
def test_a_server_puts_back_its_presence_file_or_the_buffer_removed_alone(  # type: ignore[no-untyped-def]
        waiting: List[str], removed: str, server, run, tmp_path: Path) -> None:
    srv = server("--auto-reply", "ok", "--verbose", *waiting)
    (tmp_path / removed).unlink()
    if removed == "buf.txt.server":
        srv.expect_exact("buf.txt.server was removed while this server ran; it is back")
    else:
        srv.expect_exact("empty buffer buf.txt made")
    assert run("status", "buf.txt").returncode == 0
    assert (tmp_path / "buf.txt").read_bytes() == b""          # for spec clients
    assert run("client", "buf.txt", "-m", "hi").stdout == b"ok"
    assert interrupt(srv) == 0


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_client_ended_by_sigterm_or_sighup_withdraws_as_on_ctrl_c(  # type: ignore[no-untyped-def]
        signum: int, status: int, start, tmp_path: Path) -> None:
    client = start("client", "buf.txt", "-m", "hi", "--json")
    client.expect_exact("Waiting for server response...")
    client.kill(signum)
    assert ended(client) == status
    record = json.loads(reply(client))
    assert (record["outcome"], record["exit_status"]) == ("interrupted", status)
    assert record["error"].endswith("; the message was withdrawn")
    assert list(tmp_path.iterdir()) == []


def test_timeout_ending_a_waiting_client_leaves_no_ticket(holder, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ended = subprocess.run(["timeout", "1", sys.executable, str(ROOT / "filechat.py"), "client",
                            "buf.txt", "-m", "next"], cwd=tmp_path, capture_output=True,
                           timeout=WAIT)
    assert ended.returncode == 124                  # timeout's own status for a TERM it sent
    assert b"ended by SIGTERM; nothing was sent" in ended.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.lock"]   # the holder's


def test_a_client_never_waits_for_ever_behind_an_ended_client_s_message(  # type: ignore[no-untyped-def]
        start, server, tmp_path: Path) -> None:
    # A client killed (-9) after it sent: its lock and message stay, and no
    # server has taken the message. The next client withdraws it and goes on.
    dead = hold_lock(tmp_path)
    (tmp_path / "buf.txt").write_bytes(filechat.encode_request("gone.txt", "from the dead"))
    kill(dead)
    client = start("client", "buf.txt", "-m", "next", "--timeout", "20")
    client.expect_exact("withdrew the message in buf.txt, which no server took: the lock it came "
                        "with is stale (its holder, process")
    client.expect_exact("Waiting for server response...")
    server("--auto-reply", "answered")
    assert ended(client) == 0 and reply(client) == "answered"


def test_a_stale_name_is_nothing_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # NFS and GlusterFS answer ESTALE for a name another mount replaced, where a
    # local disk says ENOENT: the buffer's checks and the server's look for the
    # lock take both alike (ENOENT and ESTALE both mean gone).
    buffer = str(tmp_path / "buf.txt")
    real_lstat = os.lstat

    def stale_lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if os.fspath(path) == buffer:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), buffer)
        return real_lstat(path, *args, **kwargs)
    monkeypatch.setattr(os, "lstat", stale_lstat)
    filechat.check_buffer_path(buffer, str(tmp_path / "server.lock"))     # no error
