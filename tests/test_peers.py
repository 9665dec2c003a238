"""Beside programs written from the spec alone, each with the quirk of one seen in use.

tests/spec_peer.py plays them: one that reads the message format as drawn
(ESC on a line of its own), a client that opens the buffer without O_CREAT,
a server that removes the lock before it clears the buffer, and one that
never removes the lock.
"""

import json
import sys
from pathlib import Path
from typing import List

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
