"""Long texts written in pieces and parsed through a map; the ticket that becomes the lock."""

import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

import filechat
from conftest import WAIT, Proc
from filechat import (MAP_FROM, PIECE, FramingError, Line, encode_reply, encode_request,
                      parse_file, parse_reply, read_if_ended, reply_pieces, request_pieces)

ESC = "\x1b"
LONG = ["", "hi\n", "x" * (2 * PIECE + 5), "é" * (PIECE + 3), "mixed 世界\n" * (PIECE // 5)]


@pytest.mark.parametrize("message", LONG, ids=range(len(LONG)))
def test_request_pieces_join_to_the_request(message: str) -> None:
    pieces = list(request_pieces("/dir/r.txt", message))
    assert b"".join(pieces) == encode_request("/dir/r.txt", message)
    assert max(map(len, pieces)) <= 4 * PIECE + len(b"/dir/r.txt\n")


@pytest.mark.parametrize("text", LONG, ids=range(len(LONG)))
def test_reply_pieces_frame_as_encode_reply(text: str) -> None:
    assert b"".join(reply_pieces(text)) == encode_reply(text)


@pytest.mark.parametrize("bad", [ESC, "\0"])
def test_reply_pieces_refuse_a_long_text_at_once(bad: str) -> None:
    with pytest.raises(FramingError):
        reply_pieces("a" * (PIECE + 1) + bad)       # before anything is written


def test_parse_file_maps_a_large_file(tmp_path: Path) -> None:
    large, small = tmp_path / "large", tmp_path / "small"
    large.write_bytes(encode_reply("y" * (MAP_FROM + 10)))
    small.write_bytes(encode_reply("tiny", error=True))
    assert parse_file(str(large), parse_reply) == ("y" * (MAP_FROM + 10), False)
    assert parse_file(str(small), parse_reply) == ("tiny", True)
    assert parse_file(str(tmp_path / "absent"), parse_reply) is None


def test_read_if_ended_judges_a_large_file_by_its_end(tmp_path: Path) -> None:
    path = tmp_path / "buf.txt"
    path.write_bytes(encode_request("/r", "z" * (200 << 10)))
    assert read_if_ended(str(path), ESC.encode()) == (True, None)    # read once claimed
    path.write_bytes(b"/r\n" + b"z" * (200 << 10))                  # still being written
    assert read_if_ended(str(path), ESC.encode()) == (False, path.read_bytes())
    path.write_bytes(b"/r\nsmall\x1b")
    assert read_if_ended(str(path), ESC.encode()) == (True, b"/r\nsmall\x1b")
    assert read_if_ended(str(tmp_path / "absent"), ESC.encode()) == (False, None)


@pytest.fixture(scope="module")
def big_echo(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server that echoes messages of up to 64 MiB."""
    directory = tmp_path_factory.mktemp("big")
    proc = Proc([sys.executable, str(pyz), "server", "buf.txt", "--auto-reply-cmd", "cat",
                 "--max-bytes", str(64 << 20)], directory)
    proc.expect("Waiting for clients...")
    yield str(directory / "buf.txt")
    assert proc.interrupt() == 0


@pytest.mark.parametrize("message", LONG[2:], ids=range(3))
def test_long_messages_survive_a_round_trip(big_echo: str, message: str) -> None:
    assert filechat.send(big_echo, message, timeout=WAIT, max_bytes=64 << 20) == message


def test_a_message_over_max_bytes_says_its_size_and_leaves_nothing(tmp_path: Path) -> None:
    buffer = str(tmp_path / "buf.txt")
    with pytest.raises(FramingError, match="is 1200 bytes, over the limit of 1000"):
        filechat.send(buffer, "é" * 600, max_bytes=1000)         # 600 characters, 1200 bytes
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="hard links and flock")
def test_the_head_of_the_line_turns_its_ticket_into_the_lock(tmp_path: Path) -> None:
    lock = str(tmp_path / "server.lock")
    line = Line(lock)
    line.join()
    assert line.tickets() == [line.ticket] and line.ahead() == 0
    ticket = os.path.join(line.directory, str(line.ticket))
    ticket_inode = os.stat(ticket).st_ino
    (tmp_path / "server.lock").write_text("")         # a spec-following holder
    assert line.promote(lock, durable=False) == -1
    os.unlink(lock)
    fd = line.promote(lock, durable=False)
    assert fd is not None and fd >= 0
    assert os.fstat(fd).st_ino == os.stat(lock).st_ino == ticket_inode
    assert filechat.read_owner(Path(lock).read_bytes()) is not None   # names its holder
    assert not os.path.exists(line.directory)         # the last to leave removed it
    os.close(fd)
    os.unlink(lock)


@pytest.mark.skipif(sys.platform == "win32", reason="hard links and flock")
def test_a_ticket_is_linked_as_the_lock_where_it_cannot_be_renamed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filechat, "_rename_exclusive", lambda source, target: None)
    lock = str(tmp_path / "server.lock")
    line = Line(lock)
    line.join()
    ticket_inode = os.stat(os.path.join(line.directory, str(line.ticket))).st_ino
    fd = line.promote(lock, durable=False)
    assert fd is not None and fd >= 0
    assert os.stat(lock).st_ino == ticket_inode
    assert os.stat(lock).st_nlink == 1                 # the ticket's own name is gone
    assert not os.path.exists(line.directory)
    os.close(fd)
    os.unlink(lock)


def test_the_server_clears_a_dead_waiters_ticket_and_the_line(tmp_path: Path, server) -> None:  # type: ignore[no-untyped-def]
    line = tmp_path / "server.lock.line"
    line.mkdir()
    record = {"pid": 999999, "host": filechat.HOST, "token": "ab", "created": 1.0}
    (line / f"{1:020d}-999999").write_text(json.dumps(record) + "\n")   # nobody flocks it
    with filechat.Waiter([str(tmp_path)]) as waiter:       # watching before it can happen
        srv = server("--auto-reply", "ok")
        deadline = time.monotonic() + WAIT    # the server's chores run once a second
        while line.exists() and time.monotonic() < deadline:
            waiter.wait(deadline - time.monotonic(), {line.name})
    assert not line.exists()
    assert srv.interrupt() == 0


@pytest.mark.skipif(not filechat._O_TMPFILE, reason="unnamed files are Linux's")
def test_the_server_keeps_its_next_reply_file_ready(tmp_path: Path) -> None:
    home = tmp_path / "chat"
    home.mkdir()
    spares = filechat._Spares(str(home))
    try:
        spares.make()
        assert spares.take(str(tmp_path / "r.txt")) is None      # not where it was made
        spares.make()
        spare = spares.take(str(home / "r.txt"))
        assert spare is not None
        filechat.publish_new(str(home / "r.txt"), b"pong\x1b", unnamed=spare)
        assert (home / "r.txt").read_bytes() == b"pong\x1b"
        spares.make()
        home.rename(tmp_path / "old")                              # replaced while idle
        home.mkdir()
        assert spares.take(str(home / "s.txt")) is None
        assert list(home.iterdir()) == []
        assert [p.name for p in (tmp_path / "old").iterdir()] == ["r.txt"]
    finally:
        spares.close()
