"""Installing, scripting and watching: packaging, status, progress, --json, --log, colour."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path
from typing import Dict

import pexpect
import pytest
from conftest import ROOT, WAIT, ended, interrupt, printed

import filechat

CLIENT_RECORD = {"reply", "response_path", "lock_wait", "reply_wait", "outcome", "error",
                 "exit_status"}
LOG_RECORD = {"time", "outcome", "response_path", "message", "reply", "duration", "reason"}
PEER = str(Path(__file__).with_name("spec_peer.py"))   # a client written from the spec alone




def spawn(pyz: Path, cwd: Path, *args: str, **env: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, [str(pyz), *args], cwd=str(cwd), encoding="utf-8",
                         timeout=WAIT, env=dict(os.environ, **env))


# --- Installing and running ---

@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with filechat installed by pip, as a user installs it."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "src"
    source.mkdir()
    for name in ("filechat.py", "pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    venv.create(root / "venv", with_pip=True)
    bin_dir = root / "venv" / "bin"
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", str(source)],
                   check=True, timeout=300)
    return bin_dir


def test_pip_install_gives_a_filechat_command(installed: Path, tmp_path: Path) -> None:
    command = str(installed / "filechat")
    server = subprocess.Popen([command, "server", "buf.txt", "--auto-reply", "installed",
                               "--max-messages", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL)
    reply = subprocess.run([command, "client", "buf.txt", "-m", "hi"], cwd=tmp_path,
                           capture_output=True, timeout=30)
    assert reply.stdout == b"installed"
    assert server.wait(WAIT) == 0
    version = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=30)
    assert version.stdout == f"filechat {filechat.__version__}\n"


def readme_programs() -> Dict[str, str]:
    """The README's library programs, by the file name each one's first line gives."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## As a library"):text.index("## Development")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return {block.split(":", 1)[0].lstrip("# "): block for block in blocks}


def test_the_readme_s_library_programs_run_and_type_check_as_installed(
        installed: Path, tmp_path: Path) -> None:
    programs = readme_programs()
    assert sorted(programs) == ["answer.py", "ask.py"]
    for name, code in programs.items():
        (tmp_path / name).write_text(code)
    python = str(installed / "python")
    server = subprocess.Popen([python, "answer.py"], cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        asked = subprocess.run([python, "ask.py"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=60)
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout == "HELLO\n" + programs["ask.py"].upper()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(WAIT)
    # Its annotations reach a type checker in the installed copy: a program
    # that misuses them is caught.
    (tmp_path / "wrong.py").write_text("import filechat\n\ncount: int = filechat.send('b', 'm')\n")
    checked = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--python-executable",
                              python, "answer.py", "ask.py"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout
    wrong = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--python-executable",
                            python, "wrong.py"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert 'Incompatible types in assignment (expression has type "str"' in wrong.stdout


def test_python_m_filechat_from_a_checkout(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "filechat", "status", str(tmp_path / "b")],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == filechat.EXIT_NO_SERVER == 5
    assert "not running" in result.stdout


# --- Progress and state at a terminal, and their absence in a pipe ---

def test_client_progress_line_at_a_terminal(holder, pyz: Path, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply-cmd", "sleep 1; cat")
    client = spawn(pyz, tmp_path, "client", "buf.txt", "-m", "hi")
    client.expect(r"\rServer busy, please wait\.\.\. \(1 ahead of you\) \d+\.\d s\x1b\[K")
    client.expect(r"\rServer busy, please wait\.\.\. \(1 ahead of you\) \d+\.\d s\x1b\[K")
    holder.kill()                     # its lock is stale now, and broken by the client
    client.expect(r"\rWaiting for server response\.\.\. \d+\.\d s\x1b\[K")
    client.expect(r"\rWaiting for server response\.\.\.\x1b\[K\r\n")   # timer gone at the end
    client.expect("hi")
    client.expect(pexpect.EOF)


def test_no_progress_or_colour_when_piped(holder, run, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply-cmd", "sleep 0.5; cat")
    holder.kill()
    result = run("client", "buf.txt", "-m", "hi", "--lock-timeout", "5")
    assert result.stdout == b"hi"
    assert b"\r" not in result.stderr and b"\x1b" not in result.stderr
    bad = run("client", "buf.txt", "-m", "a\x1bb")
    assert bad.stderr.startswith(b"filechat: error: ")


def test_server_state_line_at_a_terminal(pyz: Path, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = spawn(pyz, tmp_path, "server", "buf.txt", "--auto-reply", "ok")
    server.expect(r"\r\[waiting · 0 answered · lock free\]\x1b\[K")
    assert run("client", "buf.txt", "-m", "hi").stdout == b"ok"
    server.expect(r"\r\x1b\[K\r\n={60}")             # erased before the transcript
    server.expect(r"\r\[waiting · 1 answered · lock free\]\x1b\[K")
    server.sendintr()
    server.expect(pexpect.EOF)


def test_no_state_line_when_piped(server, run) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "ok")
    assert run("client", "buf.txt", "-m", "hi").stdout == b"ok"
    assert interrupt(srv) == 0
    assert "[waiting" not in printed(srv) and "\r" not in printed(srv)


@pytest.mark.parametrize(("no_color", "label"), [("", "\x1b[31merror\x1b[0m"), ("1", "error")])
def test_colour_at_a_terminal_unless_no_color(no_color: str, label: str, pyz: Path,
                                              tmp_path: Path) -> None:
    client = spawn(pyz, tmp_path, "client", "buf.txt", "-m", "a\x1bb", NO_COLOR=no_color)
    client.expect_exact(f"filechat: {label}: --message contains the ESC character")
    client.expect(pexpect.EOF)


def test_quiet_prints_only_the_reply(server, run) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "ok")
    result = run("client", "buf.txt", "-m", "hi", "--quiet")
    assert (result.stdout, result.stderr) == (b"ok", b"")


# --- JSON for scripts ---

def test_client_json_on_success(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "ok")
    result = run("client", "buf.txt", "r.txt", "-m", "hi", "--json")
    record = json.loads(result.stdout)
    assert set(record) == CLIENT_RECORD
    assert record["reply"] == "ok" and record["outcome"] == "ok" and record["exit_status"] == 0
    assert record["response_path"] == str(tmp_path / "r.txt") and record["error"] is None
    assert 0 <= record["lock_wait"] < WAIT and 0 < record["reply_wait"] < WAIT   # seconds
    assert result.returncode == 0


@pytest.mark.parametrize(("args", "outcome", "status"), [
    (["--timeout", "0.2"], "timeout", 3),
    (["-m", "a\x1bb"], "bad-input", 2),
])
def test_client_json_on_failure(args, outcome: str, status: int, run) -> None:  # type: ignore[no-untyped-def]
    result = run("client", "buf.txt", "-m", "hi", *args, "--json")
    record = json.loads(result.stdout)
    assert set(record) == CLIENT_RECORD
    assert (record["outcome"], record["exit_status"], result.returncode) == (outcome, status,
                                                                           status)
    assert record["error"] and record["reply"] is None


def test_client_json_on_an_error_reply(server, run) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply-cmd", "exit 4")
    record = json.loads(run("client", "buf.txt", "-m", "hi", "--json").stdout)
    assert record["outcome"] == "error-reply" and record["exit_status"] == 1
    assert "failed with exit status 4" in record["reply"]


def test_server_log_is_json_lines(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply-cmd", "tr a-z A-Z", "--log", "chat.jsonl")
    assert run("client", "buf.txt", "r.txt", "-m", "first").stdout == b"FIRST"
    assert run("client", "buf.txt", "-m", "second").stdout == b"SECOND"
    assert interrupt(srv) == 0
    records = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert [set(r) for r in records] == [LOG_RECORD, LOG_RECORD], records
    assert [(r["outcome"], r["message"], r["reply"]) for r in records] == [
        ("replied", "first", "FIRST"), ("replied", "second", "SECOND")]
    assert records[0]["response_path"] == str(tmp_path / "r.txt")
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["time"]) for r in records)
    assert all(0 < r["duration"] < WAIT and r["reason"] is None for r in records)


def test_server_log_in_a_missing_directory(run) -> None:  # type: ignore[no-untyped-def]
    result = run("server", "buf.txt", "--auto-reply", "x", "--log", "nodir/chat.jsonl")
    assert result.returncode == 2
    assert b"cannot open --log nodir/chat.jsonl: No such file or directory" in result.stderr


# --- status ---

def status(run, *args: str):  # type: ignore[no-untyped-def]
    text = run("status", "buf.txt", *args)
    data = run("status", "buf.txt", "--json", *args)
    assert text.returncode == data.returncode
    return text.returncode, text.stdout.decode(), json.loads(data.stdout)


# One schema whether the lock is held or not.
FREE = {"path": "server.lock", "held": False, "pid": None, "host": None, "age": None,
        "state": "free", "stale_reason": None}


def test_status_without_a_server(run) -> None:  # type: ignore[no-untyped-def]
    code, text, data = status(run)
    assert code == 5
    assert "server   not running" in text and "lock     server.lock: free" in text
    files = data.pop("filesystem")
    assert data == {"buffer": "buf.txt", "server": None,
                    "lock": FREE, "message_waiting": False,
                    "being_answered": 0, "waiting_clients": 0}
    # The tests' own directory is on a local disk: nothing polls there.
    assert files["shared"] is False and files["polling"] is None and files["type"]
    assert "files" not in text


def test_status_with_an_idle_server(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "ok")
    assert run("client", "buf.txt", "-m", "hi").stdout == b"ok"
    # Counted as the reply goes out: right at once, and only what was answered.
    code, text, data = status(run)
    assert code == 0
    assert f"running, process {srv.pid} on " in text
    assert data["server"]["pid"] == srv.pid
    assert data["server"]["answered"] == 1 and "1 message answered" in text
    assert data["lock"] == FREE
    outside = run("client", "buf.txt", "/tmp/not-beside-the-buffer.txt", "-m", "hi")
    assert outside.returncode == filechat.EXIT_USAGE             # refused by the server
    assert run("client", "buf.txt", "-m", "again").stdout == b"ok"
    code, text, data = status(run)
    assert data["server"]["answered"] == 2 and "2 messages answered" in text


def test_status_with_the_lock_held_and_clients_waiting(holder, start, run) -> None:  # type: ignore[no-untyped-def]
    waiting = start("client", "buf.txt", "-m", "hi")
    waiting.expect_exact("(1 ahead of you)")
    code, text, data = status(run)
    assert code == 5
    assert f"held by process {holder.pid} on " in text and ", alive" in text
    assert data["lock"]["pid"] == holder.pid and data["lock"]["state"] == "alive"
    assert data["waiting_clients"] == 1 and "1 client waiting" in text


def test_status_with_a_stale_lock(holder, run) -> None:  # type: ignore[no-untyped-def]
    holder.send_signal(signal.SIGKILL)
    holder.wait(WAIT)
    _, text, data = status(run)
    assert data["lock"]["state"] == "stale"
    assert data["lock"]["stale_reason"] == f"its holder, process {holder.pid}, has ended"
    assert "stale (its holder" in text


def test_status_with_a_message_waiting(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A spec client has sent (an empty lock, the message in the buffer), and no server runs.
    peer = subprocess.run([sys.executable, PEER, "client", "buf.txt", "r.txt", "hello",
                           "--send-only"], cwd=tmp_path, capture_output=True, timeout=WAIT)
    assert peer.stdout == b"Message sent to server.\n", peer.stderr
    _, text, data = status(run)
    assert data["message_waiting"] is True and "a complete message waits" in text
    assert data["lock"]["state"] == "unknown" and data["lock"]["pid"] is None
    assert "held by a client that does not name itself" in text


def test_status_of_a_directory_is_a_usage_error(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "adir").mkdir()
    result = run("status", "adir")
    assert result.returncode == 2
    assert result.stderr == b"filechat: error: buffer file adir is a directory; name a file\n"


def test_a_buffer_turned_into_a_directory_is_an_error_not_a_traceback(  # type: ignore[no-untyped-def]
        start, tmp_path: Path) -> None:
    (tmp_path / "server.lock").write_text("")          # held: the client waits in line
    client = start("client", "buf.txt", "-m", "hi")
    client.expect_exact("Server busy, please wait...")
    (tmp_path / "buf.txt").mkdir()                       # the buffer, replaced meanwhile
    (tmp_path / "server.lock").unlink()                  # the holder is done: the client's turn
    assert ended(client) == 1
    assert "Traceback" not in printed(client)
    assert printed(client).endswith(
        "filechat: error: buf.txt: Is a directory; check the files beside the buffer\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buf.txt"]    # its lock let go
