"""Shared fixtures: the built .pyz, and helpers that run it as a user would."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pexpect
import pyte
import pytest

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


class Proc:
    """A filechat process whose output lines can be awaited one event at a time."""

    def __init__(self, args: Sequence[str], cwd: Path, stdin: Optional[bytes] = None,
                 env: Optional[Dict[str, str]] = None,
                 preexec: Optional[Callable[[], object]] = None) -> None:
        self.popen = subprocess.Popen(
            list(args), cwd=cwd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(os.environ, **(env or {})), preexec_fn=preexec)
        self.arrived = threading.Condition()
        self.stdout: List[str] = []
        self.stderr: List[str] = []
        self.seen = {"out": 0, "err": 0}        # lines of each stream already expected
        self.threads = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, self.stdout)),
            threading.Thread(target=self._pump, args=(self.popen.stderr, self.stderr)),
        ]
        for thread in self.threads:
            thread.daemon = True
            thread.start()
        if stdin is not None:
            assert self.popen.stdin is not None
            self.popen.stdin.write(stdin)
            self.popen.stdin.close()

    def _pump(self, stream, sink: List[str]) -> None:  # type: ignore[no-untyped-def]
        for raw in stream:
            with self.arrived:
                sink.append(raw.decode("utf-8", "replace"))
                self.arrived.notify_all()

    def expect(self, text: str, timeout: float = WAIT) -> str:
        """Return the next line containing text, on stdout or on stderr.

        Each stream is searched from its own last match on, so that the
        order in which two pipes deliver their lines does not matter.
        """
        def found() -> Optional[str]:
            for name, lines in (("out", self.stdout), ("err", self.stderr)):
                for index in range(self.seen[name], len(lines)):
                    if text in lines[index]:
                        self.seen[name] = index + 1
                        return lines[index]
            return None

        matched: List[str] = []

        def ready() -> bool:
            line = found()
            if line is not None:
                matched.append(line)
            return bool(matched)

        with self.arrived:
            if not self.arrived.wait_for(ready, timeout):
                raise AssertionError(f"no line with {text!r} within {timeout} s; "
                                     f"stdout={''.join(self.stdout)!r} "
                                     f"stderr={''.join(self.stderr)!r}")
            return matched[0]

    def interrupt(self) -> int:
        """Press Ctrl+C and return the exit status."""
        self.popen.send_signal(signal.SIGINT)
        return self.wait()

    def wait(self, timeout: float = WAIT) -> int:
        """Wait for the process to end and its output to be read."""
        code = self.popen.wait(timeout)
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), "its output is still open: a process it started lives on"
        return code

    def kill(self) -> None:
        """Stop the process if it still runs."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(WAIT)

    @property
    def err(self) -> str:
        return "".join(self.stderr)

    @property
    def out(self) -> str:
        return "".join(self.stdout)


@pytest.fixture
def start(pyz: Path, tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Start filechat processes in tmp_path; all are stopped at the end of the test."""
    procs: List[Proc] = []

    def _start(*args: str, cwd: Optional[Path] = None, stdin: Optional[bytes] = None,
               env: Optional[Dict[str, str]] = None) -> Proc:
        proc = Proc([sys.executable, str(pyz), *args], cwd or tmp_path, stdin, env)
        procs.append(proc)
        return proc

    yield _start
    for proc in procs:
        proc.kill()


@pytest.fixture
def server(start):  # type: ignore[no-untyped-def]
    """Start a server on tmp_path/buf.txt and wait until it is ready."""
    def _server(*options: str, buffer: str = "buf.txt", cwd: Optional[Path] = None,
                env: Optional[Dict[str, str]] = None) -> Proc:
        proc = start("server", buffer, *options, cwd=cwd, env=env)
        proc.expect("Waiting for clients...")
        return proc
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
