"""Long messages and replies: read whole up to --max-bytes, and streamed to and from files."""

import io
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator, List

import pytest
from conftest import WAIT, interrupt, spawn

import filechat
from filechat import FramingError

ESC = "\x1b"
MAX_BYTES = 1 << 20       # bytes: the largest message a client sends by default
PIECE = 1 << 18           # bytes a streaming copy reads at a time (filechat's, today)
LONG = ["", "hi\n", "x" * (2 * PIECE + 5), "é" * (PIECE + 3), "mixed 世界\n" * (PIECE // 5)]
LARGE = MAX_BYTES         # over the default limit when a little is added


@pytest.fixture(scope="module")
def big_echo(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server that echoes messages of up to 64 MiB."""
    directory = tmp_path_factory.mktemp("big")
    proc = spawn([sys.executable, str(pyz), "server", "buf.txt", "--auto-reply-cmd", "cat",
                  "--max-bytes", str(64 << 20)], directory)
    proc.expect_exact("Waiting for clients...")
    yield str(directory / "buf.txt")
    assert interrupt(proc) == 0


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
    data = ("mixed 世界 é\n" * (LARGE // 8)).encode()
    (tmp_path / "message.txt").write_bytes(data)
    client = [sys.executable, str(pyz), "client", big_echo, *source]
    result = subprocess.run([*client, "--max-bytes", str(64 << 20)], input=data, cwd=tmp_path,
                            capture_output=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data
    refused = subprocess.run([*client, "--max-bytes", str(LARGE)], input=data,
                             cwd=tmp_path, capture_output=True, timeout=WAIT)
    assert refused.returncode == 2
    named = source[-1:] == ["message.txt"]
    what = "message file message.txt is" if named else "message on stdin is"
    assert refused.stderr.decode().startswith(f"filechat: error: {what} ")
    assert f"over the limit of {LARGE}" in refused.stderr.decode()


def named(data: bytes) -> io.BytesIO:
    """A message file called m."""
    source = io.BytesIO(data)
    source.name = "m"       # type: ignore[misc]
    return source


def test_pieces_of_a_message_file_are_checked_across_their_joins(big_echo: str,
                                                                  tmp_path: Path) -> None:
    # A character cut by the edge of a piece is whole text; ESC after many
    # pieces is refused before anything is sent.
    for text in ("é" * PIECE, "€" * PIECE, "a🙂" * 70000):
        assert filechat.send(big_echo, named(text.encode()), timeout=WAIT,
                             max_bytes=64 << 20) == text
    late_esc = named(b"x" * (3 * PIECE) + b"\x1b")
    with pytest.raises(FramingError, match=r"^message file m contains the ESC character"):
        filechat.send(str(tmp_path / "buf.txt"), late_esc, max_bytes=64 << 20)
    for cut in ("é".encode() * PIECE + b"\xc3",                 # cut at the very end
                b"x" * (PIECE - 1) + b"\xc3" + b"x" * PIECE):    # cut, then ASCII
        with pytest.raises(FramingError, match=r"^message file m is not valid UTF-8 text"):
            filechat.send(str(tmp_path / "buf.txt"), named(cut), max_bytes=64 << 20)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, error", [
    (b"bad \x1b" + b"x" * (LARGE + 1), "contains the ESC character"),
    (b"x" * LARGE + b"\0", "contains a NUL byte"),
    (b"x" * LARGE + b"\xff", "is not valid UTF-8 text"),
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


class _WriteOnly:
    """A sink with write() alone, as a caller may pass one."""

    def __init__(self) -> None:
        self.parts: List[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)


def test_a_sink_with_write_alone_gets_the_reply(big_echo: str) -> None:
    sink = _WriteOnly()
    assert filechat.send(big_echo, LONG[2], timeout=WAIT, max_bytes=64 << 20,
                         reply_to=sink) == ""
    assert "".join(sink.parts) == LONG[2]


class _FullFile(io.StringIO):
    """A file whose disk filled up half way through the reply."""

    def write(self, text: str) -> int:
        if self.tell() + len(text) > PIECE:
            raise OSError(28, "No space left on device")
        return super().write(text)


def test_a_long_reply_that_cannot_be_written_out_is_kept(big_echo: str) -> None:
    heard: List[str] = []

    def status(event: str, **info: object) -> None:
        if event == "kept":
            heard.append(str(info["path"]))
    response = Path(big_echo).with_name("reply.txt")
    with pytest.raises(OSError, match="No space left on device"):
        filechat.send(big_echo, LONG[2], str(response), timeout=WAIT, max_bytes=64 << 20,
                      reply_to=_FullFile(), status=status)
    assert heard == [f"{response}.unread"]
    assert Path(heard[0]).read_bytes() == (LONG[2] + ESC).encode()
    assert not response.exists()
    os.remove(heard[0])


def test_a_message_over_max_bytes_says_its_size_and_leaves_nothing(tmp_path: Path) -> None:
    buffer = str(tmp_path / "buf.txt")
    with pytest.raises(FramingError, match="is 1200 bytes, over the limit of 1000"):
        filechat.send(buffer, "é" * 600, max_bytes=1000)         # 600 characters, 1200 bytes
    assert list(tmp_path.iterdir()) == []


