"""filechat: request/reply text messaging through plain files.

A server runs continuously and answers messages; a client runs once, sends one
message and prints the reply. Beside the buffer: BUFFER (the request: response
path, newline, message, ESC on a line of its own), server.lock (held while one
client's request is in flight) and RESPONSE (the reply, then ESC; ESC ESC for
an error); filechat's own BUFFER.server (the running server), BUFFER.taken.*
(a claimed message), BUFFER.rejected.* (why a reply was not written) and
server.lock.line/ (waiting clients' tickets, first come first).

One exchange: the client publishes the lock whole and exclusively (a temp file
hard-linked as server.lock, which fails if it exists, as O_CREAT|O_EXCL does),
waiting in line meanwhile; renames its request to BUFFER; the server claims it
by renaming it, publishes RESPONSE whole and removes the lock; the client reads
the reply and deletes it. Locks, tickets and presence files name their owner,
who flocks them (on a shared directory also rewrites them every 2 s), so that
a dead owner's file is cleared, a live one's never.

Sections, each built on those above: framing, look, publish, record, judge,
waiter, holding, sweep; then the client, the server, status, watch and the CLI.
Exit statuses: 0 ok, 1 error, 2 usage or bad input, 3 reply timeout, 4 lock
timeout, 5 no server, 6 breach seen (watch), 130 interrupted (129 SIGHUP, 143 SIGTERM).

Assumptions: every participant sees the same files; os.link fails if the name
exists and os.replace is atomic; text is UTF-8 without ESC or NUL; a peer that
follows only the spec may write files in place and leave the lock empty.
"""

from __future__ import annotations  # annotations unevaluated: typing is not imported

import argparse
import codecs
import errno
import functools
import json
import os
import re
import select
import stat
import struct
import sys
import time
import zlib
from _thread import _local as _thread_local

if sys.platform != "win32":
    import fcntl  # flock, the liveness signal of a file's holder; Windows uses the pid

# True for type checkers only: importing typing would cost a client a tenth
# of its run, and annotations are never evaluated.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from subprocess import Popen  # imported where hooks run: clients never need it
    from typing import (
        IO,
        Any,
        BinaryIO,
        Callable,
        Dict,
        Iterable,
        Iterator,
        List,
        Mapping,
        NoReturn,
        Optional,
        Sequence,
        Set,
        Tuple,
        TypeVar,
        Union,
    )
    F = TypeVar("F", bound=Callable[..., Any])    # a function, as a decorator returns it
else:
    import _signal  # signal's core: signal.py imports enum, a millisecond clients need not spend

__all__ = [
    "AlreadyServing",
    "Ended",
    "FilechatError",
    "FramingError",
    "HookError",
    "Lock",
    "LockTimeout",
    "NoServer",
    "Rejected",
    "ReplyTimeout",
    "Request",
    "ServerError",
    "StopServing",
    "UsageError",
    "Waiter",
    "WaitingLine",
    "encode_reply",
    "encode_request",
    "newline_added",
    "parse_reply",
    "parse_request",
    "reply_pieces",
    "request_pieces",
    "send",
    "serve",
    "status",
]
__version__ = "1.2.0"

# --- Constants ---

LOCKFILE_NAME = "server.lock"
END_MARKER = "\x1b"               # ESC ends a message and a reply
ERROR_MARKER = END_MARKER * 2     # a reply ending in ESC ESC reports a failure
TAKEN_SUFFIX = ".taken."          # BUFFER + this + lock inode-token: a message being answered
PRESENCE_SUFFIX = ".server"       # BUFFER + this: the running server's identity
LINE_SUFFIX = ".line"             # LOCK + this: the directory of waiting clients' tickets
REJECTED_SUFFIX = ".rejected."    # BUFFER + this + hash: why a reply was not written
REPLY_PREFIX = "filechat-reply-"  # + host tag-pid-random.txt: a default response file
BANNER = "=" * 60

LOCK_RETRY_INTERVAL = 2.0         # seconds between "Server busy" lines (spec)
RESPONSE_POLL_INTERVAL = 0.5      # seconds between reply checks when polling (spec)
POLL_INTERVAL = 0.5               # seconds between buffer checks when polling (spec)
RESPONSE_TIMEOUT = 60.0           # seconds a client waits for its reply (spec)
SAFETY_INTERVAL = 1.0             # seconds: longest sleep even when events are trusted
SHARED_POLL_INTERVAL = 0.02       # seconds between checks on a directory shared between hosts
HEARTBEAT_INTERVAL = 1.5          # seconds between rewrites of a held file on a shared directory
                                  # (and the longest a status waits to see its holder live)
HEARTBEAT_TIMEOUT = 4.0           # seconds without a rewrite after which its holder has ended:
                                  # two beats missed and a second's margin for a slow file server
STALE_AFTER = 300.0               # seconds before an unidentifiable lock counts as stale
HOOK_TIMEOUT = 10.0               # seconds an --auto-reply-cmd may run
PEER_CLEAR_WAIT = 3.0             # seconds a client lets a server that removed the lock before
                                  # clearing the buffer clear it (a spec peer's order)
PRESENCE_INTERVAL = 1.0           # seconds between a polling server's looks at its presence
                                  # (and at a buffer with no lock in place: see _Server.due)
SWEEP_INTERVAL = 60.0             # seconds between a running server's sweeps of leftovers
HOLDER_LOOKS = 0.25               # seconds between a polling client's judgements of a holder
                                  # (its server; the one ahead of it in line)
PROGRESS_INTERVAL = 0.1           # seconds between updates of a progress line at a terminal
MAX_BYTES = 1 << 20               # bytes: the largest message a client sends by default
MAX_PATH = 4096                   # bytes: the longest response path a server reads
READ_SIZE = 1 << 18               # bytes read at a time by a streaming copy
HEAD = 65536                      # bytes read first: the whole of most messages and replies
KEPT = 4096                       # bytes of a file that tell it from another (see Seen)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_LOCK_TIMEOUT = 4
EXIT_NO_SERVER = 5
EXIT_BREACH = 6
EXIT_INTERRUPTED = 130

# Each command's exit statuses, as its --help says them ("": every command's).
EXIT_STATUSES = {
    "": """\
exit status:
  0    success (a server stopped by Ctrl+C, SIGTERM, SIGHUP or --max-messages)
  1    error (the server reported a failure, a file could not be used)
  2    usage error or bad input (e.g. a message containing ESC)
  3    no reply within --timeout
  4    lock not acquired within --lock-timeout
  5    no server is running on the buffer (status; a client's --server-timeout)
  6    watch saw a protocol breach
  130  client interrupted by Ctrl+C (129: SIGHUP, 143: SIGTERM)""",
    "server": """\
exit status:
  0    stopped by Ctrl+C, SIGTERM, SIGHUP or --max-messages
  1    another server already serves the buffer, or a file could not be used
  2    usage error (a missing directory, a symlink, nothing to answer with)""",
    "client": """\
exit status:
  0    the reply was printed
  1    the server sent an error reply, or a file could not be used
  2    usage error or bad input (e.g. a message containing ESC); the server
       will not write the reply where asked
  3    no reply within --timeout
  4    lock not acquired within --lock-timeout
  5    no server showed up within --server-timeout
  130  interrupted by Ctrl+C (129: SIGHUP, 143: SIGTERM)""",
    "status": """\
exit status:
  0    a server is running on the buffer
  2    usage error (e.g. a missing directory)
  5    no server is running on the buffer""",
    "watch": """\
exit status:
  0    stopped by Ctrl+C, SIGTERM or SIGHUP; no breach of the protocol seen
  2    usage error (e.g. a missing directory)
  6    stopped, and a breach of the protocol was seen (counted in the last line)""",
}

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)   # absent on Windows
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)   # a FIFO planted at a protocol path must not hang
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)     # hooks and children must not inherit a flock
O_BINARY = getattr(os, "O_BINARY", 0)       # Windows would translate newlines
O_NOATIME = getattr(os, "O_NOATIME", 0)     # Linux: filechat's looks leave access times alone

HOST = os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "")
HOST_TAG = f"{zlib.crc32(HOST.encode()):08x}"     # marks temp files made on this host
_CRASH_AT = os.environ.get("FILECHAT_CRASH_AT")   # tests only: the step at which to die


class _Log:
    """filechat's log: logging.getLogger("filechat") for a library user.

    The command line writes its own lines (``filechat: warning: ...``, debug
    lines with -v) to ``stream`` instead: importing logging would cost a
    client more start-up time than its whole exchange.
    """

    stream: Optional[IO[str]] = None
    verbose = False
    color = False
    live: Optional[Any] = None    # what redraws a live line, and prints a line above it
                                  # (interject): a client's status, a server's state

    def debug(self, message: str, *args: object) -> None:
        """Log a debug line: one protocol step, or a wait's transition."""
        if self.stream is not None:
            if self.verbose:
                self._write("debug", message % args)
        elif "logging" in sys.modules:        # imported, so configured, by the program
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
        try:
            if self.live is not None:
                self.live.interject(f"filechat: {level}: {text}")
            else:
                self.stream.write(f"filechat: {level}: {text}\n")
                self.stream.flush()
        except (OSError, ValueError):
            pass              # stderr gone: there is nowhere left to say anything


log = _Log()


def _ignore(event: str, **info: object) -> None:
    """Ignore a status or server event."""


# --- Exceptions ---

class FilechatError(Exception):
    """Base of every error filechat reports; carries the exit status."""

    exit_code = EXIT_ERROR


class UsageError(FilechatError, ValueError):
    """A path or an argument that cannot be used."""

    exit_code = EXIT_USAGE


class OutputError(FilechatError):
    """Standard output cannot be written (a full disk, a failing device)."""


class FramingError(UsageError):
    """Text that the wire format cannot carry."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(what, reason)
        self.what = what
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.what} {self.reason}"


class ReplyTimeout(FilechatError, TimeoutError):
    """No reply arrived in time; fate says what the client saw of its message (FATES)."""

    exit_code = EXIT_TIMEOUT

    def __init__(self, response_path: str, timeout: float, buffer: str, fate: str,
                 server_running: bool, lock_path: str = "") -> None:
        super().__init__(response_path, timeout, buffer, fate, server_running, lock_path)
        self.response_path = response_path
        self.timeout = timeout
        self.buffer = buffer
        self.fate = fate
        self.server_running = server_running
        self.lock_path = lock_path
        self.withdrawn = fate == "withdrawn"
        self.left = fate in ("left", "taken")     # to a server that is not filechat

    def __str__(self) -> str:
        if self.fate == "withdrawn" and not self.server_running:
            fate = (f"no filechat server was running on {self.buffer}, and no other read the "
                    f"message; it was withdrawn; start one with: filechat server {self.buffer}")
        elif self.fate == "claimed":
            fate = "the server took the message but did not answer in time; raise --timeout"
        else:
            fate = fate_of(self.fate, self.buffer, self.response_path, self.lock_path)
        return f"no reply in {self.response_path} within {self.timeout:g} s: {fate}"


# What a client that gave up saw of its message, as it says so: only what it saw.
FATES = {
    "unsent": "nothing was sent",
    "withdrawn": "the message was withdrawn",
    "claimed": "the server had taken the message, and will find this client gone",
    "left": ("a server that is not filechat had read the message; it and the lock are left "
             "to that server, as the spec's clients do"),
    "taken": ("a program that is not filechat took the message from {buffer} without "
              "answering yet; the lock is left to it, as the spec's clients do"),
    "replied": ("a reply arrived in {response} but the lock {lock} was never released; "
                "the reply is left there"),
    "answered": "the reply had arrived, and was being printed",
}


def fate_of(fate: str, buffer: str, response: str, lock: str) -> str:
    """Say what a client that gave up saw of its message (see FATES)."""
    return FATES[fate].format(buffer=buffer, response=response, lock=lock)


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


class NoServer(FilechatError):
    """No server appeared on the buffer within the time allowed."""

    exit_code = EXIT_NO_SERVER

    def __init__(self, buffer: str, server_timeout: float, sent: bool, withdrawn: bool) -> None:
        super().__init__(buffer, server_timeout, sent, withdrawn)
        self.buffer = buffer
        self.server_timeout = server_timeout
        self.sent = sent
        self.withdrawn = withdrawn

    def __str__(self) -> str:
        within = (f" within {self.server_timeout:g} s (--server-timeout)"
                  if self.server_timeout else "")
        fate = ("nothing was sent" if not self.sent else
                "the message was withdrawn" if self.withdrawn else
                "a server took the message as the client gave up, and will find it gone")
        return (f"no server is running on {self.buffer}{within}; {fate}; "
                f"start one with: filechat server {self.buffer}")


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
    """A responder failed to produce a reply: its client gets an error reply naming why.

    serve() turns any other exception a responder raises into one, but
    StopServing (and KeyboardInterrupt), so that one message never stops it.
    """


class StopServing(FilechatError):
    """Raised by a responder that cannot answer at all: serve() stops, and the message
    stays claimed for the next server."""


class Ended(KeyboardInterrupt):
    """A client ended by SIGTERM or SIGHUP, which it takes as Ctrl+C; exits 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        if self.signum == getattr(_signal, "SIGHUP", 0):
            return "ended by SIGHUP (its terminal closed)"
        return "ended by SIGTERM"


# --- Signals: held while files are in flight ---

class _Interrupts:
    """Holds back SIGINT, SIGTERM and SIGHUP while an exchange has files in flight.

    Entered (``with _interrupts:``), a handler that acts on one of them
    (Ctrl+C's raises KeyboardInterrupt) acts only while a wait (a function
    marked with @_wait_point) runs, where nothing is half made, or once the
    outermost holder has left: an interrupt just after a file was opened and
    before it was noted would leak it, and one in the middle of cleaning up
    would leave files behind. Whether a wait runs is told by the frame the
    signal came in, not by a flag that an interrupt could leave set. Only
    the main thread acts on signals; in other threads nothing is held.
    """

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self) -> None:
        self.depth = 0
        self.saved: Dict[int, Any] = {}         # the handlers held back
        self.pending: List[int] = []            # signals received meanwhile

    def __enter__(self) -> _Interrupts:
        if self.depth == 0:
            try:
                for name in self.NAMES:
                    signum = getattr(_signal, name, None)
                    handler = None if signum is None else _signal.getsignal(signum)
                    if signum is not None and callable(handler):
                        self.saved[signum] = handler
                        _signal.signal(signum, self._received)
            except ValueError:
                self._restore()                 # not the main thread: nothing to hold
                return self
        self.depth += 1
        return self

    def __exit__(self, kind: object, exc: object, trace: object) -> None:
        self.depth -= 1
        if self.depth == 0:
            pending, self.pending = self.pending, []
            self._restore()
            if pending and kind is None:
                self._act(pending[0])

    def check(self) -> None:
        """In a wait: act on a signal held back until now."""
        if self.pending:
            self._act(self.pending.pop(0))

    def _received(self, signum: int, frame: Any) -> None:
        if frame is not None and frame.f_code in _WAITS:
            self._act(signum)
        else:
            self.pending.append(signum)

    def _act(self, signum: int) -> None:
        handler = self.saved.get(signum, _signal.getsignal(signum))
        if callable(handler) and handler != self._received:
            handler(signum, None)

    def _restore(self) -> None:
        for signum, handler in self.saved.items():     # noted until put back
            _signal.signal(signum, handler)
        self.saved = {}


_WAITS: Set[Any] = set()      # the code of the functions in which held signals act at once


def _wait_point(function: F) -> F:
    """Mark function as a wait: held signals are acted on while it runs (see _Interrupts).

    Nothing in it may open a file or leave one half made.
    """
    _WAITS.add(function.__code__)
    return function


_interrupts = _Interrupts()


# --- Framing: the wire format, pure; then the reader of a framed file ---

PIECE = 1 << 18               # characters of a long text encoded at a time

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


def _check_text(text: str, what: str) -> bytes:
    """Return text as UTF-8, refusing what the framing cannot carry."""
    check_characters(text, what)
    return _utf8(text, what)


def _check_path(response_path: str) -> bytes:
    """Return a response path as UTF-8, refusing one the framing cannot carry."""
    if "\n" in response_path or "\r" in response_path:
        raise FramingError(f"response path {response_path!r}", "contains a line break; "
                           "choose a path without one")
    return _check_text(response_path, f"response path {response_path!r}")


def _text_pieces(text: str, what: str) -> Iterator[bytes]:
    """Yield text as UTF-8, PIECE characters at a time: a long text is never encoded whole."""
    check_characters(text, what)
    for start in range(0, len(text), PIECE):
        yield _utf8(text[start:start + PIECE], what)


def newline_added(text: str) -> bool:
    """True if framing adds a newline to text, so that its ESC stands on a line of its own."""
    return text[-1:] not in ("", "\n")


def _closing(text: str, drawn: bool = True) -> bytes:
    """Return what ends a framed text: ESC, after a newline if drawn and its last line needs one.

    The spec draws ESC on a line of its own, and peers that read it so wait
    for that line; text that ends a line already is sent as it is.
    """
    return (b"\n" if drawn and newline_added(text) else b"") + END_MARKER.encode()


def request_pieces(response_path: str, message: str) -> Iterator[bytes]:
    """Frame a request as pieces to write in order: response path, newline, message, ESC.

    ESC stands on a line of its own: see newline_added.
    """
    yield _check_path(response_path) + b"\n"
    yield from _text_pieces(message, "message")
    yield _closing(message)


def encode_request(response_path: str, message: str) -> bytes:
    """Frame a request: response path, newline, message, ESC on a line of its own."""
    return b"".join(request_pieces(response_path, message))


def parse_request(data: bytes, added: bool = False) -> Optional[Tuple[str, str]]:
    """Return (response path, message) of a complete request, None if incomplete.

    added: its sender says framing added a newline (see newline_added), which
    is then not part of the message. Raises ValueError for a complete request
    that is malformed (no path line, text that is not UTF-8).
    """
    end = data.find(END_MARKER.encode())
    if end < 0:
        return None
    newline = data.find(b"\n", 0, end)
    if newline < 0 or not data[:newline].strip():
        raise ValueError("no response path before the message")
    if added and end > newline + 1 and data[end - 1:end] == b"\n":
        end -= 1
    view = memoryview(data)
    path = str(view[:newline], "utf-8").rstrip("\r")      # a peer on Windows may write CRLF
    return path, str(view[newline + 1:end], "utf-8")


def reply_pieces(text: str, error: bool = False, drawn: bool = True) -> Iterator[bytes]:
    """Frame a reply as pieces to write in order: text, then ESC (ESC ESC for an error).

    drawn: ESC on a line of its own (see newline_added), for a reader that
    may be any program; a filechat client gets the text exactly as it is.
    """
    yield from _text_pieces(text, "reply")
    yield _closing(text, drawn) + (END_MARKER.encode() if error else b"")


def encode_reply(text: str, error: bool = False, drawn: bool = True) -> bytes:
    """Frame a reply: text then ESC, or ESC ESC for an error reply (see reply_pieces)."""
    return b"".join(reply_pieces(text, error, drawn))


def parse_reply(data: bytes) -> Optional[Tuple[str, bool]]:
    """Return (text, is_error) of a complete reply, None if it has no end marker yet."""
    end = data.find(END_MARKER.encode())
    if end < 0:
        return None
    return (str(memoryview(data)[:end], "utf-8", "replace"),
            data[end:end + 2] == ERROR_MARKER.encode())


class _Framed:
    """A request or reply in a file open as fd, read as the framing says, a piece at a time.

    Its first HEAD bytes are read at once, then on until the first ESC (end:
    its offset, -1 if none), never further than limit bytes: a file of any
    size is never held whole, and what lies beyond the end is never read.
    """

    def __init__(self, fd: int, limit: Optional[int] = None) -> None:
        self.fd = fd
        self.head = os.read(fd, HEAD)
        self.end = self.head.find(END_MARKER.encode())
        offset = len(self.head)
        while self.end < 0 and offset >= HEAD and (limit is None or offset < limit):
            piece = os.read(fd, READ_SIZE)
            if not piece:
                break
            found = piece.find(END_MARKER.encode())
            self.end = -1 if found < 0 else offset + found
            offset += len(piece)

    def data(self, end: int) -> bytes:
        """Return the file's bytes up to offset end (for those a parser reads whole)."""
        return b"".join(self.pieces(0, end))

    def pieces(self, start: int, end: int) -> Iterator[bytes]:
        """Yield the file's bytes between offsets start and end, those in its head from it."""
        if start < len(self.head):
            yield self.head[start:end]
            start = len(self.head)
        if start < end:
            os.lseek(self.fd, start, os.SEEK_SET)
        while start < end:
            piece = os.read(self.fd, min(end - start, READ_SIZE))
            if not piece:
                return
            start += len(piece)
            yield piece

    @_wait_point      # a long reply, copied to a slow reader: its file is closed by the caller
    def copy(self, end: int, sink: IO[str]) -> None:
        """Write the UTF-8 text before offset end to sink, decoded a piece at a time."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for piece in self.pieces(0, end):
            _interrupts.check()
            sink.write(decoder.decode(piece))
        sink.write(decoder.decode(b"", final=True))


# --- Look: one way to see what is at a path, and what the filesystem lets one trust ---

GONE = (errno.ENOENT, errno.ESTALE)   # removed, or replaced through another mount (NFS, gluster)


class Seen:
    """A file as one look found it.

    Files are told apart by what they hold, their size and first KEPT bytes
    (a record's token is among them), an empty one by its inode: a network
    filesystem may give a hard link a new inode number.
    """

    __slots__ = ("atime_ns", "head", "ino", "kind", "mtime", "mtime_ns", "size")

    def __init__(self, st: os.stat_result, head: bytes) -> None:
        self.kind = "" if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)   # "": a file
        self.ino = st.st_ino
        self.size = st.st_size
        self.mtime = st.st_mtime
        self.mtime_ns = st.st_mtime_ns
        self.atime_ns = st.st_atime_ns
        self.head = head

    def same(self, other: Seen) -> bool:
        """True if other is this very file, as what it holds tells."""
        return (self.size == other.size and self.head == other.head
                and (self.size > 0 or self.ino == other.ino))

    def read_in_place(self) -> bool:
        """True if someone read it since it was written: its access time passed its change
        time (filechat's own looks leave it alone): a server that is not filechat."""
        return self.atime_ns > self.mtime_ns


def _kind(mode: int) -> str:
    """Name what a file that is not a regular one is, as a message says it."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "a device"


def look(path: str, size: int = KEPT, noatime: bool = False) -> Optional[Seen]:
    """Return what is at path now, and the first size bytes of a file; None if nothing is."""
    seen: Optional[Seen] = looked_into(path, lambda fd, st: Seen(
        st, os.read(fd, size) if size and stat.S_ISREG(st.st_mode) else b""), noatime)
    return seen


def looked_into(path: str, use: Callable[[int, os.stat_result], Any],
                noatime: bool = False, strict: bool = False) -> Any:
    """Return use(fd, st) for what is at path, open to read; None if nothing is now.

    The one way filechat looks at a file: opened, since an open asks the file
    server where a stat may answer from an attribute cache; read past the page
    cache on a shared directory, where a record rewritten in place on another
    mount is not seen through it; and a file removed or replaced meanwhile
    (ENOENT, ESTALE, from any call) is none. Other errors say which file.
    """
    fd = _open_to_read(path, noatime, strict)
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and _on_shared(path) and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return use(fd, st)
    except OSError as exc:
        if exc.errno in GONE:
            return None
        raise OSError(exc.errno, exc.strerror, exc.filename or path) from None
    finally:
        _close(fd)


def _open_to_read(path: str, noatime: bool = False, strict: bool = False) -> Optional[int]:
    """Open path for reading; None if nothing is there (ENOENT, ESTALE).

    Never through a symlink, and never blocking on a FIFO planted there. With
    noatime, for a buffer, without touching its access time where the system
    allows (the file's owner): a read in place is how a spec server shows.
    strict: PermissionError where it does not allow that, rather than a read.
    """
    flags = os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | O_BINARY
    if strict and not O_NOATIME:
        raise PermissionError(errno.EPERM, "O_NOATIME is not available here", path)
    try:
        if noatime and O_NOATIME:
            try:
                return os.open(path, flags | O_NOATIME)
            except PermissionError:
                if strict:       # another user's file: O_NOATIME refused
                    raise
        return os.open(path, flags)
    except OSError as exc:
        if exc.errno in GONE:
            return None
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "Is a symbolic link, which filechat never follows",
                          path) from None
        raise OSError(exc.errno, exc.strerror, path) from None


def _close(fd: int) -> None:
    """Close fd; a file gone meanwhile (ESTALE, from a network filesystem's close) is no error."""
    try:
        os.close(fd)
    except OSError as exc:
        if exc.errno not in GONE:
            raise


def _unlink_quietly(path: str) -> bool:
    """Remove path if it exists; True if it did."""
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno in GONE:
            return False
        raise
    return True


def remove_if_same(path: str, seen: Seen) -> bool:
    """Remove path only if it is still the file seen (see Seen.same); True if removed."""
    now = look(path) if listed(path, seen) else None
    return now is not None and now.same(seen) and _unlink_quietly(path)


def _names_cached(path: str) -> bool:
    """True if the mount of path's directory may keep a name's file after another mount
    replaced or removed it (FUSE: GlusterFS's default is a second; CephFS's is coherent)."""
    kind = filesystem_type(os.path.dirname(path) or ".")
    return kind.startswith("fuse.") and kind != "fuse.ceph-fuse"


def listed(path: str, seen: Optional[Seen] = None) -> bool:
    """True if path's directory, listed afresh, has path's name (for the file seen, by its
    inode where the listing gives one), always True where names are not cached.

    Where they are, an open of a name another mount replaced may get the old
    file, old content and all, or one it removed: a removal decided on that
    look would remove a new file. A listing (FUSE's readdirplus) asks the
    file server, and has the kernel look the names it lists up afresh.
    """
    if not _names_cached(path):
        return True
    directory, name = os.path.split(path)
    try:
        with os.scandir(directory or ".") as entries:
            for entry in entries:
                if entry.name == name:
                    return seen is None or entry.inode() in (seen.ino, 0, 0xFFFFFFFF)
    except OSError:
        return True               # no listing: the look alone decides
    return False


def _name_cached_gone(path: str) -> bool:
    """True if path, refused to a link as taken, is gone on the file server: GlusterFS's
    md-cache answers for a name another mount removed for up to a second; listxattr asks
    the brick (md-cache never keeps the list), and its ENOENT clears that entry."""
    if not _names_cached(path) or not hasattr(os, "listxattr"):
        return False
    try:
        os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        return exc.errno in GONE
    return False


def ends_with_esc(path: str) -> Optional[Seen]:
    """Return what is at path if it is a file that ends with ESC, as a complete reply does."""
    def use(fd: int, st: os.stat_result) -> Optional[Seen]:
        if not (stat.S_ISREG(st.st_mode) and st.st_size):
            return None
        os.lseek(fd, -1, os.SEEK_END)
        return Seen(st, b"") if os.read(fd, 1) == END_MARKER.encode() else None
    found: Optional[Seen] = looked_into(path, use)
    return found


def remove_empty_directory(path: str) -> bool:
    """Remove path if it is an empty directory (rmdir refuses any other); True if it is
    gone, removed now or before."""
    try:
        os.rmdir(path)
    except OSError as exc:
        return exc.errno in GONE      # else not empty, or not ours to remove
    return True


def _flock(fd: int, shared: bool) -> bool:
    """Try to flock fd without waiting; True if taken (always False without flock)."""
    if sys.platform == "win32":
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


# Filesystem types through which hosts share a directory. There inotify sees
# nothing of another host's changes, and attributes and pages are cached.
_SHARED_TYPES = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs",
                 "lustre", "gpfs", "gfs2", "ocfs2", "virtiofs", "fuse"}
# Shared ones whose flock one mount's holder keeps from every other mount
# (measured on GlusterFS 10 and CephFS 16; FUSE stand-ins such as bindfs and
# sshfs, and two mounts of anything else, share none).
_FLOCK_SHARED = {"glusterfs", "fuse.glusterfs", "ceph", "fuse.ceph-fuse"}
# Shared ones that keep a file renamed over while open as .fuse_hidden... (see _kept_hidden).
_HIDING = {"fuse.sshfs", "fuse.bindfs"}
# Shared ones where O_CREAT|O_EXCL lets two creators win (measured: smbnetfs in
# 497 of 500 races, rclone in 165 of 200), so that no lock can keep clients apart.
_NOT_EXCLUSIVE = {"fuse.smbnetfs", "fuse.rclone"}
_FILESYSTEMS: Dict[str, str] = {}     # directory: the type of the filesystem it is on


def filesystem_type(directory: str) -> str:
    """Return the type of the filesystem directory is on, as Linux names it ("" if unknown)."""
    directory = os.path.abspath(directory)
    kind = _FILESYSTEMS.get(directory)
    if kind is None:
        kind = _FILESYSTEMS[directory] = _mount_type(directory)
    return kind


def _mount_type(directory: str) -> str:
    """Return the type of the mount holding directory ("": not Linux, or not found).

    Found by its device number, one look; else (btrfs subvolumes have their
    own) by the innermost mount point above its real path.
    """
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").splitlines()
        dev = os.stat(directory).st_dev
    except OSError:
        return ""
    mounts = []
    for line in lines:
        fields = line.split(" ")
        try:
            point = fields[4]
            if "\\" in point:            # a space or other character escaped in octal
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
            mounts.append((fields[2], point, fields[fields.index("-", 6) + 1]))
        except (IndexError, ValueError):
            continue
    # The later of two mounts on one device or point hides the earlier.
    number = f"{os.major(dev)}:{os.minor(dev)}"
    kinds = [kind for device, _, kind in mounts if device == number]
    if kinds:
        return kinds[-1]
    real, longest, found = os.path.realpath(directory), -1, ""
    for _, point, kind in mounts:
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= longest:
            longest, found = len(point), kind
    return found


def is_shared(kind: str) -> bool:
    """True for a filesystem type through which other hosts may share the directory."""
    return kind in _SHARED_TYPES or kind.startswith("fuse.")


def _on_shared(path: str) -> bool:
    """True if path's directory is on a filesystem shared with other hosts."""
    return is_shared(filesystem_type(os.path.dirname(path) or "."))


def _flock_reaches(path: str) -> bool:
    """True if a flock on a file in path's directory keeps every process that sees it out."""
    kind = filesystem_type(os.path.dirname(path) or ".")
    return sys.platform != "win32" and (not is_shared(kind) or kind in _FLOCK_SHARED)


def _kept_hidden(path: str) -> bool:
    """True if path's directory is on sshfs or bindfs, whose libfuse keeps a file renamed over
    or removed while open under a hidden name until it is closed (the FUSE filesystems
    measured; GlusterFS's and CephFS's own clients do not)."""
    return filesystem_type(os.path.dirname(path) or ".") in _HIDING


def check_exclusive(path: str) -> None:
    """Refuse a directory whose filesystem does not create exclusively (see _NOT_EXCLUSIVE)."""
    directory = os.path.dirname(path) or "."
    kind = filesystem_type(directory)
    if kind in _NOT_EXCLUSIVE:
        raise FilechatError(
            f"{directory} is on {kind}, where O_CREAT|O_EXCL and hard links are not exclusive "
            "(two clients can both take the lock), so filechat cannot keep clients apart "
            "there; use a local directory, NFS, GlusterFS, CephFS, or the kernel's SMB "
            "client (mount -t cifs)")


# --- Publish: a file appears whole, under its name, or not at all ---

if TYPE_CHECKING:
    Data = Union[bytes, Iterable[bytes]]     # one bytes object, or pieces to write in order

# Errors from os.link that mean "this filesystem has no hard links".
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


def _crash_point(step: str) -> None:
    """Die here, as kill -9 would, if the tests asked for it (FILECHAT_CRASH_AT)."""
    if step == _CRASH_AT:
        os._exit(137)


def _temp_name(path: str) -> str:
    """Return a unique hidden name beside path that says which host and process made it,
    so that a sweep removes what a killed process left, and never a live one's."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.{HOST_TAG}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def _create(path: str, mode: int = 0o644) -> int:
    """Create path for writing, failing with FileExistsError if it exists."""
    return os.open(path,
                   os.O_WRONLY      # written by its creator only
                   | os.O_CREAT     # create it...
                   | os.O_EXCL      # ...only if absent: the spec's atomic test-and-set
                   | O_NOFOLLOW     # never through a planted symlink
                   | O_CLOEXEC      # hooks and children must not inherit a flock on it
                   | O_BINARY,
                   mode)


def _write_all(fd: int, data: Data, durable: bool) -> bytes:
    """Write all of data to fd (and to the disk, if durable); return its first KEPT bytes."""
    head = b""
    for part in [data] if isinstance(data, bytes) else _coalesced(data):
        if len(head) < KEPT:
            head += part[:KEPT - len(head)]
        view = memoryview(part)
        if _CRASH_AT == "mid-write":
            os.write(fd, view[:len(view) // 2])
            _crash_point("mid-write")
        while view:
            view = view[os.write(fd, view):]
    if durable:
        os.fsync(fd)
    return head


def _coalesced(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """Yield the pieces joined into runs of at least 64 KiB: fewer writes for small files."""
    run: List[bytes] = []
    size = 0
    for piece in pieces:
        run.append(piece)
        size += len(piece)
        if size >= 65536:
            yield b"".join(run) if len(run) > 1 else run[0]
            run, size = [], 0
    if run:
        yield b"".join(run)


class _Staged:
    """A file written under a temp name in its path's directory, to be put in place whole.

    How filechat publishes every file another process reads: readers see no
    file, the old one, or the whole new one, even if the writer is killed
    half-way. With hold it is flocked before it is written and kept open, so
    that a complete file with a free flock means its holder has ended.
    """

    def __init__(self, path: str, data: Data, durable: bool = False, hold: bool = False) -> None:
        self.path = path
        self.durable = durable
        self.temp = _temp_name(path)
        self.fd = _create(self.temp)
        try:
            if hold:
                _flock(self.fd, shared=False)
            head = _write_all(self.fd, data, durable)
            self.seen = Seen(os.fstat(self.fd), head)     # what tells it from another file
        except BaseException:
            self.discard()
            raise
        if not hold:
            self.close()

    def put(self, replace: bool = False) -> None:
        """Give the file its name: os.replace, or a hard link, FileExistsError if taken.

        A hard link fails if the name exists, as O_CREAT|O_EXCL does, and the
        file it names is complete. Where the filesystem has no hard links the
        name is taken with O_CREAT|O_EXCL and the complete file renamed over
        it, so it is as exclusive, and empty only for that moment.
        """
        try:
            if replace:
                self._replace()
            else:
                self._link()
        except OSError as exc:
            if isinstance(exc, FileExistsError):
                raise
            raise OSError(exc.errno, exc.strerror, self.path) from None    # say which file
        self.temp = ""
        if self.durable and os.name == "posix":      # the name, too, survives a power loss
            fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _replace(self) -> None:
        """Rename the temp file to the path, whatever is there."""
        try:
            os.replace(self.temp, self.path)
        except OSError:
            # A network filesystem may report a failure for a rename it made:
            # put in place is put in place, never a second time.
            if look(self.temp) is not None or not self.landed():
                raise

    def _link(self) -> None:
        """Hard-link the temp file as the path (see put), then drop its temp name.

        A network filesystem may report a failure for a link it made (sshfs:
        ENOENT), or EPERM or EACCES for a name that exists: what is at the
        path decides, before anything else is tried.
        """
        try:
            try:
                os.link(self.temp, self.path)
            except FileExistsError:
                if not _name_cached_gone(self.path):
                    raise
                os.link(self.temp, self.path)       # the refusal came from a stale cache
        except OSError as exc:
            if isinstance(exc, FileExistsError):
                raise
            if not self.landed():
                if exc.errno not in _NO_HARD_LINKS:
                    self._refuse_if_taken()
                    raise
                try:
                    os.close(_create(self.path))
                except OSError as create_exc:
                    if not isinstance(create_exc, FileExistsError):
                        self._refuse_if_taken()
                    raise
                os.replace(self.temp, self.path)
        if self.fd >= 0 and not _flock_reaches(self.path):
            self._hold_by_name()
        _unlink_quietly(self.temp)

    def _hold_by_name(self) -> None:
        """Keep the file open by its name rather than its temp name, on a FUSE stand-in.

        libfuse keeps a file removed while open under a hidden name, and before
        3.15 may leave it there when the holder dies at that moment (its issue
        746); the temp name is removed closed. No flock reaches others there,
        so none is lost.
        """
        fd = os.open(self.path, os.O_WRONLY | O_NOFOLLOW | O_CLOEXEC | O_BINARY)
        self.fd, temp_fd = fd, self.fd
        os.close(temp_fd)

    def landed(self) -> bool:
        """True if the file at the path is this one (see Seen.same)."""
        now = look(self.path)
        return now is not None and now.same(self.seen)

    def take_back(self) -> bool:
        """Remove the file from its path if it is still this one; True if removed."""
        return remove_if_same(self.path, self.seen)

    def _refuse_if_taken(self) -> None:
        """Raise FileExistsError if the path exists: a refusal that said something else."""
        if look(self.path, 0) is not None:
            raise FileExistsError(errno.EEXIST, "File exists", self.path)

    def close(self) -> None:
        """Close the file's descriptor, letting go of its flock."""
        # Forgotten before it is closed: after an interrupt in between, a second
        # close could hit a file given the same number.
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _close(fd)

    def discard(self) -> None:
        """Drop the file if it was not put in place."""
        self.close()
        if self.temp:
            _unlink_quietly(self.temp)
            self.temp = ""


def publish(path: str, data: Data, *, replace: bool = False, durable: bool = False,
            hold: bool = False) -> _Staged:
    """Publish data as path, whole (see _Staged); FileExistsError if it exists, unless replace.

    Returns the file, open and flocked if hold.
    """
    staged = _Staged(path, data, durable, hold)
    try:
        staged.put(replace)
    except BaseException:
        staged.discard()
        raise
    return staged


# --- Record: who holds a lock, ticket or presence file, rewritten in place ---

def _machine() -> Tuple[str, int]:
    """Return this machine's boot id and pid namespace ("" and 0 where there are none): with
    the host name they say where a holder's pid means something."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip().decode("ascii", "replace")
        return boot, os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return "", 0


BOOT_ID, PID_NS = _machine()


def _time_namespace() -> int:
    """Return the inode of this process's time namespace (0: none, before Linux 5.6): /proc
    shows a process's start shifted by the reader's namespace's boot time offset."""
    try:
        return os.stat("/proc/self/ns/time").st_ino
    except OSError:
        return 0


TIME_NS = _time_namespace()
BEAT = b'"beat": "00000000"}'       # how a record that beats ends: its counter is rewritten
COUNT = 10                          # digits of a presence file's count of answered messages


class Owner:
    """What a lock, ticket or presence file says about the process that holds it."""

    __slots__ = ("answered", "beats", "boot", "created", "flocked", "host", "newline", "pid",
                 "pidns", "pstart", "started", "timens", "timeout", "token")

    def __init__(self, pid: int, host: str, token: str, created: float, answered: int = 0,
                 started: float = 0.0, timeout: Optional[float] = None, boot: str = "",
                 pidns: int = 0, flocked: bool = True, beats: bool = False,
                 newline: bool = False, pstart: int = 0, timens: int = 0) -> None:
        self.pid = pid
        self.host = host
        self.token = token          # random: a file is its holder's while it holds this
        self.created = created
        self.answered = answered    # presence files only: messages the server answered
        self.started = started      # presence files only: when the server started
        self.timeout = timeout      # locks only: seconds the client waits for its reply
        self.newline = newline      # locks only: framing added a newline to the message
        self.boot = boot            # the holder's boot id and pid namespace: where its
        self.pidns = pidns          # pid means something ("", 0: an older record)
        self.flocked = flocked      # its holder's flock keeps out whoever sees the file
        self.beats = beats          # its holder rewrites it every HEARTBEAT_INTERVAL
        self.pstart = pstart        # when its pid's process started (0: unknown), as /proc
        self.timens = timens        # shows it in this time namespace: a pid reused since
                                    # names a process that started at another tick

    def here(self) -> bool:
        """True if the holder runs on this machine, so that its pid can be checked."""
        return (self.host == HOST and (not self.boot or self.boot == BOOT_ID)
                and (not self.pidns or self.pidns == PID_NS))

    def start(self) -> int:
        """Return pstart where this process's /proc shows starts as the holder's did, else 0:
        in its time namespace, and where this process could read its own start."""
        return self.pstart if self.timens == TIME_NS and _own_start(os.getpid()) else 0

    def __repr__(self) -> str:
        return f"Owner(pid={self.pid}, host={self.host!r}, token={self.token!r})"


def _owner_record(path: str, token: str, answered: Optional[int] = None, started: float = 0.0,
                  timeout: Optional[float] = None, newline: bool = False) -> bytes:
    """Return this process's record for the file path: one line of JSON.

    answered, started: a presence file's count (a fixed width, rewritten in
    place) and start; timeout, newline: what a lock tells the server (how
    long the client waits; framing added a newline to its message). It says
    whether the holder's flock reaches all who see the file ("local": a local
    disk, "flock": a cluster filesystem), and on a shared directory it ends in
    a heartbeat counter.
    """
    shared = _on_shared(path)
    record: Dict[str, object] = {"pid": os.getpid(), "host": HOST, "token": token,
                                 "created": time.time()}
    if answered is not None:
        record.update(answered=f"{answered:0{COUNT}d}", started=started)
    if timeout is not None:
        record.update(timeout=float(timeout))
    if newline:
        record.update(newline=True)
    pstart = _own_start(os.getpid())
    record.update(boot=BOOT_ID, pidns=PID_NS,
                  **({"pstart": pstart, "timens": TIME_NS} if pstart else {}), local=not shared)
    if shared and _flock_reaches(path):
        record.update(flock=True)
    if shared:
        record.update(beat="00000000")
    return (json.dumps(record) + "\n").encode()


def read_owner(data: bytes) -> Optional[Owner]:
    """Parse a lock, ticket or presence file; None for an empty or foreign one."""
    try:
        raw = json.loads(data.decode("utf-8"))
        timeout = raw.get("timeout")
        return Owner(int(raw["pid"]), str(raw["host"]), str(raw["token"]),
                     float(raw["created"]), int(raw.get("answered", 0)),
                     float(raw.get("started", 0.0)), None if timeout is None else float(timeout),
                     str(raw.get("boot", "")), int(raw.get("pidns", 0)),
                     raw.get("local", True) is not False or raw.get("flock") is True,
                     "beat" in raw, raw.get("newline") is True, int(raw.get("pstart", 0)),
                     int(raw.get("timens", 0)))
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return None         # empty, cut short, or another program's (1e999: inf, no int)


def token_at(path: str) -> Optional[str]:
    """Return the token of the record at path ("" if it names nobody), None if nothing is there."""
    seen = look(path)
    if seen is None:
        return None
    owner = read_owner(seen.head)
    return "" if owner is None else owner.token


class _Heartbeat:
    """Keeps this process's held records on a shared directory visibly alive.

    A holder on another host cannot be checked by its pid, nor everywhere by
    its flock, so a thread rewrites each record every HEARTBEAT_INTERVAL, in
    place and at the same length, with a new counter (a holder busy elsewhere
    still beats); a record unchanged for HEARTBEAT_TIMEOUT by the watcher's own
    clock has ended; no two clocks need agree. The first beat comes a third
    of that after the thread starts: a look that finds a record just made
    (status) waits for it. It also touches the pending request, whose age
    tells a sweep a dead writer's leftover.
    """

    def __init__(self) -> None:
        import _thread
        self.guard = _thread.allocate_lock()    # a beat and a rewrite or close never overlap
        self.records: Dict[int, Tuple[bytearray, int]] = {}   # a held file: its record, and
                                                              # where its counter is
        self.touched: Set[str] = set()          # paths whose times are kept fresh
        self.running = False
        self.count = 0

    def start(self, fd: int, record: bytes) -> None:
        """Beat the record held open for writing as fd, if it is one that beats."""
        if record.rstrip(b"\n").endswith(BEAT):
            with self.guard:
                self.records[fd] = bytearray(record), record.rindex(b'"}') - 8
                self._run()

    def rewrite(self, fd: int, record: bytes) -> None:
        """Write record over the one held open as fd, in place; it keeps its current beat."""
        with self.guard:
            if fd in self.records:
                kept, at = self.records[fd]
                kept[:at] = record[:at]
                record = bytes(kept)
            _write_in_place(fd, record)

    def stop(self, fd: int) -> None:
        """Stop beating fd: before it is closed, so that no beat hits a reused descriptor."""
        if fd in self.records:
            with self.guard:
                self.records.pop(fd, None)

    def touch(self, path: str, keep: bool = True) -> None:
        """Keep path's modification time fresh (keep=False: no longer)."""
        if keep or path in self.touched:
            with self.guard:
                (self.touched.add if keep else self.touched.discard)(path)
                self._run()

    def _run(self) -> None:
        if not self.running:
            import _thread
            self.running = True
            _thread.start_new_thread(self._beat_forever, ())

    def _beat_forever(self) -> None:
        pause = HEARTBEAT_INTERVAL / 3
        while True:
            time.sleep(pause)
            pause = HEARTBEAT_INTERVAL
            with self.guard:
                self.count += 1
                counter = f"{self.count & 0xFFFFFFFF:08x}".encode()
                for fd, (record, at) in self.records.items():
                    record[at:at + 8] = counter
                    try:
                        _write_in_place(fd, bytes(record))
                    except OSError:
                        pass            # removed meanwhile, or the server is away: try again
                for path in self.touched:
                    try:
                        os.utime(path)
                    except OSError:
                        pass


def _write_in_place(fd: int, record: bytes) -> None:
    """Write record at the start of the file open as fd, over one of the same length."""
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, record)


_heartbeat = _Heartbeat()


def _new_heartbeat() -> None:
    """In a forked child: the parent's held files are the parent's to beat."""
    global _heartbeat
    _heartbeat = _Heartbeat()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_heartbeat)


# --- Judge: whether a holder lives, has ended, or cannot be told; and when to look again ---

class Verdict:
    """What a look at a lock, ticket or presence file says of its holder."""

    __slots__ = ("again", "ended", "how", "owner", "seen", "silent")

    def __init__(self, seen: Seen, owner: Optional[Owner] = None, ended: Optional[str] = None,
                 how: str = "", again: float = float("inf"), silent: float = 0.0) -> None:
        self.seen = seen
        self.owner = owner      # None: empty, or written by a spec-following peer
        self.ended = ended      # why its holder is known to have ended
        self.how = how          # how its life is seen: "flock", "pid", "heartbeat", or ""
        self.again = again      # seconds until a look may tell more (inf: an event will)
        self.silent = silent    # heartbeat: seconds its record has not been seen to change

    @property
    def age(self) -> float:
        """Seconds since the file was written, never less than zero (see _age)."""
        return _age(self.seen)

    def mine(self, token: str, seen: Optional[Seen] = None) -> bool:
        """True if this is the file holding token (without one: the file seen)."""
        if token:
            return self.owner is not None and self.owner.token == token
        return seen is not None and self.seen.same(seen)


def judge(path: str, ours: bool = False) -> Optional[Verdict]:
    """Return what the file at path says of its holder; None if there is no file.

    A holder is judged where its life shows: by its flock where flocks keep
    every mount out (a local disk; GlusterFS and CephFS) and it is free (the
    holder has ended; a held one may outlive a crashed host there, so the
    heartbeat still decides); by its pid on its own machine; by its heartbeat
    elsewhere. ours: a file only filechat makes (ticket, presence file), so
    one naming nobody (cut short by a power loss, or empty for the moment a
    file is put in place without hard links) is nobody's once it has stayed
    so for a second with a free flock, or unchanged for HEARTBEAT_TIMEOUT.
    What is not a regular file is never a holder's, and never judged.
    """
    def use(fd: int, st: os.stat_result) -> Verdict:
        seen = Seen(st, os.read(fd, KEPT) if stat.S_ISREG(st.st_mode) else b"")
        owner = None if seen.kind else read_owner(seen.head)
        if owner is not None:
            return _life(fd, seen, owner, path)
        if ours and not seen.kind:
            if _flock_reaches(path) and not _on_shared(path):
                if time.time() - seen.mtime > 1.0 and _flock(fd, shared=True):
                    return Verdict(seen, ended="it names no holder, and none holds it")
                return Verdict(seen, how="flock", again=1.0)
            silent = _beats_stopped(path, seen.head)
            ended = (f"it names no holder, and has not changed for {silent:.0f} s"
                     if silent > HEARTBEAT_TIMEOUT else None)
            return Verdict(seen, None, ended, "heartbeat", HEARTBEAT_TIMEOUT - silent + 0.01,
                           silent)
        return Verdict(seen)
    verdict: Optional[Verdict] = looked_into(path, use)
    return verdict


def _life(fd: int, seen: Seen, owner: Owner, path: str) -> Verdict:
    """Judge the holder of the file open as fd (see judge)."""
    where = "" if owner.here() else f" on {owner.host}"
    gone = f"its holder, process {owner.pid}{where}, has ended"
    # A local disk is one machine's: there another host's record cannot be judged by flock.
    flocked = owner.flocked and _flock_reaches(path) and (owner.here() or _on_shared(path))
    if flocked and _flock(fd, shared=True):
        return Verdict(seen, owner, gone, "flock")
    if flocked and not owner.beats:
        return Verdict(seen, owner, None, "flock")       # its end closes the file: an event
    if owner.here():
        if not _pid_alive(owner.pid, owner.start()):
            return Verdict(seen, owner, gone, "pid")
        if not owner.beats:
            return Verdict(seen, owner, None, "pid", HEARTBEAT_INTERVAL)
    if owner.beats:
        silent = _beats_stopped(path, seen.head)
        if silent > HEARTBEAT_TIMEOUT:
            return Verdict(seen, owner, f"its holder, process {owner.pid}{where}, has not "
                           f"rewritten it for {silent:.0f} s (its heartbeat stopped)",
                           "heartbeat", 0.0, silent)
        # On its own machine a live pid says it lives; the heartbeat ends a reused pid's
        # where no start tells (see Owner.start).
        how = "pid" if owner.here() else "heartbeat"
        return Verdict(seen, owner, None, how, HEARTBEAT_TIMEOUT - silent + 0.01, silent)
    return Verdict(seen, owner)


# The judge's memory: each beating record's content and since when it has not
# changed (monotonic), and when each file dated in the future (by a clock set
# back) was first seen, so that its age counts from then.
_SEEN: Dict[str, Tuple[bytes, float]] = {}
_FUTURE: Dict[int, float] = {}


def _beats_stopped(path: str, data: bytes) -> float:
    """Return for how long the record at path has not changed; 0 if it just did.

    Counted from this process's first look: a watcher that arrives late
    waits HEARTBEAT_TIMEOUT seconds before it judges a holder dead.
    """
    now = time.monotonic()
    seen = _SEEN.get(path)
    if seen is None or seen[0] != data:
        if len(_SEEN) > 256:            # forget records not looked at for a minute
            for key in [k for k, (_, at) in _SEEN.items() if now - at > 60.0]:
                del _SEEN[key]
        _SEEN[path] = (data, now)
        return 0.0
    return now - seen[1]


def _age(seen: Seen) -> float:
    """Return the seconds since a file was written, never less than zero."""
    age = time.time() - seen.mtime
    if age >= -1.0:                   # a second of leeway: clocks of one host's files
        return max(age, 0.0)
    return time.monotonic() - _FUTURE.setdefault(seen.ino, time.monotonic())


def stale_reason(verdict: Verdict, stale_after: float) -> Optional[str]:
    """Return why a lock is stale: its holder ended, or it cannot be checked and is old."""
    if verdict.ended:
        return verdict.ended
    if verdict.how or verdict.seen.kind:
        return None               # a live holder is never broken, however long it holds,
                                  # nor what is not a lock file, which is not ours
    if verdict.age > stale_after:
        who = ("an unidentified holder" if verdict.owner is None
               else f"host {verdict.owner.host}")
        return f"held by {who} for {verdict.age:.0f} s (over {stale_after:g} s)"
    return None


def remove_judged(path: str, verdict: Verdict) -> bool:
    """Remove the file at path if it is still the one judged: its token, or what it holds."""
    if verdict.owner is not None:
        return (listed(path, verdict.seen) and token_at(path) == verdict.owner.token
                and _unlink_quietly(path))
    return remove_if_same(path, verdict.seen)


def break_stale(path: str, stale_after: float,
                ours: bool = False) -> Optional[Tuple[str, Optional[Owner]]]:
    """Remove the lock (or ticket) at path if it is stale; return why and whose, else None.

    The breaker first takes an exclusive flock on the very file judged, which
    a live holder's flock refuses and which makes other breakers that flocks
    reach see it taken; only then is the name, checked once more, removed.
    """
    verdict = judge(path, ours)
    reason = None if verdict is None else stale_reason(verdict, stale_after)
    if verdict is None or reason is None:
        return None
    def use(fd: int, st: os.stat_result) -> bool:
        if verdict.owner is None and not Seen(st, os.read(fd, KEPT)).same(verdict.seen):
            return False            # another file has its name now
        return ((sys.platform == "win32" or _flock(fd, shared=False))
                and remove_judged(path, verdict))
    return (reason, verdict.owner) if looked_into(path, use) else None


def running_server(presence_path: str) -> Optional[Owner]:
    """Return the identity of the server whose presence file is live, else None."""
    verdict = judge(presence_path, ours=True)
    if verdict is None or verdict.ended or verdict.seen.kind:
        return None
    return verdict.owner or Owner(0, "", "", 0.0)


def _pid_alive(pid: int, start: int = 0) -> bool:
    """True if a process with this pid exists on this host (and has not ended as a zombie);
    with start (see _process_start), only the process that started then."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False   # no such process (or a pid too large to be one)
    except OSError:
        pass           # exists, but belongs to someone else
    fields = _proc_stat(pid)
    if not fields:
        return True    # not Linux: no zombies or start times to tell
    return fields[0] != b"Z" and (not start or _process_start(pid, fields) == start)


def _proc_stat(pid: int) -> List[bytes]:
    """Return the fields of /proc/PID/stat after the command's name ([] if unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()
    except OSError:
        return []


def _process_start(pid: int, fields: Optional[List[bytes]] = None) -> int:
    """Return when the process pid started, in clock ticks after boot; 0 where unknown.

    A number of the kernel's own, not a clock time: setting the clock moves
    neither it nor the holder's record, so a pid that names a process started
    at another tick has been reused.
    """
    fields = _proc_stat(pid) if fields is None else fields
    try:
        return int(fields[19])        # field 22 of stat(5): starttime
    except (IndexError, ValueError):
        return 0


@functools.lru_cache(maxsize=1)
def _own_start(pid: int) -> int:
    """Return _process_start(pid) for this process's pid, read once (a fork's pid is new);
    0 where /proc is not this process's own (see _proc_is_own)."""
    return _process_start(pid) if _proc_is_own() else 0


def _proc_is_own() -> bool:
    """True if /proc shows this process's pid namespace, so that /proc/PID is process PID
    (not so after unshare -p without a /proc of its own: there it is another process)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
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


# --- Waiter ---

IN_ATTRIB = 0x004        # a watched file's link count fell (it was removed), or it was touched
IN_CLOSE_WRITE = 0x008   # a file open for writing was closed: written in place, or its
                         # holder ended (the kernel closes a dead process's files)
IN_MOVED_FROM = 0x040    # a name was renamed away (a claim; watch only)
IN_MOVED_TO = 0x080      # a name was renamed into place (os.replace)
IN_CREATE = 0x100        # a name was created or hard-linked (published whole)
IN_DELETE = 0x200        # a name was removed (a lock released, a reply read)
IN_DELETE_SELF = 0x400   # a watched file or directory is gone
IN_MOVE_SELF = 0x800     # a watched file or directory was renamed
IN_Q_OVERFLOW = 0x4000   # events were lost: anything may have changed
IN_IGNORED = 0x8000      # a watch ended: its file or directory went away

# What a wait wakes for. A directory's watch reports every file in it, and
# each event costs a read and a look, so a mask has only what ends a wait.
NAME_EVENTS = IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE | IN_DELETE  # a name comes, is written
FILE_EVENTS = IN_ATTRIB | IN_CLOSE_WRITE | IN_DELETE_SELF | IN_MOVE_SELF     # or goes; a file goes

# How a wait ended.
EVENT = "event"          # an event about what is watched
DEADLINE = "deadline"    # the time the caller gave ran out
POLLED = "polled"        # a polling step ended: look again
SAFETY = "safety"        # no event within SAFETY_INTERVAL: look again, just in case


class Waiter:
    """Sleep until a watched name or file may have changed, or a deadline passes.

    Events are hints: the caller sets up its watches, then looks, and looks
    again after every wake-up, so that nothing after the look goes unseen.
    On Linux inotify wakes it when a name given to watch (or ``paths``) is
    created, written, renamed or removed, or a file given to watch_files is
    removed, renamed or closed by a writer (the kernel closes a dead holder's
    files). A removed
    directory is watched again once it exists again. With poll=True (other
    hosts' changes send no events), without inotify, or while a directory is
    missing, it sleeps in steps of poll_interval.

    No sleep lasts longer than SAFETY_INTERVAL: a net, not the mechanism.
    A caller that finds progress after such a wake calls progress(), which
    logs it, and the tests assert it never does. Each thread keeps one
    inotify instance (_Inotify: closing one costs the kernel about a
    millisecond), and a forked child makes its own, lest they take each
    other's events.
    """

    def __init__(self, paths: Iterable[str] = (), poll: bool = False,
                 poll_interval: float = POLL_INTERVAL) -> None:
        self.poll_interval = poll_interval
        self.names: Dict[str, Set[bytes]] = {}        # directory: names watched in it
        self.watched: Dict[int, Set[bytes]] = {}      # a directory's watch: names in it
        self.directories: Dict[str, int] = {}         # a directory watched now: its watch
        self.files: List[int] = []                    # the watches of watch_files
        self.woke = ""                                # how the last wait ended
        self.changed: Dict[bytes, int] = {}           # name: its events (see changes)
        self.inotify = None if poll else _Inotify.borrow()
        self.fd = -1 if self.inotify is None else self.inotify.fd
        self.watch(*paths)
        log.debug("waiting with %s", "polling" if self.fd < 0 else "inotify")

    def watch(self, *paths: str) -> None:
        """Watch just these names from now on.

        A directory watched already keeps its watch: removing one queues an
        event that wakes the waiter for nothing, and another watch costs a
        system call.
        """
        self.names = {}
        for path in paths:
            directory, name = os.path.split(os.path.abspath(path))
            self.names.setdefault(directory, set()).add(os.fsencode(name))
        kept = {d: wd for d, wd in self.directories.items() if d in self.names}
        for wd in set(self.directories.values()) - set(kept.values()):
            _libc().inotify_rm_watch(self.fd, wd)
        self.directories, self.watched = kept, {}
        for directory, wd in kept.items():
            self.watched.setdefault(wd, set()).update(self.names[directory])
        self._watch_directories()

    def _watch_directories(self) -> bool:
        """Watch every directory not watched yet; False if one cannot be (it is missing)."""
        if self.fd < 0:
            return False
        for directory in set(self.names) - set(self.directories):
            wd = _libc().inotify_add_watch(self.fd, os.fsencode(directory), NAME_EVENTS)
            if wd < 0:
                return False
            # Two names for one directory (a symlink) share its watch.
            self.watched.setdefault(wd, set()).update(self.names[directory])
            self.directories[directory] = wd
        return True

    def watch_files(self, paths: Sequence[str]) -> bool:
        """Watch just these files from now on; False if one does not exist.

        A watch follows a file, not its name: it is set up anew for the file
        that has the name now, and must be before the caller looks at it. A
        file watched already keeps its watch (the kernel gives it back; see
        watch); the others' are removed.
        """
        if self.fd < 0:
            return True
        old, self.files = self.files, []
        found = True
        for path in paths:
            wd = _libc().inotify_add_watch(self.fd, os.fsencode(path), FILE_EVENTS)
            if wd < 0:
                found = False
                break
            self.files.append(wd)
        for wd in old:
            if wd not in self.files:
                _libc().inotify_rm_watch(self.fd, wd)
        return found

    def wait(self, timeout: float) -> str:
        """Sleep until an event about what is watched, or for timeout seconds; say which.

        Returns EVENT, DEADLINE (timeout passed), POLLED (a polling step
        ended) or SAFETY (no event for SAFETY_INTERVAL).
        """
        return self._wait(time.monotonic() + timeout)

    @_wait_point
    def _wait(self, deadline: float) -> str:
        while True:
            _interrupts.check()
            left = deadline - time.monotonic()
            if left <= 0:
                self.woke = DEADLINE
            elif not self._watch_directories():
                time.sleep(min(left, self.poll_interval))
                self.woke = DEADLINE if left <= self.poll_interval else POLLED
            elif not select.select([self.fd], [], [], min(left, SAFETY_INTERVAL))[0]:
                self.woke = DEADLINE if left <= SAFETY_INTERVAL else SAFETY
            elif not self._drain():
                continue               # events about other names only
            else:
                self.woke = EVENT
            return self.woke

    def changes(self) -> Dict[bytes, int]:
        """Return the events seen about each watched name since the last call, by name
        (b"": anything may have changed: events were lost, or a directory went); none
        when polling."""
        changed, self.changed = self.changed, {}
        return changed

    def progress(self, what: str) -> None:
        """Tell the waiter that the caller found what it waited for: what."""
        if self.woke == SAFETY:
            log.debug("woken by the safety re-check: %s", what)

    def _drain(self) -> bool:
        """Read the queued events; True if one is about what is watched."""
        relevant = False
        for wd, mask, name in _read_events(self.fd):
            names = self.watched.get(wd)
            anything = mask & IN_Q_OVERFLOW or (names is not None and mask & IN_IGNORED)
            named = names is not None and name in names
            if anything:
                self.changed[b""] = mask
            elif named:
                self.changed[name] = self.changed.get(name, 0) | mask
            relevant = bool(relevant or anything or named or wd in self.files)
            if mask & IN_IGNORED and wd in self.watched:
                del self.watched[wd]            # gone: watched again once it exists
                self.directories.clear()        # (the others are found watched already)
            elif mask & IN_IGNORED and wd in self.files:
                self.files.remove(wd)           # its file is gone: nothing to remove
        return relevant

    def close(self) -> None:
        """Stop watching, and give the thread's inotify instance back."""
        if self.inotify is not None:
            for wd in [*self.watched, *self.files]:
                _libc().inotify_rm_watch(self.fd, wd)
            self.inotify.give_back()
            self.inotify = None
        self.fd = -1

    def __enter__(self) -> Waiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_events(fd: int) -> Iterator[Tuple[int, int, bytes]]:
    """Read what inotify has queued on fd: (watch, event mask, file name) each."""
    data = b"\0" * 65536
    try:
        # A read that leaves room for more events has taken them all.
        while len(data) > 65536 - 4096:
            data = os.read(fd, 65536)
            offset = 0
            while offset + 16 <= len(data):
                wd, mask, _, size = struct.unpack_from("iIII", data, offset)
                yield wd, mask, data[offset + 16:offset + 16 + size].rstrip(b"\0")
                offset += 16 + size
    except BlockingIOError:
        pass


class _Inotify:
    """A thread's inotify instance, lent to one waiter at a time."""

    _threads = _thread_local()
    fd = -1

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lent = False

    @classmethod
    def borrow(cls) -> Optional[_Inotify]:
        """Return this thread's instance (a new one if it is lent); None without inotify."""
        kept: Optional[_Inotify] = getattr(cls._threads, "instance", None)
        if kept is None or kept.lent:
            fd = _inotify_init()
            if fd < 0:
                return None
            instance = cls(fd)
            if kept is None:
                cls._threads.instance = instance
        else:
            instance = kept
        for _ in _read_events(instance.fd):
            pass                    # what the last waiter left: about its watches only
        instance.lent = True
        return instance

    def give_back(self) -> None:
        """End the loan; an instance that is not the thread's own is closed."""
        self.lent = False
        if getattr(self._threads, "instance", None) is not self:
            self.close()

    @classmethod
    def forget(cls) -> None:
        """In a forked child: leave the parent's instances to the parent."""
        cls._threads = _thread_local()

    def close(self) -> None:
        """Close the instance."""
        fd, self.fd = self.fd, -1        # plain: it may run at the interpreter's exit
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Inotify.forget)


_LIBC: List[object] = []


def _libc() -> Any:
    """Return the C library through ctypes, loaded on first use."""
    if not _LIBC:
        import ctypes
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def _inotify_init() -> int:
    """Create an inotify descriptor; -1 where there is none (not Linux): then poll."""
    if not sys.platform.startswith("linux"):
        return -1
    try:
        return int(_libc().inotify_init1(O_NONBLOCK | O_CLOEXEC))
    except (OSError, AttributeError):
        return -1


def settled(looks: Dict[str, bool]) -> Dict[str, Optional[Verdict]]:
    """Return judge(path, ours) for each path: ours in looks, all watched at once until
    each beating record is known to live or not.

    For a single look (status, a server starting): a record that beats is
    watched until it changes (its holder lives: within one heartbeat) or
    HEARTBEAT_TIMEOUT seconds pass without a change (it has ended). Each
    settles on its own (beats need not coincide), and all are looked at
    again meanwhile: what appears or goes during the look is what it says.
    One that appears lives: its holder made it just now.
    """
    def beating(verdict: Optional[Verdict]) -> bool:
        return verdict is not None and verdict.how == "heartbeat" and not verdict.ended

    def fresh(path: str, ours: bool) -> Optional[Verdict]:
        # Listed first: GlusterFS's mount can show a record (a beat, a count) or a removed
        # file as it was up to a second ago; a listing has it ask the file server again.
        return judge(path, ours) if listed(path) else None
    verdicts = {path: fresh(path, ours) for path, ours in looks.items()}
    first = {path: verdict.seen.head for path, verdict in verdicts.items() if verdict}
    absent = set(looks) - set(first)   # at the first look
    lived: Set[str] = set()            # seen to change since their first sighting here
    deadline = time.monotonic() + HEARTBEAT_TIMEOUT + HEARTBEAT_INTERVAL
    with Waiter((), poll=True, poll_interval=PROGRESS_INTERVAL) as waiter:
        while (any(beating(verdict) and path not in lived for path, verdict in verdicts.items())
               and time.monotonic() < deadline):
            waiter.wait(PROGRESS_INTERVAL)
            for path, ours in looks.items():
                verdicts[path] = verdict = fresh(path, ours)
                if verdict is not None and (path in absent or first.setdefault(
                        path, verdict.seen.head) != verdict.seen.head):
                    lived.add(path)
    return verdicts


# --- Holding: a lock, a ticket or the presence file, from taking it to letting it go ---

class Held:
    """A file this process holds: a lock, a ticket or the presence file.

    Taken by publishing its record whole and exclusively (as O_CREAT|O_EXCL),
    flocked from before it is written and kept open to the end; beaten on a
    shared directory, and rewritten in place, never replaced (a mount that
    holds it open would find a replaced file stale); let go of by removing it,
    if it still holds this holder's token, and closing it.
    """

    def __init__(self, path: str, durable: bool = False) -> None:
        self.path = path
        self.durable = durable
        self.fd = -1
        self.token = ""                   # in the file while this process holds it
        self.record = bytearray()         # as published, rewritten in place

    def take(self, token: str = "", keep_open: bool = True, **told: Any) -> bool:
        """Publish this process's record (told: see _owner_record); False if the name is taken."""
        token = token or os.urandom(8).hex()
        record = _owner_record(self.path, token, **told)
        try:
            staged = publish(self.path, record, durable=self.durable, hold=True)
        except FileExistsError:
            return False
        self.token, self.record, self.fd = token, bytearray(record), staged.fd
        if keep_open:
            _heartbeat.start(self.fd, record)
        else:
            self._shut()
        return True

    def mine(self) -> bool:
        """True while the file at path holds this holder's token."""
        return bool(self.token) and token_at(self.path) == self.token

    def rewrite(self, field: bytes, value: bytes) -> None:
        """Write value over the quoted value of field in the record, in place: the same width."""
        at = self.record.index(b'"' + field + b'": "') + len(field) + 5
        self.record[at:at + len(value)] = value
        _heartbeat.rewrite(self.fd, bytes(self.record))
        if self.durable:
            os.fsync(self.fd)

    def let_go(self, remove: bool = True) -> bool:
        """Stop holding the file, removing it if it still holds this holder's token; True if
        removed.

        Where flocks keep others out it is removed first, then closed: its
        flock, held to the end, says that its holder lives, and a file in place
        with a free flock would be taken for a dead holder's. Elsewhere (FUSE
        stand-ins) it is closed first: libfuse keeps a file removed while open
        under a hidden name, and may leave it there.
        """
        token, self.token = self.token, ""
        if not _flock_reaches(self.path):
            self._shut()
        try:
            return bool(remove and token and token_at(self.path) == token
                        and _unlink_quietly(self.path))
        finally:
            self._shut()

    def _shut(self) -> None:
        """Close the file (forgotten first: see _Staged.close), its beats stopped before."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _heartbeat.stop(fd)
            _close(fd)


class Lock(Held):
    """The spec's lockfile: whoever creates it may use the buffer.

    A Held file (its holder's record, flock and heartbeat), so that a dead
    holder's lock is told from a live one's. The server, not the holder,
    removes it after answering, as the spec says; whether it is stale is
    judged in one place (stale_reason), and it is removed only as the very
    file judged (by its token; without one, by what it holds).
    """

    def __init__(self, path: str, stale_after: float = STALE_AFTER,
                 durable: bool = False, reply_timeout: Optional[float] = None) -> None:
        super().__init__(path, durable)
        self.stale_after = stale_after
        self.reply_timeout = reply_timeout    # told the server in the record
        self.newline = False                  # likewise: framing added a newline

    def try_acquire(self) -> bool:
        """Create the lock if nobody holds it; True if this process now holds it."""
        # Without flock (Windows) an open file would only keep the server from removing it.
        if not self.take(keep_open=sys.platform != "win32", timeout=self.reply_timeout,
                         newline=self.newline):
            return False
        log.debug("lock %s acquired", self.path)
        return True

    def still_held(self) -> bool:
        """True while the lock file this process created is still in place."""
        return self.mine()

    def release(self) -> None:
        """Remove the lock if it is still the one this process created (see Held.let_go).

        Only while no server has claimed its message: from then on the server
        is the lock's only remover (close). Two removers could each check the
        lock and then remove its name, one of them a new lock that another
        client took in between.
        """
        if self.let_go():
            log.debug("lock %s released", self.path)

    def close(self) -> None:
        """Drop this process's hold (its flock) without touching the file."""
        self.let_go(remove=False)


class WaitingLine:
    """The queue of clients waiting for one lock, served first come, first served.

    A waiting client holds a ticket (a Held file) in the directory LOCK.line,
    named ``<nanoseconds>-<pid>``. Only the first in line tries to take the
    lock; each waits for the file just ahead of it to go (the ticket ahead or,
    first, the lock), and removes that ticket if its owner died. Spec peers
    take no ticket. The first to join makes the directory, the last to leave
    removes it (rmdir removes only an empty one; a ticket cannot be published
    into a removed one, so a client joining then makes it again).
    """

    def __init__(self, lock_path: str, stale_after: float = STALE_AFTER) -> None:
        self.directory = lock_path + LINE_SUFFIX
        self.stale_after = stale_after
        self.ticket = Held("")
        self.dead: List[Owner] = []   # holders of tickets ahead found dead (their leftovers)
        self.named = 0.0            # when its name was taken, in seconds since the epoch
        self.joined = 0.0           # when it appeared, just after

    def tickets(self) -> List[str]:
        """Return the names of the tickets in line, first come first (files only)."""
        try:
            with os.scandir(self.directory) as entries:
                return sorted(entry.name for entry in entries
                              if _is_ticket(entry.name) and entry.is_file(follow_symlinks=False))
        except OSError:
            return []

    def join(self) -> None:
        """Take a ticket at the end of the line."""
        while not self.ticket.token:
            try:
                os.mkdir(self.directory)
            except FileExistsError:
                pass
            else:
                # Whoever may write the lock's directory may join the line.
                mode = stat.S_IMODE(os.stat(os.path.dirname(self.directory) or ".").st_mode)
                try:
                    os.chmod(self.directory, mode)
                except FileNotFoundError:
                    continue        # the last to leave removed it at once: again
            named = time.time_ns()
            self.ticket = Held(os.path.join(self.directory, f"{named:020d}-{os.getpid()}"))
            try:
                if self.ticket.take():
                    self.named, self.joined = named / 1e9, time.time()
            except FileNotFoundError:
                pass                # the last to leave removed the directory: again

    def ahead(self, alive: str = "") -> Tuple[int, str]:
        """Return how many tickets come before this one, and the path of the one just before.

        A dead ticket just before this one is cleared first (break_stale):
        its holder's death leaves it to this client. alive: a ticket judged
        alive a moment ago, not judged again.
        """
        while True:
            names = self.tickets()
            mine = os.path.basename(self.ticket.path)
            if mine not in names or names[0] == mine:
                return 0, ""        # first (or removed by somebody: behave as the first)
            index = names.index(mine)
            before = os.path.join(self.directory, names[index - 1])
            broken = None if before == alive else break_stale(before, self.stale_after, ours=True)
            if broken is None:
                return index, before
            if broken[1] is not None:
                self.dead.append(broken[1])

    def leave(self) -> bool:
        """Give up this ticket; the last to leave removes the line's directory: True if it
        is gone."""
        return self.ticket.let_go() and remove_empty_directory(self.directory)

    def clear(self) -> List[Owner]:
        """Remove the tickets of waiters that died, and the directory if it is empty; return
        the dead waiters (their leftovers are to be swept)."""
        for name in self.tickets():
            broken = break_stale(os.path.join(self.directory, name), self.stale_after, ours=True)
            if broken is not None and broken[1] is not None:
                self.dead.append(broken[1])
        remove_empty_directory(self.directory)
        return self.dead


def _is_ticket(name: str) -> bool:
    """True for a ticket's name: nanoseconds (20 digits), a dash, a pid."""
    return len(name) > 21 and name[20] == "-" and name[:20].isdigit() and name[21:].isdigit()


class Presence(Held):
    """The server's presence file, BUFFER.server: which server runs, since when.

    A Held file with the server's record and its count of answered messages,
    rewritten in place as each reply goes out, so that clients and status
    tell a running server from one that was killed, and see its count at once.
    Published exclusively at start: a second server is refused.
    """

    def __init__(self, path: str, durable: bool = False) -> None:
        super().__init__(path, durable)
        self.id = os.urandom(8).hex()       # the token of every record this server makes
        self.started = time.time()
        self.answered = 0

    def start(self) -> None:
        """Publish this server's presence; AlreadyServing if a live server has one."""
        while not self.take(self.id, answered=self.answered, started=self.started):
            verdict = settled({self.path: True})[self.path]
            if verdict is not None and verdict.ended is None:
                raise AlreadyServing(self.path, verdict.owner)
            if verdict is not None:                          # left by a killed server
                remove_judged(self.path, verdict)

    def update(self, answered: int) -> None:
        """Rewrite the count of answered messages in the presence file, in place."""
        self.rewrite(b"answered", f"{answered:0{COUNT}d}".encode())
        self.answered = answered

    def keep(self) -> bool:
        """Publish this server's presence again if its file went (the directory made anew);
        True if it had. AlreadyServing if another live server's is there now."""
        if token_at(self.path) == self.id:
            return False
        self.let_go(remove=False)
        self.start()
        return True


# --- Sweep: what ended processes left behind ---

# A temp file's name (see _temp_name); compiled at its first use, by re's cache:
# half a millisecond a client that sweeps nothing does not spend.
_LEFTOVER = r"\.([0-9a-f]{8})\.(\d+)\.[0-9a-f]{8}\.tmp\Z"


def sweep(directories: Sequence[str], older_than: float = STALE_AFTER,
          dead: Optional[Owner] = None, replies: str = "") -> List[str]:
    """Remove what ended processes left behind; return the names removed.

    In directories: temp files (see _temp_name) of this host's processes once
    ended, whatever was judged of a file they held (a holder may have let go
    of it and gone on); of another host's once older than older_than (a
    pending request there is touched by its heartbeat), or at once if they
    are dead's, a holder found dead; and what libfuse before 3.15 may keep for
    ever, as .fuse_hidden..., of a holder's file removed while open (its issue
    746). In the directory replies: the complete replies in default response
    files (see default_response_path) whose client has ended, on this host,
    or that are older than older_than, on another.
    """
    dead_tag = "" if dead is None else f"{zlib.crc32(dead.host.encode()):08x}"
    older_than = max(older_than, 10 * HEARTBEAT_INTERVAL)    # a touched file is young
    removed = []
    places = [(directory, False) for directory in directories]
    for directory, is_reply in places + ([(replies, True)] if replies else []):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            why = (_reply_orphaned(path, name, older_than) if is_reply
                   else _left_over(path, name, older_than, dead, dead_tag))
            if why and _unlink_quietly(path):
                removed.append(name)
                if is_reply:
                    log.warning("removed the reply %s: %s", path, why)
    return removed


def _left_over(path: str, name: str, older_than: float, dead: Optional[Owner],
               dead_tag: str) -> str:
    """Say why the file at path is a leftover to sweep, "" if it is not (see sweep)."""
    if name.startswith(".fuse_hidden"):
        try:
            return "a holder's file FUSE kept" if token_at(path) else ""
        except OSError:
            return ""
    match = re.search(_LEFTOVER, name) if name.startswith(".") else None
    if match is None:
        return ""
    tag, pid = match.group(1), int(match.group(2))
    if tag == HOST_TAG:
        return "" if _pid_alive(pid) else "its process has ended"
    if dead is not None and (tag, pid) == (dead_tag, dead.pid):
        return "its holder has ended"
    seen = look(path, 0)
    return "old" if seen is not None and time.time() - seen.mtime > older_than else ""


def _reply_orphaned(path: str, name: str, older_than: float) -> str:
    """Say why the reply at path will never be read, "" if it may be (see sweep)."""
    if not (name.startswith(REPLY_PREFIX) and name.endswith(".txt")):
        return ""
    seen = ends_with_esc(path)
    if seen is None:
        return ""                     # not a complete reply: nobody's to judge
    tag, _, rest = name[len(REPLY_PREFIX):].partition("-")
    pid = rest.partition("-")[0]
    if tag == HOST_TAG and pid.isdigit():
        return "" if _pid_alive(int(pid)) else \
            f"its client, process {pid}, has ended without reading it"
    if time.time() - seen.mtime > older_than:
        return f"nobody read it for over {older_than:g} s"
    return ""


# --- Client API ---

if TYPE_CHECKING:
    Status = Callable[..., None]


def default_lock_path(buffer: str) -> str:
    """Return the lock beside the buffer: the spec's server.lock when run from there."""
    return os.path.join(os.path.dirname(buffer), LOCKFILE_NAME)


class Paths:
    """Every file that the exchanges on one buffer use."""

    def __init__(self, buffer: str, lock: Optional[str] = None) -> None:
        self.buffer = buffer
        self.lock = lock or default_lock_path(buffer)
        self.presence = buffer + PRESENCE_SUFFIX      # the running server's identity
        self.claim_prefix = buffer + TAKEN_SUFFIX     # + "<lock inode>-<token>": being answered

    def claims(self) -> List[str]:
        """Return the claimed messages that wait for an answer, oldest name first."""
        directory, prefix = os.path.split(self.claim_prefix)
        try:
            names = os.listdir(directory or ".")
        except OSError:
            return []
        return sorted(os.path.join(directory, name) for name in names
                      if name.startswith(prefix) and _claim_ref(name[len(prefix):]))

    def answering(self, lock: Verdict) -> bool:
        """True if a server has claimed the message that came with this lock.

        Such a lock is never stale, however old: the server removes it once
        it has answered, and a waiter that broke it would take the reply back.
        A claim names the lock by its token, or by its inode if it has none.
        """
        token = lock.owner.token if lock.owner is not None else ""
        prefix = os.path.basename(self.claim_prefix)
        refs = (_claim_ref(os.path.basename(claim)[len(prefix):]) for claim in self.claims())
        return any(ref is not None and (ref[1] == token if token else ref[0] == lock.seen.ino)
                   for ref in refs)

    def rejection(self, response_path: str) -> str:
        """Return where the server says why it would not write to response_path (as sent)."""
        return f"{self.buffer}{REJECTED_SUFFIX}{zlib.crc32(os.fsencode(response_path)):08x}"

    def directories(self) -> List[str]:
        """Return the buffer's directory, and the lock's if it is another."""
        found = [os.path.dirname(os.path.abspath(path)) for path in (self.buffer, self.lock)]
        return found[:1] if found[0] == found[1] else found

    def shared(self) -> bool:
        """True if the buffer's or the lock's directory is shared with other hosts."""
        return _on_shared(self.buffer) or _on_shared(self.lock)

    def waiting_mode(self, poll: Optional[bool], interval: Optional[float],
                     local_interval: float) -> Tuple[bool, float]:
        """Return whether to poll and how often, as asked (None: the filesystem decides).

        On a directory shared between hosts inotify sees nothing of the
        other hosts' changes: there filechat polls, every SHARED_POLL_INTERVAL.
        """
        shared = self.shared()
        if poll is None:
            poll = shared
        if interval is None:
            interval = SHARED_POLL_INTERVAL if shared else local_interval
        directory = os.path.dirname(os.path.abspath(self.buffer))
        if shared and directory not in _SAID_SHARED:
            _SAID_SHARED.add(directory)
            kind = filesystem_type(directory) or filesystem_type(os.path.dirname(self.lock) or ".")
            log.debug("%s is on %s, which other hosts may share: %s", directory, kind,
                      f"polling every {interval:g} s" if poll else "waiting for events "
                      "(--no-poll), which other hosts' changes do not send")
        return poll, interval


_SAID_SHARED: Set[str] = set()     # the shared directories -v has told about


def _claim_ref(suffix: str) -> Optional[Tuple[int, str]]:
    """Read a claim name's suffix, "<lock inode>-<lock token>"; None if it is not one."""
    inode, dash, token = suffix.partition("-")
    if not (inode.isdigit() and dash and all(c in "0123456789abcdef" for c in token)):
        return None
    return int(inode), token


def sent_path(buffer: str, response_path: str) -> str:
    """Return the response path as a request carries it.

    Relative to the buffer's directory when it lies inside it, so that a
    server on a host that mounts the share at another path finds it (a
    filechat server resolves a filechat client's relative path against the
    buffer's directory); absolute otherwise.
    """
    absolute = os.path.abspath(response_path)
    try:
        relative = os.path.relpath(absolute, os.path.dirname(os.path.abspath(buffer)))
    except ValueError:              # another drive on Windows
        return absolute
    return absolute if relative.split(os.sep, 1)[0] == os.pardir else relative


def default_response_path(buffer: str) -> str:
    """Return a fresh, unique response file name beside the buffer.

    It names this host (HOST_TAG) and process, so that a sweep can tell a
    reply whose client has ended (see sweep).
    """
    directory = os.path.dirname(os.path.abspath(buffer))
    return os.path.join(directory, f"{REPLY_PREFIX}{HOST_TAG}-{os.getpid()}-"
                                   f"{os.urandom(4).hex()}.txt")


def _fresh(response_path: str) -> bool:
    """True for a name default_response_path made in this process: nothing else writes
    there, so nothing needs looking at (on a file server, each look is a request)."""
    mine = re.escape(f"{REPLY_PREFIX}{HOST_TAG}-{os.getpid()}-")
    return re.fullmatch(mine + r"[0-9a-f]{8}\.txt", os.path.basename(response_path)) is not None


def check_response_path(response_path: str, paths: Optional[Paths] = None) -> None:
    """Refuse a response path the server could not, or should not, write.

    With paths, also one that is a file of the protocol's own.
    """
    if paths is not None:
        mine = os.path.abspath(response_path)
        for what, path in (("buffer", paths.buffer), ("lock file", paths.lock),
                           ("server's presence file", paths.presence)):
            if mine == os.path.abspath(path):
                raise UsageError(f"response file {response_path} is the {what}; name "
                                 "another file for the reply")
    kind = _kind_at(response_path, "response file")
    if kind is None:
        _check_directory(response_path, "response file")
    elif kind == "a symbolic link":
        raise UsageError(f"response file {response_path} is a symbolic link, which the server "
                         "never follows; name a new file")
    elif kind == "a directory":
        raise UsageError(f"response file {response_path} is a directory; name a file")
    else:
        raise UsageError(f"response file {response_path} already exists; the server will "
                         "not overwrite it: remove it or choose another path")


def sticky_problem(path: str) -> str:
    """Return why users cannot share path's directory if it has the sticky bit, else ""."""
    directory = os.path.dirname(path) or "."
    try:
        sticky = os.stat(directory).st_mode & stat.S_ISVTX
    except OSError:
        return ""
    return "" if not sticky else (
        f"directory {directory} has the sticky bit (as /tmp has): only a file's owner may "
        "rename or remove it there, so a server and clients run by different users cannot "
        "hand the buffer and the lock to each other; use a directory without it that they "
        "all can write, e.g. install -d -m 2775 -g GROUP DIR")


def check_buffer_path(buffer: str, lock_path: str) -> None:
    """Refuse a buffer or lock path that cannot be used, or a filesystem that cannot lock."""
    if os.path.abspath(buffer) == os.path.abspath(lock_path):
        raise UsageError(f"buffer file {buffer} is the lock file; name the buffer otherwise "
                         f"(or the lock, with --lock-file)")
    checked = set()
    for what, path in (("buffer file", buffer), ("lock file", lock_path)):
        directory = os.path.dirname(path) or "."
        if directory not in checked:
            _check_directory(path, what, writable=True)
            check_exclusive(path)
            checked.add(directory)
        _refuse_unusable(path, what)


def _refuse_unusable(path: str, what: str) -> None:
    """Refuse a path where a symbolic link or a directory stands."""
    kind = _kind_at(path, what, anew=False)
    if kind == "a symbolic link":
        raise UsageError(f"{what} {path} is a symbolic link, which filechat never "
                         "follows; name the file itself")
    if kind == "a directory":
        raise UsageError(f"{what} {path} is a directory; name a file")


def _kind_at(path: str, what: str, anew: bool = True) -> Optional[str]:
    """Return what is at path ("" a file, "a directory"...), None if nothing; UsageError for
    a name too long. With anew, a file is looked at anew (see look): a stat may answer from
    a cache. Without, it is not opened: a buffer open on a FUSE mount as another client
    renames its message over it is kept under a hidden name, which libfuse before 3.15 may
    leave there (see _Staged._hold_by_name)."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return _kind(st.st_mode)
        return None if anew and look(path, 0) is None else ""
    except OSError as exc:
        if exc.errno in GONE:         # ESTALE too: a name another mount replaced (see look)
            return None
        if exc.errno != errno.ENAMETOOLONG:
            raise
        raise UsageError(f"{what} {path}: the name is too long for the filesystem; "
                         "choose a shorter one") from None


def _check_directory(path: str, what: str, writable: bool = False) -> None:
    """Refuse a path whose directory does not exist (or, if asked, cannot be written)."""
    directory = os.path.dirname(path) or "."
    # One call in the usual case: with the trailing separator, only a directory passes.
    if os.access(os.path.join(directory, ""), os.W_OK if writable else os.F_OK):
        return
    if not os.path.isdir(directory):
        raise UsageError(f"{what} {path}: directory {directory} does not exist; "
                         "create it or choose another path")
    if writable and not os.access(directory, os.W_OK):
        raise UsageError(f"{what} {path}: directory {directory} is not writable; "
                         "choose a directory you can write")


def _check_same_user(paths: Paths) -> None:
    """Refuse to send, in a sticky directory, to a server another user runs (sticky_problem)."""
    problem = sticky_problem(paths.buffer)
    # Only root replaces another user's buffer there, a root server's included.
    if (problem and running_server(paths.presence) is not None
            and os.geteuid() not in (0, os.lstat(paths.presence).st_uid)):
        raise FilechatError(f"the server on {paths.buffer} runs as another user, and "
                            f"{problem}")


def send(buffer: str, message: Union[str, BinaryIO], response_path: Optional[str] = None, *,
         timeout: float = RESPONSE_TIMEOUT, lock_timeout: Optional[float] = None,
         lock_path: Optional[str] = None, stale_after: float = STALE_AFTER,
         max_bytes: int = MAX_BYTES, durable: bool = False, poll: Optional[bool] = None,
         poll_interval: Optional[float] = None,
         lock_retry_interval: float = LOCK_RETRY_INTERVAL, status: Status = _ignore,
         progress_interval: Optional[float] = None, reply_to: Optional[IO[str]] = None,
         server_timeout: Optional[float] = None) -> str:
    """Send one message to the server on buffer and return its reply.

    Does what the spec's client does: takes the lock, writes the buffer,
    waits for the reply in response_path (default: a fresh file beside the
    buffer) and deletes it. message is text, or a binary file to copy it from
    (UTF-8) a piece at a time; with reply_to, a text file, the reply is copied
    there and "" returned. The wait for the lock is unbounded unless
    lock_timeout is given; the wait for the reply is bounded by timeout,
    counted anew when a server starts. With server_timeout, a client that
    finds that many seconds after it began no server announced and none
    answering its message gives up (0: before sending anything).

    ``status(event, **info)`` hears "busy" every lock_retry_interval while
    others hold or wait for the lock (``ahead``; for a lock whose holder
    cannot be checked also ``who``, ``held_for``, ``stale_in``), "queued"
    (``at``, ``named``: when its ticket appeared), "locked" (``asked``),
    "sent", "waiting", "received" (just before the reply is written to
    reply_to), "kept" (``path``: reply_to could not be written, and the
    reply is kept there, see _keep_unread), "no-server", "server-stopped",
    "server-started", and
    "interrupted" (``fate``, a key of FATES, and ``said``, its sentence) on
    Ctrl+C; with progress_interval, also "tick" (``phase`` "lock" or "reply",
    ``waited``).

    Raises FramingError (ESC, NUL or non-UTF-8 text, over max_bytes),
    UsageError (unusable paths), Rejected (the server will not write
    response_path), LockTimeout, ReplyTimeout, NoServer and ServerError (an
    error reply). On any exception, KeyboardInterrupt included, a message no
    server is answering is withdrawn and the lock released, and every file
    opened closed: signals are held until a wait (see _Interrupts).
    """
    with _interrupts:
        paths = Paths(buffer, lock_path)
        if response_path is None:
            response_path = default_response_path(buffer)
        carried = sent_path(buffer, response_path)
        added: List[bool] = []            # whether framing added a newline, once data is written
        data = _request_data(carried, message, max_bytes, added)
        check_buffer_path(buffer, paths.lock)
        _check_same_user(paths)
        if not _fresh(response_path):         # one of its own is nobody else's
            check_response_path(response_path, paths)  # errors name the path as the user gave it
        poll, poll_interval = paths.waiting_mode(poll, poll_interval, RESPONSE_POLL_INTERVAL)
        exchange = _Exchange(paths, os.path.abspath(response_path), carried, stale_after,
                             durable, status, progress_interval, server_timeout, timeout)
        try:
            with Waiter((), poll, poll_interval) as exchange.waiter:
                exchange.write(data)
                exchange.lock.newline = added[0]
                exchange.acquire(lock_timeout, lock_retry_interval)
                exchange.put_in_place()
                text, is_error = exchange.await_reply(timeout, reply_to)
        except BaseException as exc:
            if exchange.phase != "done":
                exchange.give_up()
            if isinstance(exc, KeyboardInterrupt):
                status("interrupted", fate=exchange.fate, said=fate_of(
                    exchange.fate, buffer, exchange.response_path, paths.lock))
            raise
    if is_error:
        raise ServerError(text)
    return text


def _request_data(response_path: str, message: Union[str, BinaryIO], max_bytes: int,
                  added: List[bool]) -> Data:
    """Check what can be checked before the request is written; return its pieces.

    A message from a file is read and checked as its pieces are written.
    Whether framing added a newline (newline_added) is appended to added
    once the pieces have been written.
    """
    _check_path(response_path)
    if not isinstance(message, str):
        size = _file_size(message)
        if size > max_bytes:
            raise _too_long(_message_name(message), size, max_bytes)
        return _file_request(response_path, message, max_bytes, added)
    check_characters(message, "message")
    size = (len(message) if message.isascii()
            else sum(map(len, _text_pieces(message, "message"))))
    if size > max_bytes:
        raise _too_long("message", size, max_bytes)
    added.append(newline_added(message))
    return request_pieces(response_path, message)


@_wait_point          # reading a slow pipe: the request being written is discarded
def _file_request(response_path: str, source: BinaryIO, max_bytes: int,
                  added: List[bool]) -> Iterable[bytes]:
    """Frame a request whose message is read from the binary file source, a piece at a time.

    Each piece is checked as it comes (UTF-8 text, no ESC or NUL), so that a
    file of any size is sent without being held whole.
    """
    what = _message_name(source)
    yield _check_path(response_path) + b"\n"
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = 0
    last = b""
    while True:
        _interrupts.check()
        try:
            piece = source.read(READ_SIZE)
        except OSError as exc:
            raise UsageError(f"cannot read {what}: {exc.strerror or exc}") from None
        if not isinstance(piece, bytes):
            raise UsageError(f"{what} is open as text; open it in binary mode ('rb')")
        size += len(piece)
        if size > max_bytes:
            raise _too_long(what, -1, max_bytes)
        try:                  # first: a binary file is named as such, not by its bytes
            decoder.decode(piece, final=not piece)
        except UnicodeDecodeError:
            raise FramingError(what, "is not valid UTF-8 text") from None
        check_characters(piece, what)
        if not piece:
            break
        last = piece[-1:]
        yield piece
    if size == 0 and what == "message on stdin":
        raise UsageError("nothing to send: standard input is empty; to send an empty "
                         "message, say so with --message ''")
    added.append(newline_added(last.decode("latin-1")))
    yield _closing(last.decode("latin-1"))


def _file_size(message: BinaryIO) -> int:
    """Return the bytes left in message's file, 0 where that is not known (a pipe)."""
    try:
        st = os.fstat(message.fileno())
    except (OSError, ValueError, AttributeError):
        return 0
    return st.st_size - message.tell() if stat.S_ISREG(st.st_mode) else 0


def _too_long(what: str, size: int, max_bytes: int) -> FramingError:
    """Return the error for a message over max_bytes (size -1: not known yet)."""
    says = f"is {size} bytes, over" if size >= 0 else "is over"
    return FramingError(what, f"{says} the limit of {max_bytes} (--max-bytes); "
                        "send less or raise the limit")


def _message_name(message: Union[str, BinaryIO]) -> str:
    """Name the message in errors: as a file if it is read from a named one."""
    name = getattr(message, "name", None)
    if not isinstance(name, str):
        return "message"
    return "message on stdin" if name == "<stdin>" else f"message file {name}"


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


# What a client that gives up does with its lock, by what became of its message
# (FATES): the server's or a peer's lock is only closed, so that one remover
# remains (see Lock.release); one whose message nobody has is removed.
_LOCK_ON_GIVING_UP = {"unsent": "release", "withdrawn": "release", "replied": "release",
                      "claimed": "close", "left": "close", "taken": "close",
                      "answered": "close"}


class _Exchange:
    """One client's exchange, from writing its request to deleting the reply.

    ``phase`` says how far it has got, and only these methods move it on:
    "new" -> write() -> "written" (the request under a temp name beside the
    buffer) -> acquire() -> "locked" -> put_in_place() -> "sent" (the request
    is the buffer) -> await_reply() -> "done"; give_up() ends it from any
    phase, doing what _LOCK_ON_GIVING_UP says. Both waits go through _wait:
    one loop, one deadline, one notice timer, and one recheck.
    """

    def __init__(self, paths: Paths, response_path: str, sent: str, stale_after: float,
                 durable: bool, status: Status, progress: Optional[float],
                 server_timeout: Optional[float] = None,
                 reply_timeout: Optional[float] = None) -> None:
        self.paths = paths
        self.response_path = response_path
        self.note = paths.rejection(sent)     # where the server says why it will not reply
        self.lock = Lock(paths.lock, stale_after, durable, reply_timeout)
        self.waiter: Waiter = Waiter((), True)    # set for the exchange: see send()
        self.status = status
        self.progress = progress
        self.phase = "new"
        self.request: Optional[_Staged] = None
        self.line: Optional[WaitingLine] = None
        self.rejected = False         # the server said it will not write the reply
        self.fate = ""                # what became of the message, once given up (FATES)
        self.deadline = float("inf")  # when the wait going on gives up
        self.server_due = _ServerDue(server_timeout)

    def write(self, data: Data) -> None:
        """Write the request under a temp name, so that holding the lock only renames it.

        On a shared directory it is touched while it waits: other hosts sweep
        such files by age.
        """
        self.request = _Staged(self.paths.buffer, data, self.lock.durable)
        if self.paths.shared():
            _heartbeat.touch(self.request.temp)
        self.phase = "written"

    def _wait(self, phase: str, look: Callable[[], Optional[float]],
              expire: Callable[[], None], notice: Optional[Callable[[], None]] = None,
              every: float = float("inf")) -> None:
        """Wait until look() finds the wait over (None), else the seconds until it may.

        expire() raises once self.deadline passes; notice() is said every
        `every` seconds; the waiter is woken by events about what look()
        watches, or by polling; "tick" is told as progress_interval asks.
        """
        tick = _Ticker(self.status, phase, self.progress)
        next_notice = time.monotonic() if notice is not None else float("inf")
        while True:
            again = look()
            if again is None:
                return
            now = time.monotonic()
            if now >= self.deadline:
                expire()
            if notice is not None and again > 0 and now >= next_notice:
                notice()              # not when a look at once may end it (a lock cleared)
                next_notice = now + every
            self.waiter.wait(min(again, self.deadline - now, next_notice - now, tick(now),
                                 self.server_due.left(self)))

    def acquire(self, lock_timeout: Optional[float], retry_interval: float) -> None:
        """Take the lock, waiting in line while others hold it or wait for it."""
        asked = time.time()
        self.server_due.left(self)
        line = WaitingLine(self.lock.path, self.lock.stale_after)
        # Nobody waits: ask at once. Else, or if it is taken, join the line.
        if not line.tickets() and self.lock.try_acquire():
            self._locked(asked)
            return
        line.join()
        self.line = line              # left once the request is out: see put_in_place
        self.status("queued", at=line.joined, named=line.named)
        start = time.monotonic()
        self.deadline = float("inf") if lock_timeout is None else start + lock_timeout
        turn = _Turn(self, line)

        def expire() -> None:
            raise LockTimeout(self.lock.path, time.monotonic() - start if lock_timeout is None
                              else lock_timeout)

        def notice() -> None:
            self.status("busy", ahead=turn.ahead + 1, **turn.unchecked)  # + 1: the served one
            log.debug("waiting in line for %s: %d ahead", self.lock.path, turn.ahead + 1)
        self._wait("lock", turn.look, expire, notice, retry_interval)
        self._locked(line.named)

    def _locked(self, asked: float) -> None:
        """Note that the lock is held, asked for at asked (seconds since the epoch)."""
        self.phase = "locked"
        self.status("locked", asked=asked)
        _crash_point("client-locked")

    def put_in_place(self) -> None:
        """Rename the request to the buffer: holding the lock, whatever is there is a leftover.

        Holding the lock, no reply is due to this response path: a file there
        now is another client's reply to the same path, or a stranger's, and
        this client would take it for its own.
        """
        assert self.request is not None
        if not _fresh(self.response_path):
            _own_response_path(self.response_path, self.note)
        _let_peer_clear(self)
        _heartbeat.touch(self.request.temp, keep=False)
        self.request.put(replace=True)
        log.debug("message put in place as %s", self.paths.buffer)
        self.phase = "sent"
        self._leave_line()
        _crash_point("client-sent")
        self.status("sent")
        self.status("waiting")

    def await_reply(self, timeout: float, sink: Optional[IO[str]]) -> Tuple[str, bool]:
        """Wait for the complete reply and return it as (text, is_error); delete the file.

        With sink, the reply is copied there and ("", False) returned; an
        error reply is returned, not copied. Then the lock is let go of.
        """
        paths = self.paths
        self.waiter.watch(paths.lock, paths.presence, self.note)    # the reply's: see _Awaiting
        self.deadline = time.monotonic() + timeout
        awaiting = _Awaiting(self, timeout)

        def expire() -> None:
            self.give_up()
            raise ReplyTimeout(self.response_path, timeout, paths.buffer, self.fate,
                               running_server(paths.presence) is not None, paths.lock)
        self._wait("reply", awaiting.look, expire)
        reply = awaiting.reply
        assert reply is not None
        kept = ""
        try:
            self.status("received")
            log.debug("reply read from %s", self.response_path)
            try:
                return reply.read(sink)           # a wait: its file is closed below
            except (OSError, FilechatError) as exc:
                if not isinstance(exc, BrokenPipeError):     # a reader gone wants no more
                    kept = _keep_unread(self.response_path)
                    self.status("kept", path=kept)
                raise
        finally:
            reply.close()
            # The response file goes after the release, so that a server restarted
            # before it sees the message was answered.
            if not kept and _unlink_quietly(self.response_path):
                log.debug("reply %s removed", self.response_path)
            self.lock.close()
            self.phase, self.fate = "done", "answered"

    def give_up(self) -> bool:
        """Withdraw a message no server is answering, let go of the lock; True if withdrawn.

        What became of the message is noted in fate (see FATES), as seen, and
        a reply that arrived is never removed unread.
        """
        self.fate = "unsent"
        if self.phase == "sent":
            assert self.request is not None
            self.fate = _message_fate(self.paths, self.request.seen, self.response_path,
                                      self.rejected)
        if _LOCK_ON_GIVING_UP[self.fate] == "close":
            self.lock.close()
        elif self.phase in ("locked", "sent"):
            self.lock.release()
        if self.request is not None:
            _heartbeat.touch(self.request.temp, keep=False)
            self.request.discard()
        self._leave_line()
        self.phase = "done"
        if self.fate == "withdrawn":
            log.debug("message withdrawn from %s", self.paths.buffer)
        if self.fate in ("left", "taken"):
            log.debug("message in %s left to the server that took it", self.paths.buffer)
        return self.fate == "withdrawn"

    def _leave_line(self) -> None:
        """Give up the ticket, if this client waited in line.

        Only once the request is out: the one behind, woken by its going,
        has nothing to do until the lock is released. The last to leave takes
        with it what waiters killed while joining left in the line.
        """
        line, self.line = self.line, None
        if line is None or line.leave():
            return                    # not in line, or the last: the directory went with it
        if not line.tickets() and os.path.isdir(line.directory):
            sweep([line.directory], self.lock.stale_after)
            remove_empty_directory(line.directory)


def _keep_unread(path: str) -> str:
    """Keep a reply that could not be written out, as the server wrote it, beside its
    response file under the name + ".unread"; return where it is.

    Not under its own name, which its server clears once its client has
    ended (see _Server.check_delivered). Hard-linked, so that no file there
    is replaced: one there already makes the name unique.
    """
    for kept in (f"{path}.unread", f"{path}.{os.urandom(4).hex()}.unread"):
        try:
            os.link(path, kept)
        except FileExistsError:
            continue
        except OSError:
            break                     # no hard links there: left where it is
        _unlink_quietly(path)
        return kept
    return path


class _ServerDue:
    """How long a client waits for any server to show up (send's server_timeout)."""

    def __init__(self, timeout: Optional[float]) -> None:
        self.timeout = timeout
        # When to look whether any server has shown up (never, once one has).
        self.due = None if timeout is None else time.monotonic() + timeout

    def left(self, exchange: _Exchange) -> float:
        """Return the seconds left for a server to show up; NoServer if they are up and none
        has (the exchange given up).

        A server has shown up if one is announced, or if the message is no
        longer waiting as sent or its reply has begun (a server that follows
        only the spec announces nothing).
        """
        if self.due is None:
            return float("inf")
        left = self.due - time.monotonic()
        if left > 0:
            return left
        paths, request, answering = exchange.paths, exchange.request, False
        if exchange.phase == "sent" and request is not None:
            seen = look(paths.buffer, noatime=True)
            answering = (_kind_at(exchange.response_path, "response file") is not None
                         or seen is None or not seen.same(request.seen) or seen.read_in_place())
        if answering or running_server(paths.presence) is not None:
            self.due = None
            return float("inf")
        assert self.timeout is not None
        raise NoServer(paths.buffer, self.timeout, exchange.phase == "sent", exchange.give_up())


def _own_response_path(response_path: str, note: str) -> None:
    """Make sure, holding the lock, that response_path is this message's alone: no file
    there, no earlier note about it."""
    if _kind_at(response_path, "response file") is not None:
        raise UsageError(f"response file {response_path} appeared while this client waited "
                         "for the lock (another client's reply to the same path?); nothing "
                         "was sent: give each client its own response file")
    # A note about this path now is about an earlier exchange, whose client
    # gave up: the next one there is this message's.
    try:
        _unlink_quietly(note)
    except PermissionError:
        raise FilechatError(f"cannot remove {note}, an earlier note for this response path: "
                            f"{sticky_problem(note) or 'permission denied'}; nothing was "
                            "sent") from None


def _let_peer_clear(exchange: _Exchange) -> None:
    """Wait, holding the lock, for a server that read the buffer in place to clear it.

    Some servers that follow only the spec remove the lock before they
    clear the buffer: the message they answered still stands there, read,
    and their late clearing would erase this one. Woken by the buffer's
    change, for at most PEER_CLEAR_WAIT seconds.
    """
    buffer = exchange.paths.buffer
    exchange.deadline = time.monotonic() + PEER_CLEAR_WAIT
    exchange.waiter.watch(buffer)

    def look() -> Optional[float]:
        seen = look_message(buffer)
        return float("inf") if seen is not None and seen[1] and seen[0].read_in_place() else None

    def expire() -> None:
        log.warning("%s still holds a message a server read but has not cleared after "
                    "%g s; replacing it", buffer, PEER_CLEAR_WAIT)
        raise _Expired

    try:
        exchange._wait("lock", look, expire)
    except _Expired:
        pass


def _message_fate(paths: Paths, sent: Seen, response_path: str, rejected: bool) -> str:
    """Withdraw the sent message if nobody has it; return what became of it (FATES).

    sent is the message as put in place; rejected: the server said it will
    not write the reply.
    """
    buffer = paths.buffer
    serving = running_server(paths.presence) is not None
    seen = look(buffer, noatime=True)
    if seen is not None and seen.same(sent):
        if not serving and seen.read_in_place():
            return "left"                 # read in place by a server that is not filechat
        if remove_if_same(buffer, sent):
            return "withdrawn"
    if serving:
        return "claimed"
    # Claimed by a server that has stopped since: nobody is answering it.
    if any(remove_if_same(claim, sent) for claim in paths.claims()):
        return "withdrawn"
    reply = None if rejected else _Reply.find(response_path)
    if reply is not None:
        reply.close()
        return "replied"                  # by a server that kept the lock
    return "taken"


def look_message(path: str) -> Optional[Tuple[Seen, bool]]:
    """Return what is at path and whether it holds a complete message (an ESC), its access
    time untouched (see Seen.read_in_place); None if nothing is there."""
    def use(fd: int, st: os.stat_result) -> Tuple[Seen, bool]:
        if not stat.S_ISREG(st.st_mode):
            return Seen(st, b""), False
        framed = _Framed(fd)
        return Seen(st, framed.head[:KEPT]), framed.end >= 0
    found: Optional[Tuple[Seen, bool]] = looked_into(path, use, noatime=True)
    return found


class _Reply:
    """A reply in its file, open (see _Framed): where its text ends, whether it is an error."""

    def __init__(self, fd: int, framed: _Framed, end: int, is_error: bool) -> None:
        self.fd = fd
        self.framed = framed
        self.end = end
        self.is_error = is_error

    @classmethod
    def find(cls, path: str, unended: bool = False) -> Optional[_Reply]:
        """Return the reply in path if it is complete (ended by ESC; with unended, any)."""
        fd = _open_to_read(path)
        if fd is None:
            return None
        try:
            framed = _Framed(fd)
            if framed.end >= 0:
                marker = b"".join(framed.pieces(framed.end, framed.end + 2))
                return cls(fd, framed, framed.end, marker == ERROR_MARKER.encode())
            if unended:
                return cls(fd, framed, os.fstat(fd).st_size, False)
        except OSError as exc:
            _close(fd)
            if exc.errno in GONE:
                return None
            raise OSError(exc.errno, exc.strerror, path) from None
        except BaseException:
            _close(fd)
            raise
        _close(fd)
        return None

    def read(self, sink: Optional[IO[str]]) -> Tuple[str, bool]:
        """Return the reply's text and whether it is an error, or copy the text to sink (never
        held whole) and return ("", False). An error reply is returned, never copied."""
        if sink is not None and not self.is_error:
            self.framed.copy(self.end, sink)
            # Out before its file goes: a buffered write may fail only now. (A
            # sink with write() alone, which the type does not allow, still works.)
            getattr(sink, "flush", lambda: None)()
            return "", False
        data = self.framed.data(self.end + 2)
        return parse_reply(data) or (str(data, "utf-8", "replace"), False)   # a peer's: no ESC

    def close(self) -> None:
        """Close the reply's file."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _close(fd)


class _Expired(Exception):
    """A wait's deadline passed, and what waited goes on (see _let_peer_clear)."""


class _Turn:
    """A client's turn in line: what it looks at while it waits for the lock (see acquire)."""

    def __init__(self, exchange: _Exchange, line: WaitingLine) -> None:
        self.exchange = exchange
        self.line = line
        self.ahead = -1               # tickets ahead at the last look (-1: not looked yet)
        self.unchecked: Dict[str, object] = {}    # a lock whose holder cannot be checked
        self.retried = ""             # the ticket ahead last looked at again at once
        self.said_strange = False     # warned of what is not a lock file at the lock's path
        self.alive = ""               # polling: the file ahead (ticket or lock) judged alive...
        self.judged = -float("inf")   # ...at this time

    def look(self) -> Optional[float]:
        """Take the lock if it is this client's turn and it is free; else return the seconds
        until a look may tell more (see _Exchange._wait)."""
        exchange, lock = self.exchange, self.exchange.lock
        # Polling, the holder ahead is judged every HOLDER_LOOKS, and in between
        # only looked for: a judgement costs a file server several requests for
        # each waiter at each poll, and a remote holder's death shows no sooner.
        polling = exchange.waiter.fd < 0
        if not polling or time.monotonic() >= self.judged + HOLDER_LOOKS:
            self.alive = ""
        # Once first, a client stays first: later tickets come after it.
        ahead, before = (0, "") if self.ahead == 0 else self.line.ahead(self.alive)
        for dead in self.line.dead:
            sweep(exchange.paths.directories(), lock.stale_after, dead=dead)
        self.line.dead.clear()
        if 0 <= ahead < self.ahead:
            exchange.waiter.progress(f"{ahead} ahead in line for {lock.path}")
        self.ahead = ahead
        # Watched anew before every look, so that its going is not missed: a
        # watch follows a file, and another lock may have the name by now.
        watching = exchange.waiter.watch_files([before or lock.path])
        if before:                    # its going wakes us
            if polling and before != self.alive:
                self.alive, self.judged = before, time.monotonic()
            # Judged alive before it was watched: a death in between woke nobody.
            # (Polling, the next look comes anyway.)
            events = watching and exchange.waiter.fd >= 0
            verdict = judge(before, ours=True) if events else None
            if watching and (not events or (verdict is not None and verdict.ended is None)):
                return float("inf")
            # Gone or ended meanwhile: look again, once (one that cannot be removed
            # is then waited for, not looked at without end).
            retry, self.retried = before != self.retried, before
            return 0.0 if retry else float("inf")
        # A lock in place is not asked for: making a file only to find the name
        # taken would cost each waiter woken by the one ahead leaving.
        if look(lock.path, 0) is None and lock.try_acquire():
            exchange.waiter.progress(f"lock {lock.path} free")
            return None
        if not watching:
            return 0.0                # taken meanwhile: watch it, then look again
        if self.alive == lock.path:
            return float("inf")
        self.unchecked = {}
        again = self._clear_stale_lock()
        if polling and again > 0:
            self.alive, self.judged = lock.path, time.monotonic()
        return again

    def _clear_stale_lock(self) -> float:
        """Remove the lock if its holder is gone; return 0 then, else seconds until it may be.

        Only while no server answers its message, and no complete message that
        a server may yet take waits in the buffer: they are the server's to
        clear, with the lock. A lock whose holder cannot be checked becomes
        stale by age, with no event: meanwhile status hears of it (unchecked:
        who, held_for, stale_in).
        """
        paths, lock = self.exchange.paths, self.exchange.lock
        path, stale_after = lock.path, lock.stale_after
        verdict = judge(path)
        if verdict is None:
            return 0.0
        if verdict.seen.kind:
            if not self.said_strange:
                log.warning("%s is %s, not a lock file: no client makes one (it is created "
                            "with O_CREAT|O_EXCL); remove it, and this client goes on",
                            path, verdict.seen.kind)
                self.said_strange = True
            return float("inf")       # its removal wakes us
        reason = stale_reason(verdict, stale_after)
        if reason and (paths.answering(verdict) or not _nothing_left(paths, reason)):
            return float("inf")       # the server's to clear: its removing the lock wakes us
        if reason:
            broken = break_stale(path, stale_after)
            if broken is not None:
                log.warning("removed stale lock %s: %s", path, reason)
                sweep(paths.directories(), stale_after, dead=broken[1])
            return 0.0
        if verdict.how:
            return verdict.again      # a flock's end is an event; a pid or heartbeat is looked at
        stale_in = stale_after - verdict.age + 0.01
        self.unchecked.update(who="" if verdict.owner is None else verdict.owner.host,
                              held_for=verdict.age, stale_in=stale_in)
        return stale_in


def _nothing_left(paths: Paths, reason: str) -> bool:
    """True if no message a stale lock's holder left waits in the buffer: withdrawn now if
    no server will take it.

    Its sender has ended (or, naming nobody, gave up long ago): nobody
    would read a reply. Left to a running filechat server, which takes
    it and removes the lock, and to a server that has read it in place.
    """
    found = look_message(paths.buffer)
    if found is None or not found[1]:
        return True
    if (running_server(paths.presence) is not None or found[0].read_in_place()
            or not remove_if_same(paths.buffer, found[0])):
        return False
    log.warning("withdrew the message in %s, which no server took: the lock it came with "
                "is stale (%s)", paths.buffer, reason)
    return True


class _Awaiting:
    """A sent message's wait for its reply: what it looks at (see _Exchange.await_reply)."""

    def __init__(self, exchange: _Exchange, timeout: float) -> None:
        self.exchange = exchange
        self.timeout = timeout
        self.reply: Optional[_Reply] = None       # once complete
        self.reply_watched = False    # its name: watched once the lock is gone
        self.server_up: Optional[bool] = None     # as last looked at (None: not yet)
        self.looked = -float("inf")   # when the server was last looked for
        # Polling, the server is looked for less often than the reply: a look
        # costs the file server as much as the reply's, and where there are
        # heartbeats its death takes seconds to show anyway.
        self.every = HOLDER_LOOKS if exchange.waiter.fd < 0 else 0.0

    def look(self) -> Optional[float]:
        """None once the reply is complete (in self.reply), else seconds until a look may
        tell more (see _Exchange._wait)."""
        exchange = self.exchange
        # Its server's death closes the presence file: watched before it is looked at.
        exchange.waiter.watch_files([exchange.paths.presence])
        self.reply = self._complete_reply()
        if self.reply is not None:
            exchange.waiter.progress(f"reply in {exchange.response_path}")
            return None
        if time.monotonic() - self.looked >= self.every:
            self._look_for_server()
        _crash_point("client-waiting")
        return self.every or float("inf")

    def _look_for_server(self) -> None:
        """Say when the server stops or starts; a server that starts gets the whole timeout."""
        exchange, paths = self.exchange, self.exchange.paths
        self.looked = time.monotonic()
        up = running_server(paths.presence) is not None
        if up == self.server_up:
            return
        if self.server_up is not None:
            exchange.waiter.progress(f"server on {paths.buffer} {'up' if up else 'gone'}")
            exchange.status("server-started" if up else "server-stopped")
            if up:                    # the new server shows the message: it gets the whole time
                exchange.deadline = time.monotonic() + self.timeout
        elif not up:
            # Gone already at the first look, it may still have taken the message
            # first (its claim is left): it ran, and stopped.
            exchange.status("server-stopped" if paths.claims() else "no-server")
        self.server_up = up

    def _complete_reply(self) -> Optional[_Reply]:
        """Return the reply once it is complete, else None.

        Complete means written and the lock released: every server, filechat
        or spec-following, writes the reply, then removes the lock, so a file
        at the response path while the lock is held is nobody's reply yet (a
        stranger may have made it). A note from the server saying why it
        will not write the reply raises Rejected, whatever is at the path.
        """
        exchange = self.exchange
        reason = look(exchange.note, MAX_PATH * 4)
        if reason is not None:
            try:
                _unlink_quietly(exchange.note)
            except PermissionError:
                pass                  # another user's, in a sticky directory: said in it
            exchange.rejected = True
            raise Rejected(reason.head.decode("utf-8", "replace"))
        if exchange.lock.still_held():
            return None
        # Its name is watched from now on, not before: it appears while the lock
        # is held, which would only wake the client to find the lock held; a
        # peer server may still be writing it in place, and its end wakes us.
        if not self.reply_watched:
            paths, self.reply_watched = exchange.paths, True
            exchange.waiter.watch(exchange.response_path, paths.lock, paths.presence,
                                  exchange.note)
        return _Reply.find(exchange.response_path, unended=True)


# --- Server ---

class Request:
    """One message as the server received it.

    ``deadline`` is when its client will stop waiting for the reply
    (seconds since the epoch), if the client said how long it waits (a
    filechat client does); ``client_waiting()`` tells whether it still waits.
    """

    __slots__ = ("_waiting", "buffer", "deadline", "message", "response_path")

    def __init__(self, message: str, response_path: str, buffer: str,
                 deadline: Optional[float] = None,
                 waiting: Optional[Callable[[], bool]] = None) -> None:
        self.message = message
        self.response_path = response_path     # absolute
        self.buffer = buffer
        self.deadline = deadline
        self._waiting = waiting

    def client_waiting(self) -> bool:
        """False once its client is known to have given up or ended."""
        return self._waiting is None or self._waiting()

    def __repr__(self) -> str:
        return (f"Request(message={self.message!r}, response_path={self.response_path!r}, "
                f"buffer={self.buffer!r})")


if TYPE_CHECKING:
    Responder = Callable[[Request], str]
    Report = Callable[..., None]


def serve(buffer: str, responder: Responder, *, max_messages: Optional[int] = None,
          lock_path: Optional[str] = None, allow_dirs: Sequence[str] = (),
          max_bytes: int = MAX_BYTES, stale_after: float = STALE_AFTER, durable: bool = False,
          poll: Optional[bool] = None, poll_interval: Optional[float] = None,
          report: Report = _ignore) -> int:
    """Answer messages arriving in buffer until max_messages have been handled.

    For each complete message the server claims it, calls
    ``responder(request)`` for the reply text, publishes the reply in the
    request's response file and removes the lock. A responder that raises
    (HookError, or any other exception) gets the client an error reply
    naming why, and serving goes on; one that raises StopServing stops it,
    the message left claimed for the next server. Replies are written
    only into the buffer's directory and allow_dirs. ``report(event,
    **info)`` hears "ready", "idle", "received", "replied", "failed",
    "rejected", "discarded" and "released". Returns the number of messages
    handled; runs until interrupted if max_messages is None.

    Raises UsageError for unusable paths and AlreadyServing if a live
    server already serves buffer.
    """
    paths = Paths(buffer, lock_path)
    check_buffer_path(buffer, paths.lock)
    if sticky_problem(buffer) and os.name == "posix":
        log.warning("%s; this server can answer only its own user's clients",
                    sticky_problem(buffer))
    poll, poll_interval = paths.waiting_mode(poll, poll_interval, POLL_INTERVAL)
    server = _Server(paths, responder, _allowed_directories(buffer, allow_dirs), max_bytes,
                     durable, report, stale_after)
    server.upkeep.presence.start()
    try:
        server.sweep()
        server.upkeep.leave_empty_buffer()
        report("ready", buffer=buffer, lock_path=paths.lock)
        with Waiter([buffer, paths.presence], poll, poll_interval) as waiter:
            # Messages claimed by a server that stopped before answering come first.
            pending = paths.claims()
            try:
                while max_messages is None or server.handled < max_messages:
                    message = (_restore(server, pending.pop(0)) if pending
                               else server.next_claim(waiter))
                    if message is not None:
                        server.answer(message, waiter)
            finally:
                server.check_delivered(waiter, last_look=True)
    finally:
        try:
            line = WaitingLine(paths.lock, stale_after)
            for dead in line.clear():
                sweep([line.directory], stale_after, dead=dead)
            server.sweep()
            server.upkeep.remove_empty_buffer()
        finally:
            server.upkeep.keep_open(-1)
            server.upkeep.presence.let_go()
    return server.handled


def _allowed_directories(buffer: str, allow_dirs: Sequence[str]) -> List[str]:
    """Return the real paths of the directories replies may be written to."""
    for directory in allow_dirs:
        if not os.path.isdir(directory):
            raise UsageError(f"--allow-dir {directory} is not a directory; create it or "
                             "leave it out")
    buffer_dir = os.path.dirname(os.path.abspath(buffer))
    return [os.path.realpath(d) for d in (buffer_dir, *allow_dirs)]


class _Client:
    """The client a message came from, as the server follows it through its lock.

    The lock is kept open for the exchange, so that its inode cannot be
    reused by another lock meanwhile, and, where flocks reach (see
    _flock_reaches), so that its flock tells whether the client lives.
    """

    def __init__(self, fd: int = -1, owner: Optional[Owner] = None, seen: Optional[Seen] = None,
                 gone: bool = False, flocks: bool = False) -> None:
        self.fd = fd                  # its lock, open (-1: it came without one)
        self.owner = owner            # what a filechat client's lock says (None: a peer's)
        self.token = owner.token if owner is not None else ""
        self.seen = seen              # the lock as the message was claimed
        self.gone = gone
        self.flocks = flocks          # a filechat client's, and flocks reach: a free one is its end
        # Its flock is its life: a client on this host (one on another may have
        # crashed with its flock held, which its heartbeat then tells).
        self.watchable = flocks and owner is not None and owner.here()
        self.judged = time.monotonic()    # when its life was last judged in full (see waiting)
        # When its lock was made, by this host's clock (0: unknown): a filechat
        # client's record says so; a peer's empty lock, its file's time.
        self.made = (owner.created if owner is not None and owner.here() else
                     seen.mtime if owner is None and seen is not None else 0.0)

    @classmethod
    def of_lock(cls, lock_path: str) -> _Client:
        """Open the lock in place, which the message about to be claimed came with."""
        fd = _open_to_read(lock_path)
        if fd is None:
            return cls()
        try:
            seen = Seen(os.fstat(fd), os.read(fd, KEPT))
        except OSError as exc:
            _close(fd)
            if exc.errno in GONE:
                return cls()          # removed since it was opened: came without one
            raise OSError(exc.errno, exc.strerror, lock_path) from None
        owner = read_owner(seen.head)
        # As the judge has it (_life): a local disk is one machine's.
        return cls(fd, owner, seen, flocks=owner is not None and owner.flocked
                   and _flock_reaches(lock_path) and (owner.here() or _on_shared(lock_path)))

    def ref(self) -> str:
        """Return the claim name's suffix for this client's lock: "<inode>-<token>"."""
        return f"{0 if self.seen is None else self.seen.ino}-{self.token}"

    def alive(self) -> bool:
        """False once the client is known to have ended (its flock is free)."""
        return not (self.flocks and _flock(self.fd, shared=True))

    def waiting(self, lock_path: str) -> bool:
        """True if the client has not given up nor ended.

        A client whose flock is watched is judged by it alone: its lock may be
        gone by another's hand (a peer that removed it) while it waits. Any
        other has given up once its lock is no longer in place, or once its
        holder is judged to have ended: where its flock reaches, by that at
        every look, and in full (its heartbeat) every HEARTBEAT_INTERVAL, as
        a heartbeat tells no sooner; a look costs a file server several
        requests, on the way of every exchange.
        """
        if self.fd < 0 or self.gone:
            return not self.gone
        now = time.monotonic()
        if not self.alive():
            self.gone = True
        elif not self.watchable and (not self.flocks or now >= self.judged + HEARTBEAT_INTERVAL):
            self.judged = now
            verdict = judge(lock_path)
            self.gone = (verdict is None or not verdict.mine(self.token, self.seen)
                         or verdict.ended is not None)
        return not self.gone

    def release_lock(self, lock_path: str) -> None:
        """Remove the client's lock if it is still the one the message came with.

        One that names its client, and whose flock is not watched, is closed
        first (see Held.let_go). A watched one is kept open while its client
        reads the reply (see _Server.check_delivered), a nameless one while
        it is removed: it is known by what it holds, and its inode.
        """
        if self.fd < 0:
            return
        if self.token and not self.watchable:
            self.close()
        # Its token, or for a nameless one what it holds, is looked at just before removal.
        if (listed(lock_path, self.seen) and token_at(lock_path) == self.token
                and _unlink_quietly(lock_path)
                if self.token else self.seen is not None and remove_if_same(lock_path, self.seen)):
            log.debug("lock %s removed", lock_path)

    def close(self) -> None:
        """Stop following the client."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _close(fd)


class _Message:
    """One claimed message, from its claim to its release: its file, open, its client,
    and what the server answers.

    restored: claimed by a server that stopped before it was done. Once read
    it has its request, once answered its reply (while its client may still
    read it: see _Server.check_delivered).
    """

    def __init__(self, server: _Server, path: str, fd: int, framed: _Framed, client: _Client,
                 restored: bool = False) -> None:
        self.server = server
        self.path = path              # the claim ("": released)
        self.fd = fd
        self.framed = framed
        self.client = client
        self.restored = restored
        self.sent = ""                # its response path as the request carries it
        self.oversize = 0             # bytes of a message over the server's limit
        self.request: Optional[Request] = None
        self.reply: Optional[Seen] = None     # the reply published, once its client reads it

    def read(self) -> bool:
        """Read and check the request; False if there is nothing to answer (said)."""
        server, framed, client = self.server, self.framed, self.client
        if framed.end < 0:
            server.report("discarded", reason=f"incomplete message in {self.path}")
            return False
        try:
            newline = framed.head.find(b"\n", 0, min(framed.end, MAX_PATH + 1))
            if newline < 0:
                raise ValueError("no response path before the message")
            added = client.owner is not None and client.owner.newline
            size = framed.end - newline - 1 - (added and framed.end > newline + 1)
            if size > server.max_bytes:
                self.oversize = size
                parsed = parse_request(framed.head[:newline + 1] + END_MARKER.encode())
            else:
                parsed = parse_request(framed.data(framed.end + 1), added)
            assert parsed is not None
            raw_path, text = parsed
        except ValueError as exc:
            server.report("discarded", reason=f"malformed message in {server.paths.buffer}: "
                          f"{exc}")
            return False
        timeout = None if client.owner is None else client.owner.timeout
        # Its clock started when it sent the message, or when this server
        # started, if later: either way about now, as the message is claimed.
        deadline = None if timeout is None else time.time() + timeout
        # A filechat client's relative path is relative to the buffer's
        # directory (see sent_path); a peer's, as the spec has it, to this one.
        absolute = os.path.join(server.home if client.token else os.getcwd(), raw_path)
        self.sent = raw_path
        lock = server.paths.lock
        request = self.request = Request(text, os.path.normpath(absolute), server.paths.buffer,
                                         deadline, lambda: client.waiting(lock))
        problem = None if client.gone else _target_problem(
            request.response_path, server.home, server.allowed, self.restored)
        if client.gone or problem is _ANSWERED or not client.waiting(lock):
            why = "was answered before a restart" if problem is _ANSWERED else "has gone"
            server.report("discarded", reason=f"the client for {raw_path} {why}", request=request)
            return False
        if problem is not None:
            server.reject(raw_path, request, f"the server will not write the reply to "
                          f"{raw_path}: {problem}")
            return False
        server.report("received", request=request)
        return True

    def answer(self, waiter: Waiter) -> bool:
        """Obtain the reply and publish it; True if it was delivered to a waiting client."""
        server, request, client = self.server, self.request, self.client
        assert request is not None
        failure = None
        path = request.response_path
        # Watched while it is in place: the client closes its lock once it has
        # read the reply, or when it dies without reading it.
        watched = client.watchable and waiter.watch_files([server.paths.lock])
        try:
            text = self._respond(request)
            # A filechat client (its lock names it) gets the text exactly as it is.
            reply = _Staged(path, reply_pieces(text, drawn=not client.token), server.durable)
        except (HookError, FramingError) as exc:
            failure = str(exc)
            text = f"filechat server: {failure}\n"
            reply = _Staged(path, reply_pieces(text, error=True), server.durable)
        try:
            reply.put()
        except BaseException:
            reply.discard()
            raise
        log.debug("reply published in %s", path)
        _crash_point("server-replied")
        # Looked at once the reply is out, not before: the client reads it
        # meanwhile. One whose client has gone is taken back.
        if not client.waiting(server.paths.lock):
            if reply.take_back():
                log.debug("reply %s taken back: its client has gone", path)
            server.report("discarded", reason=f"the client for {path} has gone", request=request)
            return False
        self.release()                    # at once: the client waits for this
        if watched:
            self.reply = reply.seen
        server.report("failed" if failure else "replied", request=request, reason=failure,
                      reply=text)
        server.report("released", lock_path=server.paths.lock)
        return True

    def _respond(self, request: Request) -> str:
        """Return the responder's reply; HookError for anything that keeps it from one."""
        if self.oversize:
            raise HookError(f"the message is {self.oversize} bytes, over this server's "
                            f"limit of {self.server.max_bytes} (--max-bytes)")
        try:
            text = self.server.responder(request)
        except (HookError, StopServing):
            raise
        except Exception as exc:
            failure = f"the responder raised {type(exc).__name__}: {exc}"
            log.warning("%s; sent an error reply, serving on", failure)
            if log.verbose or log.stream is None:     # the traceback, for whoever debugs it
                import traceback
                log.debug("%s", "".join(traceback.format_exception(*sys.exc_info())).rstrip())
            raise HookError(failure) from exc
        if not isinstance(text, str):
            raise HookError(f"the responder returned {type(text).__name__}, not text")
        return text

    def release(self) -> None:
        """Remove the client's lock and the claim, once.

        The lock goes first: its client waits for that. The claim goes at
        once after it, so that a Ctrl+C now leaves no answered message to be
        taken up again by the next server; closed before it is removed (see
        Held.let_go), as it has been read.
        """
        if self.path:
            try:
                self.client.release_lock(self.server.paths.lock)
            finally:             # even on Ctrl+C: the message is answered or discarded
                fd, self.fd = self.fd, -1
                if fd >= 0:
                    _close(fd)
                if _unlink_quietly(self.path):
                    log.debug("claim %s removed", self.path)
                self.path = ""

    def failed(self, exc: OSError) -> None:
        """Report a file that could not be used; a client whose reply it was is told at once."""
        problem = exc.strerror or str(exc)
        if self.request is not None:   # read, so the failure is in writing its reply
            try:
                self.server.reject(self.sent, self.request, "the server could not write the "
                                   f"reply to {self.request.response_path}: {problem}")
                return
            except OSError:
                pass          # the note cannot be written either: the client times out
        self.server.report("discarded",
                           reason=f"cannot use {exc.filename or self.path}: {problem}")

    def close(self) -> None:
        """Close the message's file and stop following its client."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _close(fd)
        self.client.close()


def _claim(server: _Server, relink: bool = False) -> Optional[_Message]:
    """Claim a complete message by renaming the buffer; None if there is none.

    The claim's name carries the inode and token of the lock the message
    came with, so that even a restarted server removes that lock and no other.

    relink: through a hard link of the buffer, whose name then goes. GlusterFS's
    default mount, about once in 150 rounds of 12 clients at once, kept
    leading the buffer's name to the file a client's rename had replaced:
    every read failed (ENOENT) until the client gave up, while the other
    mount read the message. A link asks the file server for the file the name
    has now. Only while the message's client holds the lock, as every client
    that follows the protocol does, is the buffer's name its message's.
    """
    buffer = server.paths.buffer
    source = _temp_name(buffer) if relink else buffer
    if relink:
        try:
            os.link(buffer, source)
        except OSError:
            return None    # gone, or no hard links here: the next look tries the name again
    fd = _open_to_read(source, noatime=True)
    if fd is None:
        return None
    claimed = False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "Not a regular file", buffer)
        framed = _framed(fd, server.limit, st.st_size)
        if framed.end < 0:
            return None               # a peer writing it in place is not done
        client = _Client.of_lock(server.paths.lock)
        claim = server.paths.claim_prefix + client.ref()
        before = time.time()          # see _claim_replaced
        try:
            # Through a link the buffer's name goes first: a failure then leaves the
            # message the buffer's, and a claim is never beside it under both names.
            if relink and not _unlink_quietly(buffer):
                raise FileNotFoundError(errno.ENOENT, "withdrawn", buffer)
            os.rename(source, claim)
        except BaseException as exc:
            client.close()
            if isinstance(exc, OSError) and exc.errno in GONE:
                return None           # withdrawn by its client an instant ago
            raise
        claimed = True
        log.debug("message claimed as %s%s", claim, " through a link" if relink else "")
        server.upkeep.leave_empty_buffer()
        _crash_point("server-taken")
        # Replaced since it was read? Its own rename: no cache to see through.
        if os.lstat(claim).st_ino != st.st_ino:
            client.close()
            return _claim_replaced(server, claim, before)
        message, fd = _Message(server, claim, fd, framed, client), -1
        return message
    except OSError as exc:
        if exc.errno not in GONE:
            raise OSError(exc.errno, exc.strerror, exc.filename or buffer) from None
        if relink or claimed or not (server.names_cached and listed(buffer)
                          and _kind_at(server.paths.lock, "lock file", anew=False) is not None):
            return None               # withdrawn since it was opened
    finally:
        if relink and not claimed:
            _unlink_quietly(source)
        if fd >= 0 and not claimed and not relink:
            server.upkeep.keep_open(fd)   # the buffer as looked at
        elif fd >= 0:
            _close(fd)
    return _claim(server, relink=True)    # its name led to a file gone: see relink


def _claim_replaced(server: _Server, claim: str, before: float) -> Optional[_Message]:
    """Take up a message that replaced the one read, as the buffer was claimed.

    The lock read before the claim was the one read's sender's. This
    message's sender held its own lock when the buffer was renamed, and a
    filechat client leaves it in place from then on (see Lock.release):
    the lock in place now, if it was made before the rename began (before,
    by this host's clock). One made since is another client's, taken after
    a spec client that sent this message gave up and removed its lock;
    with that, or none in place, the message is its gone sender's, and
    that other lock is never removed for it. The claim is renamed to name
    its lock.
    """
    client = _Client.of_lock(server.paths.lock)
    if client.fd < 0 or client.made > before:
        client.close()
        client = _Client(gone=True)
    named = server.paths.claim_prefix + client.ref()
    if named != claim:
        os.rename(claim, named)
    return _open_claim(server, named, client)


def _restore(server: _Server, claim: str) -> Optional[_Message]:
    """Take up a message that a server claimed before it stopped; None if it went."""
    inode, token = _claim_ref(claim[len(server.paths.claim_prefix):]) or (0, "")
    client = _Client()                               # sent without a lock
    if inode != 0:
        client = _Client.of_lock(server.paths.lock)
        if (client.token != token if token else
                client.seen is None or client.seen.ino != inode):
            client.close()
            client = _Client(gone=True)              # the client gave up: another's lock
    return _open_claim(server, claim, client, restored=True)


def _open_claim(server: _Server, claim: str, client: _Client, restored: bool = False
                ) -> Optional[_Message]:
    """Open a claimed message to answer it; None if it went (withdrawn by its client)."""
    fd = _open_to_read(claim, noatime=True)
    if fd is None:
        client.close()
        return None
    try:
        return _Message(server, claim, fd, _framed(fd, server.limit, os.fstat(fd).st_size),
                        client, restored)
    except BaseException:
        _close(fd)
        client.close()
        raise


def _framed(fd: int, limit: int, size: int) -> _Framed:
    """Read the message open as fd, size bytes, as far as its end, no further than the
    longest request allowed (limit): a longer one is complete if it ends in ESC, and is
    answered with an error."""
    framed = _Framed(fd, limit)
    if framed.end < 0 and size > limit \
            and b"".join(framed.pieces(size - 1, size)) == END_MARKER.encode():
        framed.end = size - 1
    return framed


def _target_problem(path: str, home: str, allowed: List[str], restored: bool = False
                    ) -> Optional[str]:
    """Return why the reply must not be written to path, or None if it may.

    home is the buffer's directory, allowed the real paths replies may be
    written under. restored: the message was claimed by a server that
    stopped, which may have written its reply already; a reply there to a
    fresh message is somebody else's file.
    """
    directory = os.path.dirname(path)
    if "\r" in path or "\0" in path:
        return "the path contains a control character"
    # The server's own directory is not looked at: it cannot serve without it.
    if directory != home and not os.path.isdir(directory):
        return f"directory {directory} does not exist"
    # The allowed directories were resolved at start; only others need it.
    real = directory if directory in allowed else os.path.realpath(directory)
    if not any(real == a or real.startswith(a.rstrip(os.sep) + os.sep) for a in allowed):
        return (f"it is outside the directories this server writes to "
                f"({', '.join(allowed)}); the server can allow more with --allow-dir")
    kind = _kind_at(path, "response file")
    if kind is None:
        return None
    if kind:
        return f"it is {kind}" + (", which the server never follows"
                                  if kind == "a symbolic link" else "")
    if restored and ends_with_esc(path) is not None:
        return _ANSWERED
    return "the file already exists, and the server never overwrites a file"


class _Upkeep:
    """What a server keeps in place beside the buffer while it runs: its presence file,
    with the count of messages answered, and an empty buffer for spec clients."""

    def __init__(self, paths: Paths, durable: bool, home: str) -> None:
        self.paths = paths
        self.home = home
        self.presence = Presence(paths.presence, durable)
        self.count_failing = False    # the last update of the presence file's count failed
        self.kept = 0.0               # when the presence file was last looked at
        self.missing = 0.0            # since when it (or the buffer) has been missing (0: not)
        self.buffer_fd = -1           # the buffer as last looked at or made (see keep_open)
        self.keeps_buffer = _kept_hidden(paths.buffer)
        self.presence_name = os.fsencode(os.path.basename(paths.presence))   # see keep
        self.buffer_name = os.fsencode(os.path.basename(paths.buffer))

    def keep(self, waiter: Waiter) -> float:
        """Put back the presence file and the empty buffer once they have been gone for
        PRESENCE_INTERVAL (the directory made anew; not while an rm -r runs, which would then
        fail); return the seconds until then. Looked at when inotify says they may have
        gone (the presence file changed, the buffer removed), and besides once a second:
        when polling, and for a rename away, which sends no event here."""
        now = time.monotonic()
        changed = waiter.changes()
        gone = (b"" in changed or changed.get(self.presence_name, 0)
                or changed.get(self.buffer_name, 0) & IN_DELETE)
        if not gone and now < self.kept + PRESENCE_INTERVAL:
            return float("inf")
        self.kept = now
        if token_at(self.presence.path) == self.presence.id and self._buffer_there():
            self.missing = 0.0
            return float("inf")
        self.missing = self.missing or now
        if now - self.missing < PRESENCE_INTERVAL:
            return self.missing + PRESENCE_INTERVAL - now
        self.missing = 0.0
        try:
            if self.presence.keep():
                log.warning("%s was removed while this server ran; it is back",
                            self.presence.path)
            self.leave_empty_buffer()
        except FileNotFoundError:
            if os.path.isdir(self.home):
                raise
            raise FilechatError(f"directory {os.path.dirname(self.paths.buffer) or '.'} was "
                                "removed while this server ran; make it again and start the "
                                "server anew") from None
        return float("inf")

    def count(self, answered: int) -> None:
        """Update the count in the presence file; a failure is said, and tried again later."""
        try:
            self.presence.update(answered)
        except OSError as exc:
            if not self.count_failing:
                log.warning("cannot update %s (%s); status shows an old count until it can "
                            "be", self.presence.path, exc.strerror or exc)
            self.count_failing = True
        else:
            self.count_failing = False

    def leave_empty_buffer(self) -> None:
        """Put an empty buffer in place, unless a file is there (a request put in place).

        A spec client may open the buffer without O_CREAT, as the spec's
        server empties it in place. Writable as the umask allows: such a
        client writes it in place.
        """
        try:
            self.keep_open(_create(self.paths.buffer, 0o666))
        except FileExistsError:
            return
        log.debug("empty buffer %s made", self.paths.buffer)

    def _buffer_there(self) -> bool:
        """True if something is at the buffer's path, looked at anew (see look); where the
        buffer is kept open (see keep_open), as a copy of the look's file descriptor."""
        if not self.keeps_buffer:
            return look(self.paths.buffer, 0) is not None

        def keep(fd: int, st: os.stat_result) -> bool:
            self.keep_open(os.dup(fd))
            return True
        return bool(looked_into(self.paths.buffer, keep))

    def keep_open(self, fd: int) -> None:
        """Keep fd, the buffer as just looked at or made, open until the buffer is opened
        again (-1: none); close the one kept before.

        Only on sshfs and bindfs (see _kept_hidden): a client on the mount
        that renames its request over the buffer as the last close of it
        there is under way leaves the old one there for good under its hidden
        name, with libfuse before 3.15 (its issue 746; on sshfs, 15 of 600
        exchanges did). The server closes a look's file only once the next
        look has opened the buffer: while it runs, the buffer's last close is
        one that comes after it was renamed over (or removed), and libfuse
        then removes the hidden file. Elsewhere it is closed at once: on
        CephFS, a rename over a file kept open on another mount waits
        (exchanges took 2.9 s instead of 92 ms, medians).
        """
        kept, self.buffer_fd = self.buffer_fd, fd
        if kept >= 0:
            _close(kept)
        if not self.keeps_buffer and fd >= 0:
            self.buffer_fd = -1
            _close(fd)

    def remove_empty_buffer(self) -> None:
        """Remove the buffer if it is empty, unless a spec client holds the lock to write it."""
        seen = look(self.paths.buffer, 0)
        if (seen is not None and not seen.kind and seen.size == 0
                and token_at(self.paths.lock) != ""):       # none, or a filechat client's
            remove_if_same(self.paths.buffer, seen)


class _Server:
    """One server's loop: claiming messages (each then answered by its _Message), keeping
    its files in place (its _Upkeep), and clearing up what others left."""

    def __init__(self, paths: Paths, responder: Responder, allowed: List[str], max_bytes: int,
                 durable: bool, report: Report, stale_after: float = STALE_AFTER) -> None:
        self.paths = paths
        self.responder = responder
        self.allowed = allowed
        self.max_bytes = max_bytes
        self.durable = durable
        self.report = report
        self.stale_after = stale_after
        self.handled = 0              # messages taken, answered or not (--max-messages)
        self.answered = 0             # messages whose client got a reply (status)
        self.swept = 0.0              # when leftovers were last swept
        self.read = 0.0               # when the buffer was last read for a message (see due)
        self.names_cached = _names_cached(paths.buffer)     # once, not a getcwd every poll
        self.unclaimable: Tuple[Optional[bytes], str] = (None, "")   # the last said
        self.home = os.path.dirname(os.path.abspath(paths.buffer))
        self.upkeep = _Upkeep(paths, durable, self.home)
        # The most a whole request of max_bytes can take: path, newline, message, ESC.
        self.limit = MAX_PATH + 1 + max_bytes + 1
        # The last message answered, while its client has still to read the reply:
        # a client killed before it does would leave the file for nobody.
        self.delivered: Optional[_Message] = None

    def next_claim(self, waiter: Waiter) -> _Message:
        """Wait for a complete message in the buffer and claim it."""
        while True:
            self.check_delivered(waiter)
            try:
                message = _claim(self) if self.due(waiter) else None
                if message is not None:
                    waiter.progress(f"a message in {self.paths.buffer}")
                    return message
            except OSError as exc:
                self._unclaimable(exc)
            back = self.upkeep.keep(waiter)
            if time.monotonic() >= self.swept + SWEEP_INTERVAL:
                self.sweep()
            if self.upkeep.presence.answered != self.answered:
                self.upkeep.count(self.answered)      # failed before: tried again now
            self.report("idle", answered=self.answered)
            waiter.wait(min(PRESENCE_INTERVAL if self.upkeep.presence.answered != self.answered
                            else back, self.swept + SWEEP_INTERVAL - time.monotonic()))

    def due(self, waiter: Waiter) -> bool:
        """True if the buffer is worth reading for a message now.

        A client puts its message in place holding its lock. Polling, the
        buffer is read while a lock is in place, whose name is enough to tell
        (on a file server a stat is one request, reading the buffer several),
        and besides once every PRESENCE_INTERVAL, for a message whose client
        let go of its lock (a spec client interrupted after sending). Where
        names are cached, the buffer's is looked up afresh (see listed), so
        that the read sees the message, not a cache.
        """
        polling, cached = waiter.fd < 0, self.names_cached
        if not (polling or cached):
            return True
        locked = _kind_at(self.paths.lock, "lock file", anew=False) is not None
        if locked and cached:
            listed(self.paths.buffer)
        now = time.monotonic()
        if locked or not polling or now >= self.read + PRESENCE_INTERVAL:
            self.read = now
            return True
        return False

    def sweep(self) -> None:
        """Remove what ended processes left: temp files, and replies nobody will read."""
        self.swept = time.monotonic()
        sweep(self.allowed, self.stale_after, replies=self.home)

    def answer(self, message: _Message, waiter: Waiter) -> None:
        """Answer one claimed message, then free the lock it came with and the claim."""
        replied = False
        self.check_delivered(waiter, last_look=True)     # one reply is watched at a time
        try:
            try:
                if message.read():
                    replied = message.answer(waiter)
            except OSError as exc:
                message.failed(exc)
            # Not on an exception (Ctrl+C, a responder that cannot go on): a
            # message being answered stays claimed for the next server.
            message.release()
        finally:
            if message.reply is not None:
                self.delivered = message
            else:
                message.close()
                waiter.watch_files([])    # a reply not delivered is not watched
        self.handled += 1
        if not replied:
            self.report("released", lock_path=self.paths.lock)
            return
        self.answered += 1
        self.upkeep.count(self.answered)

    def check_delivered(self, waiter: Waiter, last_look: bool = False) -> None:
        """Forget the last reply delivered once read; remove it if its client died unread.

        last_look: the server is moving on (another reply, a stop), and leaves
        a live client to read its reply alone.
        """
        message = self.delivered
        if message is None or message.request is None or message.reply is None:
            return
        path = message.request.response_path
        # Its life first: a client that has ended removes nothing more, while
        # one that lives may read its reply, remove it and end between two looks.
        alive = message.client.alive()
        now = look(path)
        if now is not None and now.same(message.reply):
            if alive and not last_look:
                return                    # its lock's watch wakes the server when that changes
            if not alive and remove_if_same(path, message.reply):
                self.report("discarded", reason=f"removed the reply {path}: its client "
                            "ended without reading it")
        else:
            waiter.progress(f"reply {path} read")
        self.delivered = None
        message.close()
        waiter.watch_files([])

    def _unclaimable(self, exc: OSError) -> None:
        """Say, once for each message, why the message in the buffer cannot be claimed.

        In a sticky directory (see sticky_problem) another user's message can
        be read but not renamed: its client is told at once, by a note.
        """
        problem = (sticky_problem(self.paths.buffer)
                   if exc.errno in (errno.EPERM, errno.EACCES) else "")
        reason = problem or f"cannot use {exc.filename or self.paths.buffer}: " \
                            f"{exc.strerror or exc}"
        seen = look(self.paths.buffer, MAX_PATH + 1, noatime=True)
        head = None if seen is None else seen.head
        if (head, reason) == self.unclaimable:
            return                    # said already
        self.unclaimable = (head, reason)
        raw = (head or b"").partition(b"\n")
        if problem and raw[1]:
            try:
                self.reject(raw[0].decode("utf-8").rstrip("\r"), None, problem)
                return
            except (OSError, ValueError):
                pass                  # no note can be written either: the client times out
        self.report("discarded", reason=reason)

    def reject(self, raw_path: str, request: Optional[Request], reason: str) -> None:
        """Tell the client at once why its reply cannot be delivered."""
        publish(self.paths.rejection(raw_path), reason.encode("utf-8"), replace=True,
                durable=self.durable)
        self.report("rejected", request=request, reason=reason)


_ANSWERED = "answered before a restart"    # a _target_problem that is not an error


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
    with _interrupts:           # an interrupt inside Popen would leave a hook none can stop
        proc = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, start_new_session=posix)
        try:
            _crash_point("server-hook")
            if posix:
                output = _hook_output(proc, stdin, timeout)
            else:
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


def _hook_output(proc: Popen[bytes], stdin: bytes, timeout: float) -> bytes:
    """Give the hook its stdin and return its stdout, read until it ends or the hook does.

    Once the hook's own process has ended, what its pipe holds is its output:
    a daemon it started in a session of its own may keep the pipe open for
    ever. TimeoutExpired once timeout seconds have passed.
    """
    import threading
    assert proc.stdin is not None and proc.stdout is not None
    ended, ending = os.pipe()            # readable (at end of file) once the hook has ended
    try:
        def watch() -> None:
            proc.wait()
            os.close(ending)
        threading.Thread(target=watch, daemon=True).start()
        os.set_blocking(proc.stdout.fileno(), False)
        os.set_blocking(proc.stdin.fileno(), False)
        return _pump_hook(proc, memoryview(stdin), time.monotonic() + timeout, ended)
    finally:
        os.close(ended)
        proc.stdin.close()


@_wait_point
def _pump_hook(proc: Popen[bytes], pending: memoryview, deadline: float, ended: int) -> bytes:
    """Write pending to the hook's stdin and read its stdout, until either ends (see
    _hook_output)."""
    import subprocess
    assert proc.stdin is not None and proc.stdout is not None
    source, sink = proc.stdout.fileno(), proc.stdin.fileno()
    chunks: List[bytes] = []
    while True:
        _interrupts.check()
        if not pending:
            proc.stdin.close()                # the message ends here
        left = deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired(str(proc.args), left)
        readable, writable, _ = select.select([source, ended], [sink] if pending else [], [],
                                              left)
        if writable:
            try:
                pending = pending[os.write(sink, pending[:PIPE_PIECE]):]
            except BrokenPipeError:
                pending = pending[:0]         # it reads no more of the message
        if (source in readable or ended in readable) and (_drain(source, chunks)
                                                          or ended in readable):
            break
    proc.wait(max(0.0, deadline - time.monotonic()))
    return b"".join(chunks)


PIPE_PIECE = 65536              # bytes written to a hook's stdin at a time


def _drain(fd: int, chunks: List[bytes]) -> bool:
    """Append what the pipe fd holds now to chunks; True once it is at its end."""
    while True:
        try:
            chunk = os.read(fd, PIPE_PIECE)
        except BlockingIOError:
            return False
        if not chunk:
            return True
        chunks.append(chunk)


def _kill_hook(proc: Popen[bytes], posix: bool) -> None:
    """Stop a hook and everything it started in its session, and let go of its pipes.

    Its output is not waited for: a daemon it started in a session of its
    own may hold it open for ever.
    """
    try:
        if posix:
            os.killpg(proc.pid, 9)
        else:
            proc.kill()
    except OSError:
        pass
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()
    proc.wait()


# --- Status ---
# After the server because it reads what both sides leave: the presence
# file, the lock, the buffer, claims and the line.

def status(buffer: str, lock_path: Optional[str] = None,
           stale_after: float = STALE_AFTER) -> Dict[str, object]:
    """Describe the exchange on buffer: server, lock, waiting message, line of clients.

    Returns the dictionary that ``filechat status --json`` prints.
    """
    paths = Paths(buffer, lock_path)
    verdicts = settled({paths.presence: True, paths.lock: False})
    presence = verdicts[paths.presence]
    server: Optional[Dict[str, object]] = None
    if presence is not None and presence.ended is None and not presence.seen.kind:
        owner = presence.owner
        server = {"pid": owner.pid if owner else None, "host": owner.host if owner else None,
                  "started": owner.started if owner else None,
                  "answered": owner.answered if owner else 0}
    verdict = verdicts[paths.lock]
    lock: Dict[str, object] = {"path": paths.lock, "held": False, "pid": None, "host": None,
                               "age": None, "state": "free", "stale_reason": None}
    if verdict is not None and verdict.seen.kind:
        lock.update(state=f"not a lock file: {verdict.seen.kind}")
    elif verdict is not None:
        answering = paths.answering(verdict)
        reason = None if answering else stale_reason(verdict, stale_after)
        owner = verdict.owner
        # Held since its record was made: a heartbeat keeps its file's time fresh.
        held = verdict.age if owner is None else max(0.0, time.time() - owner.created)
        lock.update(held=True, pid=owner.pid if owner else None,
                    host=owner.host if owner else None, age=round(held, 3),
                    state="stale" if reason else
                    "being answered; its client has ended" if answering and verdict.ended else
                    "being answered" if answering else "alive" if verdict.how else "unknown",
                    stale_reason=reason)
    waiting = look_message(buffer)
    poll, interval = paths.waiting_mode(None, None, POLL_INTERVAL)
    files = {"type": filesystem_type(os.path.dirname(buffer) or "."),
             "shared": paths.shared(), "polling": interval if poll else None}
    return {"buffer": buffer, "server": server, "lock": lock, "filesystem": files,
            "message_waiting": waiting is not None and waiting[1],
            "being_answered": len(paths.claims()),
            "waiting_clients": len(WaitingLine(paths.lock).tickets())}


# --- Watch: the protocol's files as they change, none of them touched ---
# After status: it reads what every section above writes.

BREACHES = {       # what the files alone show; said as seen, never as whose fault
    "unlocked": "buffer written while no lock exists",
    "overwritten": "message overwritten before it was answered or withdrawn",
    "unanswered": "lock removed before any reply appeared for its message",
    "reply-lost": "reply replaced or removed before its client read it",
    "unended": "message without the end marker when its lock goes",
}
WATCH_EVENTS = IN_CREATE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE | IN_DELETE
RECORDS = ("lock", "ticket", "presence")    # one JSON line each, made whole; rewritten: beats
# The protocol's order: changes that one poll saw together are judged in it
# (no breach that some order allows) and shown marked as seen together.
ROLES = ("lock", "ticket", "buffer", "claim", "reply", "rejected", "presence")


class Watcher:
    """Tell each change to the files of the exchanges on a buffer, as one record to emit.

    Changes come from inotify's events, in their order, or from polls that
    compare the directories' listings with the last ones. Files are only
    read, the buffer and claims with O_NOATIME or not at all: a filechat
    client takes a read of its message for a spec server's.
    """

    def __init__(self, paths: Paths, emit: Callable[[Dict[str, object]], None]) -> None:
        self.paths, self.emit = paths, emit
        self.line = paths.lock + LINE_SUFFIX
        self.started = time.monotonic()
        self.known: Dict[str, Tuple[int, int, int]] = {}    # path: inode, size, mtime seen
        self.owners: Dict[str, Optional[Owner]] = {}        # record path: its holder
        self.makers: Dict[str, Tuple[str, int, str, Dict[str, object]]] = {}
        # path: the temp file it is being made in, its pid and host, what it holds
        self.replies: Set[str] = set()                      # response paths messages named
        self.since: Dict[str, float] = {}                   # lock or ticket: when it came
        self.message: Dict[str, object] = {}   # what the buffer held last
        self.blind = ""                     # why messages are not read (said once)
        self.story = _Story()
        self.counts: Dict[str, int] = {}

    def run(self, poll: Optional[bool] = None, interval: Optional[float] = None) -> None:
        """Tell every change until interrupted; counts holds the breaches. Follows inotify's
        events, or polls where they tell nothing of other hosts (Paths.waiting_mode) or if
        asked."""
        poll, interval = self.paths.waiting_mode(poll, interval, SHARED_POLL_INTERVAL)
        inotify = None if poll else _Inotify.borrow()
        if inotify is not None:
            try:
                _Follower(self, inotify).follow()
            finally:
                inotify.give_back()
        self.story.polling = True
        self.poll(first=True)
        log.debug("watching with polling every %g s", interval)
        while True:
            time.sleep(interval)
            self.poll()

    def role(self, path: str) -> str:
        """Name the part path plays ("temp": a file being made; "": none)."""
        base, buffer = os.path.basename(path), self.paths.buffer
        return ("temp" if base.startswith(".") and base.endswith(".tmp") else
                "lock" if path == self.paths.lock else "buffer" if path == buffer else
                "presence" if path == self.paths.presence else
                "claim" if path.startswith(self.paths.claim_prefix) else
                "rejected" if path.startswith(buffer + REJECTED_SUFFIX) else
                "ticket" if os.path.dirname(path) == self.line and _is_ticket(base) else
                "reply" if path in self.replies or base.startswith(REPLY_PREFIX) else "")

    def scan(self) -> Dict[str, Tuple[int, int, int]]:
        """Return inode, size and modification time of each protocol file there now."""
        found = {}
        for directory in {*self.paths.directories(), self.line}:
            try:
                with os.scandir(directory) as entries:
                    named = [entry for entry in entries if self.role(entry.path)]
            except OSError:
                continue        # missing (the line, between waiters)
            for entry in named:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue    # gone since the listing: the others are still there
                found[entry.path] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return found

    def poll(self, first: bool = False) -> None:
        """Look once; tell each change since the last look, in the protocol's order."""
        now, changes = self.scan(), []
        for path in sorted(set(now) | set(self.known)):
            before, after = self.known.get(path), now.get(path)
            if before == after:
                continue
            if self.role(path) == "temp":      # a gone one is forgotten below, once used
                self.known.pop(path, None)
                if after is not None:
                    self.known[path] = after
                    self.temp(path, IN_CLOSE_WRITE)
            else:
                changes.append(("present" if first else "removed" if after is None else
                                "claimed" if self.role(path) == "claim" and before is None else
                                "written" if before is not None and before[0] == after[0] else
                                "published" if before or path in self.makers else "created",
                                path, after))
        if any(kind == "claimed" for kind, _, _ in changes):   # the buffer renamed to it
            changes = [c for c in changes if c[:2] != ("removed", self.paths.buffer)]
        changes.sort(key=lambda c: (c[0] == "removed", ROLES.index(self.role(c[1]))))
        for kind, path, after in changes:
            self.known.pop(path, None)
            if after is not None:
                self.known[path] = after     # till a look says more: the lock is there
            self.change(kind, path, together=len(changes) > 1 and not first)
        self.makers = {p: m for p, m in self.makers.items() if m[0] in now}

    def same(self, path: str) -> bool:
        """True if path is as the last look saw it (or created empty), or gone: nobody
        reads what is written to a removed file."""
        try:
            st = os.lstat(path)
        except OSError:
            return True
        return self.known.get(path) in ((st.st_ino, st.st_size, st.st_mtime_ns),
                                        (0, 0, 0) if st.st_size == 0 else None)

    def temp(self, path: str, mask: int) -> None:
        """Note who makes the file that a temp file at path is to be published as, and (once
        written) what it holds: it may be gone again before a look (_temp_name)."""
        head, base = os.path.split(path)
        parts = base[1:].rsplit(".", 4)
        target = os.path.join(head, parts[0])
        if mask & IN_DELETE:
            self.makers = {p: m for p, m in self.makers.items() if m[0] != path}
        elif len(parts) == 5 and parts[2].isdigit() and not mask & IN_MOVED_FROM:
            host = HOST if parts[1] == HOST_TAG else f"a host tagged {parts[1]}"
            held = self._look(path, self.role(target)) if mask & IN_CLOSE_WRITE else {}
            self.makers[target] = (path, int(parts[2]), host, held)

    def change(self, kind: str, path: str, fresh: bool = True, together: bool = False) -> None:
        """Tell one change to path: what is there now (if fresh), who, any breach."""
        role = self.role(path)
        info: Dict[str, object] = {}
        if kind == "removed":
            self.known.pop(path, None)
            if path in self.since:
                info["held"] = round(time.time() - self.since.pop(path), 3)
        elif fresh:
            before = self.owners.get(path)
            info = self._look(path, role)
            owner = self.owners.get(path)
            if kind == "written" and role in RECORDS and before and owner \
                    and before.token == owner.token:
                return                # its holder's heartbeat or count, rewritten in place
        elif role in ("buffer", "claim", "reply"):
            info["changed"] = "again before a look"
        owner = self.owners.get(self.paths.presence if role == "claim" else path)
        pid, host = (owner.pid, owner.host) if owner else (None, None)
        if kind in ("created", "published", "present") and role in ("lock", "ticket"):
            self.since[path] = owner.created if kind == "present" and owner else time.time()
        if role == "ticket" and kind != "removed":
            tickets = sorted(p for p in self.known if self.role(p) == "ticket")
            info["place"] = tickets.index(path) + 1 if path in tickets else None
        if kind == "published" and path in self.makers:
            _, pid, host, held = self.makers.pop(path)
            info = held if "size" in held else info   # exactly what was published
        if role == "buffer" and info.get("size"):
            self.message = info
        elif kind == "claimed" and "size" not in info:
            info = self.message               # answered before a look: the buffer's last
        who = (f"pid {pid} on {host}" if pid else
               "a client that does not name itself" if role == "lock" else None)
        if kind == "removed" and role in RECORDS:
            self.owners.pop(path, None)
        breach = self.story.judge(kind, role, path, info, self.paths.lock in self.known,
                                  self.owners.get(self.paths.lock) is not None)
        if breach:
            self.counts[breach] = self.counts.get(breach, 0) + 1
        self.emit({"ms": round((time.monotonic() - self.started) * 1000), "time": time.time(),
                   "file": os.path.relpath(path, os.path.dirname(self.paths.buffer)),
                   "event": kind, "pid": pid, "host": host, "who": who, **info,
                   "breach": BREACHES.get(breach), "together": together})

    def _look(self, path: str, role: str) -> Dict[str, object]:
        """Return what path holds now, as its role says it: its record, its message..."""
        message = role in ("buffer", "claim")
        try:
            found = looked_into(path, _ends, noatime=True, strict=message)
        except PermissionError as exc:
            if not self.blind:
                self.blind = f"{path}: {exc.strerror}"
                log.warning("%s: without O_NOATIME a read would count as a server's; "
                            "messages are sized, not read", self.blind)
            try:
                st = os.lstat(path)       # a stat leaves the access time alone
            except OSError:
                return {}
            found = st, b"", b""
        if found is None:
            return {"changed": "gone before a look"}
        st, head, tail = found
        self.known[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
        if role in RECORDS:
            self.owners[path] = read_owner(head)
            return {}
        info: Dict[str, object] = {"size": st.st_size}
        if st.st_size and (head or not message):
            esc = END_MARKER.encode()
            ended = esc in head or tail.endswith(esc)
            info.update(ended=ended, error=ended and tail == ERROR_MARKER.encode())
            first, _, text = head.partition(b"\n") if message else (b"", b"", head)
            if message and ended:
                response = first.decode("utf-8", "replace").rstrip("\r")
                self.replies.add(os.path.join(os.path.dirname(self.paths.buffer), response))
                info.update(response=response, size=st.st_size - len(first) - 2)
            info["first_line"] = text.split(b"\n")[0].split(esc)[0].decode("utf-8", "replace")
        return info


class _Story:
    """The exchanges on a buffer as a watch follows them: the breach each change shows."""

    def __init__(self) -> None:
        self.ended: Set[str] = set()        # replies seen complete
        self.sent: Optional[str] = None     # the lock's message's response path...
        self.answered = False               # ...and whether a reply (or note) came for it
        self.waiting = False                # the buffer holds a message nobody took yet
        self.unended = False                # the buffer holds an unfinished message
        self.polling = False                # a reply may come and go between two looks

    def judge(self, kind: str, role: str, path: str, info: Dict[str, object],
              locked: bool, named: bool) -> str:
        """Follow the exchange through one change; return the breach it shows ("" if none).

        locked: a lock is there now; named: it names its holder.
        """
        if role == "lock" and kind == "removed":
            sent, self.sent, unended = self.sent, None, self.unended
            # Polling, what a look did not see may have been there: a reply that
            # came and went between two looks, a lock left out of a listing that
            # a FUSE client cached (GlusterFS). Breaches of a missing file need events.
            return ("unended" if unended else
                    "unanswered" if sent and not self.answered and not self.polling else "")
        if role in ("buffer", "claim") and (kind == "removed" or info.get("size") == 0):
            if role == "claim" or self.waiting:    # taken away unanswered: withdrawn
                self.sent = None if not self.answered else self.sent
            self.waiting = self.unended = self.waiting and role == "claim"
            return ""
        if role in ("buffer", "claim") and "size" in info:
            breach = ("" if kind == "present" or role == "claim" else
                      "unlocked" if not locked and not self.polling else
                      "overwritten" if self.waiting and not self.answered else "")
            self.unended = info.get("ended") is False and role == "buffer"
            self.waiting = role == "buffer" and not self.unended
            if not self.unended:
                self.sent, self.answered = str(info.get("response", "")), False
            return breach
        if role in ("reply", "rejected"):
            lost = path in self.ended and (kind in ("published", "written") or (
                kind == "removed" and self.sent is not None and self.answered
                and named))
            self.ended.discard(path)
            if kind != "removed":
                self.answered = self.answered or self.sent is not None
                if info.get("ended"):
                    self.ended.add(path)
            return "reply-lost" if lost and role == "reply" else ""
        return ""


class _Follower:
    """A watch's changes from inotify's events, in their order (see Watcher.run)."""

    def __init__(self, watcher: Watcher, inotify: _Inotify) -> None:
        self.watcher = watcher
        self.inotify = inotify

    def follow(self) -> None:
        """Watch the directories (again, once made anew), and tell each event's change, until
        interrupted."""
        watcher, fd = self.watcher, self.inotify.fd
        watches: Dict[int, str] = {}
        watcher.poll(first=True)
        try:
            while True:
                for directory in {*watcher.paths.directories(), watcher.line} - {*watches.values()}:
                    wd = _libc().inotify_add_watch(fd, os.fsencode(directory), WATCH_EVENTS)
                    if wd >= 0:               # set before the look that sees what came first
                        watches[wd] = directory
                        watcher.poll()
                        log.debug("watching %s with inotify", directory)
                select.select([fd], [], [], SAFETY_INTERVAL)
                events = [(watches.get(wd, ""), mask, os.fsdecode(name))
                          for wd, mask, name in _read_events(fd)]
                for index, (directory, mask, name) in enumerate(events):
                    if mask & IN_IGNORED:
                        for wd in [w for w, d in watches.items() if d == directory]:
                            del watches[wd]
                    if mask & IN_Q_OVERFLOW:
                        watcher.poll()        # events lost: the listings tell what changed
                    elif directory and name:
                        self._event(os.path.join(directory, name), mask, events[index + 1:])
        finally:
            for wd in watches:
                _libc().inotify_rm_watch(fd, wd)

    def _event(self, path: str, mask: int, later: List[Tuple[str, int, str]]) -> None:
        """Tell what one inotify event says happened to path; later: the events after it."""
        watcher = self.watcher
        role = watcher.role(path)
        fresh = not any(m & ~IN_CLOSE_WRITE and os.path.join(d, n) == path for d, m, n in later)
        if role == "temp":
            watcher.temp(path, mask)
        elif not role or (mask & IN_CLOSE_WRITE and (role in RECORDS or watcher.same(path))):
            return     # a record's holder letting go, a file seen as it is, or one gone
        elif mask & IN_CLOSE_WRITE:
            watcher.change("written", path, fresh)
        elif mask & IN_MOVED_FROM and role == "buffer" and later and later[0][1] & IN_MOVED_TO \
                and watcher.role(os.path.join(later[0][0], later[0][2])) == "claim":
            watcher.known.pop(path, None)        # its claim tells
        elif mask & (IN_DELETE | IN_MOVED_FROM):
            watcher.change("removed", path)
        else:
            watcher.known[path] = (0, 0, 0)      # till a look says more: it is there
            watcher.change("claimed" if role == "claim" else "published"
                           if mask & IN_MOVED_TO or path in watcher.makers else "created",
                           path, fresh)


def _ends(fd: int, st: os.stat_result) -> Tuple[os.stat_result, bytes, bytes]:
    """Return a file's status, its first HEAD bytes and its last two (where an end marker is)."""
    if not stat.S_ISREG(st.st_mode):
        return st, b"", b""
    head = os.read(fd, HEAD)
    if st.st_size > HEAD:
        os.lseek(fd, -2, os.SEEK_END)
    return st, head, (os.read(fd, 2) if st.st_size > HEAD else head[-2:])


# --- CLI ---

class Terminal:
    """The streams the CLI talks through; tests pass their own."""

    def __init__(self, stdin: Optional[IO[str]] = None, stdout: Optional[IO[str]] = None,
                 stderr: Optional[IO[str]] = None) -> None:
        self.stdin = stdin or sys.stdin
        # A stream the process was started without (>&-) is None; what would go
        # there goes nowhere, and a client with nowhere to print is refused.
        self.closed = [name for name, stream in (("output", stdout or sys.stdout),
                                                 ("error", stderr or sys.stderr))
                       if stream is None]
        self.stdout = stdout or sys.stdout or _nowhere()
        self.stderr = stderr or sys.stderr or _nowhere()
        self.stdout_tty = _isatty(self.stdout)
        if stdout is None:
            _speak_utf8(self.stdout, self.stdout_tty)
        self.stderr_tty = _isatty(self.stderr)
        # https://no-color.org: any non-empty NO_COLOR turns colour off.
        self.color = (self.stderr_tty and not os.environ.get("NO_COLOR")
                      and os.environ.get("TERM") != "dumb")
        self.lenient = False      # a server: output that fails is given up, not fatal

    def error(self, text: str) -> None:
        """Print ``filechat: error: text`` on stderr, "error" in red at a terminal."""
        label = "\x1b[31merror\x1b[0m" if self.color else "error"
        self.err(f"filechat: {label}: {text}")

    def out(self, text: str = "") -> None:
        """Print a line on stdout."""
        self.write(text + "\n")

    def write(self, text: str) -> None:
        """Write text on stdout, at once.

        Lenient, a failure (the reader gone, a full disk) is said once on
        stderr and stdout is given up: a server serves on without it. Else
        OutputError, but BrokenPipeError for a reader gone (see main).
        """
        try:
            self.stdout.write(text)
            self.stdout.flush()
        except (OSError, ValueError) as exc:
            if not self.lenient:
                if isinstance(exc, BrokenPipeError):
                    raise
                raise OutputError("cannot write to standard output: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
            self.stdout = _nowhere()
            self.stdout_tty = False
            reason = getattr(exc, "strerror", None) or exc
            log.warning("cannot write to standard output (%s); serving on without showing "
                        "the messages", reason)

    def err(self, text: str = "", end: str = "\n") -> None:
        """Print a line on stderr (or, with end="", text to go on with).

        A failure is ignored: nothing could say it, and what stderr carries
        (status lines, prompts, warnings) is not what a command is run for.
        """
        try:
            self.stderr.flush()
            self.stdout.flush()
            self.stderr.write(text + end)
            self.stderr.flush()
        except (OSError, ValueError):
            pass

    def stdin_is_tty(self) -> bool:
        """True if stdin is a terminal."""
        return _isatty(self.stdin)

    def editing(self) -> bool:
        """True if text typed here is read with line editing (readline) and history."""
        return (self.stdin is sys.stdin and self.stdout is sys.stdout and self.stdin_is_tty()
                and self.stdout_tty and _line_editor() is not None)

    def read_text(self, what: str) -> Tuple[str, bool]:
        """Read stdin up to end of file; return (text, ended mid-line at a terminal).

        At a terminal, Ctrl+D after text on a line ends that text at once
        (the terminal hands over the partial line without a newline), instead
        of needing a second Ctrl+D; with line editing it does the same. Text
        typed before the prompt (a paste, a script) is read as the terminal
        has it, Ctrl+D included: it was shown as it was typed.
        """
        if self.editing() and not _typed_ahead(self.stdin):
            return _read_edited(what), False
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
            typed = _keys_queued_raw(chunk) if tty else None
            if typed is not None:
                chunk, ended = typed
                self.err(chunk.decode("utf-8", "replace"), end="")    # never shown as typed
                chunks.append(chunk)
                if ended:
                    data = b"".join(chunks)
                    return _decode_input(data, what), data[-1:] not in (b"", b"\n")
                continue
            chunks.append(chunk)
            if tty and not chunk.endswith(b"\n"):
                return _decode_input(b"".join(chunks), what), True
        return _decode_input(b"".join(chunks), what), False


def _keys_queued_raw(chunk: bytes) -> Optional[Tuple[bytes, bool]]:
    """Read keys typed with the command, as the terminal's line mode would have; True if
    Ctrl+D ended the text. None for what line mode read: no Ctrl+D, no lone CR.

    They came while the shell's line editor held the terminal raw, and wait
    unprocessed, unechoed: Enter as a carriage return, Ctrl+D as a character
    (line mode never hands over either; a Windows console's lines end in
    CR LF). What follows a Ctrl+D in the same burst is dropped: it was typed
    for what comes after the client.
    """
    if b"\x04" not in chunk and b"\r" not in chunk.replace(b"\r\n", b""):
        return None
    text, ctrl_d, _ = chunk.partition(b"\x04")
    return text.replace(b"\r\n", b"\n").replace(b"\r", b"\n"), bool(ctrl_d)


# readline, once set up for typed text (None where there is none).
_EDITOR: Dict[str, Any] = {}
_CTRL_D: List[bool] = []      # Ctrl+D was pressed after text on the line just read


def _line_editor() -> Any:
    """Return readline set up for typed messages, or None where there is none.

    Arrow keys and history then work as at any prompt, and ESC starts an
    editing key instead of reaching the text. Ctrl+D after text runs a
    completer that only notes it was pressed, then accepts the line: the
    text ends there, as without readline, and nothing shows on the screen.
    A NUL does the same: it is how a Ctrl+D typed before readline took the
    terminal out of line mode reaches it (the kernel queues an end of file
    as a NUL), and a NUL can never be part of the text.
    """
    if "readline" not in _EDITOR:
        editor: Any = None
        try:
            import readline as editor
        except ImportError:
            pass              # not built with it (Windows, some minimal builds): plain lines
        if editor is not None and "libedit" not in (editor.__doc__ or ""):
            editor.set_completer(lambda text, state: _CTRL_D.append(True))
            for binding in (r'"\C-x\C-f": complete', r'"\C-d": "\C-e\C-x\C-f\C-m"',
                            r'"\C-@": "\C-e\C-x\C-f\C-m"',
                            r'"\t": tab-insert', "set bell-style none"):
                editor.parse_and_bind(binding)
        _EDITOR["readline"] = editor
    return _EDITOR["readline"]


def _typed_ahead(stream: IO[str]) -> bool:
    """True if whole lines typed at the terminal stream wait to be read."""
    try:
        import termios
        return int.from_bytes(fcntl.ioctl(stream.fileno(), termios.FIONREAD, bytes(4)),
                              sys.byteorder) > 0
    except (ImportError, OSError, ValueError, AttributeError, NameError):
        return False              # not a terminal that can say (or not POSIX)


def _read_edited(what: str) -> str:
    """Read typed lines with readline up to Ctrl+D; return them as one text.

    After Ctrl+Z and fg the line being typed is drawn again where the cursor
    is now: readline would go on as if the shell had printed nothing.
    """
    lines: List[str] = []
    resumed = getattr(_signal, "SIGCONT", None)
    saved = None if resumed is None else _signal.signal(resumed, _redraw_typed)
    try:
        while True:
            del _CTRL_D[:]
            try:
                line = input()
            except EOFError:
                return "".join(lines)
            except UnicodeDecodeError:
                raise FramingError(what, "is not valid UTF-8 text") from None
            if _CTRL_D:
                return "".join(lines) + line
            lines.append(line + "\n")
    finally:
        if resumed is not None:
            _signal.signal(resumed, saved)


def _redraw_typed(signum: int, frame: object) -> None:
    """Take the terminal back and draw the line being typed again (see _read_edited).

    The shell gave the terminal back in its own line mode, which would echo
    keys as well as readline does; readline sets it up anew, then draws.
    """
    editor = _line_editor()
    try:
        import ctypes
        library = ctypes.CDLL(editor.__file__)    # readline's own, through its module
        library.rl_deprep_terminal()
        library.rl_prep_terminal(1)
        library.rl_on_new_line()
        library.rl_forced_update_display()
    except (OSError, AttributeError):
        pass                  # a readline without them: the line is still there, unseen


def _nowhere() -> IO[str]:
    """Return a stream that discards what is written to it."""
    return open(os.devnull, "w", encoding="utf-8")


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


class _StatusDisplay:
    """The client's status lines on stderr; at a terminal the last one counts the wait.

    At a terminal the line being waited on shows the seconds waited, updated
    in place, and is rewritten without them when the next line comes, so the
    screen ends up showing exactly the lines a pipe would get. The live line
    is cut to the terminal's width, read anew at each update (so a resized
    window is redrawn at the next one): a line that wrapped onto a second
    row would leave a copy behind at every redraw. Elsewhere, or in a window
    too narrow for any of it, each line is printed once, plainly; with
    quiet, not at all.
    """

    def __init__(self, term: Terminal, quiet: bool) -> None:
        self.term = term
        self.quiet = quiet
        self.live = term.stderr_tty and not quiet
        self.current: Optional[str] = None
        self.reply: Optional[_Tail] = None    # the reply, as it is printed at a terminal

    def say(self, text: str) -> None:
        """Show the next status line."""
        if self.quiet:
            return
        self.done()
        # Live only where the line has room for a timer beside some of it.
        if not self.live or _live_row(text, " 00.0 s", self.term.stderr) is None:
            self.term.err(text)
            return
        self._write(_live_row(text, "", self.term.stderr) or "")
        self.current = text

    def tick(self, waited: float) -> None:
        """Show how long the current line has been waited on."""
        if self.current is not None:
            row = _live_row(self.current, f" {waited:.1f} s", self.term.stderr)
            if row is not None:
                self._write(f"\r{row}\x1b[K")

    def interject(self, line: str) -> None:
        """Print line on a line of its own above the live line, which is drawn again below."""
        if self.reply is not None:
            self.reply.end_line()         # a reply at this terminal, not ending its line
        if self.current is None:
            self.term.err(line)
            return
        self._write(f"\r\x1b[K{line}\n{_live_row(self.current, '', self.term.stderr) or ''}")

    def done(self) -> None:
        """End the current line, whole and without its timer (wrapping as it must)."""
        if self.current is not None:
            self._write(f"\r{self.current}\x1b[K\n")
            self.current = None

    def _write(self, text: str) -> None:
        self.term.err(text, end="")


MIN_LIVE = 12           # columns: a live line cut shorter than this says nothing


def _live_row(text: str, suffix: str, stream: IO[str]) -> Optional[str]:
    """Return text cut to fit one row of stream's terminal with suffix; None if it cannot.

    The last column is left free: some terminals wrap on writing to it.
    """
    room = _columns(stream) - 1 - len(suffix)
    if room < MIN_LIVE:
        return None
    if _cells(text) > room:
        while _cells(text) > room - 1:
            text = text[:-1 - (_cells(text) - room) // 2]
        text += "\u2026"         # an ellipsis: more was cut
    return text + suffix


def _columns(stream: IO[str]) -> int:
    """Return the width of the terminal stream writes to (80 if it cannot be found)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return 80


def _cells(text: str) -> int:
    """Return how many terminal columns text takes: wide characters two, combining none."""
    if text.isascii():
        return len(text)
    import unicodedata  # here: only a live line with other than ASCII needs it
    return sum(0 if unicodedata.combining(char) else
               2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _decode_input(data: bytes, what: str) -> str:
    """Decode typed or piped input as UTF-8; FramingError if it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FramingError(what, "is not valid UTF-8 text") from None


def _display(text: str) -> str:
    """Return text ending in exactly one newline for showing between banners."""
    return text if text.endswith("\n") else text + "\n"


_CARETS: Dict[int, str] = {}      # control character: how a terminal shows it (_visible)


def _visible(text: str) -> str:
    """Return text as a terminal should show it: control characters but tab and newline
    written out (^M, ^H, ^?, <U+009B>), so none can hide or redraw what was sent; so are
    the marks that reorder text from right to left (<U+202E>)."""
    if not _CARETS:
        _CARETS.update({code: f"^{chr(code + 64)}" for code in range(32)
                        if chr(code) not in "\t\n"})
        _CARETS[0x7F] = "^?"
        for code in (*range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)):
            _CARETS[code] = f"<U+{code:04X}>"
    return text.translate(_CARETS)


def _display_path(path: str) -> str:
    """Show a path relative to the working directory when it lies below it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:      # another drive on Windows
        return path
    return path if relative.startswith(os.pardir) else relative


# Each command's examples, and (under "") all of them, for --help.
EXAMPLES = {
    "server": """\
  filechat server buf.txt                        answer at this terminal
  filechat server buf.txt --auto-reply 'got it'  answer every message unattended
  filechat server buf.txt --auto-reply-cmd 'tr a-z A-Z' --log chat.jsonl""",
    "client": """\
  filechat client buf.txt resp.txt               type a message, end it with Ctrl+D
  reply=$(filechat client buf.txt --message 'hello')
  filechat client buf.txt --message-file report.txt --json""",
    "status": """\
  filechat status buf.txt                        is a server up? who holds the lock?""",
    "watch": """\
  filechat watch buf.txt                         who made which file when, until Ctrl+C
  filechat watch buf.txt --json > timeline.jsonl one JSON object per event, for tools
  filechat watch buf.txt --since-start           times in ms since the watch began""",
}
RUN_AS = ("  (run as python3 filechat.pyz ..., python3 -m filechat ..., or filechat ... "
          "once installed)")


def _epilog(command: str) -> str:
    """Return the examples and exit statuses a command's --help ends with ("": all)."""
    examples = EXAMPLES[command] if command else "\n".join(EXAMPLES.values())
    return f"examples:\n{examples}\n{RUN_AS}\n\n{EXIT_STATUSES[command]}"


class _CommandLineError(Exception):
    """A command line argparse refuses: args are the command's name and what argparse says."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors main() reports (and a client's --json says)."""

    def error(self, message: str) -> NoReturn:
        """Print the usage, as argparse does, and raise the error for main() to say."""
        self.print_usage(sys.stderr)
        raise _CommandLineError(self.prog, message)


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """Return the command-line parser; with only, a command's name, that command's alone
    (a client starts measurably faster without building the others)."""
    parser = _Parser(
        prog="filechat", formatter_class=_HelpFormatter, epilog=_epilog(""),
        description="Client/server text messaging through plain files and a lockfile.")
    parser.add_argument("--version", action="version", version=f"filechat {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.set_defaults(parsers={name: add(commands)
                                 for name, add in _COMMANDS.items() if only in (None, name)})
    return parser


def _server_parser(commands: argparse._SubParsersAction[_Parser]
                    ) -> argparse.ArgumentParser:
    """Add the server command to commands; return its parser."""
    server = commands.add_parser("server", help="answer messages arriving in a buffer file",
                                 formatter_class=_HelpFormatter, epilog=_epilog("server"),
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
    return server


def _client_parser(commands: argparse._SubParsersAction[_Parser]
                    ) -> argparse.ArgumentParser:
    """Add the client command to commands; return its parser."""
    client = commands.add_parser("client", help="send one message and print the reply",
                                 formatter_class=_HelpFormatter, epilog=_epilog("client"),
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
    client.add_argument("--server-timeout", metavar="SECONDS", type=_seconds,
                        help="give up (exit 5) if no server has shown up within SECONDS; "
                             "0: unless one runs now (default: wait for one)")
    client.add_argument("--lock-retry-interval", metavar="SECONDS", type=_positive_seconds,
                        default=LOCK_RETRY_INTERVAL,
                        help="seconds between 'Server busy' lines, and between tries for "
                             f"the lock with --poll (default {LOCK_RETRY_INTERVAL:g})")
    client.add_argument("--json", action="store_true",
                        help="print one JSON object (reply, waits, outcome) instead of the reply")
    client.add_argument("-q", "--quiet", action="store_true",
                        help="print no status lines, only the reply and errors")
    _common_options(client)
    return client


def _status_parser(commands: argparse._SubParsersAction[_Parser]
                    ) -> argparse.ArgumentParser:
    """Add the status command to commands; return its parser."""
    state = commands.add_parser("status", help="show the server, the lock and who waits",
                                formatter_class=_HelpFormatter, epilog=_epilog("status"),
                                description="Show whether a server runs on BUFFER, who holds "
                                            "the lock, and what waits.")
    state.add_argument("buffer", metavar="BUFFER", help="the buffer file")
    state.add_argument("--json", action="store_true", help="print JSON instead of text")
    state.add_argument("--lock-file", metavar="PATH",
                       help=f"the lockfile (default: {LOCKFILE_NAME} beside BUFFER)")
    state.add_argument("--stale-after", metavar="SECONDS", type=_seconds, default=STALE_AFTER,
                       help=f"as for client and server (default {STALE_AFTER:g})")
    return state


def _watch_parser(commands: argparse._SubParsersAction[_Parser]
                    ) -> argparse.ArgumentParser:
    """Add the watch command to commands; return its parser."""
    watching = commands.add_parser(
        "watch", help="print each protocol event beside BUFFER as it happens",
        formatter_class=_HelpFormatter, epilog=_epilog("watch"),
        description="Print a line for each file made, written, claimed, published or removed\n"
                    "beside BUFFER, with who did it and breaches of the protocol marked (!),\n"
                    "until Ctrl+C. Changes no file, and reads no message in a way a client\n"
                    "would notice. Works beside any program that follows the spec.")
    watching.add_argument("buffer", metavar="BUFFER", help="the buffer file")
    watching.add_argument("--json", action="store_true",
                          help="print one JSON object per event (and a last one with counts)")
    clock = watching.add_mutually_exclusive_group()
    clock.add_argument("--since-start", dest="clock", action="store_const", const="start",
                       help="show only the ms since the watch began (default: both times)")
    clock.add_argument("--wall-clock", dest="clock", action="store_const", const="wall",
                       help="show only the wall clock")
    watching.add_argument("--lock-file", metavar="PATH",
                          help=f"the lockfile (default: {LOCKFILE_NAME} beside BUFFER)")
    watching.add_argument("--poll", action="store_const", const=True, default=None,
                          help="poll instead of waiting for events (the default on a shared "
                               "directory); changes seen in one look are marked ~")
    watching.add_argument("--poll-interval", metavar="SECONDS", type=_positive_seconds,
                          help=f"seconds between looks when polling "
                               f"(default {SHARED_POLL_INTERVAL:g})")
    watching.add_argument("-v", "--verbose", action="store_true",
                          help="say on stderr how it waits (events or polling)")
    return watching


_COMMANDS = {"server": _server_parser, "client": _client_parser, "status": _status_parser,
             "watch": _watch_parser}


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
                        help="treat a lock whose holder cannot be checked (a spec client's "
                             f"empty lock) as stale after SECONDS (default {STALE_AFTER:g})")
    parser.add_argument("--poll", action="store_const", const=True, default=None,
                        help="poll the files instead of waiting for filesystem events "
                             "(the default on a directory shared between hosts: NFS, SMB, FUSE)")
    parser.add_argument("--no-poll", dest="poll", action="store_const", const=False,
                        help="wait for filesystem events even on a shared directory")
    parser.add_argument("--poll-interval", metavar="SECONDS", type=_positive_seconds,
                        help=f"seconds between checks when polling (default "
                             f"{SHARED_POLL_INTERVAL:g} on a shared directory, else "
                             f"{POLL_INTERVAL:g}, the spec's)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log lock and wait transitions on stderr")


def _seconds(text: str) -> float:
    """Parse a non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be a finite number: {text!r}; give a "
                                         "number of seconds, however large")
    if value < 0:
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
        "no-server": f"No filechat server is running on {args.buffer}; waiting for a server "
                     "to answer..."})
    shown = _StatusDisplay(term, args.quiet)
    log.live = shown if shown.live or term.stdout_tty else None
    times = {"start": time.monotonic()}
    fate = ["nothing was sent"]           # what Ctrl+C did to the message
    kept = [""]                           # where a reply that could not be printed is
    for name in ("SIGTERM", "SIGHUP"):    # as Ctrl+C: `timeout`, a CI job's end, a closed tab
        if hasattr(_signal, name):
            _signal.signal(getattr(_signal, name), _end_on_signal)

    def status(event: str, **info: object) -> None:
        if event == "received":
            shown.done()          # the reply is printed next
        if event == "interrupted":
            fate[0] = str(info["said"])
        if event == "kept":
            kept[0] = str(info["path"])
        if event in ("queued", "received", "interrupted", "kept"):
            return
        if event == "tick":
            shown.tick(float(info["waited"]))     # type: ignore[arg-type]
            return
        times.setdefault(event, time.monotonic())
        shown.say(lines[event] + (_busy_suffix(info) if event == "busy" else ""))

    record: Dict[str, object] = {
        "reply": None, "response_path": os.path.abspath(response), "lock_wait": None,
        "reply_wait": None, "outcome": "ok", "error": None, "exit_status": EXIT_OK}
    # The spec's transcript, banners and all, where a person reads both sides;
    # where stdout is a pipe or a file it gets the reply alone, exactly.
    banners = interactive and term.stdout_tty

    def between_banners(reply: str) -> None:
        term.out()
        term.out(BANNER)
        term.out("Server response:")
        term.out(BANNER)
        term.write(_visible(_display(reply)))
        term.out(BANNER)

    def in_json(reply: str) -> None:
        record.update(_waits(times), reply=reply)
        term.out(_json(record))

    # Printed as it is read, unless it is shown between banners or in JSON:
    # a long reply is then never held whole, nor a long --message-file. Either
    # way it is printed before its file is deleted, so that one that cannot be
    # printed is kept (see _keep_unread).
    tail = _Tail(term)
    reply_to = _Whole(between_banners) if banners else _Whole(in_json) if args.json else tail
    if term.stdout_tty and reply_to is tail:
        shown.reply = tail
    typing = interactive                  # a line of the message may be half typed
    try:
        _look_for_server(args, term, interactive)
        message = _client_message(args, term, interactive)
        typing = False                    # the message is read
        times["start"] = time.monotonic()
        try:
            send(args.buffer, message, response, timeout=args.timeout,
                 lock_timeout=args.lock_timeout, lock_path=args.lock_file,
                 stale_after=args.stale_after, max_bytes=args.max_bytes,
                 durable=args.durable, poll=args.poll, poll_interval=args.poll_interval,
                 lock_retry_interval=args.lock_retry_interval, status=status,
                 progress_interval=PROGRESS_INTERVAL if shown.live else None,
                 reply_to=reply_to, server_timeout=args.server_timeout)    # type: ignore[arg-type]  # it only writes
        finally:
            if args.message_file not in (None, "-") and not isinstance(message, str):
                message.close()
    except (FilechatError, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt):
            term.lenient = True   # its terminal may be gone (SIGHUP): nothing more may fail
        shown.done()
        said = f"{str(exc) or 'interrupted'}; {fate[0]}" \
            if isinstance(exc, KeyboardInterrupt) else str(exc)
        if kept[0]:
            said += f"; the reply is kept in {kept[0]}"
        if args.json and not isinstance(exc, OutputError):   # else stdout cannot take it
            record.update(_waits(times), outcome=_outcome(exc), error=said,
                          exit_status=getattr(exc, "exit_code", EXIT_INTERRUPTED),
                          reply=exc.text if isinstance(exc, ServerError) else None)
            term.out(_json(record))
        elif isinstance(exc, KeyboardInterrupt):
            if not isinstance(exc, Ended) or typing:
                term.err()        # after the ^C the terminal shows, or the line being typed
            term.err(f"filechat: {said}")
            return getattr(exc, "exit_code", EXIT_INTERRUPTED)
        term.error(said)
        return getattr(exc, "exit_code", EXIT_ERROR)
    shown.done()
    if reply_to is tail and term.stdout_tty:
        tail.end_line()       # the shell's prompt is not glued to the reply; a pipe gets it exact
    return EXIT_OK


class _Tail:
    """The reply's way to stdout, which remembers the last character written through it;
    at a terminal, control characters are shown (see _visible)."""

    def __init__(self, term: Terminal) -> None:
        self.term = term
        self.last = ""

    def write(self, text: str) -> int:
        """Write text to stdout."""
        if text:
            self.last = text[-1]
        self.term.write(_visible(text) if self.term.stdout_tty else text)
        return len(text)

    def end_line(self) -> None:
        """End the line the text written left open, if it did."""
        if self.last not in ("", "\n"):
            self.write("\n")


class _Whole:
    """The reply's way to stdout where it is printed whole, between banners or in JSON:
    held, and printed by flush, which send() calls before it deletes the response file."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.parts: List[str] = []

    def write(self, text: str) -> int:
        """Hold text."""
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        """Print the reply held."""
        self.emit("".join(self.parts))


def _busy_suffix(info: Mapping[str, object]) -> str:
    """Say who is ahead: how many, or a lock holder that cannot be checked and until when."""
    if "held_for" not in info:
        return f" ({info['ahead']} ahead of you)"
    who = f"a client on {info['who']}" if info["who"] else "a client that does not name itself"
    return (f" (the lock is held by {who}, which cannot be checked, for "
            f"{_duration(info['held_for'])}; it counts as stale in {_duration(info['stale_in'])})")


def _duration(seconds: object) -> str:
    """Return seconds as people read them: 42 s, 4 min 48 s, 2 h 5 min."""
    assert isinstance(seconds, (int, float))
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole // 60 % 60} min"


def _look_for_server(args: argparse.Namespace, term: Terminal, interactive: bool) -> None:
    """Say before the prompt that no server runs; with --server-timeout 0, refuse at once."""
    if not interactive and args.server_timeout != 0:
        return
    paths = Paths(args.buffer, args.lock_file)
    check_buffer_path(args.buffer, paths.lock)
    if running_server(paths.presence) is not None:
        return
    if args.server_timeout == 0:
        raise NoServer(args.buffer, 0, sent=False, withdrawn=False)
    term.err(f"No filechat server is running on {args.buffer}; the message will wait for a "
             "server to answer.")


def _waits(times: Dict[str, float]) -> Dict[str, Optional[float]]:
    """Return the seconds waited for the lock and for the reply."""
    now = time.monotonic()
    locked, sent = times.get("locked"), times.get("sent")
    return {"lock_wait": round((locked or now) - times["start"], 6),
            "reply_wait": None if sent is None else round(now - sent, 6)}


def _outcome(exc: BaseException) -> str:
    """Name how an exchange ended, for --json."""
    for kind, name in ((ServerError, "error-reply"), (ReplyTimeout, "timeout"),
                       (LockTimeout, "lock-timeout"), (NoServer, "no-server"),
                       (Rejected, "rejected"), (UsageError, "bad-input"),
                       (KeyboardInterrupt, "interrupted")):
        if isinstance(exc, kind):
            return name
    return "error"


def _json(record: Mapping[str, object]) -> str:
    """Return record as one line of JSON."""
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
    if term.stdin is None:    # started with stdin closed (<&-)
        raise UsageError("nothing to send: standard input is closed; pass the message "
                         "with --message or --message-file")
    stdin = getattr(term.stdin, "buffer", None)
    if stdin is not None and not term.stdin_is_tty():
        return stdin          # type: ignore[no-any-return]
    if not interactive:
        piped = term.read_text("message on stdin")[0]
        if not piped:
            raise UsageError("nothing to send: standard input is empty; to send an empty "
                             "message, say so with --message ''")
        return piped
    while True:
        term.err("Enter your message (press Ctrl+D or Ctrl+Z when done):")
        text = _read_typed(term, "message", term.err)
        if text == "":
            term.error("nothing was typed, and an empty message is sent only with "
                       "--message ''; type the message, or press Ctrl+C to send nothing")
        elif text is not None:
            return text


def _read_typed(term: Terminal, what: str, end_line: Callable[[], None]) -> Optional[str]:
    """Read text typed up to Ctrl+D and check it; None, said, if it must be typed again.

    What was typed is never dropped unsaid: with line editing it is in the
    history. end_line ends the line when Ctrl+D left the cursor after the text.
    """
    try:
        text, mid_line = term.read_text(what)
        if mid_line:
            end_line()
        _check_text(text, what)
        return text
    except FramingError as exc:
        again = " (the Up key brings back what you typed)" if term.editing() else ""
        term.error(f"{exc}; please type the {what} again{again}")
        return None


def run_server(args: argparse.Namespace, term: Terminal) -> int:
    """Run the server subcommand until Ctrl+C or --max-messages."""
    # The files first: a server that cannot use them need not say how it would answer.
    check_buffer_path(args.buffer, args.lock_file or default_lock_path(args.buffer))
    responder = _cli_responder(args, term)
    term.lenient = True       # only the buffer itself being unusable stops a server
    view = _ServerView(args, term)
    log.live = view if term.stdout_tty else None
    import signal
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _stop_on_signal)
    # Ctrl+C stops a server whatever it inherited: a shell script's background
    # job starts with SIGINT ignored, and could not be stopped with kill -INT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
        # The person at this terminal types the replies.
        self.operator = (args.auto_reply is None and args.auto_reply_file is None
                         and args.auto_reply_cmd is None and term.stdin_is_tty())
        self.state_shown = False
        self.row = ""                 # the state line shown last
        self.received = time.monotonic()
        self.log: Optional[IO[str]] = None
        self.log_failing = False
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
            self.discard_typed()
            term.out()
            term.out(BANNER)
            term.out(f"Message received from client (response file: "
                     f"{_display_path(request.response_path)})")
            term.out(BANNER)
            term.write(_visible(_display(request.message)) if term.stdout_tty
                       else _display(request.message))
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

    def discard_typed(self) -> None:
        """Discard, and say so, what the operator typed while no message was shown.

        What is typed once the message shows is the reply, typed ahead or not.
        """
        if self.operator:
            stray = _discard_typeahead(self.term.stdin)
            if stray:
                self.term.err(f"filechat: note: {stray} bytes typed before the prompt were "
                              "discarded; type the reply below")

    def write_log(self, event: str, info: Mapping[str, object]) -> None:
        """Append one exchange to the --log file."""
        if self.log is None:
            return
        request = info.get("request")
        known = isinstance(request, Request)
        replied = event in ("replied", "failed")
        record = _json({
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "outcome": event,
            "response_path": request.response_path if isinstance(request, Request) else None,
            "message": request.message if isinstance(request, Request) else None,
            "reply": info.get("reply") if replied else None,
            "duration": round(time.monotonic() - self.received, 6) if replied and known else None,
            "reason": info.get("reason")})
        try:
            self.log.write(record + "\n")
            self.log.flush()
        except OSError as exc:
            if not self.log_failing:
                log.warning("cannot write --log %s (%s); exchanges go unlogged until it can "
                            "be written", self.args.log, exc.strerror or exc)
            self.log_failing = True
        else:
            self.log_failing = False

    def show_state(self, answered: object) -> None:
        """At a terminal, show what the server is doing on its last line."""
        if not self.term.stdout_tty:
            return
        verdict = judge(self.lock_path)
        if verdict is None:
            lock = "lock free"
        elif verdict.seen.kind:
            lock = f"at the lock's path: {verdict.seen.kind}"
        elif verdict.owner is None:
            lock = f"lock held by a client without a name for {verdict.age:.0f} s"
        else:
            lock = f"lock held by process {verdict.owner.pid} for {verdict.age:.0f} s"
        row = _live_row(f"[waiting · {answered} answered · {lock}]", "", self.term.stdout)
        if row is None:
            return                # too narrow a window for it
        self.term.write(f"\r{row}\x1b[K")
        self.state_shown, self.row = True, row

    def interject(self, line: str) -> None:
        """Print line (a warning, a debug line) on a line of its own; the state line stays last."""
        shown = self.state_shown
        self.clear_state()
        self.term.err(line)
        if shown:
            self.term.write(f"\r{self.row}\x1b[K")
            self.state_shown = True

    def clear_state(self) -> None:
        """Erase the state line, so that the transcript goes on where it stood."""
        if self.state_shown:
            self.term.write("\r\x1b[K")
            self.state_shown = False

    def close(self) -> None:
        """Close the --log file; records it cannot take are said, not fatal (see report)."""
        if self.log is None:
            return
        try:
            self.log.close()
        except OSError as exc:
            if not self.log_failing:
                log.warning("cannot write --log %s (%s); the last exchanges went unlogged",
                            self.args.log, exc.strerror or exc)


def run_status(args: argparse.Namespace, term: Terminal) -> int:
    """Run the status subcommand: 0 if a server runs, EXIT_NO_SERVER if not."""
    _check_directory(args.buffer, "buffer file")
    _refuse_unusable(args.buffer, "buffer file")
    state = status(args.buffer, args.lock_file, args.stale_after)
    if args.json:
        term.out(_json(state))
    else:
        for label, text in _status_lines(state):
            term.out(f"{label:<8} {text}")
    return EXIT_OK if state["server"] else EXIT_NO_SERVER


def run_watch(args: argparse.Namespace, term: Terminal) -> int:
    """Run the watch subcommand until Ctrl+C: 0, or EXIT_BREACH if a breach was seen."""
    _check_directory(args.buffer, "buffer file")
    _refuse_unusable(args.buffer, "buffer file")
    color = term.stdout_tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"

    def emit(record: Dict[str, object]) -> None:
        width = _columns(term.stdout) - 1 if term.stdout_tty else 0
        term.out(_json(record) if args.json else _watch_line(record, args.clock, width, color))
    buffer, lock = os.path.abspath(args.buffer), args.lock_file
    watcher = Watcher(Paths(buffer, lock and os.path.abspath(lock)), emit)
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(_signal, name):
            _signal.signal(getattr(_signal, name), _stop_on_signal)
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)   # as a server's (run_server)
    poll, interval = watcher.paths.waiting_mode(args.poll, args.poll_interval,
                                                SHARED_POLL_INTERVAL)
    how = f"polling every {interval:g} s" if poll else "with inotify"
    term.err(f"Watching the files of {args.buffer} ({how}); Ctrl+C to stop.")
    try:
        watcher.run(poll, interval)
    except KeyboardInterrupt:
        pass
    seen = sum(watcher.counts.values())
    if args.json:
        term.out(_json({"event": "end", "breaches": seen, "counts": watcher.counts}))
    else:
        term.out("no breach of the protocol seen" if not seen else
                 f"{_count_of(seen, 'breach')} of the protocol seen: " +
                 "; ".join(f"{n} {BREACHES[key]}" for key, n in watcher.counts.items()))
    return EXIT_BREACH if seen else EXIT_OK


def _watch_line(record: Mapping[str, object], clock: Optional[str], width: int = 0,
                color: bool = False) -> str:
    """Return a watch record as a line: mark, time, file, event, who, what it holds, breach.

    The mark leads: ! a breach, ~ a change seen in one look with others
    (their order unknown). Wider than width (a terminal's), the line wraps
    onto indented rows: nothing said is cut off.
    """
    at = time.strftime("%H:%M:%S", time.localtime(float(str(record["time"]))))
    at += f".{int(float(str(record['time'])) * 1000) % 1000:03d}"
    since = f"{record['ms']:>7} ms"
    when = since if clock == "start" else at if clock == "wall" else f"{since} {at}"
    said = [str(record["who"])] if record.get("who") else []
    size, place, held = record.get("size"), record.get("place"), record.get("held")
    if "response" in record:
        said.append(f"reply to {record['response']}, {_count_of(size, 'byte')}")
    elif size is not None:
        said.append("empty" if not size else _count_of(size, "byte"))
    if record.get("first_line") is not None:
        said.append(repr(_visible(str(record["first_line"]))[:40]))
    if size and "ended" not in record:
        said.append("not read")
    elif size and record.get("ended") is False:
        said.append("no end marker")
    elif record.get("error"):
        said.append("error reply: ends in ESC ESC")
    said += [f"place {place} in line"] if place else []
    said += [f"held {held} s"] if held is not None else []
    said += [f"changed {record['changed']}"] if "changed" in record else []
    breach = record.get("breach")
    mark = "!" if breach else "~" if record.get("together") else " "
    if breach:
        said.append(f"! {breach}")
    line = f"{mark} {when}  {record['file']:<16} {record['event']:<9} {'; '.join(said)}".rstrip()
    if width and _cells(line) > width:
        import textwrap  # only for a narrow window
        line = "\n".join(textwrap.wrap(line, max(width, 20), subsequent_indent="    ",
                                        break_on_hyphens=False))
    return "\x1b[31m!\x1b[0m" + line[1:] if color and breach else line


def _status_lines(state: Mapping[str, object]) -> List[Tuple[str, str]]:
    """Return status() as (label, text) lines for people."""
    server = state["server"]
    if isinstance(server, dict):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(server["started"] or 0))
        running = (f"running, process {server['pid']} on {server['host']}, since {since}, "
                   f"{_count_of(server['answered'], 'message')} answered")
    else:
        running = "not running"
    lock = state["lock"]
    assert isinstance(lock, dict)
    if not lock["held"]:
        held = f"{lock['path']}: {lock['state']}"
        if lock["state"] != "free":
            held += "; no client makes one: remove it"
    else:
        who = (f"process {lock['pid']} on {lock['host']}" if lock["pid"]
               else "a client that does not name itself")
        held = f"{lock['path']}: held by {who} for {lock['age']:.1f} s, {lock['state']}"
        if lock["stale_reason"]:
            held += f" ({lock['stale_reason']})"
    message = "a complete message waits" if state["message_waiting"] else "none waiting"
    if state["being_answered"]:
        message += f"; {state['being_answered']} being answered"
    lines = [("buffer", str(state["buffer"])), ("server", running), ("lock", held),
             ("message", message), ("line", _count_of(state["waiting_clients"], "client") +
                                    " waiting")]
    files = state["filesystem"]
    assert isinstance(files, dict)
    if files["shared"]:
        how = (f"polling every {files['polling']:g} s" if files["polling"] else
               "waiting for events (--no-poll)")
        lines.append(("files", f"on {files['type']}, which other hosts may share: {how}; "
                               f"holders there beat every {HEARTBEAT_INTERVAL:g} s"))
    return lines


def _count_of(number: object, thing: str) -> str:
    """Say how many things: 1 client, 2 clients."""
    return f"{number} {thing}{'' if number == 1 else 's'}"


def _stop_on_signal(signum: int, frame: object) -> None:
    """Stop the server on SIGTERM or SIGHUP as on Ctrl+C."""
    raise KeyboardInterrupt


def _end_on_signal(signum: int, frame: object) -> None:
    """End the client on SIGTERM or SIGHUP as on Ctrl+C."""
    raise Ended(signum)


def _cli_responder(args: argparse.Namespace, term: Terminal) -> Responder:
    """Return the responder the server's options ask for."""
    if args.auto_reply is not None:
        _check_text(args.auto_reply, "--auto-reply")
        return static_responder(args.auto_reply)
    if args.auto_reply_file is not None:
        if not os.path.isfile(args.auto_reply_file):
            raise UsageError(f"--auto-reply-file {args.auto_reply_file}: no such file; create "
                             "it first (it is read anew for each message)")
        return file_responder(args.auto_reply_file)
    if args.auto_reply_cmd is not None:
        return command_responder(args.auto_reply_cmd, args.hook_timeout)
    if _nothing_to_read(term.stdin):
        raise UsageError("standard input is not a terminal and holds nothing to read, so no "
                         "message could be answered; give --auto-reply, --auto-reply-file or "
                         "--auto-reply-cmd, or start the server at a terminal")
    return _operator_responder(term)


def _nothing_to_read(stream: Optional[IO[str]]) -> bool:
    """True if stream is closed, /dev/null, an empty file or a pipe already at its end."""
    if stream is None:
        return True
    try:
        fd = stream.fileno()
        st = os.fstat(fd)
    except (OSError, ValueError, AttributeError):
        return False                  # not a file: the caller's own stream, read as it is
    if stat.S_ISREG(st.st_mode):
        return st.st_size == 0
    if stat.S_ISCHR(st.st_mode):
        return os.path.samestat(st, os.stat(os.devnull))
    if stat.S_ISFIFO(st.st_mode) and sys.platform != "win32":
        import termios
        ready = select.select([fd], [], [], 0)[0]
        waiting = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)
        return bool(ready) and waiting == 0       # readable with nothing in it: at its end
    return False


def _operator_responder(term: Terminal) -> Responder:
    """Ask the person at the server's terminal for each reply."""
    def respond(request: Request) -> str:
        if exhausted:
            # Piped replies ran out: stop, leaving the message claimed for the
            # next server rather than answering it with nothing.
            raise StopServing("standard input has ended, so there is no reply for "
                              "this message; it stays queued for the next server "
                              "(use --auto-reply* options to answer unattended)")
        if not tty:
            exhausted.append(True)
            return _ask_reply(term)
        left = None if request.deadline is None else request.deadline - time.time()
        if left is not None and abs(left - RESPONSE_TIMEOUT) > 1:   # the spec's is known
            until = time.strftime("%H:%M:%S", time.localtime(request.deadline))
            term.err(f"(the client waits {_duration(left)} for the reply, until {until})")
        stop_watching = _watch_client(request, term)
        try:
            return _ask_reply(term)
        finally:
            stop_watching()

    tty = term.stdin_is_tty()
    exhausted: List[bool] = []
    return respond


def _ask_reply(term: Terminal) -> str:
    """Prompt for the reply and read it, asking again for text the framing cannot carry."""
    while True:
        term.out()
        term.out(BANNER)
        term.out("Enter your response (press Ctrl+D or Ctrl+Z when done):")
        term.out(BANNER)
        text = _read_typed(term, "reply", term.out)
        if text is not None:
            return text


def _watch_client(request: Request, term: Terminal) -> Callable[[], None]:
    """Warn at the terminal, while the reply is typed, once its client stops waiting.

    A timer (SIGALRM: the reply is read in this thread) looks every second,
    and at the client's deadline if it says one, whether the client still
    waits: one that gave up, or ended (its flock, pid or heartbeat), is said
    within a second of it. Returns what stops it.
    """
    import signal
    if not hasattr(signal, "setitimer"):
        return lambda: None           # no timers (Windows)

    def ring(signum: int, frame: object) -> None:
        if request.client_waiting():
            signal.setitimer(signal.ITIMER_REAL, _next_look(request))
            return
        term.err()
        log.warning("the client has stopped waiting for this reply, which will be "
                    "discarded; end it with Ctrl+D")
        if term.editing():            # the line being typed, shown again below the warning
            term.write(_line_editor().get_line_buffer())

    saved = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, _next_look(request))

    def stop() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved)
    return stop


def _next_look(request: Request) -> float:
    """Return the seconds until the next look at a client: 1, or less to its deadline."""
    if request.deadline is None:
        return 1.0
    return min(1.0, max(0.01, request.deadline - time.time()))


def _discard_typeahead(stream: IO[str]) -> int:
    """Discard what was typed at the terminal stream before now; return how many bytes.

    Text typed at an idle server would otherwise begin the next reply,
    unseen. A line not yet ended counts for nothing in the terminal's line
    mode, so the count is taken with that mode off for a moment.
    """
    try:
        import termios
        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError):
        return 0                  # not a terminal that termios knows (or not POSIX)
    except termios.error:
        return 0
    raw = list(saved)
    raw[3] &= ~termios.ICANON
    raw[6] = list(saved[6])
    raw[6][termios.VMIN], raw[6][termios.VTIME] = 0, 0
    try:
        termios.tcsetattr(fd, termios.TCSANOW, raw)
        try:
            pending = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)
            termios.tcflush(fd, termios.TCIFLUSH)
        finally:
            termios.tcsetattr(fd, termios.TCSANOW, saved)
    except (termios.error, OSError):
        return 0
    return pending


def main(argv: Optional[Sequence[str]] = None, term: Optional[Terminal] = None) -> int:
    """Run the command line; return the exit status."""
    term = term or Terminal()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parse(argv)
    except _CommandLineError as exc:
        prog, message = exc.args
        term.err(f"{prog}: error: {message}")
        if argv[:1] == ["client"] and "--json" in argv:
            term.out(_json({"reply": None, "response_path": None, "lock_wait": None,
                            "reply_wait": None, "outcome": "bad-input", "error": message,
                            "exit_status": EXIT_USAGE}))
        return EXIT_USAGE
    log.stream, log.verbose = term.stderr, getattr(args, "verbose", False)
    log.color = term.color
    try:
        if "output" in term.closed and args.command != "server":
            printed = {"client": "reply", "status": "status", "watch": "changes"}
            raise UsageError("standard output is closed, so there is nowhere to print the "
                             f"{printed[args.command]}; start filechat with its output open "
                             "(or sent to a file)")
        if args.command == "server":
            return run_server(args, term)
        if args.command == "status":
            return run_status(args, term)
        if args.command == "watch":
            return run_watch(args, term)
        return run_client(args, term)
    except FilechatError as exc:
        term.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt as exc:
        term.lenient = True
        term.err()
        return getattr(exc, "exit_code", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `| head`); nothing left to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as exc:
        # A file changed under filechat's feet (say, the buffer replaced by a
        # directory while it ran): say which and how, never a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        if log.verbose:               # for a bug report: where it came from
            import traceback
            log.debug("%s", "".join(traceback.format_exception(*sys.exc_info())).rstrip())
        term.error(f"{where}{exc.strerror or exc}; check the files beside the buffer")
        return EXIT_ERROR
    finally:
        log.stream, log.verbose, log.color, log.live = None, False, False, None


def _parse(argv: List[str]) -> argparse.Namespace:
    """Return the command line's arguments; _CommandLineError if they cannot be used."""
    parser = build_parser(argv[0] if argv and argv[0] in _COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    command = args.parsers[args.command]     # its own usage in its errors
    if (args.command == "client" and args.response is None and len(extra) == 1
            and not extra[0].startswith("-")):
        args.response = extra[0]          # RESPONSE after the options: client BUF -m hi RESP
    elif extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    for name, said in (("buffer", "BUFFER"), ("response", "RESPONSE"),
                       ("lock_file", "--lock-file")):
        if getattr(args, name, None) == "":
            command.error(f"{said} is empty; name a file")
    return args


def exit_now(status: int) -> None:
    """End the process with status, skipping the interpreter's teardown.

    By the time main() returns every file is closed and nothing is left to
    clean up, and tearing the interpreter down would cost a client as much
    time as its whole exchange. Only the standard streams need flushing.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass              # a reader that went away, or a stream it never had
    os._exit(status)


if __name__ == "__main__":
    exit_now(main())
