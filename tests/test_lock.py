"""The lock and the waiter, with second processes as the other parties."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from conftest import WAIT

import filechat
from filechat import Lock, Waiter, break_stale, judge, look, remove_if_same


def stale(path: Path, stale_after: float = filechat.STALE_AFTER) -> Optional[str]:
    """Why the lock at path is stale, as any waiter judges it (None: it is not)."""
    verdict = judge(str(path))
    assert verdict is not None
    return filechat.stale_reason(verdict, stale_after)


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
    assert break_stale(str(tmp_path / "server.lock"), 0) is None
    assert (tmp_path / "server.lock").exists()


def test_dead_holder_is_stale_at_once(tmp_path: Path, holder: subprocess.Popen) -> None:  # type: ignore[type-arg]
    holder.send_signal(signal.SIGKILL)
    holder.wait(WAIT)
    assert stale(tmp_path / "server.lock") == f"its holder, process {holder.pid}, has ended"
    assert break_stale(str(tmp_path / "server.lock"), filechat.STALE_AFTER) is not None
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


def test_remove_if_same_checks_what_the_file_holds(tmp_path: Path) -> None:
    path = tmp_path / "server.lock"
    path.write_text("first")
    first = look(str(path))
    (tmp_path / "other").write_text("second")
    os.replace(tmp_path / "other", path)
    assert first is not None and not remove_if_same(str(path), first)
    assert path.read_text() == "second"
    path.write_text("")                     # empty: told apart by its inode
    empty = look(str(path))
    (tmp_path / "other").write_text("")
    os.replace(tmp_path / "other", path)
    assert empty is not None and not remove_if_same(str(path), empty)
    now = look(str(path))
    assert now is not None and remove_if_same(str(path), now)
    assert not path.exists()


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="inotify is Linux's")


@linux_only
def test_waiter_is_woken_by_a_watched_name_only(tmp_path: Path) -> None:
    with Waiter([str(tmp_path / "buf.txt")]) as waiter:
        assert waiter.fd >= 0
        (tmp_path / "other.txt").write_text("x")
        start = time.monotonic()
        assert waiter.wait(0.2) == filechat.DEADLINE      # other names do not end it
        assert time.monotonic() - start >= 0.2
        (tmp_path / "buf.txt").write_text("x")
        assert waiter.wait(WAIT) == filechat.EVENT
        assert waiter.wait(0) == filechat.DEADLINE        # the events were all read


@linux_only
def test_waiter_is_woken_when_a_holder_dies(tmp_path: Path,
                                            holder: subprocess.Popen) -> None:  # type: ignore[type-arg]
    lock = str(tmp_path / "server.lock")
    with Waiter() as waiter:
        assert waiter.watch_files([lock])
        assert waiter.wait(0.1) == filechat.DEADLINE
        holder.send_signal(signal.SIGKILL)                 # its files are closed by the kernel
        assert waiter.wait(WAIT) == filechat.EVENT
        assert stale(Path(lock)) is not None
        assert not waiter.watch_files([str(tmp_path / "absent")])


@linux_only
def test_waiter_watches_a_directory_again_once_it_is_made_anew(tmp_path: Path) -> None:
    home = tmp_path / "chat"
    home.mkdir()
    with Waiter([str(home / "buf.txt")], poll_interval=0.01) as waiter:
        home.rmdir()
        assert waiter.wait(WAIT) == filechat.EVENT        # its watch ended
        assert waiter.wait(0.05) in (filechat.POLLED, filechat.DEADLINE)   # missing: polls
        home.mkdir()
        assert waiter.wait(0.05) in (filechat.POLLED, filechat.DEADLINE)   # watched again
        (home / "buf.txt").write_text("x")
        assert waiter.wait(WAIT) == filechat.EVENT


def test_waiter_polls_when_asked(tmp_path: Path) -> None:
    with Waiter([str(tmp_path / "buf.txt")], poll=True, poll_interval=0.01) as waiter:
        assert waiter.fd == -1
        assert waiter.watch_files([str(tmp_path / "absent")])   # nothing to watch: looks
        assert waiter.wait(1) == filechat.POLLED
        assert waiter.wait(0.005) == filechat.DEADLINE


@linux_only
def test_the_safety_re_check_says_when_it_found_progress(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # What the load and line tests look for in the debug log: shown to appear
    # when a wait really is ended by the net.
    monkeypatch.setattr(filechat, "SAFETY_INTERVAL", 0.05)
    caplog.set_level("DEBUG", logger="filechat")
    with Waiter([str(tmp_path / "buf.txt")]) as waiter:
        assert waiter.wait(WAIT) == filechat.SAFETY
        waiter.progress("a message in buf.txt")
        (tmp_path / "buf.txt").write_text("x")
        assert waiter.wait(WAIT) == filechat.EVENT
        waiter.progress("a message in buf.txt")
    assert [r.getMessage() for r in caplog.records if "safety" in r.getMessage()] == [
        "woken by the safety re-check: a message in buf.txt"]


def test_publish_is_whole_exclusive_or_replacing(tmp_path: Path) -> None:
    path = str(tmp_path / "f.txt")
    assert filechat.publish(path, b"one").fd == -1
    with pytest.raises(FileExistsError):
        filechat.publish(path, b"two")
    assert Path(path).read_bytes() == b"one"
    filechat.publish(path, [b"thr", b"ee"], replace=True)
    assert Path(path).read_bytes() == b"three"
    held = filechat.publish(str(tmp_path / "held"), b"x", hold=True)
    assert held.fd >= 0 and os.fstat(held.fd).st_ino == os.stat(tmp_path / "held").st_ino
    held.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "held"]    # no temp left


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP])
def test_without_hard_links_a_file_is_still_created_exclusively(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(filechat.os, "link", refuse)
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
    judged = []
    unlink = filechat._unlink_quietly

    def look_then_unlink(path: str) -> bool:
        if not os.path.basename(path).startswith("."):            # not a temp file
            verdict = judge(path, ours=True)
            judged.append((os.path.basename(path), verdict is not None and verdict.ended))
        return unlink(path)
    monkeypatch.setattr(filechat, "_unlink_quietly", look_then_unlink)
    lock = Lock(str(tmp_path / "server.lock"))
    assert lock.try_acquire()
    lock.release()
    line = filechat.WaitingLine(str(tmp_path / "server.lock"))
    line.join()
    line.leave()
    presence = filechat.Presence(str(tmp_path / "buf.txt.server"))
    presence.start()
    presence.let_go()
    assert [name for name, _ in judged][::2] == ["server.lock", "buf.txt.server"]
    assert filechat._is_ticket(judged[1][0])
    assert [gone for _, gone in judged] == [None, None, None]   # each seen alive to the end
    assert os.listdir(tmp_path) == []


def test_a_client_that_gives_up_on_a_claimed_message_leaves_its_lock_to_the_server(
        tmp_path: Path) -> None:
    # Two removers of one lock, the client giving up and the server done with
    # its message, could each check it and then remove a new lock another
    # client took in between (seen: a message then sent without its lock).
    # The client only closes it, and the server removes it.
    paths = filechat.Paths(str(tmp_path / "buf.txt"))
    server = filechat._Server(paths, lambda request: "", [str(tmp_path)], 1 << 20, False,
                              filechat._ignore)
    server.presence.start()
    response = str(tmp_path / "reply.txt")
    exchange = filechat._Exchange(paths, response, "reply.txt", filechat.STALE_AFTER, False,
                                  filechat._ignore, None)
    with Waiter() as exchange.waiter:
        exchange.write(filechat.encode_request("reply.txt", "hello"))
        exchange.lock.newline = False
        exchange.acquire(None, 2.0)
        exchange.put_in_place()
    taken = server._claim()
    assert taken is not None
    token = exchange.lock.token
    assert exchange.give_up() is False                   # claimed: not withdrawn...
    assert filechat.token_at(paths.lock) == token        # ...and its lock left in place,
    assert not taken.client.waiting(paths.lock)          # its flock free: its client gone
    taken.client.release_lock(paths.lock)
    assert not os.path.exists(paths.lock)
    taken.close()
    os.unlink(taken.path)
    server.remove_empty_buffer()
    server.presence.let_go()
    assert os.listdir(tmp_path) == []


def test_a_live_process_s_temp_files_are_never_swept(tmp_path: Path) -> None:
    # Whatever was judged of a file it held: a holder may have let go of it and
    # gone on to its next exchange, whose pending request is such a file.
    mine = tmp_path / filechat._temp_name(str(tmp_path / "buf.txt"))
    mine.write_bytes(b"a pending request")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    theirs = tmp_path / f".buf.txt.{filechat.HOST_TAG}.{dead.stdout.strip()}.0badf00d.tmp"
    theirs.write_bytes(b"a killed writer's")
    me = filechat.Owner(os.getpid(), filechat.HOST, "00ff", time.time())
    assert filechat.sweep([str(tmp_path)], dead=me) == [theirs.name]
    assert os.listdir(tmp_path) == [mine.name]
