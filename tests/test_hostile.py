"""Bad and hostile input: a clear error and exit status, nothing lost, the server serving on."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator, List

import pytest
from conftest import (
    WAIT,
    ended,
    hold_lock,
    interrupt,
    kill,
    leftovers,
    line,
    printed,
    served,
    spawn,
    stop,
)

import filechat

ESC_NUL_UTF8 = [("ESC", b"a\x1bb", "contains the ESC character"),
                ("NUL", b"a\x00b", "contains a NUL byte"),
                ("bad UTF-8", b"a\xffb", "is not valid UTF-8")]


def still_serves(run) -> None:  # type: ignore[no-untyped-def]
    """The server answers the next ordinary client."""
    result = run("client", "buf.txt", "-m", "there?", "--timeout", "5", "--lock-timeout", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"there?"


PEER = str(Path(__file__).with_name("spec_peer.py"))


def spec_peer(directory: Path, *args: str) -> "subprocess.Popen[bytes]":
    """Start tests/spec_peer.py in directory (a client or server from the spec alone)."""
    return subprocess.Popen([sys.executable, PEER, *args], cwd=directory,
                            stdout=subprocess.DEVNULL)


def spec_request(directory: Path, response_path: str) -> None:
    """Send as a spec-following client would (an empty lock, the buffer written in place),
    and end there, not reading what the server makes of it."""
    peer = spec_peer(directory, "client", "buf.txt", response_path, "hi", "--send-only")
    assert peer.wait(WAIT) == 0


# --- The message ---

# An argument cannot hold a NUL byte: the operating system ends it there.
UNSENDABLE = [pytest.param(source, data, error, id=f"{source}-{name}")
              for source in ("argument", "file", "stdin") for name, data, error in ESC_NUL_UTF8
              if not (source == "argument" and name == "NUL")]


@pytest.mark.parametrize(("source", "data", "error"), UNSENDABLE)
def test_unsendable_message(source: str, data: bytes, error: str,
                            server, pyz: Path, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply-cmd", "cat")
    (tmp_path / "msg").write_bytes(data)
    args = {"argument": [b"-m", data], "file": [b"--message-file", b"msg"], "stdin": []}[source]
    result = subprocess.run([os.fsencode(sys.executable), os.fsencode(pyz), b"client", b"buf.txt",
                             *args], cwd=tmp_path, input=data, capture_output=True, timeout=30)
    assert result.returncode == 2
    assert error in result.stderr.decode(), result.stderr
    assert result.stderr.decode().startswith("filechat: error: ")
    assert leftovers(tmp_path) == []                 # refused before the lock was taken
    still_serves(run)


def test_message_over_max_bytes_is_refused_before_the_lock(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply-cmd", "cat")
    result = run("client", "buf.txt", "-m", "x" * 11, "--max-bytes", "10")
    assert result.returncode == 2
    assert "message is 11 bytes, over the limit of 10 (--max-bytes)" in result.stderr.decode()
    assert leftovers(tmp_path) == []
    assert run("client", "buf.txt", "-m", "x" * 10, "--max-bytes", "10").stdout == b"x" * 10


def test_message_over_the_servers_max_bytes_gets_an_error_reply(server, run) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply-cmd", "cat", "--max-bytes", "10")
    result = run("client", "buf.txt", "-m", "x" * 20)
    assert result.returncode == 1
    assert "the message is 20 bytes, over this server's limit of 10" in result.stderr.decode()
    still_serves(run)


# --- The buffer ---

def test_garbage_in_the_buffer(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply-cmd", "cat")
    (tmp_path / "buf.txt").write_bytes(b"garbage without a path line\x1b")
    srv.expect_exact("malformed message in buf.txt: no response path before the message")
    still_serves(run)
    served(srv, 2)                   # the garbage, then the next client's
    assert leftovers(tmp_path) == []


def test_half_a_message_from_a_dead_client(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    holder = hold_lock(tmp_path, half_message=True)
    assert (tmp_path / "buf.txt").read_text() == "/tmp/r.txt\nhalf a mess"
    srv = server("--auto-reply-cmd", "cat")
    kill(holder)
    # The next client breaks the dead holder's lock and puts its own request
    # over the half message; the server never shows the half.
    result = run("client", "buf.txt", "-m", "there?", "--timeout", "5", "--lock-timeout", "5")
    assert result.stdout == b"there?"
    assert b"removed stale lock server.lock: its holder" in result.stderr
    assert interrupt(srv) == 0
    assert "half a mess" not in printed(srv)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("which", ["buffer", "lock"])
@pytest.mark.parametrize("role", ["server", "client"])
def test_symlinked_buffer_or_lock(which: str, role: str, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    name = "buf.txt" if which == "buffer" else "server.lock"
    (tmp_path / name).symlink_to(target)
    args = ["server", "buf.txt"] if role == "server" else ["client", "buf.txt", "-m", "hi"]
    result = run(*args)
    assert result.returncode == 2
    assert f"{name} is a symbolic link, which filechat never follows" in result.stderr.decode()
    assert target.read_text() == "precious"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv")
                    or not os.path.exists("/usr/bin/python3"),
                    reason="needs root to run filechat as another user")
@pytest.mark.parametrize("role", ["server", "client"])
def test_unwritable_directory(role: str, pyz: Path) -> None:
    public = Path(tempfile.mkdtemp(prefix="filechat-test-"))   # reachable by another user
    public.chmod(0o755)
    shutil.copy(pyz, public / "filechat.pyz")
    (public / "filechat.pyz").chmod(0o644)
    args = ["server", "buf.txt"] if role == "server" else ["client", "buf.txt", "-m", "hi"]
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "/usr/bin/python3", str(public / "filechat.pyz"), *args],
                            cwd=public, capture_output=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(public)})
    shutil.rmtree(public)
    assert result.returncode == 2, result.stderr
    assert "buffer file buf.txt: directory . is not writable" in result.stderr.decode()


# --- The response path ---

def test_response_path_with_a_line_break(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run("client", "buf.txt", "r\n.txt", "-m", "hi")
    assert result.returncode == 2
    assert result.stderr.decode() == ("filechat: error: response path 'r\\n.txt' contains a "
                                      "line break; choose a path without one\n")
    assert list(tmp_path.iterdir()) == []


def test_reply_outside_the_allowed_directories_is_refused_at_once(  # type: ignore[no-untyped-def]
        server, run, tmp_path: Path) -> None:
    srv = server("--auto-reply-cmd", "cat", cwd=tmp_path)
    other = tmp_path.parent / (tmp_path.name + "-other")
    other.mkdir()
    result = run("client", "buf.txt", str(other / "r.txt"), "-m", "hi", "--timeout", "30")
    assert result.returncode == 2
    err = result.stderr.decode()
    assert f"the server will not write the reply to {other / 'r.txt'}: it is outside" in err
    assert "--allow-dir" in err
    srv.expect_exact("the client was told")
    assert list(other.iterdir()) == []
    still_serves(run)
    served(srv, 2)                   # the refused message, then the next client's
    assert leftovers(tmp_path) == []


def test_allow_dir_lets_replies_out(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    other = tmp_path / "sub" / "deeper"
    other.mkdir(parents=True)
    outside = tmp_path.parent / (tmp_path.name + "-out")
    outside.mkdir()
    server("--auto-reply", "ok", "--allow-dir", str(outside))
    assert run("client", "buf.txt", str(other / "r.txt"), "-m", "hi").stdout == b"ok"
    assert run("client", "buf.txt", str(outside / "r.txt"), "-m", "hi").stdout == b"ok"


def test_reply_through_a_symlinked_directory_is_refused(server, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path.parent / (tmp_path.name + "-target")
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside)
    server("--auto-reply-cmd", "cat")
    result = run("client", "buf.txt", "link/r.txt", "-m", "hi")
    assert result.returncode == 2
    assert "it is outside the directories this server writes to" in result.stderr.decode()
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(("make", "problem"), [
    ("missing", "directory {d}/nodir does not exist"),
    ("directory", "it is a directory"),
    ("symlink", "it is a symbolic link, which the server never follows"),
    ("existing", "the file already exists, and the server never overwrites a file"),
])
def test_bad_response_paths_from_spec_clients(make: str, problem: str, server, run,  # type: ignore[no-untyped-def]
                                              tmp_path: Path) -> None:
    victim = tmp_path.parent / (tmp_path.name + "-victim.txt")
    victim.write_text("precious")
    target = {"missing": "nodir/r.txt", "directory": "adir", "symlink": "link.txt",
              "existing": "exists.txt"}[make]
    (tmp_path / "adir").mkdir()
    (tmp_path / "link.txt").symlink_to(victim)
    (tmp_path / "exists.txt").write_text("not the server's")
    srv = server("--auto-reply-cmd", "cat")
    spec_request(tmp_path, target)
    told = line(srv, "the client was told")
    assert f"the server will not write the reply to {target}: " in told
    assert problem.format(d=tmp_path) in told
    srv.expect_exact("Lockfile removed. Ready for next client.")
    assert victim.read_text() == "precious"
    assert (tmp_path / "exists.txt").read_text() == "not the server's"
    still_serves(run)


def test_relative_path_is_resolved_against_the_servers_directory(  # type: ignore[no-untyped-def]
        start, run, tmp_path: Path) -> None:
    shared, home = tmp_path / "shared", tmp_path / "home"
    shared.mkdir()
    home.mkdir()
    srv = start("server", str(shared / "buf.txt"), "--auto-reply", "ok", "--allow-dir", ".",
                cwd=home)
    srv.expect_exact("Waiting for clients...")
    spec_request(shared, "r.txt")
    srv.expect_exact("Response sent to: r.txt")
    assert (home / "r.txt").read_bytes() == b"ok\n\x1b"      # ESC on a line of its own
    assert not (shared / "r.txt").exists()


# --- Permissions ---

@pytest.mark.parametrize(("umask", "mode"), [(0o000, "644"), (0o077, "600")])
def test_files_respect_the_umask_and_are_never_world_writable(umask: int, mode: str, pyz: Path,
                                                              tmp_path: Path) -> None:
    python = f"{sys.executable} {pyz}"
    hook = "stat -c '%a %n' server.lock buf.txt.taken.* buf.txt.server"
    script = (f"umask {umask:03o}; {python} server buf.txt --max-messages 1 "
              f"--auto-reply-cmd \"{hook}\" >/dev/null & "
              f"{python} client buf.txt r.txt -m hi; wait")
    result = subprocess.run(["sh", "-c", script], cwd=tmp_path, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    modes = dict(reversed(line.split(" ", 1)) for line in result.stdout.decode().splitlines())
    assert len(modes) == 3 and {"buf.txt.server", "server.lock"} < set(modes)
    assert set(modes.values()) == {mode}
    old = os.umask(umask)
    try:                # a reply, published where a spec client asks for it
        peer = spec_peer(tmp_path, "client", "buf.txt", str(tmp_path / "r.txt"), "hi",
                         "--keep-reply")
        assert filechat.serve(str(tmp_path / "buf.txt"), lambda request: "ok",
                              max_messages=1) == 1
        assert peer.wait(WAIT) == 0
    finally:
        os.umask(old)
    assert oct((tmp_path / "r.txt").stat().st_mode & 0o777)[2:] == mode


def test_presence_file_says_who_serves(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "x")
    presence = json.loads((tmp_path / "buf.txt.server").read_text())
    assert presence["pid"] == srv.pid
    assert presence["answered"] == "0000000000"          # rewritten in place: a fixed width
    assert filechat.status(str(tmp_path / "buf.txt"))["server"] is not None
    assert interrupt(srv) == 0
    assert filechat.status(str(tmp_path / "buf.txt"))["server"] is None


def test_durable_fsyncs_files_and_directories(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    synced = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_mode)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    buffer = str(tmp_path / "buf.txt")
    thread = threading.Thread(target=filechat.serve, args=(buffer, lambda r: "ok"),
                              kwargs={"max_messages": 1, "durable": True}, daemon=True)
    thread.start()
    assert filechat.send(buffer, "hi", durable=True, timeout=WAIT) == "ok"
    thread.join(WAIT)
    assert any(stat.S_ISDIR(m) for m in synced) and any(stat.S_ISREG(m) for m in synced)
    synced.clear()
    thread = threading.Thread(target=filechat.serve, args=(buffer, lambda r: "ok"),
                              kwargs={"max_messages": 1}, daemon=True)
    thread.start()
    assert filechat.send(buffer, "hi", timeout=WAIT) == "ok"
    thread.join(WAIT)
    assert synced == []


def test_max_bytes_is_enforced_while_reading_not_after(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # 64 GiB that take no room (a sparse file): read whole, it would never be answered.
    srv = server("--auto-reply-cmd", "cat", "--max-bytes", "1000")
    response = tmp_path / "r.txt"
    temp = tmp_path / "request.tmp"
    with open(temp, "wb") as f:
        f.write(f"{response}\n".encode())
        f.truncate(64 << 30)
        f.seek(0, os.SEEK_END)
        f.write(b"\x1b")
    with filechat.Waiter([str(response)]) as waiter:
        os.rename(temp, tmp_path / "buf.txt")             # in place whole, as a peer might
        while not response.exists():
            assert waiter.wait(WAIT) != "deadline"
    srv.expect_exact("Lockfile removed. Ready for next client.")
    reply = response.read_bytes()
    assert reply.endswith(b"\x1b\x1b")                    # an error reply
    assert b"over this server's limit of 1000 (--max-bytes)" in reply
    assert interrupt(srv) == 0
    response.unlink()
    assert leftovers(tmp_path) == []


# Two users sharing a directory as a class shares /tmp: run through setpriv.
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def sticky(pyz: Path) -> "Iterator[Path]":
    """A directory with the sticky bit under /tmp (mode 1777), holding a copy of the .pyz."""
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("setpriv") \
            or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs root, setpriv and a python3 in /usr/bin that other users can run")
    directory = Path(tempfile.mkdtemp(prefix="filechat-sticky-", dir="/tmp"))
    directory.chmod(0o1777)
    shutil.copy(pyz, directory / "filechat.pyz")
    (directory / "filechat.pyz").chmod(0o644)
    yield directory
    shutil.rmtree(directory)


def as_user(uid: int, *args: str) -> List[str]:
    """Return filechat's command line run as the user uid (and group uid)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", SYSTEM_PYTHON,
            "filechat.pyz", *args]


@pytest.mark.parametrize("server_uid", [65534, 0])
def test_users_in_a_sticky_directory_are_told_at_once_on_both_sides(server_uid: int,
                                                                     sticky: Path) -> None:
    server = spawn(as_user(server_uid, "server", "buf.txt", "--auto-reply", "ok"), sticky)
    try:
        server.expect_exact("directory . has the sticky bit (as /tmp has): only a file's owner may "
                            "rename or remove it there")
        server.expect_exact("Waiting for clients...")
        assert ("install -d -m 2775 -g GROUP DIR; this server can answer only its own user's "
                "clients") in printed(server)
        client = spawn(as_user(65533, "client", "buf.txt", "-m", "hi", "--timeout", "30"), sticky)
        assert ended(client) == filechat.EXIT_ERROR
        assert ("the server on buf.txt runs as another user, and directory . has the sticky "
                "bit") in printed(client)
        assert "install -d -m 2775 -g GROUP DIR" in printed(client)
    finally:
        stop(server)


def test_a_message_sent_before_another_user_s_server_started_is_refused_at_once(
        sticky: Path) -> None:
    client = spawn(as_user(65533, "client", "buf.txt", "-m", "hi", "--timeout", "30"), sticky)
    client.expect_exact("Waiting for server response...")
    server = spawn(as_user(65534, "server", "buf.txt", "--auto-reply", "ok"), sticky)
    try:
        assert ended(client) == filechat.EXIT_USAGE
        assert "directory . has the sticky bit" in printed(client)
        server.expect_exact("the client was told")
        assert not (sticky / "buf.txt").exists() or (sticky / "buf.txt").stat().st_size == 0
    finally:
        stop(server)
