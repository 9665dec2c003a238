"""The lock and the waiter, with second processes as the other parties."""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import WAIT

import filechat
from filechat import Lock, Waiter, remove_if_same


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
    lock = Lock(str(tmp_path / "server.lock"), stale_after=0)
    assert lock.stale_reason() is None
    assert lock.break_stale() is None
    assert (tmp_path / "server.lock").exists()


def test_dead_holder_is_stale_at_once(tmp_path: Path, holder: subprocess.Popen) -> None:  # type: ignore[type-arg]
    holder.send_signal(signal.SIGKILL)
    holder.wait(WAIT)
    lock = Lock(str(tmp_path / "server.lock"))
    assert lock.stale_reason() == f"its holder, process {holder.pid}, has ended"
    assert lock.break_stale() is not None
    assert not (tmp_path / "server.lock").exists()
    assert lock.try_acquire()
    lock.release()


def test_unidentified_lock_is_stale_only_by_age(tmp_path: Path) -> None:
    path = tmp_path / "server.lock"
    path.write_text("")             # what a spec-following client leaves
    assert Lock(str(path), stale_after=300).stale_reason() is None
    old = time.time() - 301
    os.utime(path, (old, old))
    reason = Lock(str(path), stale_after=300).stale_reason()
    assert reason is not None and "unidentified holder" in reason


def test_other_hosts_lock_is_stale_only_by_age(tmp_path: Path) -> None:
    path = tmp_path / "server.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere.invalid", "token": "t",
                                "created": 0}))
    assert Lock(str(path)).stale_reason() is None
    old = time.time() - 400
    os.utime(path, (old, old))
    assert "host elsewhere.invalid" in (Lock(str(path)).stale_reason() or "")


def test_remove_if_same_checks_identity(tmp_path: Path) -> None:
    path = tmp_path / "server.lock"
    path.write_text("first")
    st = os.stat(path)
    first = (st.st_dev, st.st_ino)
    (tmp_path / "other").write_text("second")
    os.replace(tmp_path / "other", path)    # both existed at once: another inode
    assert not remove_if_same(str(path), first)
    assert path.read_text() == "second"
    st = os.stat(path)
    assert remove_if_same(str(path), (st.st_dev, st.st_ino))
    assert not path.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_waiter_is_woken_by_inotify(tmp_path: Path) -> None:
    with Waiter([str(tmp_path)]) as waiter:
        assert waiter.fd is not None and waiter.inotify is not None
        waiter.inotify.drain()          # events this thread's instance saw earlier
        assert select.select([waiter.fd], [], [], 0)[0] == []
        (tmp_path / "buf.txt").write_text("x")
        assert select.select([waiter.fd], [], [], WAIT)[0] == [waiter.fd]
        assert waiter.wait(WAIT, {"buf.txt"}) == {"buf.txt"}    # drains the queued events
        assert select.select([waiter.fd], [], [], 0)[0] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_waiter_sleeps_through_other_names_and_forgets(tmp_path: Path) -> None:
    with Waiter([str(tmp_path)]) as waiter:
        waiter.forget()                  # events this thread's instance saw earlier
        (tmp_path / "other.txt").write_text("x")
        start = time.monotonic()
        assert waiter.wait(0.2, {"buf.txt"}) is None      # only a timeout ends it
        assert time.monotonic() - start >= 0.2
        (tmp_path / "buf.txt").write_text("x")
        waiter.forget()
        assert select.select([waiter.fd], [], [], 0)[0] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_a_paused_waiter_queues_nothing_and_sees_changes_once_resumed(tmp_path: Path) -> None:
    with Waiter([str(tmp_path)]) as waiter:
        waiter.pause()                   # waiting in line: the directory's changes pile up not
        for n in range(100):
            (tmp_path / f"{n}.txt").write_text("x")
        assert select.select([waiter.fd], [], [], 0)[0] == []
        waiter.resume()
        assert select.select([waiter.fd], [], [], 0)[0] == []
        (tmp_path / "buf.txt").write_text("x")
        assert waiter.wait(WAIT, {"buf.txt"}) == {"buf.txt"}


def test_waiter_polls_when_asked(tmp_path: Path) -> None:
    with Waiter([str(tmp_path)], poll=True, poll_interval=0.01) as waiter:
        assert waiter.fd is None
        assert waiter.wait(0.01, {"buf.txt"}) is None


def test_atomic_write_and_publish_new(tmp_path: Path) -> None:
    path = str(tmp_path / "f.txt")
    filechat.atomic_write(path, b"one")
    filechat.atomic_write(path, b"two")
    assert Path(path).read_bytes() == b"two"
    reply = str(tmp_path / "r.txt")
    filechat.publish_new(reply, b"reply\x1b")
    with pytest.raises(FileExistsError):
        filechat.publish_new(reply, b"again\x1b")
    assert Path(reply).read_bytes() == b"reply\x1b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "r.txt"]


def _server(tmp_path: Path) -> "filechat._Server":
    paths = filechat.Paths.of(str(tmp_path / "buf.txt"))
    return filechat._Server(paths, lambda request: request.message, [str(tmp_path)],
                            filechat.MAX_BYTES, filechat.STALE_AFTER, False,
                            lambda event, **info: None)


def test_a_lock_opened_as_it_appeared_is_the_one_its_message_goes_with(tmp_path: Path) -> None:
    server = _server(tmp_path)
    lock = Lock(server.paths.lock)
    assert lock.try_acquire()
    server._look_at_lock()                           # woken by the lock, before the message
    assert server.looked is not None
    opened = server.looked.client.fd
    client, ref = server._hold_lock()
    assert client.fd == opened                       # not opened and read again
    assert ref.inode == os.stat(lock.path).st_ino
    assert ref.token == json.loads(Path(lock.path).read_text())["token"]
    client.close()
    lock.release()


@pytest.mark.parametrize("change", ["replaced", "written"])
def test_a_lock_changed_since_it_was_opened_is_read_again(change: str, tmp_path: Path) -> None:
    server = _server(tmp_path)
    path = Path(server.paths.lock)
    first = Lock(str(path))
    if change == "replaced":
        assert first.try_acquire()
    else:
        path.write_text("")                          # a peer that writes its lock after making it
    server._look_at_lock()
    assert server.looked is not None and server.looked.ref.token == (
        "" if change == "written" else json.loads(path.read_text())["token"])
    if change == "replaced":
        first.release()                              # gave up; another client took the lock
        second = Lock(str(path))
        assert second.try_acquire()
    else:
        path.write_bytes(filechat._owner_record())
    client, ref = server._hold_lock()
    assert ref.inode == path.stat().st_ino
    assert ref.token == json.loads(path.read_text())["token"]    # the lock as it is now
    client.close()
