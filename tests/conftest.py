"""Shared fixtures: the built .pyz, and helpers that run it as a user would."""

import io
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pexpect
import pyte
import pytest
from pexpect.popen_spawn import PopenSpawn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import build_zipapp  # noqa: E402

WAIT = 10.0      # seconds: the longest any single expected event may take
SAFETY_NET = "woken by the safety re-check"   # in a debug log: a wait no event ended


@pytest.fixture(scope="session")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zipapp, built once from this checkout."""
    target = tmp_path_factory.mktemp("build") / "filechat.pyz"
    build_zipapp.build(str(target))
    return target


def spawn(args: Sequence[str], cwd: Path, *, stdout: Optional[Path] = None, stdin: str = "",
          env: Optional[Dict[str, str]] = None,
          preexec: Optional[Callable[[], object]] = None) -> PopenSpawn:
    """Start args in cwd with pexpect's PopenSpawn, its stdin given and closed at once.

    Its stdout and stderr share the pipe that expect reads, in the order they
    were written. With stdout (a path), its standard output goes to that file
    instead, so that the pipe holds its stderr alone and the file exactly what
    it printed as data (see reply()).
    """
    if stdout is not None:
        args = ["sh", "-c", 'exec "$@" >"$0"', str(stdout), *args]
    child = PopenSpawn(list(args), timeout=WAIT, maxread=1 << 20, cwd=str(cwd), encoding="utf-8",
                       codec_errors="replace", env=dict(os.environ, **(env or {})),
                       preexec_fn=preexec)
    child.logfile_read = io.StringIO()          # everything read from the pipe: printed()
    child.stdout_file = stdout                  # type: ignore[attr-defined]
    if stdin:
        child.send(stdin)
    child.sendeof()
    return child


def line(child: PopenSpawn, text: str, timeout: float = WAIT) -> str:
    """Wait for the next line holding text, and return it whole."""
    child.expect(f"[^\n]*{re.escape(text)}[^\n]*\n", timeout=timeout)
    return str(child.after)


def ended(child: PopenSpawn, timeout: float = WAIT) -> int:
    """Wait for the end of the child's output and of the child; return its exit status.

    The output ends once nothing holds the pipe: a process the child started
    and left running would hold it, and fail the test here.
    """
    child.expect(pexpect.EOF, timeout=timeout)
    child.proc.wait(timeout)
    return int(child.wait())


def interrupt(child: PopenSpawn) -> int:
    """Press Ctrl+C and return the exit status."""
    child.kill(signal.SIGINT)
    return ended(child)


def printed(child: PopenSpawn) -> str:
    """What the child wrote to the pipe, as read so far (all of it once ended)."""
    return str(child.logfile_read.getvalue())


def reply(child: PopenSpawn) -> str:
    """What the child wrote to its stdout file: a client's reply alone."""
    path = child.stdout_file                    # type: ignore[attr-defined]
    assert path is not None, "its stdout went to the pipe"
    return Path(path).read_text(encoding="utf-8", errors="replace")


def stop(child: PopenSpawn) -> None:
    """Kill the child if it still runs."""
    if child.proc.poll() is None:
        child.proc.kill()
        child.proc.wait(WAIT)


@pytest.fixture
def start(pyz: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:  # type: ignore[type-arg]
    """Start filechat processes in tmp_path; all are stopped at the end of the test.

    A client's stdout, the reply alone, goes to a file outside tmp_path
    (reply()); a server's stdout shares the pipe with its stderr.
    """
    children: List[PopenSpawn] = []
    outputs = tmp_path_factory.mktemp("stdout")

    def _start(*args: str, cwd: Optional[Path] = None, stdin: str = "",
               env: Optional[Dict[str, str]] = None) -> PopenSpawn:
        stdout = outputs / f"{len(children)}.out" if args[0] == "client" else None
        child = spawn([sys.executable, str(pyz), *args], cwd or tmp_path, stdout=stdout,
                      stdin=stdin, env=env)
        children.append(child)
        return child

    yield _start
    for child in children:
        stop(child)


@pytest.fixture
def server(start):  # type: ignore[no-untyped-def]
    """Start a server on tmp_path/buf.txt and wait until it is ready."""
    def _server(*options: str, buffer: str = "buf.txt", cwd: Optional[Path] = None,
                env: Optional[Dict[str, str]] = None) -> PopenSpawn:
        child = start("server", buffer, *options, cwd=cwd, env=env)
        child.expect_exact("Waiting for clients...")
        return child
    return _server


@pytest.fixture
def run(pyz: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Run filechat to completion; returns the CompletedProcess (bytes)."""
    def _run(*args: str, input: Optional[bytes] = None, cwd: Optional[Path] = None,
             env: Optional[Dict[str, str]] = None,
             timeout: float = 30) -> "subprocess.CompletedProcess[bytes]":
        return subprocess.run([sys.executable, str(pyz), *args], cwd=cwd or tmp_path,
                              input=input if input is not None else b"",
                              env=dict(os.environ, **(env or {})),
                              capture_output=True, timeout=timeout)
    return _run


class Gate:
    """What a hook waits at until the test opens it: ``read`` from a FIFO, an event.

    The FIFO lies outside the buffer's directory, which may be a share
    (sshfs makes none), and the test keeps it open for writing, so a hook
    never blocks opening it, and reads end of file if the test ends first.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "gate"
        os.mkfifo(self.path)
        self.fd = os.open(self.path, os.O_RDWR)

    def hook(self, then: str) -> str:
        """Return a shell hook that waits at the gate, then runs then."""
        return f"read line < {shlex.quote(str(self.path))}; {then}"

    def open(self) -> None:
        """Let every hook through, those waiting and those to come."""
        os.write(self.fd, b"go\n" * 100)


@pytest.fixture
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gate]:
    """A gate for hooks (see Gate), closed at the test's end."""
    made = Gate(tmp_path_factory.mktemp("gate"))
    yield made
    os.close(made.fd)


def served(server: PopenSpawn, messages: int = 1) -> None:
    """Wait until the server has let go of its next messages. It removes the lock first,
    which its client waits for, then the claim: a look at leftovers as the client ends
    may see the claim still there."""
    for _ in range(messages):
        server.expect_exact("Lockfile removed. Ready for next client.", timeout=WAIT)


def leftovers(directory: Path) -> List[str]:
    """Names of files filechat may leave behind, which a clean run must not.

    A running server's presence file, the temp file of its update in
    flight, and the empty buffer it keeps for spec clients are its own;
    tests that stop the server check that it leaves nothing at all.
    """
    serving = (directory / "buf.txt.server").exists()
    return sorted(p.name for p in directory.iterdir()
                  if (p.name.endswith((".lock", ".tmp", ".stale")) or ".taken." in p.name
                      or ".rejected." in p.name or p.name.startswith("filechat-reply-")
                      or p.name == "buf.txt") and not p.name.startswith(".buf.txt.server.")
                  and not (serving and p.name == "buf.txt" and p.stat().st_size == 0))


HOLDER = """
import sys, filechat
lock = filechat.Lock(sys.argv[1])
assert lock.try_acquire()
if len(sys.argv) > 2:
    with open(sys.argv[2], "w") as buffer:      # a message, half written
        buffer.write("/tmp/r.txt\\nhalf a mess")
print("held", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
sys.stdin.readline()
"""


def hold_lock(directory: Path, half_message: bool = False) -> "subprocess.Popen[bytes]":
    """Start a live client holding directory/server.lock until told (release()) or killed.

    With half_message, it has written half a message into directory/buf.txt.
    """
    args = [str(directory / "server.lock")] + ([str(directory / "buf.txt")] * half_message)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
    return proc


@pytest.fixture
def holder(tmp_path: Path) -> Iterator["subprocess.Popen[bytes]"]:
    """A live client holding tmp_path/server.lock until told (release()) or killed."""
    proc = hold_lock(tmp_path)
    yield proc
    proc.kill()
    proc.wait(WAIT)


def release(holder: "subprocess.Popen[bytes]") -> None:
    """Have the holder release its lock, as a client given its reply would."""
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write(b"\n")
    holder.stdin.flush()
    assert holder.stdout.readline() == b"released\n"


def kill(holder: "subprocess.Popen[bytes]") -> None:
    """Kill the holder, as kill -9 would, and wait until it has ended."""
    holder.send_signal(signal.SIGKILL)
    holder.wait(WAIT)


class _Emulator(pyte.HistoryScreen):
    """A terminal emulator that remembers which rows were filled and wrapped onto the next."""

    def draw(self, data: str) -> None:
        for char in data:
            if self.cursor.x == self.columns and pyte.modes.DECAWM in self.mode:
                self.buffer[self.cursor.y].wrapped = True
            super().draw(char)

    def erase_in_line(self, how: int = 0, *args: object, **kwargs: object) -> None:
        self.buffer[self.cursor.y].wrapped = False
        super().erase_in_line(how, *args, **kwargs)


# Runs the .pyz given first as where Python has no readline module.
WITHOUT_READLINE = ("import runpy, sys; sys.modules['readline'] = None; del sys.argv[0]; "
                    "runpy.run_path(sys.argv[0], run_name='__main__')")


class Screen:
    """A filechat process on a pseudo-terminal, and what a person sees on it.

    Its output is fed to a terminal emulator of the same size, so that line
    wrapping, carriage returns and erasing act as on a real screen; the rows
    that scrolled off the top are kept.
    """

    def __init__(self, pyz: Path, cwd: Path, *args: str, rows: int = 24, columns: int = 80,
                 env: Optional[Dict[str, str]] = None, readline: bool = True,
                 shell: bool = False) -> None:
        self.raw: List[str] = []
        self.screen = _Emulator(columns, rows, history=100000)
        self.stream = pyte.Stream(self.screen)
        argv = [str(pyz), *args] if readline else ["-c", WITHOUT_READLINE, str(pyz), *args]
        program = sys.executable
        if shell:             # an interactive shell, with job control, to run filechat in
            program, argv = "bash", ["--norc", "--noprofile", "-i"]
        self.child = pexpect.spawn(program, argv, cwd=str(cwd),
                                   encoding="utf-8", timeout=WAIT, dimensions=(rows, columns),
                                   env=dict(os.environ, **(env or {})))
        # Keys go out the moment they are sent, as an expect script or a paste sends them.
        self.child.delaybeforesend = None
        self.child.logfile_read = self

    def write(self, text: str) -> None:
        self.raw.append(text)
        self.stream.feed(text)

    def flush(self) -> None:
        pass

    def expect(self, text: str) -> None:
        self.child.expect_exact(text)

    def type(self, text: str) -> None:
        """Type text as one burst, once the prompt reads keys one by one (readline's)."""
        assert self.child.waitnoecho(WAIT), "no prompt is reading the keys"
        self.child.send(text)

    def ctrl_c(self) -> None:
        """Press Ctrl+C at a prompt, once it reads keys one by one (see type).

        Python's readline enters its wait for a key without looking at the
        signals that came meanwhile: a Ctrl+C pressed as it sets the terminal
        up would act only on the next key, as a person's next key would make it.
        """
        assert self.child.waitnoecho(WAIT), "no prompt is reading the keys"
        self.child.sendintr()

    def type_lines(self, *lines: str) -> None:
        self.type("".join(line + "\n" for line in lines))

    def end_text(self) -> None:
        """Press Ctrl+D, as when done typing."""
        self.type("\x04")

    def output(self) -> str:
        """Everything the process wrote, as written."""
        return "".join(self.raw)

    def _rows(self) -> List[Tuple[str, bool]]:
        width = self.screen.columns
        rows = []
        for row in [*self.screen.history.top,
                    *(self.screen.buffer[y] for y in range(self.screen.lines))]:
            text = "".join(row[x].data for x in range(width))
            wrapped = getattr(row, "wrapped", False)
            rows.append((text if wrapped else text.rstrip(), wrapped))
        while rows and rows[-1][0] == "":
            rows.pop()
        return rows

    def rows(self) -> List[str]:
        """The screen's rows, those scrolled off first, without trailing blank ones."""
        return [text for text, _ in self._rows()]

    def lines(self) -> List[str]:
        """The lines the rows show: a row that wrapped joined with the next."""
        lines: List[str] = []
        joined = False
        for text, wrapped in self._rows():
            if joined:
                lines[-1] += text
            else:
                lines.append(text)
            joined = wrapped
        return lines

    def exit_status(self) -> int:
        self.child.expect(pexpect.EOF)
        self.child.close()
        status = self.child.exitstatus
        assert status is not None, f"killed by signal {self.child.signalstatus}"
        return int(status)


@pytest.fixture
def terminal(pyz: Path, tmp_path: Path) -> Iterator[Callable[..., Screen]]:
    """Start filechat processes on pseudo-terminals in tmp_path (24 x 80 unless told)."""
    spawned: List[Screen] = []

    def _spawn(*args: str, rows: int = 24, columns: int = 80, cwd: Optional[Path] = None,
               env: Optional[Dict[str, str]] = None, readline: bool = True,
               shell: bool = False) -> Screen:
        term = Screen(pyz, cwd or tmp_path, *args, rows=rows, columns=columns, env=env,
                      readline=readline, shell=shell)
        spawned.append(term)
        return term
    yield _spawn
    for term in spawned:
        term.child.close(force=True)
