"""The lock and the waiter, with second processes as the other parties."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from conftest import WAIT

import filechat
from filechat import Lock, LockTimeout, Waiter


def stale(path: Path, stale_after: float = 300) -> Optional[str]:
    """Why the lock at path is stale, as status judges it (None: it is not)."""
    lock = filechat.status(str(path.with_name("buf.txt")), stale_after=stale_after)["lock"]
    assert isinstance(lock, dict) and lock["held"], lock
    return lock["stale_reason"]     # type: ignore[no-any-return]


def test_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    path = str(tmp_path / "server.lock")
    first, second = Lock(path), Lock(path)
    assert first.try_acquire()
    assert not second.try_acquire()
    owner = json.loads(Path(path).read_text())
    assert owner["pid"] == os.getpid()
    assert owner["host"] == socket.gethostname()
    assert len(owner["token"]) == 16
    first.release()
    assert not os.path.exists(path)
    assert second.try_acquire()
    second.release()


def test_release_never_removes_a_lock_it_does_not_hold(tmp_path: Path) -> None:
    path = tmp_path / "server.lock"
    lock = Lock(str(path))
    assert lock.try_acquire()
    path.unlink()                   # e.g. the server released it...
    path.write_text("")             # ...and another client took it
    lock.release()
    assert path.exists()


def test_live_holder_is_never_stale(tmp_path: Path, holder: subprocess.Popen) -> None:  # type: ignore[type-arg]
    assert stale(tmp_path / "server.lock", stale_after=0) is None
    with pytest.raises(LockTimeout):        # a client never breaks it, however old
        filechat.send(str(tmp_path / "buf.txt"), "hi", stale_after=0, lock_timeout=0.3)
    assert (tmp_path / "server.lock").exists()


def test_dead_holder_is_stale_at_once(tmp_path: Path, holder: subprocess.Popen, run) -> None:  # type: ignore[type-arg, no-untyped-def]
    holder.send_signal(signal.SIGKILL)
    holder.wait(WAIT)
    assert stale(tmp_path / "server.lock") == f"its holder, process {holder.pid}, has ended"
    # The next client breaks it at once, and (no server answering) withdraws.
    result = run("client", "buf.txt", "-m", "hi", "--timeout", "0.5")
    assert result.returncode == filechat.EXIT_TIMEOUT
    assert (f"removed stale lock server.lock: its holder, process {holder.pid}, has ended"
            in result.stderr.decode()), result.stderr
    assert not (tmp_path / "server.lock").exists()
    lock = Lock(str(tmp_path / "server.lock"))
    assert lock.try_acquire()
    lock.release()


def test_unidentified_lock_is_stale_only_by_age(tmp_path: Path) -> None:
    path = tmp_path / "server.lock"
    path.write_text("")             # what a spec-following client leaves
    assert stale(path, 300) is None
    old = time.time() - 301
    os.utime(path, (old, old))
    reason = stale(path, 300)
    assert reason is not None and "unidentified holder" in reason


def test_other_hosts_lock_is_stale_only_by_age(tmp_path: Path) -> None:
    path = tmp_path / "server.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere.invalid", "token": "t",
                                "created": 0}))
    assert stale(path) is None
    old = time.time() - 400
    os.utime(path, (old, old))
    assert "host elsewhere.invalid" in (stale(path) or "")


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="inotify is Linux's")


@linux_only
def test_waiter_is_woken_by_a_watched_name_only(tmp_path: Path) -> None:
    with Waiter([str(tmp_path / "buf.txt")]) as waiter:
        (tmp_path / "other.txt").write_text("x")
        start = time.monotonic()
        assert waiter.wait(0.2) == "deadline"      # other names do not end it
        assert time.monotonic() - start >= 0.2
        (tmp_path / "buf.txt").write_text("x")
        assert waiter.wait(WAIT) == "event"
        assert waiter.wait(0) == "deadline"        # the events were all read


@linux_only
def test_waiter_is_woken_when_a_holder_dies(tmp_path: Path,
                                            holder: subprocess.Popen) -> None:  # type: ignore[type-arg]
    lock = str(tmp_path / "server.lock")
    with Waiter() as waiter:
        assert waiter.watch_files([lock])
        assert waiter.wait(0.1) == "deadline"
        holder.send_signal(signal.SIGKILL)                 # its files are closed by the kernel
        assert waiter.wait(WAIT) == "event"
        assert stale(Path(lock)) is not None
        assert not waiter.watch_files([str(tmp_path / "absent")])


@linux_only
def test_waiter_watches_a_directory_again_once_it_is_made_anew(tmp_path: Path) -> None:
    home = tmp_path / "chat"
    home.mkdir()
    with Waiter([str(home / "buf.txt")], poll_interval=0.01) as waiter:
        home.rmdir()
        assert waiter.wait(WAIT) == "event"        # its watch ended
        assert waiter.wait(0.05) == "polled"       # missing: it polls
        home.mkdir()
        assert waiter.wait(0.05) == "deadline"     # watched again: no more polling
        (home / "buf.txt").write_text("x")
        assert waiter.wait(WAIT) == "event"


def test_waiter_polls_when_asked(tmp_path: Path) -> None:
    with Waiter([str(tmp_path / "buf.txt")], poll=True, poll_interval=0.01) as waiter:
        (tmp_path / "buf.txt").write_text("x")          # no event ends a polling step
        start = time.monotonic()
        assert waiter.wait(1) == "polled"
        assert 0.01 <= time.monotonic() - start < 1
        assert waiter.wait(0.005) == "deadline"


@linux_only
def test_the_safety_re_check_says_when_it_found_progress(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # What the load and line tests look for in the debug log: shown to appear
    # when a wait really is ended by the net (after a second without events).
    caplog.set_level("DEBUG", logger="filechat")
    with Waiter([str(tmp_path / "buf.txt")]) as waiter:
        assert waiter.wait(WAIT) == "safety"
        waiter.progress("a message in buf.txt")
        (tmp_path / "buf.txt").write_text("x")
        assert waiter.wait(WAIT) == "event"
        waiter.progress("a message in buf.txt")
    assert [r.getMessage() for r in caplog.records if "safety" in r.getMessage()] == [
        "woken by the safety re-check: a message in buf.txt"]


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP])
def test_without_hard_links_a_file_is_still_created_exclusively(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", refuse)
    path = str(tmp_path / "server.lock")
    first, second = Lock(path), Lock(path)
    assert first.try_acquire()
    assert not second.try_acquire()
    assert json.loads(Path(path).read_text())["pid"] == os.getpid()
    first.release()
    assert os.listdir(tmp_path) == []


def test_a_holder_file_goes_while_its_flock_is_held(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # On a local disk a lock, ticket or presence file is removed before it is
    # closed: in place with a free flock, it would be taken for a dead
    # holder's, and its holder's pending files swept as a dead process's.
    # Just before each removal, what status and the line make of the file.
    buffer, lock = str(tmp_path / "buf.txt"), str(tmp_path / "server.lock")
    judged: List[Tuple[str, bool]] = []
    unlink, looking = os.unlink, []

    def look_then_unlink(path: str, *args: Any, **kwargs: Any) -> None:
        name = os.path.basename(path)
        if not looking and name not in ("buf.txt", "server.lock.line") \
                and not name.startswith("."):           # not the buffer or a temp file
            looking.append(name)
            state: Dict[str, Any] = filechat.status(buffer)
            if name == "server.lock":
                judged.append((name, state["lock"]["state"] == "alive"))
            elif name == "buf.txt.server":
                judged.append((name, state["server"] is not None))
            else:                       # a ticket: clear() removes only dead waiters'
                judged.append((name, filechat.WaitingLine(lock).clear() == []))
            looking.clear()
        unlink(path, *args, **kwargs)
    monkeypatch.setattr(os, "unlink", look_then_unlink)
    taken = Lock(lock)
    assert taken.try_acquire()
    taken.release()
    line = filechat.WaitingLine(lock)
    line.join()
    line.leave()
    assert filechat.serve(buffer, lambda request: "", max_messages=0) == 0   # presence, gone
    assert [name for name, _ in judged][::2] == ["server.lock", "buf.txt.server"]
    assert re.fullmatch(r"\d{20}-\d+", judged[1][0])             # a ticket's name
    assert [alive for _, alive in judged] == [True, True, True]    # each seen alive to the end
    assert os.listdir(tmp_path) == []
