"""Fault injection: processes killed at every step of the protocol.

FILECHAT_CRASH_AT names the step at which a filechat process kills itself
(os._exit, as abrupt as kill -9: no cleanup runs). After each crash the next
client must be served within 3 s, every message must be answered once or
reported as failed to its sender, and no reply may reach another client.
"""

import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import SAFETY_NET, Gate, ended, interrupt, kill, leftovers, printed, reply, spawn

import filechat

NEXT = ("--timeout", "3", "--lock-timeout", "3")     # "served within 3 s"


def received(server_output: str, message: str) -> int:
    """How many times the server showed message as received."""
    return server_output.count(f"============================================================\n"
                               f"{message}\n")


@pytest.mark.parametrize("step", ["client-locked", "mid-write", "client-sent", "client-waiting"])
def test_client_killed_at_each_step(step: str, server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply-cmd", "cat")
    crashed = run("client", "buf.txt", "-m", "A", env={"FILECHAT_CRASH_AT": step})
    assert crashed.returncode == 137
    assert crashed.stdout == b""
    nxt = run("client", "buf.txt", "-m", "B", *NEXT)
    assert nxt.returncode == 0, nxt.stderr
    assert nxt.stdout == b"B"                       # its own reply, not A's
    assert interrupt(srv) == 0
    assert received(printed(srv), "A") <= 1
    assert received(printed(srv), "B") == 1
    assert leftovers(tmp_path) == []                # no orphan reply, temp file or lock
    assert list(tmp_path.iterdir()) == []


def test_client_killed_while_waiting_for_the_lock(start, server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lock = tmp_path / "server.lock"
    lock.write_text("")                             # held by a spec-following client
    srv = server("--auto-reply-cmd", "cat")
    waiting = start("client", "buf.txt", "-m", "A")
    waiting.expect_exact("Server busy, please wait...")
    waiting.kill(signal.SIGKILL)
    assert ended(waiting) == -signal.SIGKILL
    lock.unlink()                                   # its holder is done
    nxt = run("client", "buf.txt", "-m", "B", *NEXT)
    assert nxt.stdout == b"B"
    assert interrupt(srv) == 0, printed(srv)
    assert received(printed(srv), "A") == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("step", ["server-taken", "server-hook", "server-replied"])
def test_server_killed_at_each_step(step: str, start, server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = server("--auto-reply-cmd", "cat", env={"FILECHAT_CRASH_AT": step})
    client = start("client", "buf.txt", "-m", "A", "--timeout", "20")
    assert ended(first) == 137
    if step != "server-replied":
        client.expect_exact("The server stopped; waiting for it to restart...")
    second = server("--auto-reply-cmd", "cat")
    assert ended(client) == 0, printed(client)
    assert reply(client) == "A"                        # answered, once
    nxt = run("client", "buf.txt", "-m", "B", *NEXT)
    assert nxt.stdout == b"B"
    assert interrupt(second) == 0
    # The restarted server answers a message it finds unanswered, and never
    # one that was answered before the crash.
    before, after = printed(first), printed(second)
    assert received(before + after, "A") == (1 if step == "server-replied" else 1 + (
        received(before, "A")))
    assert received(printed(second), "A") == (0 if step == "server-replied" else 1)
    assert received(printed(second), "B") == 1
    assert list(tmp_path.iterdir()) == []


def test_client_told_when_the_server_stops_then_times_out(start, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply-cmd", "sleep 30", "--hook-timeout", "60")
    client = start("client", "buf.txt", "-m", "A", "--timeout", "2")
    srv.expect_exact("Message received")                  # and the hook runs
    srv.kill(signal.SIGTERM)
    assert ended(srv) == 0
    client.expect_exact("The server stopped; waiting for it to restart...")
    assert ended(client) == 3
    assert ("no filechat server was running on buf.txt, and no other read the message; it was "
            "withdrawn") in printed(client)
    assert list(tmp_path.iterdir()) == []            # nothing wedges the next client


def test_reply_taken_back_when_its_client_gave_up_meanwhile(start, server, gate: Gate,  # type: ignore[no-untyped-def]
                                                            tmp_path: Path) -> None:
    srv = server("--auto-reply-cmd", gate.hook("cat"), "--hook-timeout", "60")
    client = start("client", "buf.txt", "-m", "A", "--timeout", "1")
    srv.expect_exact("Message received")                  # and the hook waits to be let go
    assert ended(client) == 3                       # gave up waiting...
    assert (tmp_path / "server.lock").exists()      # ...its lock left to the server answering
    gate.open()
    srv.expect_exact("the client for")                    # replied, saw it gone, took it back
    assert "has gone" in printed(srv)
    srv.expect_exact("Lockfile removed. Ready for next client.")    # the claim is gone by then
    assert interrupt(srv) == 0
    assert leftovers(tmp_path) == []                # no reply left for nobody


def test_client_without_server_says_so_and_waits(start, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = start("client", "buf.txt", "-m", "early", "--timeout", "20")
    client.expect_exact("No filechat server is running on buf.txt; waiting for a server to "
                        "answer...")
    server("--auto-reply", "late but here")
    assert ended(client) == 0
    assert reply(client) == "late but here"


def test_second_server_on_the_same_buffer_is_refused(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = server("--auto-reply", "x")
    result = run("server", "buf.txt", "--auto-reply", "y")
    assert result.returncode == 1
    assert f"process {first.pid}" in result.stderr.decode()
    assert "already serves this buffer" in result.stderr.decode()
    assert run("client", "buf.txt", "-m", "hi").stdout == b"x"


def test_killed_server_leaves_no_obstacle(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = server("--auto-reply", "x")
    first.kill(signal.SIGKILL)
    ended(first)
    assert (tmp_path / "buf.txt.server").exists()   # stale: its flock died with it
    server("--auto-reply", "restarted")
    assert run("client", "buf.txt", "-m", "hi").stdout == b"restarted"


def test_sigterm_stops_the_server_like_ctrl_c(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "x")
    srv.kill(signal.SIGTERM)
    assert ended(srv) == 0
    assert "Server stopped." in printed(srv)
    assert os.listdir(tmp_path) == []


def test_many_waiters_on_one_stale_lock_break_it_once(  # type: ignore[no-untyped-def]
        holder, start, server, tmp_path: Path) -> None:
    clients = [start("client", "buf.txt", "-m", f"c{n}", *NEXT) for n in range(8)]
    for client in clients:
        client.expect_exact("Server busy, please wait...")
    kill(holder)
    srv = server("--auto-reply-cmd", "cat")
    for n, client in enumerate(clients):
        assert ended(client) == 0, printed(client)
        assert reply(client) == f"c{n}"
    assert interrupt(srv) == 0
    outputs = printed(srv) + "".join(printed(client) for client in clients)
    assert outputs.count("removed stale lock") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_reply_its_client_died_before_reading_is_removed(holder, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "for nobody", "-v")
    response = tmp_path / "r.txt"
    # The holder's request: put in place while it holds the lock, as its client would.
    (tmp_path / "buf.txt").write_bytes(filechat.encode_request(str(response), "hi"))
    srv.expect_exact("Lockfile removed. Ready for next client.")    # delivered to a live client
    assert response.exists()
    kill(holder)                        # before reading it: its death wakes the server
    srv.expect_exact("removed the reply")
    assert not response.exists()
    assert interrupt(srv) == 0
    assert SAFETY_NET not in printed(srv)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_stops_a_server_started_with_sigint_ignored(pyz: Path, tmp_path: Path) -> None:
    # What a shell script's background job inherits.
    srv = spawn([sys.executable, str(pyz), "server", "buf.txt", "--auto-reply", "x"], tmp_path,
                preexec=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    srv.expect_exact("Waiting for clients...")
    assert interrupt(srv) == 0
    assert "Server stopped." in printed(srv)
    assert os.listdir(tmp_path) == []
