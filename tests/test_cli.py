"""Every flag and exit status of the command line, run as the built .pyz."""

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

import pytest
from conftest import WAIT, ended, interrupt, kill, leftovers, line, printed, reply, served

import filechat

PEER = str(Path(__file__).with_name("spec_peer.py"))
BYTE_EXACT = {
    "empty": b"",
    "no-final-newline": b"no newline at the end",
    "crlf": b"windows\r\nlines\r\n",
    "tabs": b"\tindented\twith tabs\t\n",
    "unicode": "héllo wörld, 世界, 🎉\n".encode(),
    "one-mib": (b"0123456789abcdef" * 65536),
}


# --- Messages and replies, byte for byte ---

@pytest.mark.parametrize("name", list(BYTE_EXACT))
def test_reply_on_stdout_is_byte_exact(name: str, server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply-cmd", "cat")
    (tmp_path / "msg").write_bytes(BYTE_EXACT[name])
    result = run("client", "buf.txt", "--message-file", "msg")
    assert result.returncode == 0, result.stderr
    assert result.stdout == BYTE_EXACT[name]
    served(srv)
    assert leftovers(tmp_path) == []


def test_the_reply_is_utf8_whatever_the_locale_says(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply-cmd", "cat")
    ascii_only = {"PYTHONIOENCODING": "ascii", "LC_ALL": "C"}
    result = run("client", "buf.txt", input=BYTE_EXACT["unicode"], env=ascii_only)
    assert result.returncode == 0, result.stderr
    assert result.stdout == BYTE_EXACT["unicode"]
    record = run("client", "buf.txt", "--json", "-m", "héllo", env=ascii_only)
    assert json.loads(record.stdout.decode("utf-8"))["reply"] == "héllo"


def test_a_client_imports_only_what_an_exchange_needs(server, pyz: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "pong")
    # -I: what this machine's site-packages imports at start is not the client's doing.
    result = subprocess.run([sys.executable, "-I", "-X", "importtime", str(pyz), "client",
                             "buf.txt", "-m", "ping"], cwd=tmp_path, capture_output=True,
                            timeout=WAIT)
    assert result.returncode == 0 and result.stdout == b"pong"
    imported = {line.rpartition("|")[2].strip()
                for line in result.stderr.decode().splitlines() if line.startswith("import time:")}
    assert {"filechat", "argparse", "select"} <= imported            # what it does need
    # Start-up is most of a client's run: the slow imports of other jobs stay out.
    assert imported.isdisjoint({"shutil", "subprocess", "mmap", "signal", "tempfile"})
    if sys.version_info < (3, 14):
        assert "typing" not in imported            # annotations are for type checkers


def test_status_lines_go_to_stderr(server, run) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "pong")
    result = run("client", "buf.txt", "--message", "ping")
    assert result.stdout == b"pong"
    assert result.stderr.decode().splitlines() == [
        "Lock acquired. Sending message to server...",
        "Message sent to server.",
        "Waiting for server response..."]


def test_message_from_stdin_dash_and_pipe(server, run) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply-cmd", "cat")
    assert run("client", "buf.txt", "--message-file", "-", input=b"dash\n").stdout == b"dash\n"
    assert run("client", "buf.txt", input=b"piped").stdout == b"piped"


def test_server_shows_the_message(server, run) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "ok")
    assert run("client", "buf.txt", "resp.txt", "--message", "line one\nline two").returncode == 0
    srv.expect_exact("Message received from client (response file: resp.txt)")
    assert line(srv, "line one") == "line one\n"
    assert line(srv, "line two") == "line two\n"
    srv.expect_exact("Response sent to: resp.txt")
    srv.expect_exact("Lockfile removed. Ready for next client.")


def test_auto_reply_file_is_read_anew(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "reply.txt").write_text("first version\n")
    server("--auto-reply-file", "reply.txt")
    assert run("client", "buf.txt", "-m", "a").stdout == b"first version\n"
    (tmp_path / "reply.txt").write_text("second version\n")
    assert run("client", "buf.txt", "-m", "b").stdout == b"second version\n"


def test_hook_sees_message_and_paths(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply-cmd",
           'printf "%s|%s|" "$FILECHAT_RESPONSE_FILE" "$FILECHAT_BUFFER_FILE"; tr a-z A-Z')
    result = run("client", "buf.txt", "resp.txt", "-m", "shout")
    assert result.stdout.decode() == f"{tmp_path / 'resp.txt'}|{tmp_path / 'buf.txt'}|SHOUT"


def test_max_messages_stops_the_server(server, run) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "ok", "--max-messages", "2")
    assert run("client", "buf.txt", "-m", "1").returncode == 0
    assert run("client", "buf.txt", "-m", "2").returncode == 0
    assert ended(srv) == 0


# --- Hooks that fail ---

@pytest.mark.parametrize(("hook", "expected"), [
    ("exit 3", "failed with exit status 3"),
    ("sleep 30", "ran longer than 0.5 s and was stopped"),
    ("printf '\\377\\376'", "not valid UTF-8"),
    ("printf 'a\\033b'", "contains the ESC character"),
])
def test_failed_hook_sends_an_error_reply(hook: str, expected: str, server, run) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply-cmd", hook, "--hook-timeout", "0.5")
    result = run("client", "buf.txt", "-m", "hi")
    assert result.returncode == 1
    assert result.stdout == b""
    assert expected in result.stderr.decode()
    assert "filechat: error: the server could not answer" in result.stderr.decode()
    srv.expect_exact("Response sent to:")
    assert expected in printed(srv)
    second = run("client", "buf.txt", "-m", "again")    # the server still serves
    assert second.returncode == 1 and expected in second.stderr.decode()


def test_hook_timeout_kills_the_hooks_children(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply-cmd", "sleep 30 & echo $! > child.pid; wait", "--hook-timeout", "0.5")
    assert run("client", "buf.txt", "-m", "hi").returncode == 1
    # The reply is sent only after the hook's stdout closed, so the shell's
    # child is dead by now (at most a zombie waiting for init to reap it).
    stat = Path(f"/proc/{int((tmp_path / 'child.pid').read_text())}/stat")
    assert not stat.exists() or stat.read_text().split(") ")[1].startswith("Z")


# --- Exit statuses ---

def test_reply_timeout_withdraws_the_message(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run("client", "buf.txt", "-m", "anyone?", "--timeout", "0.3")
    assert result.returncode == filechat.EXIT_TIMEOUT == 3
    assert "no reply" in result.stderr.decode()
    assert "withdrawn" in result.stderr.decode()
    assert list(tmp_path.iterdir()) == []


def test_lock_timeout(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "server.lock").write_text("")
    result = run("client", "buf.txt", "-m", "hi", "--lock-timeout", "0.3")
    assert result.returncode == filechat.EXIT_LOCK_TIMEOUT == 4
    err = result.stderr.decode()
    assert "Server busy, please wait..." in err
    assert f"lock {tmp_path / 'server.lock'} still held" in err or "server.lock still held" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.lock"]


@pytest.mark.parametrize(("source", "what"), [
    (["-m", "a\x1bb"], "--message contains the ESC character"),
    (["--message-file", "esc.txt"], "message file esc.txt contains the ESC character"),
    (["--message-file", "-"], "message on stdin contains the ESC character"),
    ([], "message on stdin contains the ESC character"),
])
def test_esc_is_refused_before_the_lock(source, what: str, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "esc.txt").write_bytes(b"bad \x1b inside")
    result = run("client", "buf.txt", *source, input=b"bad \x1b inside")
    assert result.returncode == 2
    assert what in result.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["esc.txt"]


@pytest.mark.parametrize(("args", "message"), [
    (["client", "buf.txt", "--message-file", "missing.txt"],
     "cannot read --message-file missing.txt: No such file or directory"),
    (["client", "buf.txt", "--message-file", "bad.txt"], "bad.txt is not valid UTF-8"),
    (["client", "buf.txt", "nodir/r.txt", "-m", "x"], "directory nodir does not exist"),
    (["client", "buf.txt", "adir", "-m", "x"], "adir is a directory"),
    (["client", "buf.txt", "exists.txt", "-m", "x"], "exists.txt already exists"),
    (["client", "nodir/buf.txt", "-m", "x"], "buffer file nodir/buf.txt: directory nodir does"),
    (["client", "adir", "-m", "x"], "buffer file adir is a directory"),
    (["server", "nodir/buf.txt"], "buffer file nodir/buf.txt: directory nodir does not exist"),
    (["server", "adir"], "buffer file adir is a directory"),
    (["server", "buf.txt", "--lock-file", "adir"], "lock file adir is a directory"),
    (["server", "buf.txt", "--auto-reply", "a\x1b"], "--auto-reply contains the ESC"),
])
def test_bad_input_is_a_clear_error(args, message: str, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "adir").mkdir()
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    (tmp_path / "exists.txt").write_text("keep me")
    result = run(*args)
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.startswith("filechat: error: ") and message in err, err
    assert "Traceback" not in err
    assert (tmp_path / "exists.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("args", [
    [], ["client"], ["client", "buf.txt", "-m", "a", "--message-file", "f"],
    ["server", "buf.txt", "--auto-reply", "a", "--auto-reply-cmd", "b"],
    ["client", "buf.txt", "--timeout", "soon"], ["server", "buf.txt", "--max-messages", "0"],
])
def test_usage_errors_exit_2(args, run) -> None:  # type: ignore[no-untyped-def]
    result = run(*args)
    assert result.returncode == 2
    assert b"usage: filechat" in result.stderr


@pytest.mark.parametrize("value, says", [
    ("soon", "not a number of seconds: 'soon'"), ("nan", "not a number of seconds: 'nan'"),
    ("inf", "seconds must be a finite number: 'inf'; give a number of seconds, however large"),
    ("-1", "seconds must be 0 or more: '-1'"),
])
def test_a_bad_number_of_seconds_is_named(value: str, says: str, run) -> None:  # type: ignore[no-untyped-def]
    result = run("client", "buf.txt", "-m", "x", "--timeout", value)
    assert result.returncode == 2
    assert f"error: argument --timeout: {says}" in result.stderr.decode()


def test_json_says_a_refused_command_line_too(run) -> None:  # type: ignore[no-untyped-def]
    result = run("client", "buf.txt", "-m", "x", "--json", "--timeout", "soon")
    assert result.returncode == 2
    assert json.loads(result.stdout) == {
        "reply": None, "response_path": None, "lock_wait": None, "reply_wait": None,
        "outcome": "bad-input", "error": "argument --timeout: not a number of seconds: 'soon'",
        "exit_status": 2}
    err = result.stderr.decode()
    assert err.startswith("usage: filechat client") and err.endswith(
        "filechat client: error: argument --timeout: not a number of seconds: 'soon'\n")


def test_version_and_help(run) -> None:  # type: ignore[no-untyped-def]
    assert run("--version").stdout.decode() == f"filechat {filechat.__version__}\n"
    for args, last in ((["--help"], "130  client interrupted by Ctrl+C (129: SIGHUP, 143: "
                                     "SIGTERM)"),
                       (["server", "--help"], "2    usage error (a missing directory, a symlink, "
                                              "nothing to answer with)"),
                       (["client", "--help"], "130  interrupted by Ctrl+C (129: SIGHUP, 143: "
                                              "SIGTERM)")):
        out = run(*args).stdout.decode()
        assert out.rstrip().endswith(last), args
        assert "examples:" in out and "exit status:" in out


def test_server_sigint_exits_0(server) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "x")
    assert interrupt(srv) == 0


# --- Paths ---

def test_response_file_defaults_to_a_unique_removed_file(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "ok")
    assert run("client", "buf.txt", "-m", "hi").stdout == b"ok"
    assert "filechat-reply-" in line(srv, "Message received")
    served(srv)
    assert leftovers(tmp_path) == []


def test_lock_beside_buffer_from_other_directories(start, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shared = tmp_path / "shared"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shared.mkdir()
    srv = start("server", "../shared/buf.txt", "--auto-reply", "ok", "--allow-dir", "../b",
                cwd=tmp_path / "a")
    srv.expect_exact("Lockfile: ../shared/server.lock")
    srv.expect_exact("Waiting for clients...")
    result = run("client", str(shared / "buf.txt"), "r.txt", "-m", "hi", cwd=tmp_path / "b")
    assert result.stdout == b"ok"
    assert line(srv, "response file:").strip().endswith(str(tmp_path / "b" / "r.txt") + ")")
    assert sorted(p.name for p in shared.iterdir()) == ["buf.txt", "buf.txt.server"]
    assert interrupt(srv) == 0
    assert sorted(p.name for p in shared.iterdir()) == []


def test_custom_lock_file(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "ok", "--lock-file", "my.lock")
    srv_lock = tmp_path / "my.lock"
    (tmp_path / "server.lock").write_text("")      # the default lock is not used
    result = run("client", "buf.txt", "-m", "hi", "--lock-file", "my.lock", "--lock-timeout", "5")
    assert result.stdout == b"ok"
    assert not srv_lock.exists()


def test_stale_lock_of_a_killed_client_is_recovered(holder, server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kill(holder)
    srv = server("--auto-reply", "recovered")
    result = run("client", "buf.txt", "-m", "hi", "--lock-timeout", "5")
    assert result.stdout == b"recovered", result.stderr
    served(srv)
    assert leftovers(tmp_path) == []


# --- Interoperability with peers written from the spec alone ---

def test_spec_client_against_filechat_server(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "Hello client!\n")
    result = subprocess.run([sys.executable, PEER, "client", "buf.txt", "client1_response.txt",
                             "Hello server!\n"], cwd=tmp_path, capture_output=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.decode().endswith("Server response:\nHello client!\n")
    served(srv)
    assert leftovers(tmp_path) == []


def test_spec_client_sees_the_text_of_an_error_reply(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply-cmd", "exit 7")
    result = subprocess.run([sys.executable, PEER, "client", "buf.txt", "r.txt", "hi"],
                            cwd=tmp_path, capture_output=True, timeout=30)
    assert "failed with exit status 7" in result.stdout.decode()


@pytest.mark.parametrize("esc", [False, True])
def test_filechat_client_against_spec_server(esc: bool, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    peer = subprocess.Popen([sys.executable, PEER, "server", "buf.txt", "a reply, in two halves\n",
                             *(["--esc"] if esc else [])], cwd=tmp_path, stdout=subprocess.PIPE)
    result = run("client", "buf.txt", "resp.txt", "-m", "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"a reply, in two halves\n"
    assert peer.wait(WAIT) == 0
    assert peer.stdout is not None
    # Relative to the buffer's directory, where the spec's server runs: its transcript's line.
    assert "(response file: resp.txt)" in peer.stdout.read().decode()
    assert not (tmp_path / "resp.txt").exists()


# --- In-process: main(), send() and serve() as a library ---

def test_main_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = filechat.main(["client", str(tmp_path / "b.txt"), "-m", "x\x1b"])
    assert code == 2
    assert "ESC" in capsys.readouterr().err


def test_send_and_serve_as_a_library(tmp_path: Path) -> None:
    buffer = str(tmp_path / "buf.txt")
    seen = []

    def responder(request: filechat.Request) -> str:
        seen.append(request)
        return request.message.upper()

    thread = threading.Thread(target=filechat.serve, args=(buffer, responder),
                              kwargs={"max_messages": 2}, daemon=True)
    thread.start()
    assert filechat.send(buffer, "one", timeout=WAIT) == "ONE"
    reply_path = str(tmp_path / "r.txt")
    assert filechat.send(buffer, "two", reply_path, timeout=WAIT) == "TWO"
    thread.join(WAIT)
    assert not thread.is_alive()
    assert [r.message for r in seen] == ["one", "two"]
    assert seen[1].response_path == reply_path
    assert leftovers(tmp_path) == []


def test_terminal_streams_are_swappable(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    term = filechat.Terminal(io.StringIO("from a stream"), out, err)
    code = filechat.main(["client", str(tmp_path / "b.txt"), "--timeout", "0.1"], term)
    assert code == 3
    assert "Lock acquired" in err.getvalue() and out.getvalue() == ""
    assert json.dumps(sorted(os.listdir(tmp_path))) == "[]"


# --- Waiting options ---

def test_poll_mode_both_sides(server, run) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "polled", "--poll", "--poll-interval", "0.05")
    result = run("client", "buf.txt", "-m", "hi", "--poll", "--poll-interval", "0.05", "-v")
    assert result.stdout == b"polled"
    assert "filechat: debug: waiting with polling" in result.stderr.decode()


def debug_steps(err: str) -> List[str]:
    """The protocol steps a -v run logged, in order, without their paths' details."""
    steps = []
    for logged in err.splitlines():
        if logged.startswith("filechat: debug: ") and "waiting with" not in logged:
            steps.append(re.sub(r"(taken\.|reply-)[0-9a-f-]+", r"\1*", logged[17:]))
    return steps


def test_verbose_logs_each_protocol_step_once_in_order(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "ok", "-v")
    client = run("client", "buf.txt", "r.txt", "-m", "hi", "--verbose")
    reply = tmp_path / "r.txt"
    assert debug_steps(client.stderr.decode()) == [
        "lock server.lock acquired", "message put in place as buf.txt",
        f"reply read from {reply}", f"reply {reply} removed"]
    srv.expect_exact("claim buf.txt.taken.")
    assert debug_steps(printed(srv)) == [
        "empty buffer buf.txt made", "message claimed as buf.txt.taken.*",
        "empty buffer buf.txt made", f"reply published in {reply}",
        "lock server.lock removed", "claim buf.txt.taken.* removed"]
    assert "debug" not in run("client", "buf.txt", "-m", "hi").stderr.decode()


def test_stale_after_breaks_an_old_unidentified_lock(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lock = tmp_path / "server.lock"
    lock.write_text("")
    old = os.stat(lock).st_mtime - 10
    os.utime(lock, (old, old))
    server("--auto-reply", "ok", "--stale-after", "3600")
    assert lock.exists()                      # young enough for the server's setting
    result = run("client", "buf.txt", "-m", "hi", "--stale-after", "5", "--lock-timeout", "5")
    assert result.stdout == b"ok"
    said = result.stderr.decode().splitlines()
    assert said[0].startswith("filechat: warning: removed stale lock server.lock: held by an "
                              "unidentified holder for "), said
    # Nobody was ahead of it once that lock was gone: it was never busy.
    assert said[1:] == ["Lock acquired. Sending message to server...", "Message sent to server.",
                        "Waiting for server response..."]


def test_empty_message_and_reply(server, run) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "")
    result = run("client", "buf.txt", "-m", "")
    assert result.returncode == 0 and result.stdout == b""


def test_piped_server_answers_one_message_then_stops(start, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = start("server", "buf.txt", stdin="from the pipe\n")
    srv.expect_exact("Waiting for clients...")
    assert run("client", "buf.txt", "-m", "one").stdout == b"from the pipe\n"
    second = start("client", "buf.txt", "r.txt", "-m", "two")
    assert ended(srv) == 1
    assert "standard input has ended" in printed(srv)
    assert [p.name for p in tmp_path.glob("buf.txt.taken.*")] != []   # kept for the next server
    start("server", "buf.txt", "--auto-reply", "later").expect("Waiting for clients...")
    assert ended(second) == 0
    assert reply(second) == "later"


def test_a_responder_that_sends_on_to_another_server(tmp_path: Path) -> None:
    # The forwarding server's thread waits for its reply inside its own wait:
    # two waiters at once in one thread, each with its own inotify instance.
    first, second = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    locks = {name: str(tmp_path / f"{name}.lock") for name in ("a", "b")}
    upper = threading.Thread(target=filechat.serve, args=(second, lambda r: r.message.upper()),
                             kwargs={"max_messages": 3, "lock_path": locks["b"]})
    forward = threading.Thread(
        target=filechat.serve,
        args=(first, lambda r: filechat.send(second, r.message, lock_path=locks["b"])),
        kwargs={"max_messages": 3, "lock_path": locks["a"]})
    upper.start()
    forward.start()
    for message in ("one", "two", "three"):
        assert filechat.send(first, message, lock_path=locks["a"], timeout=WAIT) == message.upper()
    forward.join(WAIT)
    upper.join(WAIT)
    assert not forward.is_alive() and not upper.is_alive()
    assert os.listdir(tmp_path) == []


def test_a_missing_auto_reply_file_is_refused_at_start(run) -> None:  # type: ignore[no-untyped-def]
    result = run("server", "buf.txt", "--auto-reply-file", "absent.txt")
    assert result.returncode == 2
    assert result.stderr.decode() == ("filechat: error: --auto-reply-file absent.txt: no such "
                                      "file; create it first (it is read anew for each message)\n")


def test_status_names_a_missing_directory(run) -> None:  # type: ignore[no-untyped-def]
    result = run("status", "nodir/buf.txt")
    assert result.returncode == 2
    assert result.stderr.decode() == ("filechat: error: buffer file nodir/buf.txt: directory "
                                      "nodir does not exist; create it or choose another path\n")


@pytest.mark.parametrize("command", ["client", "server", "status", "watch"])
def test_every_command_refuses_a_symlinked_buffer_alike(command: str, run,
                                                        tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "real.txt").write_text("")
    (tmp_path / "buf.txt").symlink_to("real.txt")
    result = run(command, "buf.txt", *(["-m", "hi"] if command == "client" else []))
    assert result.returncode == 2
    assert result.stderr.decode() == ("filechat: error: buffer file buf.txt is a symbolic "
                                      "link, which filechat never follows; name the file "
                                      "itself\n")
    assert sorted(os.listdir(tmp_path)) == ["buf.txt", "real.txt"]


def test_a_binary_message_file_is_called_not_utf8(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x1b\x00\x00\x00\rIHDR")
    result = run("client", "buf.txt", "--message-file", "image.png")
    assert result.returncode == 2
    assert result.stderr.decode() == ("filechat: error: message file image.png is not valid "
                                      "UTF-8 text\n")
    assert os.listdir(tmp_path) == ["image.png"]


@pytest.mark.parametrize("stdin, says", [
    ("</dev/null", "standard input is empty; to send an empty message, say so with --message ''"),
    ("<&-", "standard input is closed; pass the message with --message or --message-file"),
])
def test_nothing_to_send_from_an_empty_or_closed_stdin(stdin: str, says: str, pyz: Path,
                                                        tmp_path: Path) -> None:
    result = subprocess.run(["sh", "-c", f'"$0" "$1" client buf.txt {stdin}', sys.executable,
                             str(pyz)], cwd=tmp_path, capture_output=True, timeout=WAIT)
    assert result.returncode == 2
    assert result.stderr.decode() == f"filechat: error: nothing to send: {says}\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command, what", [("client buf.txt -m hi", "reply"),
                                           ("status buf.txt", "status"),
                                           ("watch buf.txt", "changes")])
def test_a_closed_stdout_is_a_clear_error(command: str, what: str, pyz: Path,
                                          tmp_path: Path) -> None:
    result = subprocess.run(["sh", "-c", f'"$0" "$1" {command} >&-', sys.executable, str(pyz)],
                            cwd=tmp_path, capture_output=True, timeout=WAIT)
    assert result.returncode == 2
    assert result.stderr.decode() == (f"filechat: error: standard output is closed, so there "
                                      f"is nowhere to print the {what}; start filechat with "
                                      "its output open (or sent to a file)\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_a_full_stdout_is_named(server, pyz: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "pong")
    result = subprocess.run(["sh", "-c", '"$0" "$1" status buf.txt >/dev/full', sys.executable,
                             str(pyz)], cwd=tmp_path, capture_output=True, timeout=WAIT)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[-1] == (
        "filechat: error: cannot write to standard output: No space left on device")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
@pytest.mark.parametrize("options", [["r.txt"], ["r.txt", "--json"], []],
                         ids=["streamed", "json", "default-path"])
def test_a_reply_that_cannot_be_printed_is_kept(options: List[str], server, run, pyz: Path,  # type: ignore[no-untyped-def]
                                                tmp_path: Path) -> None:
    srv = server("--auto-reply", "pong")
    result = subprocess.run(["sh", "-c", '"$0" "$@" >/dev/full', sys.executable, str(pyz),
                             "client", "buf.txt", "-m", "hi", "-q", *options],
                            cwd=tmp_path, capture_output=True, timeout=WAIT)
    assert result.returncode == 1
    said = result.stderr.decode().splitlines()[-1]
    prefix = ("filechat: error: cannot write to standard output: No space left on device; "
              "the reply is kept in ")
    assert said.startswith(prefix) and said.endswith(".txt.unread"), said
    kept = Path(said[len(prefix):])
    assert kept.parent == tmp_path
    if options:
        assert kept == tmp_path / "r.txt.unread"
        assert not (tmp_path / "r.txt").exists()
    assert kept.read_bytes() == b"pong\x1b"
    # Its server, moving on, leaves it: it clears only a reply still at its own name.
    assert run("client", "buf.txt", "-m", "next").stdout == b"pong"
    assert interrupt(srv) == 0
    assert kept.read_bytes() == b"pong\x1b"


def test_a_reader_gone_keeps_no_reply(server, pyz: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # `client ... | head -c 10` is a reader that wants no more: nothing to keep.
    server("--auto-reply", "pong")
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, str(pyz), "client", "buf.txt", "r.txt", "-m",
                                 "hi"], cwd=tmp_path, stdout=write, stderr=subprocess.PIPE,
                                timeout=WAIT)
    finally:
        os.close(write)
    assert result.returncode == filechat.EXIT_ERROR
    assert result.stderr.decode().splitlines()[-1] == "Waiting for server response..."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buf.txt", "buf.txt.server"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_a_full_stderr_does_not_stop_an_exchange(server, pyz: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "pong")
    result = subprocess.run(["sh", "-c", '"$0" "$1" client buf.txt -m hi 2>/dev/full',
                             sys.executable, str(pyz)], cwd=tmp_path, capture_output=True,
                            timeout=WAIT)
    assert (result.returncode, result.stdout) == (0, b"pong")


def test_a_server_with_its_output_closed_still_serves(pyz: Path, run,
                                                      tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = subprocess.Popen(["sh", "-c", 'exec "$0" "$1" server buf.txt --auto-reply ok >&- 2>&-',
                            sys.executable, str(pyz)], cwd=tmp_path)
    try:
        assert run("client", "buf.txt", "-m", "hi", "--timeout", "5").stdout == b"ok"
        srv.terminate()
        assert srv.wait(WAIT) == 0
    finally:
        srv.kill()
    assert os.listdir(tmp_path) == []


def test_response_after_the_options(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "ok")
    result = run("client", "buf.txt", "-m", "hi", "resp.txt", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["response_path"] == str(tmp_path / "resp.txt")
    assert run("client", "buf.txt", "-m", "hi", "resp.txt", "extra.txt").returncode == 2


# --- No server running ---

def test_server_timeout_0_fails_at_once_and_sends_nothing(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run("client", "buf.txt", "-m", "anyone?", "--server-timeout", "0")
    assert result.returncode == filechat.EXIT_NO_SERVER == 5
    err = result.stderr.decode()
    assert "no server is running on buf.txt; nothing was sent" in err
    assert "filechat server buf.txt" in err
    assert "Lock acquired" not in err
    assert list(tmp_path.iterdir()) == []


def test_server_timeout_withdraws_the_message_when_none_starts(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run("client", "buf.txt", "-m", "anyone?", "--server-timeout", "0.5", "--json")
    assert result.returncode == filechat.EXIT_NO_SERVER
    record = json.loads(result.stdout)
    assert record["outcome"] == "no-server" and record["exit_status"] == 5
    assert "within 0.5 s (--server-timeout); the message was withdrawn" in record["error"]
    assert list(tmp_path.iterdir()) == []


def test_server_timeout_waits_for_a_server_that_starts(start, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = start("client", "buf.txt", "-m", "hi", "--server-timeout", str(WAIT))
    client.expect_exact("No filechat server is running on buf.txt")
    server("--auto-reply", "late but here")
    assert ended(client) == 0
    assert reply(client) == "late but here"


def test_server_timeout_with_a_server_running(server, run) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "here")
    result = run("client", "buf.txt", "-m", "hi", "--server-timeout", "0")
    assert (result.returncode, result.stdout) == (0, b"here")


def test_server_timeout_while_waiting_in_line(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "server.lock").write_text("")      # a spec client's, with no server to answer it
    result = run("client", "buf.txt", "-m", "hi", "--server-timeout", "0.5")
    assert result.returncode == filechat.EXIT_NO_SERVER
    assert "nothing was sent" in result.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.lock"]


def test_server_timeout_counts_a_spec_server_that_answers(tmp_path: Path, run) -> None:  # type: ignore[no-untyped-def]
    peer = subprocess.Popen([sys.executable, PEER, "server", "buf.txt", "from the peer",
                             "--pause=3"], cwd=tmp_path, stdout=subprocess.PIPE)
    assert peer.stdout is not None and peer.stdout.readline() == b"Waiting for clients...\n"
    # The peer announces nothing, but has begun the reply when the client looks: a server.
    result = run("client", "buf.txt", "r.txt", "-m", "hi", "--server-timeout", "1")
    assert (result.returncode, result.stdout) == (0, b"from the peer"), result.stderr
    assert peer.wait(WAIT) == 0


def test_no_server_is_said_before_the_prompt(terminal, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = terminal("client", "buf.txt")
    client.expect("No filechat server is running on buf.txt; the message will wait for a "
                 "server to answer.")
    client.expect("Enter your message (press Ctrl+D or Ctrl+Z when done):")
    server("--auto-reply", "ok")
    client.type_lines("hi")
    client.end_text()
    client.expect("Server response:")
    assert client.exit_status() == 0


def test_server_timeout_0_at_a_terminal_fails_before_the_prompt(terminal) -> None:  # type: ignore[no-untyped-def]
    client = terminal("client", "buf.txt", "--server-timeout", "0")
    client.expect("no server is running on buf.txt; nothing was sent")
    assert client.exit_status() == filechat.EXIT_NO_SERVER
    assert "Enter your message" not in client.output()


@pytest.mark.parametrize(("record", "who"), [
    ("", "a client that does not name itself"),
    ('{"pid": 1, "host": "elsewhere", "token": "ab", "created": 1.0}\n', "a client on elsewhere"),
])
def test_a_lock_that_cannot_be_checked_is_called_so(record: str, who: str, run,
                                                   tmp_path: Path) -> None:
    (tmp_path / "server.lock").write_text(record)
    os.utime(tmp_path / "server.lock", (time.time() - 100,) * 2)
    result = run("client", "buf.txt", "-m", "hi", "--lock-timeout", "0.3")
    assert result.returncode == filechat.EXIT_LOCK_TIMEOUT
    said = (rf"Server busy, please wait\.\.\. \(the lock is held by {who}, which cannot be "
            r"checked, for 1 min 4\d s; it counts as stale in 3 min [12]\d s\)\n")
    assert re.search(said, result.stderr.decode()), result.stderr
    assert "ahead of you" not in result.stderr.decode()


@pytest.mark.parametrize("stdin", ["/dev/null", "an empty pipe", "an empty file"])
def test_a_server_with_nothing_to_read_and_no_terminal_is_refused_at_start(  # type: ignore[no-untyped-def]
        stdin: str, pyz: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    server = f"{sys.executable} {pyz} server buf.txt"
    command = {"/dev/null": f"{server} < /dev/null", "an empty pipe": f"true | {server}",
               "an empty file": f"{server} < empty"}[stdin]
    result = subprocess.run(["sh", "-c", command], cwd=tmp_path, capture_output=True,
                            timeout=WAIT)
    assert result.returncode == filechat.EXIT_USAGE
    assert ("standard input is not a terminal and holds nothing to read, so no message could "
            "be answered; give --auto-reply") in result.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_responder_that_raises_gets_its_client_an_error_reply_and_serving_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    buffer = str(tmp_path / "buf.txt")

    def responder(request: filechat.Request) -> str:
        if request.message == "bad":
            raise ValueError("cannot answer 'bad'")
        return "fine"

    server = threading.Thread(target=filechat.serve, args=(buffer, responder),
                              kwargs={"max_messages": 2}, daemon=True)
    server.start()
    with pytest.raises(filechat.ServerError) as raised:
        filechat.send(buffer, "bad", timeout=WAIT)
    assert "the responder raised ValueError: cannot answer 'bad'" in str(raised.value)
    assert filechat.send(buffer, "good", timeout=WAIT) == "fine"
    server.join(WAIT)
    assert not server.is_alive()
    assert "the responder raised ValueError: cannot answer 'bad'; sent an error reply, " \
           "serving on" in caplog.text


@pytest.mark.parametrize("args", [["client", "", "-m", "hi"], ["client", "buf.txt", "", "-m", "hi"],
                                  ["client", "buf.txt", "-m", "hi", "--lock-file", ""],
                                  ["server", "", "--auto-reply", "x"], ["status", ""]])
def test_an_empty_path_is_a_usage_error_before_anything_is_taken(  # type: ignore[no-untyped-def]
        args: List[str], run, tmp_path: Path) -> None:
    result = run(*args)
    assert result.returncode == filechat.EXIT_USAGE
    assert b"is empty; name a file" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_subcommand_s_usage_errors_show_its_own_usage(run) -> None:  # type: ignore[no-untyped-def]
    result = run("client", "buf.txt", "--bogus")
    assert result.returncode == filechat.EXIT_USAGE
    assert result.stderr.decode().startswith("usage: filechat client ")
    assert "filechat client: error: unrecognized arguments: --bogus" in result.stderr.decode()


def test_each_command_s_help_says_its_own_exit_statuses(run) -> None:  # type: ignore[no-untyped-def]
    helps = {command: run(command, "--help").stdout.decode()
             for command in ("server", "client", "status")}
    assert "0    a server is running on the buffer" in helps["status"]
    assert "Ctrl+C" not in helps["status"] and "--timeout" not in helps["status"].split(
        "exit status:")[1]
    assert "3    no reply within --timeout" in helps["client"]
    assert "0    stopped by Ctrl+C, SIGTERM, SIGHUP or --max-messages" in helps["server"]
    assert "filechat status buf.txt" not in helps["client"]
