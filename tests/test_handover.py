"""The server hands the lock, with the request waiting beside the ticket, to the first in line."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Tuple

import pytest
from conftest import WAIT, release

import filechat
from filechat import MAX_BYTES, Line, Lock, _Outgoing, encode_request

pytestmark = pytest.mark.skipif(not (filechat._O_TMPFILE and filechat._can_rename_exclusive()),
                                reason="requests wait in line as unnamed files, moved by renameat2")

PEER = str(Path(__file__).with_name("spec_peer.py"))


def waiting_client(tmp_path: Path, message: str = "hello") -> Tuple[Line, _Outgoing, str, str]:
    """A client in line, its request beside its ticket; returns it, the lock and the buffer."""
    buffer, lock = str(tmp_path / "buf.txt"), str(tmp_path / "server.lock")
    outgoing = _Outgoing(buffer, str(tmp_path / "r.txt"), message, MAX_BYTES, durable=False)
    line = Line(lock)
    line.join(outgoing.offer)
    assert line.offer == os.path.join(line.directory, f"{line.ticket}.request")
    assert Path(line.offer).read_bytes() == encode_request(str(tmp_path / "r.txt"), message)
    return line, outgoing, lock, buffer


def dead_waiter(tmp_path: Path, name: str) -> Path:
    """Leave the ticket and request of a waiter that died (nobody flocks them)."""
    line = tmp_path / "server.lock.line"
    line.mkdir(exist_ok=True)
    record = {"pid": 999999, "host": filechat.HOST, "token": "ab", "created": 1.0}
    (line / name).write_text(json.dumps(record) + "\n")
    (line / f"{name}.request").write_bytes(b"/elsewhere/r.txt\nfrom the dead\x1b")
    return line


def test_the_lock_and_the_request_are_handed_over_once_the_lock_is_free(tmp_path: Path) -> None:
    line, outgoing, lock, buffer = waiting_client(tmp_path)
    ticket_inode = os.stat(line.mine()).st_ino
    Path(lock).write_text("")                           # somebody else holds it
    server_side = Line(lock)
    assert not server_side.hand_over(lock, buffer, durable=False)     # never over a lock
    assert Path(line.offer).exists()
    os.unlink(lock)                                     # the server removed it, answered
    assert server_side.hand_over(lock, buffer, durable=False)
    assert os.stat(lock).st_ino == ticket_inode         # the ticket is the lock
    request = os.stat(buffer).st_ino
    # The client, woken, finds it holds the lock and its request sent.
    fd = line.promote(lock, durable=False)
    assert fd is not None and fd >= 0
    taken = Lock(lock)
    taken.hold(fd)
    assert taken.still_held()
    outgoing.publish()
    assert os.stat(buffer).st_ino == request            # not written a second time
    assert not os.path.exists(line.directory)           # the line is empty: gone
    taken.release()
    os.unlink(buffer)


@pytest.mark.parametrize("next_holder", [False, True])
def test_a_client_answered_before_it_woke_does_not_send_again(tmp_path: Path,
                                                              next_holder: bool) -> None:
    line, outgoing, lock, buffer = waiting_client(tmp_path)
    assert Line(lock).hand_over(lock, buffer, durable=False)
    os.unlink(buffer)                                   # the server took the message,
    Path(tmp_path / "r.txt").write_bytes(b"hi\x1b")     # answered it,
    os.unlink(lock)                                     # and removed the lock,
    if next_holder:
        Path(lock).write_text("")                       # which somebody else holds now
    fd = line.promote(lock, durable=False)
    assert fd is not None and fd >= 0                   # it had held the lock
    outgoing.publish()
    assert not os.path.exists(buffer) and os.path.exists(lock) == next_holder
    assert not os.path.exists(line.directory)
    os.close(fd)


def test_a_waiter_interrupted_as_it_is_handed_the_lock_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    buffer, lock = str(tmp_path / "buf.txt"), str(tmp_path / "server.lock")
    Path(lock).write_text("")                           # a holder that follows only the spec

    def handed_then_interrupted(self: filechat.Waiter, paths: object, timeout: float) -> bool:
        os.unlink(lock)                                 # released, and at that instant
        assert Line(lock).hand_over(lock, buffer, durable=False)
        assert os.path.exists(buffer)
        raise KeyboardInterrupt                         # Ctrl+C

    monkeypatch.setattr(filechat.Waiter, "wait_for_deletion", handed_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        filechat.send(buffer, "never mind", str(tmp_path / "r.txt"))
    assert sorted(os.listdir(tmp_path)) == []           # request withdrawn, lock let go


def test_the_first_live_waiter_gets_the_lock_past_a_dead_one(tmp_path: Path) -> None:
    line_dir = dead_waiter(tmp_path, f"{1:020d}-999999")        # first in line, but dead
    line, outgoing, lock, buffer = waiting_client(tmp_path, "alive")
    assert line.ahead() == 0                            # its ticket removed on the way
    assert Line(lock).hand_over(lock, buffer, durable=False)
    assert Path(buffer).read_bytes() == encode_request(str(tmp_path / "r.txt"), "alive")
    assert sorted(os.listdir(line_dir)) == []           # dead ticket and request gone too
    fd = line.promote(lock, durable=False)
    assert fd is not None and fd >= 0
    outgoing.publish()
    os.close(fd)


def test_clearing_the_line_removes_dead_requests_only(tmp_path: Path) -> None:
    line_dir = dead_waiter(tmp_path, f"{1:020d}-999999")
    line, outgoing, lock, _ = waiting_client(tmp_path)
    Line(lock).clear()
    assert sorted(os.listdir(line_dir)) == [line.ticket, f"{line.ticket}.request"]
    outgoing.discard()
    line.leave()
    assert not line_dir.exists()


def test_clients_queued_under_a_spec_server_send_their_own_requests(  # type: ignore[no-untyped-def]
        holder, start, tmp_path: Path) -> None:
    client = start("client", "buf.txt", "resp.txt", "-m", "hello")
    client.expect("(1 ahead of you)")
    requests = [p.name for p in (tmp_path / "server.lock.line").iterdir()
                if p.name.endswith(".request")]
    assert len(requests) == 1
    peer = subprocess.Popen([sys.executable, PEER, "server", "buf.txt", "from the peer\n"],
                            cwd=tmp_path, stdout=subprocess.PIPE)
    release(holder)               # the peer hands nothing over: the client moves it itself
    assert client.wait() == 0
    assert client.out == "from the peer\n"
    assert peer.wait(WAIT) == 0
    assert not (tmp_path / "server.lock.line").exists()


def test_a_waiter_that_left_meanwhile_is_passed_over(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    line, outgoing, lock, buffer = waiting_client(tmp_path, "still here")
    gone = f"{1:020d}-999999"                           # listed, then gone before looked at
    listdir = os.listdir
    monkeypatch.setattr(filechat.os, "listdir",
                        lambda path: [gone, gone + ".request", *listdir(path)])
    assert Line(lock).hand_over(lock, buffer, durable=False)
    assert Path(buffer).read_bytes() == encode_request(str(tmp_path / "r.txt"), "still here")
    monkeypatch.undo()
    fd = line.promote(lock, durable=False)
    assert fd is not None and fd >= 0
    outgoing.publish()
    os.close(fd)


def test_a_stopping_server_clears_a_dead_waiters_ticket(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server("--auto-reply", "ok")          # its chores have run, once, at the start
    line = dead_waiter(tmp_path, f"{1:020d}-999999")
    assert srv.interrupt() == 0                 # well within the second before they run again
    assert not line.exists()


def test_where_files_cannot_be_renamed_exclusively_the_client_does_it_all(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A filesystem refusing RENAME_NOREPLACE (renameat2 fails): the server
    # hands nothing over, and the client links its ticket and its request.
    monkeypatch.setattr(filechat, "_rename_exclusive", lambda source, target: None)
    buffer, lock = str(tmp_path / "buf.txt"), tmp_path / "server.lock"
    lock.write_text("")                                 # held by a spec-following client
    server = threading.Thread(target=filechat.serve, args=(buffer, lambda r: r.message.upper()),
                              kwargs={"max_messages": 1})
    server.start()
    queued = threading.Event()
    replies = []

    def client() -> None:
        replies.append(filechat.send(buffer, "hello", str(tmp_path / "r.txt"),
                                     status=lambda event, **info: event == "queued"
                                     and queued.set()))

    sender = threading.Thread(target=client)
    sender.start()
    assert queued.wait(WAIT)
    assert any(p.name.endswith(".request") for p in (tmp_path / "server.lock.line").iterdir())
    lock.unlink()                                       # its holder is done
    sender.join(WAIT)
    server.join(WAIT)
    assert replies == ["HELLO"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("renames", [True, False])
def test_a_request_from_the_line_replaces_half_a_message_left_in_the_buffer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renames: bool) -> None:
    if not renames:
        monkeypatch.setattr(filechat, "_rename_exclusive", lambda source, target: None)
    line, outgoing, lock, buffer = waiting_client(tmp_path)
    Path(buffer).write_bytes(b"/x/r.txt\nhalf a mess")   # from a client that died writing
    fd = line.promote(lock, durable=False)                # the lock was free
    assert fd is not None and fd >= 0
    outgoing.publish()
    assert Path(buffer).read_bytes() == encode_request(str(tmp_path / "r.txt"), "hello")
    assert not os.path.exists(line.directory)
    os.close(fd)


def test_a_newcomer_leaves_a_free_lock_to_the_line(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    line, outgoing, lock, buffer = waiting_client(tmp_path)      # waits; the lock is free
    tried = []
    try_acquire = Lock.try_acquire
    monkeypatch.setattr(Lock, "try_acquire",
                        lambda self, *a, **k: tried.append(a or k) or try_acquire(self, *a, **k))
    with pytest.raises(filechat.LockTimeout):
        filechat.send(buffer, "late", str(tmp_path / "late.txt"), lock_timeout=0.2)
    assert tried == [] and not os.path.exists(lock)    # never taken, not even for a moment
    outgoing.discard()
    line.leave()


@pytest.mark.parametrize("serving", [True, False])
def test_the_first_in_line_lets_a_running_server_hand_it_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serving: bool) -> None:
    buffer, lock = str(tmp_path / "buf.txt"), str(tmp_path / "server.lock")
    presence = filechat.Presence(buffer + filechat.PRESENCE_SUFFIX)
    if serving:
        presence.start()
    holder = Lock(lock)
    assert holder.try_acquire()
    waits = []
    wait_for_deletion = filechat.Waiter.wait_for_deletion
    waits_for_the_lock = threading.Event()

    def waiting(self: filechat.Waiter, paths: List[str], timeout: float) -> bool:
        if lock in paths:
            waits_for_the_lock.set()
        if not os.path.exists(lock) and timeout == filechat.HAND_OVER_GRACE:
            waits.append(paths)         # the server's part, just after the release:
            assert Line(lock).hand_over(lock, buffer, durable=False)
            os.rename(buffer, buffer + ".taken")
            Path(tmp_path / "r.txt").write_bytes(b"handed\x1b")
            os.unlink(lock)
        return wait_for_deletion(self, paths, timeout)

    monkeypatch.setattr(filechat.Waiter, "wait_for_deletion", waiting)
    replies: List[str] = []

    def client() -> None:
        try:
            replies.append(filechat.send(buffer, "hello", str(tmp_path / "r.txt"), timeout=0.5))
        except filechat.ReplyTimeout:
            replies.append("no reply")

    sender = threading.Thread(target=client)
    sender.start()
    assert waits_for_the_lock.wait(WAIT)
    holder.release()                    # the holder's exchange is over
    sender.join(WAIT)
    # With a server running, the client waited for it to hand the lock on;
    # without one, it took the lock at once, and nobody answered.
    assert replies == (["handed"] if serving else ["no reply"])
    assert len(waits) == serving
    presence.withdraw()
    assert sorted(os.listdir(tmp_path)) == (["buf.txt.taken"] if serving else [])
