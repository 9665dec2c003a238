"""Long texts written and large files read in pieces; the ticket that becomes the lock."""

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest
from conftest import WAIT, Proc

import filechat
from filechat import (
    LARGE_FILE,
    PIECE,
    FramingError,
    Line,
    encode_reply,
    encode_request,
    parse_file,
    parse_reply,
    parse_request,
    read_if_ended,
    reply_pieces,
    request_pieces,
)

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


# Large files as both sides may find them: characters of 1 to 4 bytes across
# the pieces they are read in, ESC inside, bytes that are not UTF-8, no end yet.
BIG = LARGE_FILE + 10
LARGE_REPLIES = [
    encode_reply("y" * BIG), encode_reply("é" * BIG, error=True), encode_reply("€" * BIG),
    encode_reply("a🙂" * (BIG // 4)), b"z" * BIG, b"x" * BIG + b"\x1bmore\x1b\x1b",
    b"\xff\xfe" * BIG + b"\x1b", "é".encode() * BIG + b"\xc3\x1b",
]
LARGE_REQUESTS = [
    encode_request("/r.txt", "y" * BIG), encode_request("/é.txt", "€" * BIG),
    b"/r.txt\r\n" + ("a🙂" * (BIG // 4)).encode() + b"\x1b", b"/r.txt\n" + b"z" * BIG,
    b"/r.txt\n" + b"q" * BIG + b"\x1b\x1b", b"/r.txt\n" + b"\xff" * BIG + b"\x1b",
    b"no path" * BIG + b"\x1b", b"\n" + b"x" * BIG + b"\x1b", b"\x1b" + b"\n" * BIG,
]


def _parsed(parse, data: bytes):  # type: ignore[no-untyped-def]
    try:
        return parse(data)
    except ValueError:
        return ValueError


@pytest.mark.parametrize("data", LARGE_REPLIES, ids=range(len(LARGE_REPLIES)))
def test_a_large_reply_file_parses_as_its_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "reply"
    path.write_bytes(data)
    assert parse_file(str(path), parse_reply, filechat._parse_large_reply) == parse_reply(data)


@pytest.mark.parametrize("data", LARGE_REQUESTS, ids=range(len(LARGE_REQUESTS)))
def test_a_large_request_file_parses_as_its_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "buf.txt"
    path.write_bytes(data)
    large = filechat._parse_large_request
    assert (_parsed(lambda _: parse_file(str(path), parse_request, large), data)
            == _parsed(parse_request, data))


def test_parse_file_reads_a_small_file_whole(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.write_bytes(encode_reply("tiny", error=True))

    def never(fd: int) -> None:
        raise AssertionError("a small file is parsed from its bytes")

    assert parse_file(str(small), parse_reply, never) == ("tiny", True)
    assert parse_file(str(tmp_path / "absent"), parse_reply, never) is None


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


@pytest.mark.parametrize("message", LONG[2:], ids=range(3))
def test_a_message_file_and_a_reply_sink_survive_a_round_trip(
        big_echo: str, message: str, tmp_path: Path) -> None:
    source = tmp_path / "message.txt"
    source.write_bytes(message.encode())
    sink = io.StringIO()
    with open(source, "rb") as f:
        assert filechat.send(big_echo, f, timeout=WAIT, max_bytes=64 << 20,
                             reply_to=sink) == ""
    assert sink.getvalue() == message


@pytest.mark.parametrize("source", [["--message-file", "message.txt"], ["--message-file", "-"], []])
def test_the_cli_sends_a_large_file_and_prints_the_reply(
        big_echo: str, pyz: Path, tmp_path: Path, source: List[str]) -> None:
    data = ("mixed 世界 é\n" * (LARGE_FILE // 8)).encode()
    (tmp_path / "message.txt").write_bytes(data)
    client = [sys.executable, str(pyz), "client", big_echo, *source]
    result = subprocess.run([*client, "--max-bytes", str(64 << 20)], input=data, cwd=tmp_path,
                            capture_output=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data
    refused = subprocess.run([*client, "--max-bytes", str(LARGE_FILE)], input=data,
                             cwd=tmp_path, capture_output=True, timeout=WAIT)
    assert refused.returncode == 2
    named = source[-1:] == ["message.txt"]
    what = "message file message.txt is" if named else "message on stdin is"
    assert refused.stderr.decode().startswith(f"filechat: error: {what} ")
    assert f"over the limit of {LARGE_FILE}" in refused.stderr.decode()


def test_pieces_of_a_message_file_are_checked_across_their_joins(tmp_path: Path) -> None:
    # A character cut by the edge of a piece is whole text; ESC after many
    # pieces is refused before anything is sent.
    for text in ("é" * filechat.READ_SIZE, "€" * filechat.READ_SIZE, "a🙂" * 70000):
        data = text.encode()
        assert b"".join(filechat.file_request_pieces("/r", io.BytesIO(data), "m")) == \
            encode_request("/r", text)
    late_esc = io.BytesIO(b"x" * (3 * filechat.READ_SIZE) + b"\x1b")
    with pytest.raises(FramingError, match=r"^m contains the ESC character"):
        list(filechat.file_request_pieces("/r", late_esc, "m"))
    size = filechat.READ_SIZE
    for cut in ("é".encode() * size + b"\xc3",                  # cut at the very end
                b"x" * (size - 1) + b"\xc3" + b"x" * size):      # cut, then ASCII
        with pytest.raises(FramingError, match=r"^m is not valid UTF-8 text"):
            list(filechat.file_request_pieces("/r", io.BytesIO(cut), "m"))


@pytest.mark.parametrize("content, error", [
    (b"bad \x1b" + b"x" * (LARGE_FILE + 1), "contains the ESC character"),
    (b"x" * LARGE_FILE + b"\0", "contains a NUL byte"),
    (b"x" * LARGE_FILE + b"\xff", "is not valid UTF-8 text"),
    (b"x" * 1001, "is 1001 bytes, over the limit of 1000"),
])
def test_a_bad_message_file_is_named_and_leaves_nothing(
        tmp_path: Path, content: bytes, error: str) -> None:
    source = tmp_path / "in" / "message.txt"
    source.parent.mkdir()
    source.write_bytes(content)
    buffer = tmp_path / "chat" / "buf.txt"
    buffer.parent.mkdir()
    with open(source, "rb") as f, pytest.raises(FramingError) as raised:
        filechat.send(str(buffer), f, max_bytes=1000 if len(content) < 2000 else 64 << 20)
    assert str(raised.value) == f"message file {source} {raised.value.reason}"
    assert error in raised.value.reason
    assert list(buffer.parent.iterdir()) == []


def test_a_message_file_open_as_text_is_refused(tmp_path: Path) -> None:
    (tmp_path / "message.txt").write_text("hello")
    with open(tmp_path / "message.txt") as f, pytest.raises(filechat.UsageError,
                                                            match="open it in binary mode"):
        filechat.send(str(tmp_path / "buf.txt"), f)     # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["message.txt"]


def test_a_message_from_a_pipe_is_refused_once_it_grows_too_long(tmp_path: Path) -> None:
    read, write = os.pipe()
    os.write(write, b"x" * 3000)
    os.close(write)
    with open(read, "rb") as f, pytest.raises(FramingError, match=r"^message is over the limit"):
        filechat.send(str(tmp_path / "buf.txt"), f, max_bytes=1000)
    assert list(tmp_path.iterdir()) == []


def test_an_error_reply_is_raised_not_written(tmp_path: Path) -> None:
    buffer = str(tmp_path / "buf.txt")

    def failing(request: filechat.Request) -> str:
        raise filechat.HookError("the hook failed")

    server = threading.Thread(target=filechat.serve, args=(buffer, failing),
                              kwargs={"max_messages": 1}, daemon=True)
    server.start()
    sink = io.StringIO()
    with pytest.raises(filechat.ServerError, match="the hook failed"):
        filechat.send(buffer, io.BytesIO(b"hello"), timeout=WAIT, reply_to=sink)
    server.join(WAIT)
    assert sink.getvalue() == ""


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
