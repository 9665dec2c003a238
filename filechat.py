"""filechat: request/reply text messaging through plain files.

Roles: a *server* runs continuously and answers messages; a *client* runs
once, sends one message and prints the reply.

Files (all beside the buffer unless told otherwise):
  BUFFER                 the request: response path, newline, message, ESC.
  server.lock            exists while one client's request is in flight.
  RESPONSE               the reply text, then ESC (ESC ESC: an error reply).
  BUFFER.server          the running server's identity (presence file).
  BUFFER.taken.<ino>-<t> a claimed message, named after the lock it came with.
  server.lock.line/<ns>  waiting clients' tickets: the line, first come first;
                         the first in line turns its ticket into the lock.

Steps of one exchange:
  1. The client writes its request into a file with no name yet, then
     creates the lock, exclusively (the spec's O_CREAT|O_EXCL; filechat's
     appears whole); while another client holds it, it waits in line,
     printing "Server busy, please wait...".
  2. The client puts BUFFER in place, whole (never seen half-written).
  3. The server sees a buffer ending in ESC, claims it by renaming it,
     shows the message and obtains a reply.
  4. The server publishes RESPONSE whole, then removes the lock, which lets
     the next client in, and deletes its claim.
  5. The client reads the reply, prints it and deletes RESPONSE.

Locks, tickets and presence files name their owner (JSON: pid, host, token,
time) and the owner holds an flock on them, so one whose owner died is
recognised at once and cleared; a live owner's never is.

Exit statuses: 0 ok, 1 error, 2 usage or bad input, 3 reply timeout,
4 lock timeout, 5 no server (status), 130 client interrupted (Ctrl+C
stops a server with 0).

Assumptions:
  - every participant sees the same files (one host or one shared directory);
  - creating a file exclusively, os.replace and os.rename are atomic there;
  - message and reply text is UTF-8 without ESC or NUL characters;
  - a peer that follows only the spec may write files in place and leave the
    lock empty; filechat accepts both.
"""

from __future__ import annotations  # annotations unevaluated: typing is not imported

import argparse
import codecs
import errno
import os
import re
import select
import stat
import sys
import time
import zlib
from _thread import _local as _thread_local

if sys.platform != "win32":
    import fcntl  # flock, the liveness signal of a lock's holder; Windows uses the pid

# True for type checkers only. Importing typing would cost a client about a
# tenth of its run: annotations are left unevaluated, and the named tuples
# are made by collections.namedtuple, which typing.NamedTuple uses anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from subprocess import Popen  # imported where hooks run: clients never need it
    from typing import (
        IO,
        BinaryIO,
        Callable,
        Dict,
        Iterable,
        Iterator,
        List,
        Mapping,
        NamedTuple,
        Optional,
        Sequence,
        Set,
        Tuple,
        TypeVar,
        Union,
    )
elif sys.version_info >= (3, 14):
    from typing import NamedTuple  # class annotations are kept differently from 3.14 on
else:
    from collections import namedtuple as _namedtuple

    class _NamedTupleType(type):
        """Makes ``class X(NamedTuple): field: type = default`` a named tuple."""

        def __new__(cls, name, bases, namespace):
            if not bases:
                return super().__new__(cls, name, bases, namespace)   # NamedTuple itself
            fields = list(namespace.pop("__annotations__", ()))
            defaults = [namespace.pop(field) for field in fields if field in namespace]
            base = _namedtuple(name, fields, defaults=defaults, module=namespace["__module__"])
            return type(name, (base,), dict(namespace, __slots__=()))

    NamedTuple = _NamedTupleType("NamedTuple", (), {})

__all__ = [
    "AlreadyServing",
    "FilechatError",
    "FramingError",
    "HookError",
    "LockTimeout",
    "Rejected",
    "ReplyTimeout",
    "Request",
    "ServerError",
    "UsageError",
    "encode_reply",
    "encode_request",
    "parse_reply",
    "parse_request",
    "reply_parts",
    "reply_pieces",
    "request_parts",
    "request_pieces",
    "send",
    "serve",
]
__version__ = "1.0.0"

# --- Constants ---

LOCKFILE_NAME = "server.lock"
END_MARKER = "\x1b"               # ESC ends a message and a reply
ERROR_MARKER = END_MARKER * 2     # a reply ending in ESC ESC reports a failure
TAKEN_SUFFIX = ".taken."          # BUFFER + this + lock inode-token: a message being answered
PRESENCE_SUFFIX = ".server"       # BUFFER + this: the running server's identity
LINE_SUFFIX = ".line"             # LOCK + this: the directory of waiting clients' tickets
OFFER_SUFFIX = ".request"         # TICKET + this: its client's request, ready to put in place
REJECTED_SUFFIX = ".rejected."    # BUFFER + this + hash: why a reply was not written
BANNER = "=" * 60

LOCK_RETRY_INTERVAL = 2.0         # seconds between "Server busy" lines (spec)
RESPONSE_POLL_INTERVAL = 0.5      # seconds between reply checks when polling (spec)
POLL_INTERVAL = 0.5               # seconds between buffer checks when polling (spec)
RESPONSE_TIMEOUT = 60.0           # seconds a client waits for its reply (spec)
SAFETY_INTERVAL = 1.0             # seconds: longest sleep even when events are trusted
STALE_AFTER = 300.0               # seconds before an unidentifiable lock counts as stale
HOOK_TIMEOUT = 10.0               # seconds an --auto-reply-cmd may run
RELEASE_GRACE = 1.0               # seconds a client waits for the server to remove its lock
HAND_OVER_GRACE = 0.005           # seconds the first in line waits for the server to hand it
                                  # the lock it has just let go, before taking it itself
PROGRESS_INTERVAL = 0.1           # seconds between updates of a progress line at a terminal
MAX_BYTES = 1 << 20               # bytes: the largest message a client sends by default
LARGE_FILE = 1 << 20              # bytes: a file this large is read a piece at a time
READ_SIZE = 1 << 18               # bytes in such a piece: small enough for the allocator to
                                  # reuse, where each larger one would take fresh memory

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_LOCK_TIMEOUT = 4
EXIT_NO_SERVER = 5
EXIT_INTERRUPTED = 130

EXIT_STATUS_TABLE = """\
exit status:
  0    success (a server stopped by Ctrl+C or --max-messages)
  1    error (the server reported a failure, a file could not be used)
  2    usage error or bad input (e.g. a message containing ESC)
  3    no reply within --timeout
  4    lock not acquired within --lock-timeout
  5    status: no server is running on the buffer
  130  client interrupted by Ctrl+C"""

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)   # absent on Windows
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_BINARY = getattr(os, "O_BINARY", 0)       # Windows would translate newlines
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

HOST = os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "")
HOST_TAG = f"{zlib.crc32(HOST.encode()):08x}"     # marks temp files made on this host
_CRASH_AT = os.environ.get("FILECHAT_CRASH_AT")   # tests only: the step at which to die



class _Log:
    """filechat's log: logging.getLogger("filechat") for a library user.

    The command line writes its own lines (``filechat: warning: ...``, debug
    lines with -v) to ``stream`` instead: importing logging would cost a
    client more start-up time than its whole exchange. Debug lines go to
    logging only if it has been imported, i.e. configured, by the program.
    """

    stream: Optional[IO[str]] = None
    verbose = False
    color = False

    def debug(self, message: str, *args: object) -> None:
        """Log a debug line: lock and wait transitions."""
        if self.stream is not None:
            if self.verbose:
                self._write("debug", message % args)
        elif "logging" in sys.modules:
            sys.modules["logging"].getLogger("filechat").debug(message, *args)

    def warning(self, message: str, *args: object) -> None:
        """Log something done to recover, such as removing a stale lock."""
        if self.stream is not None:
            self._write("warning", message % args)
        else:
            import logging
            logging.getLogger("filechat").warning(message, *args)

    def _write(self, level: str, text: str) -> None:
        assert self.stream is not None
        if self.color:
            level = f"\x1b[{33 if level == 'warning' else 2}m{level}\x1b[0m"
        self.stream.write(f"filechat: {level}: {text}\n")
        self.stream.flush()


log = _Log()


# --- Exceptions ---

class FilechatError(Exception):
    """Base of every error filechat reports; carries the exit status."""

    exit_code = EXIT_ERROR


class UsageError(FilechatError, ValueError):
    """A path or an argument that cannot be used."""

    exit_code = EXIT_USAGE


class FramingError(UsageError):
    """Text that the wire format cannot carry."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(what, reason)
        self.what = what
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.what} {self.reason}"


class ReplyTimeout(FilechatError, TimeoutError):
    """No reply arrived in time."""

    exit_code = EXIT_TIMEOUT

    def __init__(self, response_path: str, timeout: float, buffer: str, withdrawn: bool,
                 server_running: bool) -> None:
        super().__init__(response_path, timeout, buffer, withdrawn, server_running)
        self.response_path = response_path
        self.timeout = timeout
        self.buffer = buffer
        self.withdrawn = withdrawn
        self.server_running = server_running

    def __str__(self) -> str:
        if not self.server_running:
            fate = (f"no server was running on {self.buffer}; the message was withdrawn; "
                    f"start one with: filechat server {self.buffer}")
        elif self.withdrawn:
            fate = "the server did not take the message; it was withdrawn"
        else:
            fate = "the server took the message but did not answer in time; raise --timeout"
        return f"no reply in {self.response_path} within {self.timeout:g} s: {fate}"


class LockTimeout(FilechatError, TimeoutError):
    """The lock stayed busy for longer than allowed."""

    exit_code = EXIT_LOCK_TIMEOUT

    def __init__(self, lock_path: str, timeout: float) -> None:
        super().__init__(lock_path, timeout)
        self.lock_path = lock_path
        self.timeout = timeout

    def __str__(self) -> str:
        return (f"lock {self.lock_path} still held by another client after "
                f"{self.timeout:g} s; try again later or raise --lock-timeout")


class ServerError(FilechatError):
    """The server answered with an error reply instead of a reply."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"the server could not answer: {self.text.strip()}"


class Rejected(UsageError):
    """The server will not write the reply where the client asked."""


class AlreadyServing(FilechatError):
    """Another live server already serves the buffer."""

    def __init__(self, presence_path: str, owner: Optional[Owner]) -> None:
        super().__init__(presence_path, owner)
        self.presence_path = presence_path
        self.owner = owner

    def __str__(self) -> str:
        who = f"process {self.owner.pid} on {self.owner.host}" if self.owner else "another server"
        return (f"{who} already serves this buffer (see {self.presence_path}); "
                "stop it first, or use another buffer")


class HookError(FilechatError):
    """A responder failed to produce a reply."""


# --- Wire format ---

def _check_text(text: str, what: str) -> bytes:
    """Return text as UTF-8, refusing what the framing cannot carry."""
    check_characters(text, what)
    return _utf8(text, what)


# What the framing cannot carry, and why.
_CANNOT_CARRY = (
    (END_MARKER, "contains the ESC character, which marks the end of a message and cannot "
                 "be sent; remove it"),
    ("\0", "contains a NUL byte, which peers written in C would cut the text at; remove it"),
)


def check_characters(text: Union[str, bytes], what: str) -> None:
    """Refuse text (or its UTF-8 bytes) holding a character the framing cannot carry."""
    for char, reason in _CANNOT_CARRY:
        if (char in text) if isinstance(text, str) else (char.encode() in text):
            raise FramingError(what, reason)


def _utf8(text: str, what: str) -> bytes:
    """Return text as UTF-8; FramingError for what has no UTF-8 form (lone surrogates)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise FramingError(what, "is not valid UTF-8 text") from None


def _check_path(response_path: str) -> bytes:
    """Return a response path as UTF-8, refusing one the framing cannot carry."""
    if "\n" in response_path or "\r" in response_path:
        raise FramingError(f"response path {response_path!r}", "contains a line break")
    return _check_text(response_path, f"response path {response_path!r}")


# Framing works on lists of parts, and parsing decodes through memoryviews,
# so that a message is never copied more than once on its way; a long one is
# encoded (request_pieces) and a large file decoded (_parse_large_request) a
# piece at a time, never held whole as bytes besides its text.

PIECE = 1 << 20           # characters of a long message encoded at a time


def request_parts(response_path: str, message: str) -> List[bytes]:
    """Frame a request as parts to write in order: response path, newline, message, ESC."""
    return [_check_path(response_path), b"\n", _check_text(message, "message"),
            END_MARKER.encode()]


def request_pieces(response_path: str, message: str) -> Iterator[bytes]:
    """Frame a request as pieces to write in order, encoding the message PIECE characters at a time.

    Joined, the pieces are encode_request(response_path, message), and the
    same FramingErrors are raised, a character with no UTF-8 form only when
    its piece is reached.
    """
    path = _check_path(response_path)
    check_characters(message, "message")
    yield path + b"\n"
    for start in range(0, len(message), PIECE):
        yield _utf8(message[start:start + PIECE], "message")
    yield END_MARKER.encode()


def file_request_pieces(response_path: str, source: BinaryIO, what: str) -> Iterator[bytes]:
    """Frame a request as request_pieces does, its message read from the binary file source.

    The message is read READ_SIZE bytes at a time and each piece checked as it
    comes (UTF-8 text, no ESC or NUL), so that a file of any size is sent
    without being held whole. Errors name the file as what.
    """
    yield _check_path(response_path) + b"\n"
    decoder = codecs.getincrementaldecoder("utf-8")()
    while True:
        try:
            piece = source.read(READ_SIZE)
        except OSError as exc:
            raise UsageError(f"cannot read {what}: {exc.strerror or exc}") from None
        if not isinstance(piece, bytes):
            raise UsageError(f"{what} is open as text; open it in binary mode ('rb')")
        check_characters(piece, what)
        try:
            if not piece.isascii() or decoder.getstate()[0]:   # ASCII needs no decoding
                decoder.decode(piece, final=not piece)
        except UnicodeDecodeError:
            raise FramingError(what, "is not valid UTF-8 text") from None
        if not piece:
            break
        yield piece
    yield END_MARKER.encode()


def encode_request(response_path: str, message: str) -> bytes:
    """Frame a request: response path, newline, message, ESC."""
    return b"".join(request_parts(response_path, message))


def parse_request(data: bytes) -> Optional[Tuple[str, str]]:
    """Return (response path, message) of a complete request, None if incomplete.

    Raises ValueError for a complete request that is malformed.
    """
    end = data.find(END_MARKER.encode())
    if end < 0:
        return None
    newline = data.find(b"\n", 0, end)
    if newline < 0 or not data[:newline].strip():
        raise ValueError("no response path before the message")
    view = memoryview(data)
    path = str(view[:newline], "utf-8").rstrip("\r")   # a peer on Windows may write CRLF
    return path, str(view[newline + 1:end], "utf-8")


def _parse_large_request(fd: int) -> Optional[Tuple[str, str]]:
    """parse_request for a large file open as fd, read a piece at a time."""
    head = os.read(fd, 65536)                # a path is far shorter
    end = head.find(END_MARKER.encode())
    newline = head.find(b"\n", 0, end if end >= 0 else len(head))
    if newline < 0 or not head[:newline].strip():
        if end < 0 and _find_marker(fd) < 0:
            return None
        raise ValueError("no response path before the message")
    path = str(head[:newline], "utf-8").rstrip("\r")
    message = _TextToMarker(fd, newline + 1, "strict")
    text = message.join()
    return None if message.end < 0 else (path, text)


def reply_parts(text: str, error: bool = False) -> List[bytes]:
    """Frame a reply as parts: text then ESC, or ESC ESC for an error reply."""
    return [_check_text(text, "reply"), (ERROR_MARKER if error else END_MARKER).encode()]


def reply_pieces(text: str) -> Iterable[bytes]:
    """Frame a reply as reply_parts does; a long ASCII one encoded as it is written.

    Checked now either way: ASCII text has a UTF-8 form, so once its
    characters are checked nothing can fail half-way through writing it.
    """
    if len(text) <= PIECE or not text.isascii():
        return reply_parts(text)
    check_characters(text, "reply")
    return _ascii_pieces(text)


def _ascii_pieces(text: str) -> Iterator[bytes]:
    """Yield ASCII text encoded PIECE characters at a time, then ESC."""
    for start in range(0, len(text), PIECE):
        yield text[start:start + PIECE].encode("ascii")
    yield END_MARKER.encode()


def encode_reply(text: str, error: bool = False) -> bytes:
    """Frame a reply: text then ESC, or ESC ESC for an error reply."""
    return b"".join(reply_parts(text, error))


def parse_reply(data: bytes) -> Optional[Tuple[str, bool]]:
    """Return (text, is_error) of a complete reply, None if it has no end marker yet."""
    extent = _reply_extent(data)
    if extent is None:
        return None
    return str(memoryview(data)[:extent[0]], "utf-8", "replace"), extent[1]


def _reply_extent(data: bytes) -> Optional[Tuple[int, bool]]:
    """Return (length of the text, is_error) of a complete reply, None if it has no end yet."""
    end = data.find(END_MARKER.encode())
    return None if end < 0 else (end, data[end:end + 2] == ERROR_MARKER.encode())


def _parse_large_reply(fd: int) -> Optional[Tuple[str, bool]]:
    """parse_reply for a large file open as fd, read a piece at a time."""
    reply = _TextToMarker(fd, 0, "replace")
    text = reply.join()
    return None if reply.end < 0 else (text, _error_marker_at(fd, reply.end))


def _large_reply_extent(fd: int) -> Optional[Tuple[int, bool]]:
    """_reply_extent for a large file open as fd, read a piece at a time."""
    end = _find_marker(fd)
    return None if end < 0 else (end, _error_marker_at(fd, end))


def _error_marker_at(fd: int, end: int) -> bool:
    """True if the reply in the file open as fd, ended at offset end, is an error reply."""
    os.lseek(fd, end, os.SEEK_SET)
    return os.read(fd, 2) == ERROR_MARKER.encode()


# --- Filesystem primitives ---

if TYPE_CHECKING:
    Data = Union[bytes, Iterable[bytes]]     # one bytes object, or parts to write in order


def _temp_name(path: str) -> str:
    """Return a unique hidden name beside path that says which process made it.

    The host tag and pid let a later sweep remove what a killed process left
    behind, without ever touching a live process's file.
    """
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.{HOST_TAG}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def _write_temp(path: str, data: Data, durable: bool) -> str:
    """Write data to a new temp file beside path and return its name."""
    temp = _temp_name(path)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_BINARY, 0o644)
    try:
        _write_all(fd, data, durable)
    except BaseException:
        os.close(fd)
        _unlink_quietly(temp)
        raise
    os.close(fd)
    return temp


def _write_all(fd: int, data: Data, durable: bool) -> None:
    """Write all of data to fd (and to the disk, if durable)."""
    parts = [data] if isinstance(data, bytes) else data
    if isinstance(parts, (list, tuple)) and sum(map(len, parts)) < 65536:
        parts = [b"".join(parts)]           # one write() for what is small
    for part in parts:
        view = memoryview(part)
        if _CRASH_AT == "mid-write":
            os.write(fd, view[:len(view) // 2])
            _crash_point("mid-write")
        while view:
            view = view[os.write(fd, view):]
    if durable:
        os.fsync(fd)


class Unnamed(NamedTuple):
    """A file with no name yet (O_TMPFILE), and its directory, both open."""

    directory: int
    fd: int
    identified: bool = False     # it holds this process's identity and flock already


def open_unnamed(directory: Union[str, int]) -> Optional[Unnamed]:
    """Open a new unnamed file in directory (a path, or an open one to use, not take).

    None where the platform or the filesystem cannot. Creating a file is the
    slowest step of an exchange on some filesystems, so filechat makes its
    files ahead where it can.
    """
    if not _O_TMPFILE:
        return None                  # not Linux, or no /proc to name the file through
    try:
        fd = (os.dup(directory) if isinstance(directory, int) else
              os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | O_CLOEXEC))
    except OSError:
        return None                  # e.g. a directory one may write but not read
    try:
        return Unnamed(fd, os.open(".", _O_TMPFILE | os.O_WRONLY | O_CLOEXEC, 0o644, dir_fd=fd))
    except OSError:
        os.close(fd)
        return None                  # this filesystem has no unnamed files


def _link_unnamed(unnamed: Unnamed, path: str, directory: Optional[int] = None) -> None:
    """Give an unnamed file the name path; FileExistsError if taken.

    The name goes in the file's own directory, or in directory (open, on
    the same filesystem) if given.
    """
    # Through /proc, so that linkat follows the descriptor to the file.
    os.link(f"/proc/self/fd/{unnamed.fd}", os.path.basename(path),
            dst_dir_fd=unnamed.directory if directory is None else directory)


def close_unnamed(unnamed: Optional[Unnamed]) -> None:
    """Close an unnamed file that will not be used: it vanishes."""
    if unnamed is not None:
        os.close(unnamed.fd)
        os.close(unnamed.directory)


def _create_whole(path: str, write: Callable[[int], None], durable: bool,
                  keep: bool = False, unnamed: Optional[Unnamed] = None) -> Optional[int]:
    """Create path with what write(fd) writes, appearing whole; None where impossible.

    On Linux an O_TMPFILE file is written without ever having a name and then
    hard-linked into place, which fails if path exists, as O_CREAT|O_EXCL
    does. So nobody ever sees the file empty or half-written, even if its
    writer is killed half-way, and watchers see one event instead of a temp
    file coming and going. unnamed, if given, is such a file made ahead in
    path's directory; it is used up either way. Returns the open descriptor
    if keep, else -1; raises FileExistsError if path exists; None where the
    platform or the filesystem cannot do it, and the caller falls back.
    """
    unnamed = unnamed or open_unnamed(os.path.dirname(path))
    if unnamed is None:
        return None
    directory, fd, _ = unnamed
    try:
        try:
            write(fd)
            _link_unnamed(unnamed, path)
        except BaseException:
            os.close(fd)
            raise
        if durable:
            os.fsync(directory)
        if keep:
            return fd
        os.close(fd)
        return -1
    finally:
        os.close(directory)


def _create_owned(path: str, durable: bool = False,
                  unnamed: Optional[Unnamed] = None) -> Optional[int]:
    """Create path holding this process's identity, flocked; None if it exists.

    The flock comes before the identity, and the file appears with both, so
    a complete identity with a free flock always means its holder is gone.
    Where files cannot be created whole, O_CREAT|O_EXCL, as the spec does.
    unnamed: a file made ahead in path's directory (used up), maybe already
    holding the identity (see _owned_unnamed).
    """
    def write(fd: int) -> None:
        if unnamed is None or not unnamed.identified:
            _identify(fd)
        if durable:
            os.fsync(fd)

    try:
        fd = _create_whole(path, write, durable, keep=True, unnamed=unnamed)
    except FileExistsError:
        return None
    if fd is not None:
        return fd
    try:
        fd = os.open(path,
                     os.O_WRONLY      # the holder writes its identity
                     | os.O_CREAT     # create it...
                     | os.O_EXCL      # ...only if absent: the atomic test-and-set
                     | O_NOFOLLOW     # never through a planted symlink
                     | O_CLOEXEC,     # hooks and children must not inherit the flock
                     0o644)
    except FileExistsError:
        return None
    write(fd)
    _fsync_directory(path, durable)
    return fd


def _identify(fd: int) -> None:
    """Flock fd, then write this process's identity into it."""
    _flock(fd, shared=False)
    os.write(fd, _owner_record())     # one small write: readers see all or nothing


def _owned_unnamed(directory: Union[str, int]) -> Optional[Unnamed]:
    """Return an unnamed file in directory already holding this process's identity, flocked."""
    unnamed = open_unnamed(directory)
    if unnamed is None:
        return None
    _identify(unnamed.fd)
    return unnamed._replace(identified=True)


_O_TMPFILE = (getattr(os, "O_TMPFILE", 0)
              if sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd") else 0)


def _fsync_directory(path: str, durable: bool) -> None:
    """Make a rename or link in path's directory survive a power loss."""
    if durable and os.name == "posix":
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str, data: Data, durable: bool = False) -> None:
    """Replace path with data so that readers see the old file or the new, never half."""
    temp = _write_temp(path, data, durable)
    try:
        os.replace(temp, path)
    except BaseException:
        _unlink_quietly(temp)
        raise
    _fsync_directory(path, durable)


def publish_new(path: str, data: Data, durable: bool = False,
                unnamed: Optional[Unnamed] = None) -> None:
    """Create path holding data, whole at once; FileExistsError if path exists.

    A hard link publishes the complete file under the new name and, unlike
    os.replace, refuses to overwrite a file, or follow a symlink, already
    there. unnamed: a file made ahead in path's directory (used up).
    """
    if _create_whole(path, lambda fd: _write_all(fd, data, durable), durable,
                     unnamed=unnamed) is not None:
        return
    temp = _write_temp(path, data, durable)
    try:
        try:
            os.link(temp, path)
        except FileExistsError:
            raise
        except OSError:
            # Filesystems without hard links: check, then replace.
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "file exists", path) from None
            os.replace(temp, path)
    finally:
        _unlink_quietly(temp)
    _fsync_directory(path, durable)


def read_or_none(path: str) -> Optional[bytes]:
    """Return the bytes of path, or None if it does not exist."""
    fd = _open_to_read(path)
    if fd is None:
        return None
    try:
        return _read_all(fd, path)
    finally:
        os.close(fd)


def _read_all(fd: int, path: str, head: Optional[bytes] = None) -> bytes:
    """Return the bytes of the file open as fd, at its start (path names it in errors).

    head: its first 64 KiB (or all of a shorter file), read already.
    """
    try:
        # One read of a small file, or of a large one into one buffer once
        # its size is known, and a last one to see the end: no buffered
        # file object, and no copy of a large file's bytes.
        chunks = [os.read(fd, 65536) if head is None else head]
        if len(chunks[0]) == 65536:
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = [os.read(fd, os.fstat(fd).st_size + 1)]
        while chunks[-1]:
            chunks.append(os.read(fd, 65536))     # the end, or what a writer added since
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None    # say which file
    return chunks[0] if len(chunks) <= 2 else b"".join(chunks)


if TYPE_CHECKING:
    Parsed = TypeVar("Parsed")


def parse_file(path: str, parse: Callable[[bytes], Parsed],
               parse_large: Callable[[int], Parsed]) -> Optional[Parsed]:
    """Return parse(bytes of path), or parse_large(its descriptor) if it is large.

    None if path does not exist. A large file is read a piece at a time
    (see _TextToMarker) rather than whole: its bytes are never held in memory.
    """
    fd = _open_to_read(path)
    if fd is None:
        return None
    try:
        # A file shorter than its first read is small, with no need to ask its size.
        head = os.read(fd, 65536)
        if len(head) < 65536 or os.fstat(fd).st_size < LARGE_FILE:
            return parse(_read_all(fd, path, head))
        os.lseek(fd, 0, os.SEEK_SET)
        return parse_large(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None    # say which file
    finally:
        os.close(fd)


def _find_marker(fd: int) -> int:
    """Return the offset of the first ESC in the file open as fd, -1 if it has none."""
    marker = END_MARKER.encode()
    offset = os.lseek(fd, 0, os.SEEK_SET)
    for piece in iter(lambda: os.read(fd, READ_SIZE), b""):
        found = piece.find(marker)
        if found >= 0:
            return offset + found
        offset += len(piece)
    return -1


class _TextToMarker:
    """The UTF-8 text of a file open as fd, from start up to its first ESC, a piece at a time.

    Iterating yields the decoded pieces, in one pass over the file; after
    that, ``end`` is the ESC's offset, -1 if the file has none (the text
    then runs to the end of the file).
    """

    def __init__(self, fd: int, start: int, errors: str) -> None:
        self.fd = fd
        self.start = start
        self.errors = errors
        self.end = -1

    def __iter__(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(self.errors)
        offset = os.lseek(self.fd, self.start, os.SEEK_SET)
        while True:
            piece = os.read(self.fd, READ_SIZE)
            found = piece.find(END_MARKER.encode())
            if found >= 0:
                self.end = offset + found
                yield decoder.decode(memoryview(piece)[:found], final=True)
                return
            yield decoder.decode(piece, final=not piece)
            if not piece:
                return
            offset += len(piece)

    def join(self) -> str:
        """Return the whole text.

        Joined by ``text += piece``, it holds the text and one piece at most:
        CPython grows a string held only here in place.
        """
        text = ""
        for piece in self:
            text += piece
        return text


def read_if_ended(path: str, marker: bytes) -> Tuple[bool, Optional[bytes]]:
    """Return whether path holds marker, and its bytes if it is small.

    A large file is judged by its end, where a complete message has its
    marker, so that it is not read whole only to be read again once claimed.
    """
    fd = _open_to_read(path)
    if fd is None:
        return False, None
    try:
        head = os.read(fd, 65536)
        if len(head) < 65536:
            if not os.read(fd, 65536):      # the end: a small file, read whole
                return marker in head, head
        else:
            os.lseek(fd, os.fstat(fd).st_size - 65536, os.SEEK_SET)
            if marker in os.read(fd, 65536):
                return True, None
        os.lseek(fd, 0, os.SEEK_SET)
        data = _read_all(fd, path)
    finally:
        os.close(fd)
    return marker in data, data


def _open_to_read(path: str) -> Optional[int]:
    """Open path itself (never through a symlink) for reading; None if it does not exist."""
    try:
        return os.open(path, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_BINARY)
    except FileNotFoundError:
        return None


def _unlink_quietly(path: str) -> None:
    """Remove path if it exists."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _lstat_or_none(path: str) -> Optional[os.stat_result]:
    """Return the lstat of path, or None if it does not exist."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _file_id(path: str) -> Optional[Tuple[int, int]]:
    """Return (device, inode) of path itself, None if it does not exist."""
    st = _lstat_or_none(path)
    return None if st is None else (st.st_dev, st.st_ino)


def remove_if_same(path: str, identity: Tuple[int, int]) -> bool:
    """Remove path only if it is still the file with this identity; True if removed."""
    if _file_id(path) != identity:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


_LEFTOVER = r"\.([0-9a-f]{8})\.(\d+)\.[0-9a-f]{8}\.tmp\Z"   # compiled by re on first use


def sweep_leftovers(directories: Sequence[str], mine: bool = False) -> List[str]:
    """Remove temp files that processes of this host left when killed; return them.

    With mine=True, also this process's own: for a server on its way out,
    which an interrupt may have stopped between writing a file and renaming it.
    """
    removed = []
    for directory in directories:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            match = re.search(_LEFTOVER, name)
            if (name.startswith(".") and match and match.group(1) == HOST_TAG
                    and (not _pid_alive(int(match.group(2)))
                         or (mine and int(match.group(2)) == os.getpid()))):
                _unlink_quietly(os.path.join(directory, name))
                removed.append(name)
    return removed


# --- Holders: the lock, the line and the presence file ---

class Owner(NamedTuple):
    """What a lock or presence file says about the process that holds it."""

    pid: int
    host: str
    token: str
    created: float
    answered: int = 0    # presence files only: messages the server has handled
    started: float = 0.0  # presence files only: when the server started


# Owner records are JSON. Clients write and read them on every exchange, so
# the usual shape is formatted and matched here, and the json module, slow to
# import next to a client's whole run, is used only for any other shape.
_OWNER = re.compile(rb'\{"pid": (\d+), "host": "([A-Za-z0-9._-]*)", "token": "([0-9a-f]*)", '
                    rb'"created": ([0-9.]+)(?:, "answered": (\d+), "started": ([0-9.]+))?\}\n?\Z')


def _owner_record(answered: Optional[int] = None, started: float = 0.0) -> bytes:
    """Return this process's identity as one line of JSON (with a server's count)."""
    token, now = os.urandom(8).hex(), time.time()
    if not _PLAIN_HOST:
        import json
        record = {"pid": os.getpid(), "host": HOST, "token": token, "created": now}
        if answered is not None:
            record.update(answered=answered, started=started)
        return (json.dumps(record) + "\n").encode()
    extra = "" if answered is None else f', "answered": {answered}, "started": {started!r}'
    return (f'{{"pid": {os.getpid()}, "host": "{HOST}", "token": "{token}", '
            f'"created": {now!r}{extra}}}\n').encode()


_PLAIN_HOST = HOST.isascii() and HOST.replace(".", "").replace("-", "").replace("_", "").isalnum()


def read_owner(data: bytes) -> Optional[Owner]:
    """Parse a lock or presence file; None for an empty or foreign one."""
    match = _OWNER.match(data)
    if match:
        pid, host, token, created, answered, started = match.groups()
        return Owner(int(pid), host.decode(), token.decode(), float(created),
                     int(answered or 0), float(started or 0.0))
    if not data.strip():
        return None
    import json
    try:
        raw = json.loads(data.decode("utf-8"))
        return Owner(int(raw["pid"]), str(raw["host"]), str(raw["token"]),
                     float(raw["created"]), int(raw.get("answered", 0)),
                     float(raw.get("started", 0.0)))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class Holder(NamedTuple):
    """A lock or presence file as found on disk."""

    identity: Tuple[int, int]
    owner: Optional[Owner]     # None: empty, or written by a spec-following peer
    gone: Optional[str]        # why its holder is known to have ended
    age: float                 # seconds since it was written


def inspect_holder(path: str) -> Optional[Holder]:
    """Return what the file at path says about its holder; None if there is no file.

    A holder on this host keeps an flock on its file from before it writes
    its identity until it dies, so a complete identity with a free flock
    means the holder has ended. Elsewhere nothing can be checked.
    """
    for _ in range(3):
        fd = _open_to_read(path)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            identity = (st.st_dev, st.st_ino)
            owner = read_owner(os.read(fd, 4096))
            gone = None
            if owner is not None and owner.host == HOST:
                gone = _local_owner_gone(fd, owner)
            # A presence file is replaced while its server runs: an flock
            # freed by that replacement is not a death.
            if gone is None or _file_id(path) == identity:
                return Holder(identity, owner, gone, time.time() - st.st_mtime)
        finally:
            os.close(fd)
    return Holder(identity, owner, None, 0.0)


def _local_owner_gone(fd: int, owner: Owner) -> Optional[str]:
    """Return why the file's holder on this host has ended, or None if it lives."""
    if sys.platform != "win32":
        if _flock(fd, shared=True):
            return f"its holder, process {owner.pid}, has ended"
        return None
    if not _pid_alive(owner.pid):
        return f"its holder, process {owner.pid}, has ended"
    return None


def stale_reason(holder: Holder, stale_after: float) -> Optional[str]:
    """Return why a lock is stale: its holder ended, or it cannot be checked and is old."""
    if holder.gone:
        return holder.gone
    if holder.owner is not None and holder.owner.host == HOST:
        return None               # a live holder is never broken, however long it holds
    if holder.age > stale_after:
        who = "an unidentified holder" if holder.owner is None else f"host {holder.owner.host}"
        return f"held by {who} for {holder.age:.0f} s (over {stale_after:g} s)"
    return None


def default_lock_path(buffer: str) -> str:
    """Return the lock beside the buffer: the spec's server.lock when run from there."""
    return os.path.join(os.path.dirname(buffer), LOCKFILE_NAME)


class Lock:
    """The spec's lockfile: whoever creates it may use the buffer.

    Creating it is the atomic test-and-set: exclusive like the spec's
    O_CREAT|O_EXCL, which peers may use. filechat's lock appears already
    holding its holder's identity (one line of JSON) and flock, so that it
    is never seen empty, even if its holder is killed while creating it; the
    kernel releases the flock the moment the holder dies. The server, not
    the holder, removes a lock after answering, as the spec says.

    Staleness is decided in one place, ``stale_reason``: a holder on this
    host whose flock is free (or, without flock, whose pid is gone); or a
    lock that names no holder on this host and is older than
    ``stale_after``. A lock is only ever removed after checking that it is
    the very file (device and inode) that was judged.
    """

    def __init__(self, path: str, stale_after: float = STALE_AFTER,
                 durable: bool = False) -> None:
        self.path = path
        self.stale_after = stale_after
        self.durable = durable
        self.fd: Optional[int] = None
        self.identity: Optional[Tuple[int, int]] = None

    def try_acquire(self, line: Optional[Line] = None,
                    unnamed: Optional[Unnamed] = None) -> bool:
        """Create the lock if nobody holds it; True if this process now holds it.

        A client at the head of the line turns its ticket into the lock
        instead, which is as exclusive and creates no file: see Line.promote.
        unnamed: the lock's file made ahead (see _owned_unnamed), used up.
        """
        fd = None if line is None else line.promote(self.path, self.durable)
        if fd is None:
            fd = _create_owned(self.path, self.durable, unnamed=unnamed)
        if fd is None or fd < 0:
            return False
        self.hold(fd)
        return True

    def hold(self, fd: int) -> None:
        """Hold the lock whose file is open as fd (created, or handed by the server)."""
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)
        if sys.platform == "win32":
            os.close(fd)     # without flock, an open file only blocks its deletion
        else:
            self.fd = fd
        log.debug("lock %s acquired", self.path)

    def still_held(self) -> bool:
        """True while the lock file this process created is still in place."""
        return self.identity is not None and _file_id(self.path) == self.identity

    def release(self) -> None:
        """Remove the lock if it is still the one this process created."""
        if self.identity is not None and remove_if_same(self.path, self.identity):
            log.debug("lock %s released", self.path)
        self.close()

    def close(self) -> None:
        """Drop this process's hold (its flock) without touching the file."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.identity = None

    def stale_reason(self) -> Optional[str]:
        """Return why the current lock file is stale, or None if it is live or absent."""
        holder = inspect_holder(self.path)
        return None if holder is None else stale_reason(holder, self.stale_after)

    def break_stale(self) -> Optional[str]:
        """Remove the current lock file if stale; return why, or None if left alone."""
        return break_stale_lock(self.path, self.stale_after)


def break_stale_lock(path: str, stale_after: float) -> Optional[str]:
    """Remove the lock at path if it is stale; return why, or None if it was left alone.

    Whoever breaks a lock first takes an exclusive flock on it, which a live
    holder's flock refuses, and which makes every other waiter that found the
    same stale lock wait its turn and then see that the name now belongs to
    another file. Only then is the name, checked once more, removed.
    """
    holder = inspect_holder(path)
    reason = None if holder is None else stale_reason(holder, stale_after)
    if holder is None or reason is None:
        return None
    fd = _open_to_read(path)
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        if ((st.st_dev, st.st_ino) != holder.identity
                or (sys.platform != "win32" and not _flock(fd, shared=False))
                or not remove_if_same(path, holder.identity)):
            return None
    finally:
        os.close(fd)
    return reason


class Line:
    """The queue of clients waiting for one lock, served first come, first served.

    A waiting client holds a ticket: a file in the directory LOCK.line,
    named ``<nanoseconds>-<pid>``, flocked and naming its owner like the
    lock. Only the client whose ticket comes first tries to take the lock, so
    nobody is overtaken by a later arrival; it does so by renaming its
    ticket to the lock, so the file it waited with becomes the lock. A
    ticket whose owner died is removed by the ticket after it, exactly as a
    stale lock would be; so a crashed waiter never blocks the line. Peers
    that follow only the spec take no ticket and simply find the lock free
    or not.

    Beside its ticket a client leaves its request, ``<ticket>.request``, so
    that a filechat server, having answered one client, hands the lock to
    the next at once: it renames the first ticket to the lock and that
    request to the buffer, as the client itself would, and goes on to
    answer it without waiting for that client to be woken and scheduled.
    Under a server that does not, or if the client is woken first, the
    client does both itself; either way each rename happens once.

    The directory exists while anybody waits: the first to join makes it,
    the last to leave removes it (rmdir removes only an empty directory, and
    a ticket cannot be linked into a removed one, so a client joining at
    that moment simply makes it again). Kept apart, the tickets cost a
    client that finds nobody waiting one failed look, and their coming and
    going wakes nobody who watches the lock's directory.
    """

    def __init__(self, lock_path: str, stale_after: float = STALE_AFTER) -> None:
        self.directory = lock_path + LINE_SUFFIX
        self.stale_after = stale_after
        self.ticket: Optional[str] = None
        self.fd: Optional[int] = None
        self.identity: Optional[Tuple[int, int]] = None    # the ticket's file
        self.offer = ""             # the path of the request beside it, if any
        self.joined = 0.0           # when this client's ticket appeared, in seconds
        self.named = 0.0            # when its name was taken, just before
        self.previous = ""          # the ticket just ahead of this one
        # A lock's age tells other hosts when it is stale, so a ticket that
        # becomes the lock is touched if it waited longer than this; not
        # always, as a touch wakes the client behind it.
        self.touch_after = min(1.0, stale_after / 10)

    def tickets(self) -> List[str]:
        """Return the names of the tickets in line, first come first."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(n for n in names if _is_ticket(n))

    def waiting(self, before: Optional[int] = None) -> bool:
        """True if anybody waits in line (who joined before that many ns since the epoch)."""
        tickets = self.tickets()
        if before is None:
            return bool(tickets)
        return any(int(name.partition("-")[0]) < before for name in tickets)

    def join(self, offer: Optional[Callable[[int, str], bool]] = None) -> None:
        """Take a ticket at the end of the line.

        Tickets are named by the time they are taken, and the line is their
        order; so that it is also the order in which they appear, clients
        take the time and link their ticket in turn, under an exclusive
        flock on the line's directory (the file itself is made before).
        offer(directory, path), if given, names the client's request
        ``<ticket>.request`` (in the line's directory, open), before the
        ticket appears; it returns False where it cannot.
        """
        while self.ticket is None:
            turn = None
            try:
                turn = self._take_turn()
                # Made and identified before this client's turn, which is
                # then only the time and a link: others wait on it. Made in
                # the very directory flocked, even if the name was removed
                # and made again meanwhile.
                unnamed = _owned_unnamed(self.directory if turn is None else turn)
                if turn is not None:
                    _flock_turn(turn)
                now = time.time_ns()
                name = f"{now:020d}-{os.getpid()}"
                request = os.path.join(self.directory, name + OFFER_SUFFIX)
                if offer is None or turn is None or not offer(turn, request):
                    request = ""
                fd = _create_owned(os.path.join(self.directory, name), unnamed=unnamed)
                # In line from the moment the ticket can be seen (and before
                # the next client's turn, so the times keep the line's order).
                joined = time.time()
            except FileNotFoundError:
                fd = None                  # the last to leave removed the directory: again
            finally:
                if turn is not None:
                    os.close(turn)         # and with it the flock
            if fd is not None:
                st = os.fstat(fd)
                self.ticket, self.fd, self.joined, self.named = name, fd, joined, now / 1e9
                self.identity, self.offer = (st.st_dev, st.st_ino), request

    def _take_turn(self) -> Optional[int]:
        """Make the line's directory if need be, and open it to flock (None without flock)."""
        try:
            os.mkdir(self.directory)
        except FileExistsError:
            pass
        else:
            # Whoever may write the lock's directory may join the line.
            mode = stat.S_IMODE(os.stat(os.path.dirname(self.directory) or ".").st_mode)
            os.chmod(self.directory, mode)
        if sys.platform == "win32":
            return None
        return os.open(self.directory, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)

    def promote(self, lock_path: str, durable: bool) -> Optional[int]:
        """Make this client's ticket the lock; return its descriptor, -1 if the lock exists.

        The ticket is renamed to the lock, on Linux with RENAME_NOREPLACE,
        which like O_CREAT|O_EXCL fails if the lock exists; elsewhere it is
        hard-linked as the lock, as exclusive, and then unlinked. Either way
        the lock appears whole, already holding this client's identity and
        flock. None where there is no ticket, or neither can be done: the
        caller creates the lock itself.
        """
        if self.ticket is None or self.fd is None:
            return None
        # Looked at first: a rename between directories, even one that
        # fails, waits for every other such rename on the filesystem.
        if _file_id(lock_path) is not None:
            fd = self.handed(lock_path)
            return -1 if fd is None else fd
        ticket = os.path.join(self.directory, self.ticket)
        if time.time() - self.joined > self.touch_after and os.utime in os.supports_fd:
            os.utime(self.fd)
        moved = _rename_exclusive(ticket, lock_path)
        if moved is None:
            try:
                os.link(ticket, lock_path,
                        follow_symlinks=os.link not in os.supports_follow_symlinks)
            except FileExistsError:
                moved = False
            except OSError:
                fd = self.handed(lock_path)
                if fd is None and self.fd is not None and os.fstat(self.fd).st_nlink == 0:
                    self.leave()      # removed by somebody: wait on without a ticket
                return fd             # None: the caller creates the lock
        if moved is False:
            fd = self.handed(lock_path)
            return -1 if fd is None else fd
        _fsync_directory(lock_path, durable)
        if moved:
            self.ticket = None        # its name is the lock's now
            remove_empty_directory(self.directory)
        return self._take_ticket()    # a linked ticket's name goes; its file is the lock

    def handed(self, lock_path: str) -> Optional[int]:
        """Return the ticket's descriptor if a server has made it the lock, else None.

        The server may even have answered and removed it already, if this
        client was slow to wake: then the ticket has no name left, and the
        request, which only such a server moves, has left the line too.
        """
        if self.fd is None or self.identity is None:
            return None
        if _file_id(lock_path) != self.identity and (
                not self.offer or os.fstat(self.fd).st_nlink
                or _lstat_or_none(self.offer) is not None):
            return None
        self.ticket = None            # its name is the lock's now, or gone
        return self._take_ticket()

    def _take_ticket(self) -> int:
        """Keep the ticket's file (the lock now) open for the caller; leave the line."""
        fd, self.fd = self.fd, None
        assert fd is not None
        self.leave()
        return fd

    def ahead(self, recheck: bool = True) -> int:
        """Return how many live tickets come before this one, clearing a dead one before it.

        The ticket just ahead is checked when it is new, and else only if
        recheck: its holder's death makes no event, so a wait that ended
        with one has nothing to look for.
        """
        tickets = self.tickets()
        if self.ticket not in tickets:
            return 0            # removed by somebody: behave as the head
        mine = tickets.index(self.ticket)
        previous = os.path.join(self.directory, tickets[mine - 1]) if mine else ""
        recheck = recheck or previous != self.previous
        self.previous = previous
        if mine and recheck and self._clear_ticket(previous):
            return mine - 1
        return mine

    def mine(self) -> str:
        """Return the path of this client's ticket ("" if it has none)."""
        return "" if self.ticket is None else os.path.join(self.directory, self.ticket)

    def before(self) -> str:
        """Return the path of the ticket just ahead of this one, as ahead() last saw it."""
        return self.previous

    def leave(self) -> None:
        """Give up this ticket; the last to leave removes the line's directory."""
        if self.ticket is not None:
            _unlink_quietly(os.path.join(self.directory, self.ticket))
            remove_empty_directory(self.directory)
        if self.fd is not None:
            os.close(self.fd)
        self.ticket = self.fd = None

    def clear(self) -> None:
        """Remove the tickets and requests of waiters that died, and the directory if empty."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            path = os.path.join(self.directory, name)
            if _is_ticket(name):
                self._clear_ticket(path)
            elif name.endswith(OFFER_SUFFIX) and _is_ticket(name[:-len(OFFER_SUFFIX)]):
                _remove_abandoned(path)
        remove_empty_directory(self.directory)

    def _clear_ticket(self, path: str) -> bool:
        """Remove the ticket at path, and its request, if its waiter died; True if removed."""
        if not break_stale_lock(path, self.stale_after):
            return False
        _remove_abandoned(path + OFFER_SUFFIX)
        return True

    def hand_over(self, lock_path: str, buffer: str, durable: bool) -> bool:
        """Make the first live ticket the lock and put its request in place; True if done.

        For a server that has just let go of a client's lock. Only a ticket
        whose request waits beside it is handed the lock, and only if the
        lock is free (the rename is as exclusive as O_CREAT|O_EXCL); the
        tickets of waiters that died on the way are removed. If the request
        cannot be moved, its client, woken by the lock's release, moves it.
        """
        try:
            names = os.listdir(self.directory)
        except OSError:
            return False              # nobody waits
        present = set(names)
        for name in sorted(n for n in names if _is_ticket(n)):
            ticket = os.path.join(self.directory, name)
            holder = inspect_holder(ticket)
            if holder is None:
                continue              # left meanwhile
            if stale_reason(holder, self.stale_after):
                self._clear_ticket(ticket)
                continue
            if name + OFFER_SUFFIX not in present:
                return False          # it takes the lock itself
            if holder.age > self.touch_after:
                _touch(ticket)
            if _rename_exclusive(ticket, lock_path) is not True:
                return False
            _fsync_directory(lock_path, durable)
            if _rename_exclusive(ticket + OFFER_SUFFIX, buffer):
                _fsync_directory(buffer, durable)
            return True
        return False


def _remove_abandoned(path: str) -> None:
    """Remove path if nobody holds its flock: a request whose waiter died."""
    fd = _open_to_read(path)
    if fd is None:
        return
    try:
        st = os.fstat(fd)
        if _flock(fd, shared=False):
            remove_if_same(path, (st.st_dev, st.st_ino))
    finally:
        os.close(fd)


def _touch(path: str) -> None:
    """Set path's modification time to now, if this process may."""
    try:
        os.utime(path)
    except OSError:
        pass                   # another user's file: its age stays


def _is_ticket(name: str) -> bool:
    """True for a ticket's name: nanoseconds (20 digits), a dash, a pid."""
    return len(name) > 21 and name[20] == "-" and name[:20].isdigit() and name[21:].isdigit()


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_exclusive(source: str, target: str) -> Optional[bool]:
    """Rename source to target unless target exists: True if renamed, False if it exists.

    None where the system or the filesystem cannot (renameat2 is Linux's).
    The rename moves a file without changing its link count, which watchers
    of its link count would take for its going.
    """
    if not _can_rename_exclusive():
        return None
    libc = _Inotify.libc()
    if libc.renameat2(_AT_FDCWD, os.fsencode(source),  # type: ignore[attr-defined]
                      _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
        return True
    # Any other failure (no renameat2 on this filesystem, a ticket gone)
    # leaves the caller to take the lock the ordinary way, which says what
    # is wrong if anything is.
    return False if _ctypes_errno() == errno.EEXIST else None


def _can_rename_exclusive() -> bool:
    """True if this system has renameat2 (its filesystems may still refuse it)."""
    return getattr(_Inotify.libc(), "renameat2", None) is not None


def _ctypes_errno() -> int:
    """Return the errno a ctypes call left."""
    import ctypes
    return ctypes.get_errno()


def _flock_turn(fd: int) -> None:
    """Wait for an exclusive flock on fd: a live holder keeps it for microseconds."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass                   # a filesystem without flock: turns are not kept


def remove_empty_directory(path: str) -> None:
    """Remove path if it is an empty directory (rmdir refuses any other)."""
    try:
        os.rmdir(path)
    except OSError:
        pass                   # not empty, gone already, or not ours to remove


class Presence:
    """The server's presence file, BUFFER.server: which server runs, since when.

    It holds the server's identity and its count of handled messages, and the
    server keeps an flock on it, so clients and ``status`` can tell a running
    server from one that was killed. It is published whole (a hard link of a
    complete temp file, which also makes starting exclusive) and updated by
    replacing it whole.
    """

    def __init__(self, path: str, durable: bool = False) -> None:
        self.path = path
        self.durable = durable
        self.fd: Optional[int] = None
        self.identity: Optional[Tuple[int, int]] = None
        self.started = time.time()
        self.answered = 0

    def start(self) -> None:
        """Publish this server's presence; AlreadyServing if a live server has one."""
        while True:
            temp, fd = self._write(0)
            try:
                os.link(temp, self.path)
            except FileExistsError:
                os.close(fd)
                holder = inspect_holder(self.path)
                if holder is not None and holder.gone is None:
                    raise AlreadyServing(self.path, holder.owner) from None
                if holder is not None:
                    remove_if_same(self.path, holder.identity)   # left by a killed server
                continue
            except OSError:
                os.replace(temp, self.path)    # no hard links here: the check above is all
            finally:
                _unlink_quietly(temp)
            self._hold(fd)
            return

    def update(self, answered: int) -> None:
        """Replace the presence file with one that counts answered messages."""
        temp, fd = self._write(answered)
        os.replace(temp, self.path)
        self._hold(fd)
        self.answered = answered

    def _write(self, answered: int) -> Tuple[str, int]:
        """Write a complete, flocked presence file under a temp name."""
        temp = _temp_name(self.path)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                     0o644)
        _flock(fd, shared=False)
        os.write(fd, _owner_record(answered=answered, started=self.started))
        return temp, fd

    def _hold(self, fd: int) -> None:
        """Keep fd, the presence file now in place, and let go of the previous one."""
        _fsync_directory(self.path, self.durable)
        if self.fd is not None:
            os.close(self.fd)
        st = os.fstat(fd)
        self.fd, self.identity = fd, (st.st_dev, st.st_ino)

    def withdraw(self) -> None:
        """Remove the presence file if it is still this server's."""
        if self.identity is not None:
            remove_if_same(self.path, self.identity)
        if self.fd is not None:
            os.close(self.fd)
        self.fd = self.identity = None


def running_server(presence_path: str) -> Optional[Owner]:
    """Return the identity of the server whose presence file is live, else None."""
    holder = inspect_holder(presence_path)
    if holder is None or holder.gone:
        return None
    return holder.owner or Owner(0, "", "", 0.0)


def _flock(fd: int, shared: bool) -> bool:
    """Try to flock fd without waiting; True if taken (always False without flock)."""
    if sys.platform == "win32":
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass           # exists, but belongs to someone else
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """True if pid has ended and only waits to be reaped (Linux; False elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[:1] == [b"Z"]
    except OSError:
        return False


def _windows_pid_alive(pid: int) -> bool:
    """True if the process exists (os.kill would terminate it on Windows)."""
    import ctypes
    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined,unused-ignore]
    handle = kernel32.OpenProcess(0x1000, False, pid)   # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        return code.value == 259                          # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _crash_point(step: str) -> None:
    """Die here, as kill -9 would, if the tests asked for it (FILECHAT_CRASH_AT)."""
    if step == _CRASH_AT:
        os._exit(137)


# --- Waiter ---

IN_CLOSE_WRITE = 0x008   # a file written in place is complete
IN_MOVED_TO = 0x080      # os.replace published a file
IN_CREATE = 0x100        # a file was linked in whole, or a lock or ticket created
IN_DELETE = 0x200        # a lock, ticket, presence file or claim went away
IN_ATTRIB = 0x004        # a watched file's link count fell: it was deleted
IN_DELETE_SELF = 0x400   # a watched file is gone for good
IN_MOVE_SELF = 0x800     # a watched file was renamed (a ticket became the lock)
IN_Q_OVERFLOW = 0x4000   # events were lost: anything may have changed
IN_IGNORED = 0x8000      # a watched directory went away

# What each side wakes for. Events are only hints, so a mask needs just the
# events that can end a wait; the rest would be needless wake-ups.
SERVER_EVENTS = IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE   # a buffer appears, whole
CLIENT_EVENTS = IN_CREATE | IN_DELETE      # a reply or note appears; a lock or ticket goes
FILE_EVENTS = IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF   # the file watched went


class Waiter:
    """Sleep until something may have changed in some directories.

    Events are hints: the caller re-checks its condition after every wake-up.
    On Linux inotify wakes it as soon as one of ``events`` happens there;
    elsewhere, or with poll=True (network filesystems send no events for
    other hosts' changes), it sleeps in steps of poll_interval. Even with
    events, no sleep lasts longer than SAFETY_INTERVAL, so a missed event
    costs a bounded delay, never a hang.
    """

    def __init__(self, directories: Sequence[str], poll: bool = False,
                 poll_interval: float = POLL_INTERVAL, events: int = CLIENT_EVENTS) -> None:
        self.poll_interval = poll_interval
        self.directories = list(directories)
        self.inotify = None if poll else _Inotify.for_thread(events)
        self.resume()
        log.debug("waiting with %s", "inotify" if self.fd is not None else "polling")

    def pause(self) -> None:
        """Stop watching the directories for a while (waiting in line, for one).

        Their events would otherwise pile up unread, a long line's many
        changes each to be read and skipped once the wait is over.
        """
        if self.inotify is not None:
            self.inotify.unwatch()

    def resume(self) -> None:
        """Watch the directories (again); where they cannot be, poll."""
        if self.inotify is not None and not self.inotify.watch(self.directories):
            self.inotify = None
        self.fd = None if self.inotify is None else self.inotify.fd

    def wait(self, timeout: float, names: Set[str]) -> Optional[Set[str]]:
        """Return after an event about one of names, or after timeout seconds.

        Only an event about one of those file names counts: the server waits
        for its buffer and sleeps through its own replies. Returns the names
        the events were about; None after a timeout, when polling, or when
        anything may have changed (events were lost).
        """
        deadline = time.monotonic() + timeout
        wanted = {os.fsencode(name) for name in names}
        while True:
            seen = self._wait(self.inotify, deadline - time.monotonic())
            if seen is None:
                return None
            if not seen.isdisjoint(wanted):
                return {os.fsdecode(name) for name in seen & wanted}

    def forget(self) -> None:
        """Drop the events so far: the caller is about to look at everything anyway."""
        if self.inotify is not None:
            self.inotify.drain()

    def wait_for_deletion(self, paths: Sequence[str], timeout: float) -> bool:
        """Like wait(), but woken only when a file at paths goes (or is linked, or touched).

        Returns True if an event ended the wait (or a file had gone already).
        """
        files = None if self.inotify is None else _Inotify.for_thread(FILE_EVENTS)
        # Watched afresh each time: a watch follows a file, and the name may
        # now be another file's (a new lock).
        if files is not None and not files.watch_files(paths):
            return True              # already gone (or unwatchable): look again at once
        return self._wait(files, timeout) is not None

    def _wait(self, inotify: Optional[_Inotify], timeout: float) -> Optional[Set[bytes]]:
        """Wait for events of inotify, or poll if it is None; return the names they were about.

        None after a timeout, when polling, or when anything may have changed.
        """
        if timeout <= 0:
            return None
        if inotify is None:
            time.sleep(min(timeout, self.poll_interval))
            return None
        ready, _, _ = select.select([inotify.fd], [], [], min(timeout, SAFETY_INTERVAL))
        return inotify.drain() if ready else None

    def close(self) -> None:
        """Stop using the waiter (the thread keeps its inotify instance for next time)."""
        self.inotify = None

    def __enter__(self) -> Waiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Inotify:
    """One thread's inotify instance for one event mask, kept for the thread's life.

    Creating and closing an instance costs more than a whole exchange, so
    each thread keeps one per mask and adds directories as they come.
    """

    _threads = _thread_local()
    _libc: object = None

    def __init__(self, fd: int, events: int) -> None:
        self.fd = fd
        self.events = events
        self.watched: Dict[str, int] = {}    # directory: its watch descriptor
        self.files: List[int] = []       # the watches of watch_files, by descriptor

    @classmethod
    def for_thread(cls, events: int) -> Optional[_Inotify]:
        """Return this thread's instance for events; None where inotify is unavailable."""
        instances = cls._threads.__dict__.setdefault("instances", {})
        if events not in instances:
            fd = cls._init()
            if fd is None:
                return None
            instances[events] = cls(fd, events)
        return instances[events]  # type: ignore[no-any-return]

    @classmethod
    def libc(cls) -> object:
        """Return the C library through ctypes (None where it is not Linux's)."""
        if cls._libc is None and sys.platform.startswith("linux"):
            import ctypes
            try:
                cls._libc = ctypes.CDLL(None, use_errno=True)
            except OSError:
                pass
        return cls._libc

    @classmethod
    def _init(cls) -> Optional[int]:
        """Create an inotify descriptor, None where there is no inotify."""
        try:
            fd = int(cls.libc().inotify_init1(os.O_NONBLOCK | O_CLOEXEC))  # type: ignore[attr-defined]
        except (OSError, AttributeError):
            return None
        return fd if fd >= 0 else None

    def watch(self, directories: Sequence[str]) -> bool:
        """Watch directories too (each once); False if one cannot be watched."""
        for directory in directories:
            directory = directory or "."
            if directory in self.watched:
                continue
            wd = self._libc.inotify_add_watch(  # type: ignore[attr-defined]
                self.fd, os.fsencode(directory), self.events)
            if wd < 0:
                log.debug("inotify cannot watch %s", directory)
                return False
            self.watched[directory] = wd
        return True

    def unwatch(self) -> None:
        """Stop watching the directories, and drop the events queued so far unread."""
        for wd in self.watched.values():
            self._libc.inotify_rm_watch(self.fd, wd)  # type: ignore[attr-defined]
        self.watched.clear()
        try:
            while len(os.read(self.fd, 65536)) > 65536 - 4096:
                pass
        except BlockingIOError:
            pass

    def watch_files(self, paths: Sequence[str]) -> bool:
        """Watch just these files, dropping earlier ones and their events; False if one is gone.

        A watch follows a file, not its name: an earlier one would go on
        reporting a file this thread no longer waits for.
        """
        for wd in self.files:
            self._libc.inotify_rm_watch(self.fd, wd)  # type: ignore[attr-defined]
        self.files = []
        self.drain()
        for path in paths:
            wd = self._libc.inotify_add_watch(  # type: ignore[attr-defined]
                self.fd, os.fsencode(path), self.events)
            if wd < 0:
                return False
            self.files.append(wd)
        return True

    def drain(self) -> Optional[Set[bytes]]:
        """Read the queued events; return the file names they were about.

        None means "anything may have changed": the queue overflowed, or a
        watched directory went away (and must be watched afresh if it comes back).
        """
        names: Optional[Set[bytes]] = set()
        data = b"\0" * 65536
        try:
            # A read that leaves room for more events has taken them all.
            while len(data) > 65536 - 4096:
                data = os.read(self.fd, 65536)
                offset = 0
                while offset + 16 <= len(data):
                    mask = int.from_bytes(data[offset + 4:offset + 8], "little")
                    size = int.from_bytes(data[offset + 12:offset + 16], "little")
                    if mask & IN_Q_OVERFLOW or (mask & IN_IGNORED and self.watched):
                        self.watched.clear()
                        names = None
                    elif names is not None:
                        names.add(data[offset + 16:offset + 16 + size].rstrip(b"\0"))
                    offset += 16 + size
        except BlockingIOError:
            pass
        return names

    def __del__(self) -> None:
        os.close(self.fd)


# --- Client API ---

if TYPE_CHECKING:
    Status = Callable[..., None]


def _quiet(event: str, **info: object) -> None:
    """Ignore a status event."""


class Paths(NamedTuple):
    """Every file that the exchanges on one buffer use."""

    buffer: str
    lock: str
    presence: str        # BUFFER.server: the running server's identity
    claim_prefix: str    # BUFFER.taken.<lock inode>-<lock token>: a message being answered

    @classmethod
    def of(cls, buffer: str, lock: Optional[str] = None) -> Paths:
        """Return the paths for buffer, with the lock beside it unless given."""
        return cls(buffer, lock or default_lock_path(buffer), buffer + PRESENCE_SUFFIX,
                   buffer + TAKEN_SUFFIX)

    def claims(self) -> List[str]:
        """Return the claimed messages that wait for an answer, oldest name first."""
        directory, prefix = os.path.split(self.claim_prefix)
        try:
            names = os.listdir(directory or ".")
        except OSError:
            return []
        return sorted(os.path.join(directory, name) for name in names
                      if name.startswith(prefix) and _LockRef.parse(name[len(prefix):]))

    def rejection(self, response_path: str) -> str:
        """Return where the server says why it would not write to response_path."""
        return f"{self.buffer}{REJECTED_SUFFIX}{zlib.crc32(os.fsencode(response_path)):08x}"

    def directories(self, *more: str) -> List[str]:
        """Return the directories whose changes matter to an exchange."""
        files = (self.buffer, self.lock, *more)
        return sorted({os.path.dirname(os.path.abspath(p)) for p in files})


def default_response_path(buffer: str) -> str:
    """Return a fresh, unique response file name beside the buffer."""
    directory = os.path.dirname(os.path.abspath(buffer))
    return os.path.join(directory, f"filechat-reply-{os.getpid()}-{os.urandom(4).hex()}.txt")


def check_response_path(response_path: str) -> None:
    """Refuse a response path the server could not, or should not, write."""
    st = _lstat_or_none(response_path)
    if st is None:
        _check_directory(response_path, "response file")
    elif stat.S_ISLNK(st.st_mode):
        raise UsageError(f"response file {response_path} is a symbolic link, which the server "
                         "never follows; name a new file")
    elif stat.S_ISDIR(st.st_mode):
        raise UsageError(f"response file {response_path} is a directory; name a file")
    else:
        raise UsageError(f"response file {response_path} already exists; the server will "
                         "not overwrite it: remove it or choose another path")


def check_buffer_path(buffer: str, lock_path: str) -> Optional[os.stat_result]:
    """Refuse a buffer or lock path that cannot be used; return the lock's lstat.

    None if there is no lock: a client then asks for it without looking again.
    """
    checked = set()
    st = None
    for what, path in (("buffer file", buffer), ("lock file", lock_path)):
        directory = os.path.dirname(path) or "."
        if directory not in checked:
            _check_directory(path, what, writable=True)
            checked.add(directory)
        st = _lstat_or_none(path)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise UsageError(f"{what} {path} is a symbolic link, which filechat never "
                             "follows; name the file itself")
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{what} {path} is a directory; name a file")
    return st


def _check_directory(path: str, what: str, writable: bool = False) -> None:
    """Refuse a path whose directory does not exist (or, if asked, cannot be written)."""
    directory = os.path.dirname(path) or "."
    # One call in the usual case: with the trailing separator, only a
    # directory passes.
    if os.access(os.path.join(directory, ""), os.W_OK if writable else os.F_OK):
        return
    if not os.path.isdir(directory):
        raise UsageError(f"{what} {path}: directory {directory} does not exist; "
                         "create it or choose another path")
    if writable and not os.access(directory, os.W_OK):
        raise UsageError(f"{what} {path}: directory {directory} is not writable; "
                         "choose a directory you can write")


def send(buffer: str, message: Union[str, BinaryIO], response_path: Optional[str] = None, *,
         timeout: float = RESPONSE_TIMEOUT, lock_timeout: Optional[float] = None,
         lock_path: Optional[str] = None, stale_after: float = STALE_AFTER,
         max_bytes: int = MAX_BYTES, durable: bool = False, poll: bool = False,
         poll_interval: float = RESPONSE_POLL_INTERVAL,
         lock_retry_interval: float = LOCK_RETRY_INTERVAL, status: Status = _quiet,
         progress_interval: Optional[float] = None, reply_to: Optional[IO[str]] = None) -> str:
    """Send one message to the server on buffer and return its reply.

    Does what the spec's client does: takes the lock, writes the buffer,
    waits for the reply in response_path (default: a fresh file beside the
    buffer) and deletes the response file. The wait for the lock is
    unbounded unless lock_timeout is given; the wait for the reply is
    bounded by timeout. ``status`` hears "busy" (every lock_retry_interval
    while another client holds the lock), "queued" (if it had to wait: with
    the time its ticket appeared in line, and the time it was named, just
    before), "locked" (with the time it asked for the lock), "sent", "waiting",
    "received" (the reply is complete, just before it is written to
    reply_to), and "no-server", "server-stopped", "server-started" as the
    server comes and goes; with progress_interval, also "tick" (phase "lock"
    or "reply", seconds waited) that often while it waits.

    The message is text, or a binary file to read it from (UTF-8); with
    reply_to, a text file, the reply is written there instead of returned
    (and "" returned). Either way a large message or reply is handled a
    piece at a time, never held whole.

    Raises FramingError (ESC, NUL or non-UTF-8 text, a message over
    max_bytes), UsageError (unusable paths), Rejected (the server will not
    write response_path), LockTimeout, ReplyTimeout and ServerError (the
    server sent an error reply). On any exception, KeyboardInterrupt
    included, a message no server is answering is withdrawn and the lock
    released.
    """
    paths = Paths.of(buffer, lock_path)
    chosen = response_path is not None
    if response_path is None:
        response_path = default_response_path(buffer)
    _check_path(os.path.abspath(response_path))
    if isinstance(message, str):
        check_characters(message, "message")
    if _least_size(message) > max_bytes:
        raise _too_long(message, max_bytes)
    lock_seen = check_buffer_path(buffer, paths.lock)
    if chosen:      # a fresh name beside the buffer needs no checking
        check_response_path(response_path)  # errors name the path as the user gave it
    response_path = os.path.abspath(response_path)
    lock = Lock(paths.lock, stale_after, durable)
    with _Outgoing(buffer, response_path, message, max_bytes, durable) as outgoing:
        asked = _acquire(lock, paths, outgoing, poll, poll_interval, lock_timeout,
                         lock_retry_interval, status, progress_interval, lock_seen is None)
        try:
            status("locked", asked=asked)
            _crash_point("client-locked")
            outgoing.publish()
            # Set up once the request is out, while the server answers: what
            # came before is seen by the first look below.
            waiter = Waiter(paths.directories(response_path), poll, poll_interval)
            waiter.forget()
            _crash_point("client-sent")
            status("sent")
            status("waiting")
            text, is_error = _await_reply(paths, response_path, lock, waiter, timeout,
                                          outgoing.fingerprint, status, progress_interval,
                                          stream=reply_to is not None)
        except BaseException:
            _give_up(paths, lock, outgoing.fingerprint)
            _unlink_quietly(response_path)
            raise
        _await_release(lock, waiter)
        status("received")
        # The response file goes after the release, so that a server restarted
        # before it sees the message was answered; and before the flock, or a
        # server would see a reply whose client ended and delete it as orphaned.
        try:
            if reply_to is not None:
                text, is_error = _copy_reply(response_path, reply_to, is_error)
        finally:
            _unlink_quietly(response_path)
            lock.close()
    if is_error:
        raise ServerError(text)
    return text


if TYPE_CHECKING:
    Fingerprint = Tuple[int, int]        # a request's length and CRC-32: is it still ours?


def _fingerprint(data: bytes) -> Fingerprint:
    """Return the length and CRC-32 of data."""
    return len(data), zlib.crc32(data)


def _least_size(message: Union[str, BinaryIO]) -> int:
    """Return the fewest bytes message can take: a byte a character, or its file's size."""
    if isinstance(message, str):
        return len(message)
    try:
        st = os.fstat(message.fileno())
    except (OSError, ValueError, AttributeError):
        return 0                   # not a file of its own: its size shows as it is read
    return st.st_size - message.tell() if stat.S_ISREG(st.st_mode) else 0


def _too_long(message: Union[str, BinaryIO], max_bytes: int) -> FramingError:
    """Return the error for a message over max_bytes, saying its size if it is known."""
    if isinstance(message, str):
        size = sum(len(_utf8(message[i:i + PIECE], "message"))
                   for i in range(0, len(message), PIECE))
    else:
        size = _least_size(message)
    says = f"is {size} bytes, over" if size > max_bytes else "is over"
    return FramingError(_message_name(message), f"{says} the limit of {max_bytes} "
                        "(--max-bytes); send less or raise the limit")


def _message_name(message: Union[str, BinaryIO]) -> str:
    """Name the message in errors: as a file if it is read from a named one."""
    name = getattr(message, "name", None)
    if not isinstance(name, str):
        return "message"
    return "message on stdin" if name == "<stdin>" else f"message file {name}"


class _Outgoing:
    """A request written ahead into a file that is not the buffer yet.

    It is written before the lock is taken, so that a client waiting in line
    has its message ready and, once it holds the lock, only puts the file in
    place. The message is encoded (or read from its file) and written a
    piece at a time: a long one is never held whole as bytes.
    """

    def __init__(self, buffer: str, response_path: str, message: Union[str, BinaryIO],
                 max_bytes: int, durable: bool) -> None:
        self.buffer = buffer
        self.durable = durable
        self.unnamed = open_unnamed(os.path.dirname(buffer))
        self.temp = ""
        self.offered = ""             # the request's name in line, if it has one
        self.offered_id = (0, 0)
        if self.unnamed is not None:
            fd = self.unnamed.fd
        else:                         # no unnamed files here: a temp name, linked later
            self.temp = _temp_name(buffer)
            fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW
                         | O_CLOEXEC | O_BINARY, 0o644)
        written: Optional[Fingerprint] = None
        try:
            pieces = (request_pieces(response_path, message) if isinstance(message, str)
                      else file_request_pieces(response_path, message, _message_name(message)))
            written = self._write(fd, pieces, max_bytes)
        finally:
            if self.temp:
                os.close(fd)
            if written is None:
                self.discard()
        if written is None:
            raise _too_long(message, max_bytes)
        self.fingerprint = written

    def _write(self, fd: int, pieces: Iterator[bytes], max_bytes: int) -> Optional[Fingerprint]:
        """Write the pieces to fd; return their fingerprint, None if the message is too long."""
        head = next(pieces)                   # the response path and its newline
        size, crc, small = len(head), zlib.crc32(head), [head]
        for piece in pieces:
            size, crc = size + len(piece), zlib.crc32(piece, crc)
            if size - len(head) - 1 > max_bytes:      # - 1: the ESC that ends it
                return None
            if small and size < 65536:
                small.append(piece)               # written in one go below
                continue
            _write_all(fd, [*small, piece], False)
            small = []
        _write_all(fd, small, self.durable)
        return size, crc

    def directory_of(self, path: str) -> Union[str, int]:
        """Return path's directory: the request's, open, if it is the same (as for the lock)."""
        directory = os.path.dirname(path)
        if self.unnamed is not None and directory == os.path.dirname(self.buffer):
            return self.unnamed.directory     # opened once for both files
        return directory or "."

    def offer(self, directory: int, path: str) -> bool:
        """Name the request path too (in that open directory), for a server to put in place.

        The file is flocked first: a request nobody holds is a dead waiter's.
        False where it cannot be (not an unnamed file, another filesystem).
        """
        unnamed = self.unnamed
        if unnamed is None or self.offered or not _can_rename_exclusive():
            return False              # (one name in line is enough)
        try:
            _flock(unnamed.fd, shared=False)
            _link_unnamed(unnamed, path, directory)
            st = os.fstat(unnamed.fd)
        except OSError:
            return False
        self.offered = path
        self.offered_id = (st.st_dev, st.st_ino)
        return True

    def withdraw_offer(self) -> None:
        """Take the request's name out of line, if nobody has put it in place."""
        if self.offered:
            remove_if_same(self.offered, self.offered_id)
            remove_empty_directory(os.path.dirname(self.offered))
            self.offered = ""

    def _place_offered(self) -> None:
        """Move the request from the line into place, unless the server has moved it."""
        offered, self.offered = self.offered, ""
        for attempt in range(3):
            if _file_id(offered) != self.offered_id:
                break             # moved by the server that handed this client the lock
            moved = _rename_exclusive(offered, self.buffer)
            if moved is None and _file_id(offered) == self.offered_id:
                moved = self._link_offered(offered)    # renameat2 refused here
            if moved is not False:
                break
            # Half a message from a client that died: this client holds the
            # lock, so nobody else writes the buffer meanwhile.
            if attempt == 0:
                _unlink_quietly(self.buffer)
            else:
                os.replace(offered, self.buffer)       # a writer that ignores the lock
        remove_empty_directory(os.path.dirname(offered))

    def _link_offered(self, offered: str) -> bool:
        """Hard-link the request as the buffer, then drop its name in line; False if taken.

        Not through the descriptor: a file once given a name cannot be given
        one again through it after that name is gone.
        """
        try:
            os.link(offered, self.buffer,
                    follow_symlinks=os.link not in os.supports_follow_symlinks)
        except FileExistsError:
            return False
        remove_if_same(offered, self.offered_id)
        return True

    def publish(self) -> None:
        """Put the request in place as the buffer, replacing what a client that died left."""
        if self.offered:
            self._place_offered()
            if self.durable and self.unnamed is not None:
                os.fsync(self.unnamed.directory)
            self.discard()
            return
        if self.unnamed is not None:
            unnamed, self.unnamed = self.unnamed, None
            try:
                try:
                    _link_unnamed(unnamed, self.buffer)
                except FileExistsError:
                    # Half a message from a client that died: this client holds
                    # the lock, so nobody else writes the buffer meanwhile.
                    _unlink_quietly(self.buffer)
                    _link_unnamed(unnamed, self.buffer)
                if self.durable:
                    os.fsync(unnamed.directory)
            finally:
                close_unnamed(unnamed)
            return
        temp, self.temp = self.temp, ""
        try:
            os.link(temp, self.buffer)
        except OSError:      # a file left there, or no hard links on this filesystem
            os.replace(temp, self.buffer)
        finally:
            _unlink_quietly(temp)
        _fsync_directory(self.buffer, self.durable)

    def discard(self) -> None:
        """Drop the request if it was not put in place."""
        self.withdraw_offer()
        close_unnamed(self.unnamed)
        self.unnamed = None
        if self.temp:
            _unlink_quietly(self.temp)
            self.temp = ""

    def __enter__(self) -> _Outgoing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


class _Ticker:
    """Tells status("tick", phase=..., waited=...) every interval while a wait lasts."""

    def __init__(self, status: Status, phase: str, interval: Optional[float]) -> None:
        self.status = status
        self.phase = phase
        self.interval = interval
        self.start = time.monotonic()
        self.next = self.start + interval if interval else float("inf")

    def __call__(self, now: float) -> float:
        """Tick if it is time; return the seconds until the next tick."""
        if now >= self.next and self.interval:
            self.status("tick", phase=self.phase, waited=now - self.start)
            self.next = now + self.interval
        return self.next - now


def _acquire(lock: Lock, paths: Paths, outgoing: _Outgoing, poll: bool, poll_interval: float,
             lock_timeout: Optional[float], retry_interval: float, status: Status,
             progress: Optional[float], lock_free: bool) -> float:
    """Take the lock, waiting in line while others hold it or wait for it.

    Returns when it asked for the lock, in seconds since the epoch. The
    request waits in line beside the ticket, and may be in place already,
    put there by the server that handed this client the lock. In line it
    sleeps watching no directory (the thread's watches are dropped while it
    waits), polling if poll. lock_free: no lock was there a moment ago (when
    the paths were checked).
    """
    line = Line(lock.path, lock.stale_after)
    # A lock in place is not tried: creating a file only to find the name
    # taken costs more, on some filesystems, than a whole exchange. Nor is a
    # free one with a line: it is free for the server to hand to the first
    # in line, and taking it even for a moment would spoil that. (A lock
    # taken since it was seen free is found taken when asked for; one let go
    # since it was seen is waited for in line, as the first in it.)
    if lock_free and not os.path.lexists(line.directory):
        # Made ahead, so that asking is a single link: a client slow to make
        # a file must not count as asking before those who then took turns.
        ready = _owned_unnamed(outgoing.directory_of(lock.path))
        arrived = time.time_ns()
        if lock.try_acquire(unnamed=ready):
            if not line.waiting(before=arrived):
                return arrived / 1e9             # nobody held it, nobody waited
            lock.release()    # others were waiting for it: let them go first
    else:
        arrived = time.time_ns()
    start = time.monotonic()
    next_notice = start
    tick = _Ticker(status, "lock", progress)
    line.join(outgoing.offer)
    waiter = Waiter([], poll, poll_interval)
    waiter.pause()                   # the directories: watched again for the reply
    status("queued", at=line.joined, named=line.named)
    ahead, woken = -1, False
    try:
        while True:
            # Once first, a client stays first: later tickets come after it.
            ahead = 0 if ahead == 0 else line.ahead(recheck=not woken)
            if ahead == 0:
                if woken and line.offer and _serving_hand_over(lock.path, paths):
                    # The server hands the lock on itself a moment after letting
                    # it go: racing it would leave this client to put its own
                    # request in place, and the server a wake-up behind.
                    waiter.wait_for_deletion([line.mine()], HAND_OVER_GRACE)
                if lock.try_acquire(line):
                    return arrived / 1e9
                # A holder's death makes no event: only a wait that timed
                # out (or the first look) has reason to suspect one.
                if not woken and not _message_waiting(paths.buffer) and _break_stale(lock, paths):
                    continue
            now = time.monotonic()
            if lock_timeout is not None and now - start >= lock_timeout:
                raise LockTimeout(lock.path, lock_timeout)
            if now >= next_notice:
                status("busy", ahead=ahead + 1)     # + 1: the client being served
                log.debug("waiting in line for %s: %d ahead", lock.path, ahead + 1)
                next_notice = now + retry_interval
            wake = min(next_notice - now, tick(now))
            if waiter.fd is None:
                wake = min(wake, retry_interval)    # polling: the spec's retry pace
            if lock_timeout is not None:
                wake = min(wake, start + lock_timeout - now)
            # Woken only when the file just ahead goes: the ticket ahead, or,
            # first in line, the lock, or its own ticket, made the lock by the
            # server; a directory's every change would wake a long line more
            # often than the server answers.
            watched = [line.before()] if ahead else [lock.path, line.mine()]
            woken = waiter.wait_for_deletion([p for p in watched if p], wake)
    except BaseException:
        # First out of the server's reach, then, if it handed this client the
        # lock meanwhile, out of the buffer, with the lock let go.
        outgoing.withdraw_offer()
        handed = line.handed(lock.path)
        if handed is not None:
            lock.hold(handed)
            _give_up(paths, lock, outgoing.fingerprint)
        raise
    finally:
        line.leave()


def _serving_hand_over(lock_path: str, paths: Paths) -> bool:
    """True if the lock is free and a filechat server, which hands it on, is running."""
    return _lstat_or_none(lock_path) is None and running_server(paths.presence) is not None


def _break_stale(lock: Lock, paths: Paths) -> bool:
    """Remove the lock if its holder is gone; True if removed.

    Only while no complete message waits: a dead holder's sent message is
    the server's to clear, with the lock.
    """
    reason = lock.break_stale()
    if reason:
        log.warning("removed stale lock %s: %s", lock.path, reason)
        sweep_leftovers(paths.directories())
    return reason is not None


def _message_waiting(buffer: str) -> bool:
    """True if a complete message waits in the buffer."""
    data = read_or_none(buffer)
    return data is not None and END_MARKER.encode() in data


def _await_reply(paths: Paths, response_path: str, lock: Lock, waiter: Waiter,
                 timeout: float, data: Fingerprint, status: Status,
                 progress: Optional[float], stream: bool) -> Tuple[str, bool]:
    """Wait for the complete reply and return it (see _read_reply)."""
    deadline = time.monotonic() + timeout
    server_up: Optional[bool] = None
    tick = _Ticker(status, "reply", progress)
    # What can end this wait: the reply, the lock's release, the server
    # coming or going, or a note saying why the reply will not come.
    presence = os.path.basename(paths.presence)
    names = {os.path.basename(p) for p in (response_path, lock.path, paths.presence,
                                           paths.rejection(response_path))}
    seen: Optional[Set[str]] = None
    while True:
        reply = _read_reply(paths, response_path, lock, stream)
        if reply is not None:
            return reply
        # A server that starts or stops changes its presence file; one that
        # is killed only lets go of its flock, which the safety re-check sees.
        if seen is None or presence in seen:
            up = running_server(paths.presence) is not None
            if up != server_up:
                if not up:
                    # Gone already at the first look, it may still have taken
                    # the message first (its claim is left): it ran, and stopped.
                    ran = server_up is not None or bool(paths.claims())
                    status("server-stopped" if ran else "no-server")
                elif server_up is not None:
                    status("server-started")
                server_up = up
        _crash_point("client-waiting")
        now = time.monotonic()
        if now >= deadline:
            withdrawn = _give_up(paths, lock, data)
            up = running_server(paths.presence) is not None
            raise ReplyTimeout(response_path, timeout, paths.buffer, withdrawn, up)
        seen = waiter.wait(min(deadline - now, tick(now)), names)


def _read_reply(paths: Paths, response_path: str, lock: Lock,
                stream: bool) -> Optional[Tuple[str, bool]]:
    """Return the reply if complete: ended by ESC, or by the server releasing the lock.

    As (text, is_error); with stream, as ("", is_error) once it is
    complete, for _copy_reply to read when the exchange is over.
    """
    reply = _parse_reply_file(response_path, stream)
    if reply is not None or lock.still_held():
        return reply
    # Read again now: a server that writes no ESC writes the reply, then
    # removes the lock, so a reply read after the release is whole.
    reply = _parse_reply_file(response_path, stream) or _unended_reply(response_path, stream)
    if reply is not None:
        return reply
    note = paths.rejection(response_path)
    reason = read_or_none(note)
    if reason is not None:
        _unlink_quietly(note)
        raise Rejected(reason.decode("utf-8", "replace"))
    return None


def _parse_reply_file(path: str, stream: bool) -> Optional[Tuple[str, bool]]:
    """Return the reply in path if it is ended by ESC (see _read_reply)."""
    if not stream:
        return parse_file(path, parse_reply, _parse_large_reply)
    extent = parse_file(path, _reply_extent, _large_reply_extent)
    return None if extent is None else ("", extent[1])


def _unended_reply(path: str, stream: bool) -> Optional[Tuple[str, bool]]:
    """Return a reply with no end marker, the whole file, as _read_reply does."""
    fd = _open_to_read(path)
    if fd is None:
        return None
    try:
        return "" if stream else _TextToMarker(fd, 0, "replace").join(), False
    finally:
        os.close(fd)


def _copy_reply(path: str, sink: IO[str], is_error: bool) -> Tuple[str, bool]:
    """Write the reply _read_reply found complete to sink; return ("", False).

    An error reply is not written but returned, as (its text, True).
    """
    fd = _open_to_read(path)
    if fd is None:
        raise FileNotFoundError(errno.ENOENT, "the reply was removed before it was read", path)
    try:
        if is_error:
            return _TextToMarker(fd, 0, "replace").join(), True
        for piece in _TextToMarker(fd, 0, "replace"):
            sink.write(piece)
        return "", False
    finally:
        os.close(fd)


def _await_release(lock: Lock, waiter: Waiter) -> None:
    """Wait (briefly) until the server has removed the lock.

    A lock whose flock is free counts as stale, so letting go earlier would
    invite waiters to break a lock the server is about to remove itself.
    """
    deadline = time.monotonic() + RELEASE_GRACE
    while lock.still_held() and time.monotonic() < deadline:
        waiter.wait(deadline - time.monotonic(), {os.path.basename(lock.path)})


def _give_up(paths: Paths, lock: Lock, data: Fingerprint) -> bool:
    """Withdraw the message if no server is answering it, release the lock; True if withdrawn."""
    withdrawn = _withdraw(paths.buffer, data)
    if not withdrawn and running_server(paths.presence) is None:
        # Claimed by a server that has stopped since: nobody is answering it.
        withdrawn = any(_withdraw(claim, data) for claim in paths.claims())
    lock.release()
    return withdrawn


def _withdraw(path: str, data: Fingerprint) -> bool:
    """Remove path if it still holds exactly this message; True if removed."""
    identity = _file_id(path)
    if identity is None:
        return False
    # A server that follows only the spec empties the buffer in place, so the
    # content, not only the file's identity, tells whether it is still ours.
    content = read_or_none(path)
    return (content is not None and _fingerprint(content) == data
            and remove_if_same(path, identity))


# --- Server ---

class Request(NamedTuple):
    """One message as the server received it."""

    message: str
    response_path: str     # absolute
    buffer: str


if TYPE_CHECKING:
    Responder = Callable[[Request], str]
    Report = Callable[..., None]


def _ignore(event: str, **info: object) -> None:
    """Ignore a server event."""


def serve(buffer: str, responder: Responder, *, max_messages: Optional[int] = None,
          lock_path: Optional[str] = None, allow_dirs: Sequence[str] = (),
          max_bytes: int = MAX_BYTES, stale_after: float = STALE_AFTER, durable: bool = False,
          poll: bool = False, poll_interval: float = POLL_INTERVAL,
          report: Report = _ignore) -> int:
    """Answer messages arriving in buffer until max_messages have been handled.

    For each complete message the server claims it, calls
    ``responder(request)`` for the reply text, publishes the reply in the
    request's response file and removes the lock. A responder that raises
    HookError gets the client an error reply instead. Replies are written
    only into the buffer's directory and allow_dirs. ``report(event,
    **info)`` hears "ready", "received", "replied", "failed", "rejected",
    "discarded" and "released". Returns the number of messages handled;
    runs until interrupted if max_messages is None.

    Raises UsageError for unusable paths and AlreadyServing if a live
    server already serves buffer.
    """
    paths = Paths.of(buffer, lock_path)
    check_buffer_path(buffer, paths.lock)
    server = _Server(paths, responder, _allowed_directories(buffer, allow_dirs), max_bytes,
                     stale_after, durable, report)
    presence = Presence(paths.presence, durable)
    presence.start()
    handled = 0
    try:
        sweep_leftovers(server.allowed)
        report("ready", buffer=buffer, lock_path=paths.lock)
        with Waiter(paths.directories(), poll, poll_interval, SERVER_EVENTS) as waiter:
            # Messages claimed by a server that stopped before answering come first.
            pending = [_Claim(path, None, None) for path in paths.claims()]
            while max_messages is None or handled < max_messages:
                server.answer(pending.pop(0) if pending else server.next_claim(waiter, presence))
                handled += 1
    finally:
        server.close()
        sweep_leftovers(server.allowed, mine=True)
        presence.withdraw()
    return handled


def _allowed_directories(buffer: str, allow_dirs: Sequence[str]) -> List[str]:
    """Return the real paths of the directories replies may be written to."""
    for directory in allow_dirs:
        if not os.path.isdir(directory):
            raise UsageError(f"--allow-dir {directory} is not a directory; create it or "
                             "leave it out")
    buffer_dir = os.path.dirname(os.path.abspath(buffer))
    return [os.path.realpath(d) for d in (buffer_dir, *allow_dirs)]


class _Server:
    """One server's way of claiming, answering and clearing up messages."""

    def __init__(self, paths: Paths, responder: Responder, allowed: List[str], max_bytes: int,
                 stale_after: float, durable: bool, report: Report) -> None:
        self.paths = paths
        self.responder = responder
        self.allowed = allowed
        self.max_bytes = max_bytes
        self.stale_after = stale_after
        self.durable = durable
        self.report = report
        self.unread: List[_Unread] = []
        self.handled = 0
        self.chores_done = 0.0
        self.buffer_name = {os.path.basename(paths.buffer)}
        self.lock_name = os.path.basename(paths.lock)
        self.looked: Optional[_Looked] = None    # a new lock: its message comes a moment later
        self.home = os.path.dirname(os.path.abspath(paths.buffer))
        self.spares = _Spares(self.home)
        self.line = Line(paths.lock, stale_after)

    def next_claim(self, waiter: Waiter, presence: Presence) -> _Claim:
        """Wait for a complete message and claim it by renaming the buffer.

        The claim's name carries the inode of the lock the message came
        with, so that even a restarted server removes that lock and no other.
        Chores (orphaned replies, the presence file's count, stale locks)
        are done once a second, not at every wake-up.
        """
        while True:
            if time.monotonic() - self.chores_done >= SAFETY_INTERVAL:
                self._chores(presence)
            self.spares.make()
            try:
                ended, data = read_if_ended(self.paths.buffer, END_MARKER.encode())
                if ended:
                    client, ref = self._hold_lock()
                    claim = self.paths.claim_prefix + ref.name()
                    try:
                        os.rename(self.paths.buffer, claim)
                    except BaseException:
                        client.close()
                        raise
                    _crash_point("server-taken")
                    log.debug("message claimed as %s", claim)
                    return _Claim(claim, data, client)     # a large one is read once claimed
            except FileNotFoundError:
                continue             # withdrawn by its client an instant ago
            except OSError as exc:
                self.report("discarded", reason=f"cannot use {exc.filename or self.paths.buffer}: "
                            f"{exc.strerror or exc}")
            self.report("idle", answered=self.handled)
            seen = waiter.wait(SAFETY_INTERVAL, self.buffer_name | {self.lock_name})
            if seen is not None and self.lock_name in seen and not seen & self.buffer_name:
                self._look_at_lock()

    def _chores(self, presence: Presence) -> None:
        """Do what need not delay an answer: orphans, the presence file, stale locks, the line."""
        self.chores_done = time.monotonic()
        self.forget_orphans()
        self.line.clear()
        if presence.answered != self.handled:
            presence.update(self.handled)
        data = read_or_none(self.paths.buffer)
        if not data or END_MARKER.encode() not in data:
            self._clear_stale_lock(data)

    def _clear_stale_lock(self, data: Optional[bytes]) -> None:
        """Remove a lock whose holder died before sending, with any half-written message."""
        holder = inspect_holder(self.paths.lock)
        reason = None if holder is None else stale_reason(holder, self.stale_after)
        if holder is None or reason is None:
            return
        if data:
            buffer = _file_id(self.paths.buffer)
            if buffer is not None and remove_if_same(self.paths.buffer, buffer):
                self.report("discarded", reason=f"half a message in {self.paths.buffer} from a "
                            "client that stopped while writing it")
        if break_stale_lock(self.paths.lock, self.stale_after):
            log.warning("removed stale lock %s: %s", self.paths.lock, reason)
            sweep_leftovers(self.allowed)

    def answer(self, claimed: _Claim) -> None:
        """Answer one claimed message, then free the lock it came with and the claim."""
        claim = claimed.path
        client = claimed.client
        if client is None:
            ref = _LockRef.parse(claim[len(self.paths.claim_prefix):]) or _LockRef(0, "")
            client = self._client(ref)
        try:
            self._answer(claimed, client)
        except OSError as exc:
            self.report("discarded", reason=f"cannot use {exc.filename or claim}: "
                        f"{exc.strerror or exc}")
        except BaseException:
            client.close()
            raise
        # Not on Ctrl+C: a message being answered stays claimed for the next server.
        self._release(client, claim)
        if client.watchable and client.reply is not None:
            self.unread.append(_Unread(client.reply[0], client.reply[1], client.fd))
        else:
            client.close()
        self.handled += 1
        self.report("released", lock_path=self.paths.lock)

    def _answer(self, claimed: _Claim, client: _Client) -> None:
        """Check the claimed message, obtain its reply and publish it."""
        try:
            parsed = (parse_request(claimed.data) if claimed.data is not None
                      else parse_file(claimed.path, parse_request, _parse_large_request))
        except ValueError as exc:
            self.report("discarded", reason=f"malformed message in {self.paths.buffer}: {exc}")
            return
        if parsed is None:
            self.report("discarded", reason=f"incomplete message in {claimed.path}")
            return
        raw_path, message = parsed
        request = Request(message, os.path.abspath(raw_path), self.paths.buffer)
        problem = self._target_problem(request.response_path)
        if problem is _ANSWERED:
            self.report("discarded", reason=f"{raw_path} was answered before a restart",
                        request=request)
            return
        if problem is not None:
            self._reject(raw_path, request, problem)
            return
        if not client.waiting(self.paths.lock):
            self.report("discarded", reason=f"the client for {raw_path} has gone",
                        request=request)
            return
        self.report("received", request=request)
        self._reply(request, client, claimed.path)

    def _reply(self, request: Request, client: _Client, claim: str) -> None:
        """Obtain the reply and publish it, taking it back if its client has gone meanwhile."""
        failure = None
        message = request.message
        size = len(message) if message.isascii() else len(message.encode("utf-8"))
        try:
            if size > self.max_bytes:
                raise HookError(f"the message is {size} bytes, over this server's limit of "
                                f"{self.max_bytes} (--max-bytes)")
            text = self.responder(request)
            data = reply_pieces(text)
        except (HookError, FramingError) as exc:
            failure = str(exc)
            text = f"filechat server: {failure}\n"
            data = reply_parts(text, error=True)
        publish_new(request.response_path, data, self.durable,
                    self.spares.take(request.response_path))
        _crash_point("server-replied")
        reply = _file_id(request.response_path)
        # Looked at once the reply is out, not before: the client reads it
        # meanwhile. One whose client has gone is taken back.
        if not client.waiting(self.paths.lock):
            if reply is not None:
                remove_if_same(request.response_path, reply)
            self.report("discarded", reason=f"the client for {request.response_path} has gone",
                        request=request)
            return
        self._release(client, claim)             # at once: the client waits for this
        client.reply = (request.response_path, reply)
        log.debug("reply published in %s", request.response_path)
        self.report("failed" if failure else "replied", request=request, reason=failure,
                    reply=text)

    def _release(self, client: _Client, claim: str) -> None:
        """Remove the client's lock and the claim, and hand the lock on, once per message.

        The lock goes first: its client waits for that. The claim goes at
        once after it, so that a Ctrl+C now leaves no answered message to
        be taken up again by the next server.
        """
        if client.release_lock(self.paths.lock):
            _unlink_quietly(claim)
            if self.line.hand_over(self.paths.lock, self.paths.buffer, self.durable):
                log.debug("lock %s handed to the next in line", self.paths.lock)

    def close(self) -> None:
        """Let go of what the server holds between messages; clear dead waiters' tickets."""
        self.spares.close()
        self._forget_look()
        self.forget_orphans()
        self.line.clear()

    def _look_at_lock(self) -> None:
        """Open a lock that has just appeared, while its client writes its message."""
        self._forget_look()
        fd = _open_to_read(self.paths.lock)
        if fd is not None:
            st = os.fstat(fd)
            self.looked = _Looked(*self._describe(fd), (st.st_dev, st.st_ino, st.st_size))

    def _forget_look(self) -> None:
        """Close the lock opened ahead, if any."""
        if self.looked is not None:
            self.looked.client.close()
            self.looked = None

    def _hold_lock(self) -> Tuple[_Client, _LockRef]:
        """Open the lock a message is about to be claimed with; describe it.

        One opened as it appeared is used if it is still the file in place,
        unchanged: the exchange is spared opening and reading it.
        """
        looked, self.looked = self.looked, None
        if looked is not None:
            st = _lstat_or_none(self.paths.lock)
            if st is not None and (st.st_dev, st.st_ino, st.st_size) == looked.was:
                return looked.client, looked.ref
            looked.client.close()
        fd = _open_to_read(self.paths.lock)
        if fd is None:
            return _Client(-1, False, False), _LockRef(0, "")
        return self._describe(fd)

    def _describe(self, fd: int) -> Tuple[_Client, _LockRef]:
        """Return the client whose lock is open as fd, and the lock's reference."""
        owner = read_owner(os.read(fd, 4096))
        client = _Client(fd, owner is not None and owner.host == HOST and sys.platform != "win32",
                         False)
        return client, _LockRef(client.inode, owner.token if owner else "")

    def _client(self, ref: _LockRef) -> _Client:
        """Open the lock a message came with, to follow its client while answering."""
        if ref.inode == 0:
            return _Client(-1, False, False)       # sent without a lock: nothing to follow
        fd = _open_to_read(self.paths.lock)
        if fd is None:
            return _Client(-1, False, True)
        client, found = self._describe(fd)
        if found != ref:
            client.close()
            return _Client(-1, False, True)        # the client gave up: another's lock now
        return client

    def forget_orphans(self) -> None:
        """Delete replies whose clients died before reading them."""
        for unread in list(self.unread):
            current = _file_id(unread.path)
            if current == unread.identity and not _flock(unread.watch, shared=True):
                continue                       # still waiting to be read
            self.unread.remove(unread)
            os.close(unread.watch)
            if current == unread.identity and unread.identity is not None:
                remove_if_same(unread.path, unread.identity)
                self.report("discarded", reason=f"removed the reply {unread.path}: its client "
                            "ended without reading it")

    def _target_problem(self, path: str) -> Optional[str]:
        """Return why the reply must not be written to path, or None if it may."""
        directory = os.path.dirname(path)
        if "\r" in path or "\0" in path:
            return "the path contains a control character"
        # The server's own directory is not looked at: it cannot serve without it.
        if directory != self.home and not os.path.isdir(directory):
            return f"directory {directory} does not exist"
        # The allowed directories were resolved at start; only others need it.
        real = directory if directory in self.allowed else os.path.realpath(directory)
        if not any(real == a or real.startswith(a.rstrip(os.sep) + os.sep)
                   for a in self.allowed):
            return (f"it is outside the directories this server writes to "
                    f"({', '.join(self.allowed)}); the server can allow more with --allow-dir")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return "it is a symbolic link, which the server never follows"
        if stat.S_ISDIR(st.st_mode):
            return "it is a directory"
        existing = read_or_none(path)
        if existing is not None and parse_reply(existing) is not None:
            return _ANSWERED
        return "the file already exists, and the server never overwrites a file"

    def _reject(self, raw_path: str, request: Request, problem: str) -> None:
        """Tell the client at once why its reply cannot be delivered."""
        reason = f"the server will not write the reply to {raw_path}: {problem}"
        note = self.paths.rejection(raw_path)
        _unlink_quietly(note)            # an unread note about an earlier message
        publish_new(note, reason.encode("utf-8"), self.durable)
        self.report("rejected", request=request, reason=reason)


class _Spares:
    """The file of the server's next reply, made ahead while the server is idle.

    Creating a file is the slowest step of an exchange on some filesystems
    (up to half a millisecond on ext4 without a journal), so the server
    makes the next reply's file (an unnamed file, O_TMPFILE, in the buffer's
    directory) between messages, rather than while a client waits for it.
    Where there are no unnamed files, replies are created as they go.
    """

    def __init__(self, home: str) -> None:
        self.home = home
        self.ready: Optional[Unnamed] = None
        self.made_in = (0, 0)            # the directory the ready file was made in

    def make(self) -> None:
        """Make the next reply's file, unless it is made already."""
        if self.ready is None:
            self.ready = open_unnamed(self.home)
            if self.ready is not None:
                directory = os.fstat(self.ready.directory)
                self.made_in = (directory.st_dev, directory.st_ino)

    def take(self, path: str) -> Optional[Unnamed]:
        """Return the ready file if it was made where path goes (None: create one)."""
        spare, self.ready = self.ready, None
        if spare is not None and os.path.dirname(path) == self.home:
            # Still the same directory: it may have been replaced while idle.
            try:
                now = os.stat(self.home)
            except OSError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == self.made_in:
                return spare
        close_unnamed(spare)
        return None

    def close(self) -> None:
        """Drop the ready file."""
        close_unnamed(self.ready)
        self.ready = None


class _LockRef(NamedTuple):
    """Which lock a claimed message came with: its inode and its holder's token.

    The inode alone could be reused by a later lock once its client has died;
    the token (empty for a lock that names nobody) tells them apart.
    """

    inode: int
    token: str

    @classmethod
    def parse(cls, text: str) -> Optional[_LockRef]:
        """Read a claim name's suffix, "<inode>-<token>"; None if it is not one."""
        inode, dash, token = text.partition("-")
        if not (inode.isdigit() and dash and all(c in "0123456789abcdef" for c in token)):
            return None
        return cls(int(inode), token)

    def name(self) -> str:
        """Return the claim name's suffix for this lock."""
        return f"{self.inode}-{self.token}"


class _Looked(NamedTuple):
    """A lock opened as it appeared, ahead of its message."""

    client: _Client
    ref: _LockRef
    was: Tuple[int, int, int]     # its device, inode and size then: is it still the lock?


class _Claim(NamedTuple):
    """A claimed message: its file, and, when just claimed, its bytes and its client."""

    path: str
    data: Optional[bytes]
    client: Optional[_Client]


class _Client:
    """The client a message came from, followed through its lock while it is answered."""

    def __init__(self, fd: int, watchable: bool, gone: bool) -> None:
        self.fd = fd                  # its lock, held open (-1 if none)
        self.watchable = watchable    # a local filechat client, whose flock is its life
        self.gone = gone
        self.released = False
        # Held open, the lock's inode cannot be reused by another lock.
        self.inode = os.fstat(fd).st_ino if fd >= 0 else 0
        self.reply: Optional[Tuple[str, Optional[Tuple[int, int]]]] = None

    def waiting(self, lock_path: str) -> bool:
        """True if the client has not given up (its lock is in place) nor ended."""
        if self.gone:
            return False
        if self.fd < 0:
            return True               # no lock to follow: assume it waits
        lock = _file_id(lock_path)
        if lock is None or lock[1] != self.inode:
            self.gone = True
        elif self.watchable and _flock(self.fd, shared=True):
            self.gone = True          # its flock died with it
        return not self.gone

    def release_lock(self, lock_path: str) -> bool:
        """Remove the client's lock if it is still the one the message came with.

        Once: True the first time, when the lock is let go (or had none).
        """
        if self.released:
            return False
        self.released = True
        lock = _file_id(lock_path) if self.fd >= 0 else None
        if lock is not None and lock[1] == self.inode:
            _unlink_quietly(lock_path)
        return True

    def close(self) -> None:
        """Stop following the client."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_ANSWERED = "answered before a restart"    # a _target_problem that is not an error


class _Unread(NamedTuple):
    """A published reply whose client has not read it yet."""

    path: str
    identity: Optional[Tuple[int, int]]
    watch: int             # the client's lock, open: its flock ends with the client


# --- Responders ---

def static_responder(text: str) -> Responder:
    """Reply with the same text to every message."""
    return lambda request: text


def file_responder(path: str) -> Responder:
    """Reply with the content of path, read anew for each message."""
    def respond(request: Request) -> str:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise HookError(f"cannot read --auto-reply-file {path}: "
                            f"{exc.strerror or exc}") from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise HookError(f"--auto-reply-file {path} is not valid UTF-8") from None
    return respond


def command_responder(command: str, hook_timeout: float = HOOK_TIMEOUT) -> Responder:
    """Reply with the output of a shell command given the message on stdin.

    The command sees FILECHAT_RESPONSE_FILE and FILECHAT_BUFFER_FILE in its
    environment. A non-zero exit, a run past hook_timeout or output that is
    not UTF-8 raises HookError.
    """
    def respond(request: Request) -> str:
        env = dict(os.environ, FILECHAT_RESPONSE_FILE=request.response_path,
                   FILECHAT_BUFFER_FILE=os.path.abspath(request.buffer))
        output = _run_hook(command, request.message.encode("utf-8"), env, hook_timeout)
        try:
            return output.decode("utf-8")
        except UnicodeDecodeError:
            raise HookError(f"--auto-reply-cmd {command!r} printed text that is not "
                            "valid UTF-8") from None
    return respond


def _run_hook(command: str, stdin: bytes, env: Dict[str, str], timeout: float) -> bytes:
    """Run command through the shell and return its stdout; HookError on failure."""
    import subprocess  # here, not at the top: clients never need it, and it is slow to import
    # Its own session, so that a timeout can stop the whole process group and
    # not only the shell, whose children would keep the pipe open.
    posix = os.name == "posix"
    interrupted: List[int] = []
    saved = _hold_interrupts(interrupted)
    try:
        proc = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, start_new_session=posix)
    finally:
        _restore_handlers(saved)
    try:
        if interrupted:
            raise KeyboardInterrupt     # held back until the hook could be stopped
        _crash_point("server-hook")
        output, _ = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_hook(proc, posix)
        raise HookError(f"--auto-reply-cmd {command!r} ran longer than "
                        f"{timeout:g} s and was stopped") from None
    except BaseException:
        _kill_hook(proc, posix)
        raise
    if proc.returncode != 0:
        raise HookError(f"--auto-reply-cmd {command!r} failed with exit status "
                        f"{proc.returncode}")
    return output


def _hold_interrupts(received: List[int]) -> Dict[int, object]:
    """Note Ctrl+C and SIGTERM in received instead of acting on them; return the old handlers.

    An interrupt inside Popen would leave a started hook that nothing can stop.
    Only the main thread can change handlers; elsewhere nothing is held.
    """
    import signal
    saved: Dict[int, object] = {}
    for name in ("SIGINT", "SIGTERM"):
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            saved[signum] = signal.signal(signum, lambda number, frame: received.append(number))
        except ValueError:
            break
    return saved


def _restore_handlers(saved: Dict[int, object]) -> None:
    """Put back the handlers _hold_interrupts replaced."""
    import signal
    for signum, handler in saved.items():
        signal.signal(signum, handler)  # type: ignore[arg-type]


def _kill_hook(proc: Popen[bytes], posix: bool) -> None:
    """Stop a hook and everything it started."""
    try:
        if posix:
            os.killpg(proc.pid, 9)
        else:
            proc.kill()
    except OSError:
        pass
    proc.communicate()


# --- Status ---
# After the server because it reads what both sides leave: the presence
# file, the lock, the buffer, claims and the line.

def status(buffer: str, lock_path: Optional[str] = None,
           stale_after: float = STALE_AFTER) -> Dict[str, object]:
    """Describe the exchange on buffer: server, lock, waiting message, line of clients.

    Returns the dictionary that ``filechat status --json`` prints.
    """
    paths = Paths.of(buffer, lock_path)
    presence = inspect_holder(paths.presence)
    server: Optional[Dict[str, object]] = None
    if presence is not None and presence.gone is None:
        owner = presence.owner
        server = {"pid": owner.pid if owner else None, "host": owner.host if owner else None,
                  "started": owner.started if owner else None,
                  "answered": owner.answered if owner else 0}
    holder = inspect_holder(paths.lock)
    lock: Dict[str, object] = {"path": paths.lock, "held": holder is not None}
    if holder is not None:
        reason = stale_reason(holder, stale_after)
        owner = holder.owner
        lock.update(pid=owner.pid if owner else None, host=owner.host if owner else None,
                    age=round(holder.age, 3),
                    state="stale" if reason else "alive" if owner and owner.host == HOST
                    else "unknown", stale_reason=reason)
    return {"buffer": buffer, "server": server, "lock": lock,
            "message_waiting": _message_waiting(buffer),
            "being_answered": len(paths.claims()),
            "waiting_clients": len(Line(paths.lock).tickets())}


# --- CLI ---

class Terminal:
    """The streams the CLI talks through; tests pass their own."""

    def __init__(self, stdin: Optional[IO[str]] = None, stdout: Optional[IO[str]] = None,
                 stderr: Optional[IO[str]] = None) -> None:
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.stdout_tty = _isatty(self.stdout)
        if stdout is None:
            _speak_utf8(self.stdout, self.stdout_tty)
        self.stderr_tty = _isatty(self.stderr)
        # https://no-color.org: any non-empty NO_COLOR turns colour off.
        self.color = (self.stderr_tty and not os.environ.get("NO_COLOR")
                      and os.environ.get("TERM") != "dumb")

    def error(self, text: str) -> None:
        """Print ``filechat: error: text`` on stderr, "error" in red at a terminal."""
        label = "\x1b[31merror\x1b[0m" if self.color else "error"
        self.err(f"filechat: {label}: {text}")

    def out(self, text: str = "") -> None:
        """Print a line on stdout."""
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def err(self, text: str = "") -> None:
        """Print a line on stderr."""
        self.stderr.flush()
        self.stdout.flush()
        self.stderr.write(text + "\n")
        self.stderr.flush()

    def stdin_is_tty(self) -> bool:
        """True if stdin is a terminal."""
        return _isatty(self.stdin)

    def read_text(self, what: str) -> Tuple[str, bool]:
        """Read stdin up to end of file; return (text, ended mid-line at a terminal).

        At a terminal, Ctrl+D after text on a line ends that text at once
        (the terminal hands over the partial line without a newline), instead
        of needing a second Ctrl+D.
        """
        tty = self.stdin_is_tty()
        try:
            fd = self.stdin.fileno()
        except (OSError, ValueError, AttributeError):
            return _decode_input(self.stdin.read().encode("utf-8", "surrogateescape"), what), False
        chunks: List[bytes] = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            if tty and not chunk.endswith(b"\n"):
                return _decode_input(b"".join(chunks), what), True
        return _decode_input(b"".join(chunks), what), False


def _speak_utf8(stream: IO[str], tty: bool) -> None:
    """Make stdout write replies as UTF-8, whatever the locale says.

    Into a pipe or a file the reply then goes byte for byte as it came; a
    terminal keeps its own encoding, with what it cannot show replaced.
    """
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    if encoding == "utf8":
        return
    try:
        if tty:
            stream.reconfigure(errors="replace")         # type: ignore[attr-defined]
        else:
            stream.reconfigure(encoding="utf-8")         # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):
        pass                  # not a text file of the usual kind: left as it is


def _isatty(stream: IO[str]) -> bool:
    """True if stream is a terminal."""
    try:
        return stream.isatty()
    except (ValueError, AttributeError):
        return False


class _StatusLine:
    """The client's status lines on stderr; at a terminal the last one counts the wait.

    At a terminal the line being waited on shows the seconds waited, updated
    in place, and is rewritten without them when the next line comes, so the
    screen ends up showing exactly the lines a pipe would get. Elsewhere each
    line is printed once, plainly; with quiet, not at all.
    """

    def __init__(self, term: Terminal, quiet: bool) -> None:
        self.term = term
        self.quiet = quiet
        self.live = term.stderr_tty and not quiet
        self.current: Optional[str] = None

    def say(self, text: str) -> None:
        """Show the next status line."""
        if self.quiet:
            return
        self.done()
        if self.live:
            self._write(text)
            self.current = text
        else:
            self.term.err(text)

    def tick(self, waited: float) -> None:
        """Show how long the current line has been waited on."""
        if self.live and self.current is not None:
            self._write(f"\r{self.current} {waited:.1f} s\x1b[K")

    def done(self) -> None:
        """End the current line, without its timer."""
        if self.current is not None:
            self._write(f"\r{self.current}\x1b[K\n")
            self.current = None

    def _write(self, text: str) -> None:
        self.term.stdout.flush()
        self.term.stderr.write(text)
        self.term.stderr.flush()


def _decode_input(data: bytes, what: str) -> str:
    """Decode typed or piped input as UTF-8; FramingError if it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FramingError(what, "is not valid UTF-8 text") from None


def _display(text: str) -> str:
    """Return text ending in exactly one newline for showing between banners."""
    return text if text.endswith("\n") else text + "\n"


def _display_path(path: str) -> str:
    """Show a path relative to the working directory when it lies below it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:      # another drive on Windows
        return path
    return path if relative.startswith(os.pardir) else relative


EXAMPLES = """\
examples:
  filechat server buf.txt                        answer at this terminal
  filechat client buf.txt resp.txt               type a message, end it with Ctrl+D
  filechat server buf.txt --auto-reply 'got it'  answer every message unattended
  filechat server buf.txt --auto-reply-cmd 'tr a-z A-Z' --log chat.jsonl
  reply=$(filechat client buf.txt --message 'hello')
  filechat client buf.txt --message-file report.txt --json
  filechat status buf.txt                        is a server up? who holds the lock?
  (run as python filechat.pyz ..., python -m filechat ..., or filechat ... once installed)
"""


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    epilog = EXAMPLES + "\n" + EXIT_STATUS_TABLE
    formatter = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="filechat", formatter_class=formatter, epilog=epilog,
        description="Client/server text messaging through plain files and a lockfile.")
    parser.add_argument("--version", action="version", version=f"filechat {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    server = commands.add_parser("server", help="answer messages arriving in a buffer file",
                                 formatter_class=formatter, epilog=epilog,
                                 description="Run continuously, show each message and reply.")
    server.add_argument("buffer", metavar="BUFFER", help="the buffer file clients write to")
    replies = server.add_mutually_exclusive_group()
    replies.add_argument("--auto-reply", metavar="TEXT",
                         help="reply TEXT to every message instead of asking")
    replies.add_argument("--auto-reply-file", metavar="PATH",
                         help="reply with the content of PATH, read anew for each message")
    replies.add_argument("--auto-reply-cmd", metavar="COMMAND",
                         help="reply with the output of shell COMMAND, run with the message "
                              "on stdin and FILECHAT_RESPONSE_FILE, FILECHAT_BUFFER_FILE set")
    server.add_argument("--hook-timeout", metavar="SECONDS", type=_seconds, default=HOOK_TIMEOUT,
                        help=f"stop an --auto-reply-cmd after SECONDS (default {HOOK_TIMEOUT:g})")
    server.add_argument("--max-messages", metavar="N", type=_count,
                        help="exit after answering N messages (default: run until Ctrl+C)")
    server.add_argument("--allow-dir", metavar="DIR", action="append", default=[],
                        help="also write replies into DIR (default: only the buffer's "
                             "directory); may be repeated")
    server.add_argument("--log", metavar="FILE",
                        help="append a JSON line for every exchange to FILE")
    _common_options(server)

    client = commands.add_parser("client", help="send one message and print the reply",
                                 formatter_class=formatter, epilog=epilog,
                                 description="Send one message to the server and print its reply.")
    client.add_argument("buffer", metavar="BUFFER", help="the server's buffer file")
    client.add_argument("response", metavar="RESPONSE", nargs="?",
                        help="the file the reply arrives in (default: a unique file beside "
                             "BUFFER, removed afterwards)")
    source = client.add_mutually_exclusive_group()
    source.add_argument("-m", "--message", metavar="TEXT",
                        help="send TEXT (default: read the message from stdin)")
    source.add_argument("--message-file", metavar="PATH",
                        help="send the content of PATH ('-' for stdin)")
    client.add_argument("--timeout", metavar="SECONDS", type=_seconds, default=RESPONSE_TIMEOUT,
                        help=f"wait at most SECONDS for the reply (default {RESPONSE_TIMEOUT:g})")
    client.add_argument("--lock-timeout", metavar="SECONDS", type=_seconds,
                        help="wait at most SECONDS for the lock (default: no limit)")
    client.add_argument("--lock-retry-interval", metavar="SECONDS", type=_positive_seconds,
                        default=LOCK_RETRY_INTERVAL,
                        help="seconds between 'Server busy' lines, and between tries for "
                             f"the lock with --poll (default {LOCK_RETRY_INTERVAL:g})")
    client.add_argument("--json", action="store_true",
                        help="print one JSON object (reply, waits, outcome) instead of the reply")
    client.add_argument("-q", "--quiet", action="store_true",
                        help="print no status lines, only the reply and errors")
    _common_options(client)

    state = commands.add_parser("status", help="show the server, the lock and who waits",
                                formatter_class=formatter, epilog=epilog,
                                description="Show whether a server runs on BUFFER, who holds "
                                            "the lock, and what waits.")
    state.add_argument("buffer", metavar="BUFFER", help="the buffer file")
    state.add_argument("--json", action="store_true", help="print JSON instead of text")
    state.add_argument("--lock-file", metavar="PATH",
                       help=f"the lockfile (default: {LOCKFILE_NAME} beside BUFFER)")
    state.add_argument("--stale-after", metavar="SECONDS", type=_seconds, default=STALE_AFTER,
                       help=f"as for client and server (default {STALE_AFTER:g})")
    return parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, given the terminal's width.

    argparse makes a formatter for every option it is given, and, left to
    find the width itself, imports shutil, whose own imports cost a client
    about a tenth of its run.
    """

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_terminal_width() - 2)   # - 2: as argparse does


def _terminal_width() -> int:
    """Return the width of the terminal, as shutil.get_terminal_size() finds it."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    try:
        return (stdout and os.get_terminal_size(stdout.fileno()).columns) or 80
    except (ValueError, OSError):
        return 80                    # no terminal (or stdout closed): shutil's fallback


def _common_options(parser: argparse.ArgumentParser) -> None:
    """Add the options server and client share."""
    parser.add_argument("--lock-file", metavar="PATH",
                        help=f"the lockfile (default: {LOCKFILE_NAME} beside BUFFER)")
    parser.add_argument("--max-bytes", metavar="N", type=_count, default=MAX_BYTES,
                        help=f"the largest message in bytes (default {MAX_BYTES})")
    parser.add_argument("--durable", action="store_true",
                        help="fsync every file and its directory, so that an exchange "
                             "survives a power loss (slower)")
    parser.add_argument("--stale-after", metavar="SECONDS", type=_seconds, default=STALE_AFTER,
                        help="treat a lock with no live holder on this host as stale after "
                             f"SECONDS (default {STALE_AFTER:g})")
    parser.add_argument("--poll", action="store_true",
                        help="poll the files instead of waiting for filesystem events "
                             "(for network filesystems)")
    parser.add_argument("--poll-interval", metavar="SECONDS", type=_positive_seconds,
                        default=POLL_INTERVAL,
                        help=f"seconds between checks with --poll (default {POLL_INTERVAL:g})")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log lock and wait transitions on stderr")


def _seconds(text: str) -> float:
    """Parse a non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be 0 or more: {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    """Parse a number of seconds greater than zero."""
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"seconds must be more than 0: {text!r}")
    return value


def _count(text: str) -> int:
    """Parse a positive whole number."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


CLIENT_STATUS = {
    "busy": "Server busy, please wait...",
    "locked": "Lock acquired. Sending message to server...",
    "sent": "Message sent to server.",
    "waiting": "Waiting for server response...",
    "server-stopped": "The server stopped; waiting for it to restart...",
    "server-started": "A server started; waiting for server response...",
}


def run_client(args: argparse.Namespace, term: Terminal) -> int:
    """Run the client subcommand."""
    interactive = args.message is None and args.message_file is None and term.stdin_is_tty()
    response = args.response or default_response_path(args.buffer)
    lines = dict(CLIENT_STATUS, **{
        "no-server": f"No server is running on {args.buffer}; waiting for one to start..."})
    shown = _StatusLine(term, args.quiet)
    times = {"start": time.monotonic()}

    def status(event: str, **info: object) -> None:
        if event == "received":
            shown.done()          # the reply is printed next
        if event in ("queued", "received"):
            return
        if event == "tick":
            shown.tick(float(info["waited"]))     # type: ignore[arg-type]
            return
        times.setdefault(event, time.monotonic())
        suffix = f" ({info['ahead']} ahead of you)" if event == "busy" else ""
        shown.say(lines[event] + suffix)

    record: Dict[str, object] = {
        "reply": None, "response_path": os.path.abspath(response), "lock_wait": None,
        "reply_wait": None, "outcome": "ok", "error": None, "exit_status": EXIT_OK}
    # Printed as it is read, unless it is shown between banners or in JSON:
    # a long reply is then never held whole, nor a long --message-file.
    reply_to = None if interactive or args.json else term.stdout
    try:
        message = _client_message(args, term, interactive)
        times["start"] = time.monotonic()
        try:
            reply = send(args.buffer, message, response, timeout=args.timeout,
                         lock_timeout=args.lock_timeout, lock_path=args.lock_file,
                         stale_after=args.stale_after, max_bytes=args.max_bytes,
                         durable=args.durable, poll=args.poll, poll_interval=args.poll_interval,
                         lock_retry_interval=args.lock_retry_interval, status=status,
                         progress_interval=PROGRESS_INTERVAL if shown.live else None,
                         reply_to=reply_to)
        finally:
            if args.message_file not in (None, "-") and not isinstance(message, str):
                message.close()
    except (FilechatError, KeyboardInterrupt) as exc:
        shown.done()
        if args.json:
            record.update(_waits(times), outcome=_outcome(exc), error=str(exc) or "interrupted",
                          exit_status=getattr(exc, "exit_code", EXIT_INTERRUPTED),
                          reply=exc.text if isinstance(exc, ServerError) else None)
            term.out(_json(record))
        raise
    shown.done()
    if args.json:
        record.update(_waits(times), reply=reply)
        term.out(_json(record))
        return EXIT_OK
    if interactive:
        term.out()
        term.out(BANNER)
        term.out("Server response:")
        term.out(BANNER)
        term.stdout.write(_display(reply))
        term.out(BANNER)
    term.stdout.flush()
    return EXIT_OK


def _waits(times: Dict[str, float]) -> Dict[str, Optional[float]]:
    """Return the seconds waited for the lock and for the reply."""
    now = time.monotonic()
    locked, sent = times.get("locked"), times.get("sent")
    return {"lock_wait": round((locked or now) - times["start"], 6),
            "reply_wait": None if sent is None else round(now - sent, 6)}


def _outcome(exc: BaseException) -> str:
    """Name how an exchange ended, for --json."""
    for kind, name in ((ServerError, "error-reply"), (ReplyTimeout, "timeout"),
                       (LockTimeout, "lock-timeout"), (Rejected, "rejected"),
                       (UsageError, "bad-input"), (KeyboardInterrupt, "interrupted")):
        if isinstance(exc, kind):
            return name
    return "error"


def _json(record: Mapping[str, object]) -> str:
    """Return record as one line of JSON."""
    import json  # here: only --json, status and --log need it, and it is slow to import
    return json.dumps(record, ensure_ascii=False)


def _client_message(args: argparse.Namespace, term: Terminal,
                    interactive: bool) -> Union[str, BinaryIO]:
    """Return the message to send: text, or a file to send it from a piece at a time.

    From --message, --message-file, or stdin: as a file unless it is a
    terminal, where Ctrl+D has to be read as typed.
    """
    if args.message is not None:
        _check_text(args.message, "--message")
        return str(args.message)
    if args.message_file not in (None, "-"):
        try:
            return open(args.message_file, "rb")
        except OSError as exc:
            raise UsageError(f"cannot read --message-file {args.message_file}: "
                             f"{exc.strerror or exc}") from None
    stdin = getattr(term.stdin, "buffer", None)
    if stdin is not None and not term.stdin_is_tty():
        return stdin          # type: ignore[no-any-return]
    if interactive:
        term.err("Enter your message (press Ctrl+D or Ctrl+Z when done):")
    text, mid_line = term.read_text("message on stdin")
    if mid_line:
        term.err()      # Ctrl+D left the cursor after the text
    return text


def run_server(args: argparse.Namespace, term: Terminal) -> int:
    """Run the server subcommand until Ctrl+C or --max-messages."""
    responder = _cli_responder(args, term)
    view = _ServerView(args, term)
    import signal
    signal.signal(signal.SIGTERM, _stop_on_signal)
    try:
        serve(args.buffer, responder, max_messages=args.max_messages, lock_path=args.lock_file,
              allow_dirs=args.allow_dir, max_bytes=args.max_bytes, stale_after=args.stale_after,
              durable=args.durable, poll=args.poll, poll_interval=args.poll_interval,
              report=view.report)
    except KeyboardInterrupt:
        # Ctrl+C is how the spec stops a server. A message being answered
        # stays claimed for the next server, and its client keeps waiting.
        view.clear_state()
        term.err("\nServer stopped.")
    finally:
        view.close()
    return EXIT_OK


class _ServerView:
    """What the server shows: the spec's transcript, a state line, the --log file.

    At a terminal, while the server waits, its last line shows its state
    (answered messages, who holds the lock), updated in place and erased
    before the transcript goes on, so the transcript reads as the spec's.
    """

    def __init__(self, args: argparse.Namespace, term: Terminal) -> None:
        self.args = args
        self.term = term
        self.lock_path = args.lock_file or default_lock_path(args.buffer)
        self.state_shown = False
        self.received = time.monotonic()
        self.log: Optional[IO[str]] = None
        if args.log:
            try:
                # Line-buffered: each exchange is one write of one whole line,
                # so that `tail -f` never shows half a record.
                self.log = open(args.log, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            except OSError as exc:
                raise UsageError(f"cannot open --log {args.log}: {exc.strerror or exc}; "
                                 "name a file in a directory you can write") from None

    def report(self, event: str, **info: object) -> None:
        """Show one event reported by serve()."""
        if event == "idle":
            self.show_state(info["answered"])
            return
        self.clear_state()
        request = info.get("request")
        term = self.term
        if event == "ready":
            term.out("Server starting...")
            term.out(f"Buffer file: {self.args.buffer}")
            term.out(f"Lockfile: {self.lock_path}")
            term.out("Waiting for clients...")
        elif event == "received" and isinstance(request, Request):
            self.received = time.monotonic()
            term.out()
            term.out(BANNER)
            term.out(f"Message received from client (response file: "
                     f"{_display_path(request.response_path)})")
            term.out(BANNER)
            term.stdout.write(_display(request.message))
            term.out(BANNER)
        elif event in ("replied", "failed") and isinstance(request, Request):
            if event == "failed":
                log.warning("%s; sent an error reply", info["reason"])
            term.out()
            term.out(f"Response sent to: {_display_path(request.response_path)}")
        elif event == "discarded":
            log.warning("%s; no reply sent", info["reason"])
        elif event == "rejected":
            log.warning("%s; the client was told", info["reason"])
        elif event == "released":
            term.out("Lockfile removed. Ready for next client.")
        if event in ("replied", "failed", "discarded", "rejected"):
            self.write_log(event, info)

    def write_log(self, event: str, info: Mapping[str, object]) -> None:
        """Append one exchange to the --log file."""
        if self.log is None:
            return
        request = info.get("request")
        known = isinstance(request, Request)
        replied = event in ("replied", "failed")
        self.log.write(_json({
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "outcome": event,
            "response_path": request.response_path if isinstance(request, Request) else None,
            "message": request.message if isinstance(request, Request) else None,
            "reply": info.get("reply") if replied else None,
            "duration": round(time.monotonic() - self.received, 6) if replied and known else None,
            "reason": info.get("reason")}) + "\n")

    def show_state(self, answered: object) -> None:
        """At a terminal, show what the server is doing on its last line."""
        if not self.term.stdout_tty:
            return
        holder = inspect_holder(self.lock_path)
        if holder is None:
            lock = "lock free"
        elif holder.owner is None:
            lock = f"lock held by a client without a name for {holder.age:.0f} s"
        else:
            lock = f"lock held by process {holder.owner.pid} for {holder.age:.0f} s"
        self.term.stdout.write(f"\r[waiting · {answered} answered · {lock}]\x1b[K")
        self.term.stdout.flush()
        self.state_shown = True

    def clear_state(self) -> None:
        """Erase the state line, so that the transcript goes on where it stood."""
        if self.state_shown:
            self.term.stdout.write("\r\x1b[K")
            self.state_shown = False

    def close(self) -> None:
        """Close the --log file."""
        if self.log is not None:
            self.log.close()


def run_status(args: argparse.Namespace, term: Terminal) -> int:
    """Run the status subcommand: 0 if a server runs, EXIT_NO_SERVER if not."""
    if os.path.isdir(args.buffer):
        raise UsageError(f"buffer file {args.buffer} is a directory; name a file")
    state = status(args.buffer, args.lock_file, args.stale_after)
    if args.json:
        term.out(_json(state))
    else:
        for label, text in _status_lines(state):
            term.out(f"{label:<8} {text}")
    return EXIT_OK if state["server"] else EXIT_NO_SERVER


def _status_lines(state: Mapping[str, object]) -> List[Tuple[str, str]]:
    """Return status() as (label, text) lines for people."""
    server = state["server"]
    if isinstance(server, dict):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(server["started"] or 0))
        running = (f"running, process {server['pid']} on {server['host']}, since {since}, "
                   f"{server['answered']} messages answered")
    else:
        running = "not running"
    lock = state["lock"]
    assert isinstance(lock, dict)
    if not lock["held"]:
        held = f"{lock['path']}: free"
    else:
        who = (f"process {lock['pid']} on {lock['host']}" if lock["pid"]
               else "a client that does not name itself")
        held = f"{lock['path']}: held by {who} for {lock['age']:.1f} s, {lock['state']}"
        if lock["stale_reason"]:
            held += f" ({lock['stale_reason']})"
    message = "a complete message waits" if state["message_waiting"] else "none waiting"
    if state["being_answered"]:
        message += f"; {state['being_answered']} being answered"
    return [("buffer", str(state["buffer"])), ("server", running), ("lock", held),
            ("message", message), ("line", f"{state['waiting_clients']} clients waiting")]


def _stop_on_signal(signum: int, frame: object) -> None:
    """Stop the server on SIGTERM as on Ctrl+C."""
    raise KeyboardInterrupt


def _cli_responder(args: argparse.Namespace, term: Terminal) -> Responder:
    """Return the responder the server's options ask for."""
    if args.auto_reply is not None:
        _check_text(args.auto_reply, "--auto-reply")
        return static_responder(args.auto_reply)
    if args.auto_reply_file is not None:
        return file_responder(args.auto_reply_file)
    if args.auto_reply_cmd is not None:
        return command_responder(args.auto_reply_cmd, args.hook_timeout)
    return _operator_responder(term)


def _operator_responder(term: Terminal) -> Responder:
    """Ask the person at the server's terminal for each reply."""
    def respond(request: Request) -> str:
        if exhausted:
            # Piped replies ran out: stop, leaving the message claimed for the
            # next server rather than answering it with nothing.
            raise FilechatError("standard input has ended, so there is no reply for "
                                "this message; it stays queued for the next server "
                                "(use --auto-reply* options to answer unattended)")
        while True:
            term.out()
            term.out(BANNER)
            term.out("Enter your response (press Ctrl+D or Ctrl+Z when done):")
            term.out(BANNER)
            try:
                text, mid_line = term.read_text("reply")
                if mid_line:
                    term.out()      # Ctrl+D left the cursor after the text
                _check_text(text, "reply")
            except FramingError as exc:
                term.err(f"filechat: error: {exc}; please type the reply again")
                continue
            if not tty:
                exhausted.append(True)
            return text

    tty = term.stdin_is_tty()
    exhausted: List[bool] = []
    return respond


def main(argv: Optional[Sequence[str]] = None, term: Optional[Terminal] = None) -> int:
    """Run the command line; return the exit status."""
    term = term or Terminal()
    args = build_parser().parse_args(argv)
    log.stream, log.verbose = term.stderr, getattr(args, "verbose", False)
    log.color = term.color
    try:
        if args.command == "server":
            return run_server(args, term)
        if args.command == "status":
            return run_status(args, term)
        return run_client(args, term)
    except FilechatError as exc:
        term.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        term.err()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `| head`); nothing left to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as exc:
        # A file changed under filechat's feet (say, the buffer replaced by a
        # directory while it ran): say which and how, never a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        term.error(f"{where}{exc.strerror or exc}; check the files beside the buffer")
        return EXIT_ERROR
    finally:
        log.stream, log.verbose, log.color = None, False, False


def exit_now(status: int) -> None:
    """End the process with status, skipping the interpreter's teardown.

    By the time main() returns every file is closed and nothing is left to
    clean up, and tearing the interpreter down would cost a client as much
    time as its whole exchange. Only the standard streams need flushing.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass              # a reader that went away; nothing more to say
    os._exit(status)


if __name__ == "__main__":
    exit_now(main())
