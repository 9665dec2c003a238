"""filechat watch: the protocol's timeline beside filechat, spec peers, a FUSE mount, breaches."""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, List, Optional

import pytest
from conftest import ROOT, Gate, ended, interrupt, line, printed, spawn, stop
from pexpect.popen_spawn import PopenSpawn

SPEC_PEER = str(Path(__file__).resolve().parent / "spec_peer.py")
SHORT = 5.0       # seconds: the longest a watch line may take to follow its file's change


@pytest.fixture
def spec(tmp_path: Path) -> Iterator[Any]:
    """Start spec peers, in tmp_path unless told, where they find server.lock as the spec has
    it; all are stopped at the end of the test."""
    peers: List[PopenSpawn] = []

    def _spec(*args: str, cwd: Optional[Path] = None) -> PopenSpawn:
        peers.append(spawn([sys.executable, SPEC_PEER, *args], cwd or tmp_path))
        return peers[-1]
    yield _spec
    for peer in peers:
        stop(peer)


@pytest.fixture
def watch(start: Any) -> Iterator[Any]:
    """Start filechat watch on buf.txt and wait until it has looked once."""
    def _watch(*options: str, cwd: Any = None) -> PopenSpawn:
        proc: PopenSpawn = start("watch", "buf.txt", "-v", *options, cwd=cwd)
        line(proc, "watching ", SHORT)
        return proc
    yield _watch


def events(proc: PopenSpawn) -> List[str]:
    """The watch's lines of events, without what it said on stderr (its log)."""
    return [text for text in printed(proc).splitlines()
            if text[:1] in ("!", "~", " ", "{") and not text.startswith("  ")]


def test_filechat_exchange_in_order(server: Any, start: Any, watch: Any, gate: Gate) -> None:
    # The reply waits at the test's gate: the claim stays until the watch has read it.
    serving = server("--auto-reply-cmd", gate.hook("echo pong"))
    watching = watch()
    client = start("client", "buf.txt", "resp.txt", "-m", "hello\nworld")
    lock = line(watching, "server.lock      published", SHORT)
    assert f"pid {client.pid} on " in lock
    # What a message held may be gone before a look (a server claims it at once).
    message = line(watching, "buf.txt          published", SHORT)
    assert f"pid {client.pid} on " in message
    claimed = line(watching, "claimed", SHORT)
    assert "buf.txt.taken." in claimed and f"pid {serving.pid} on " in claimed
    assert "reply to resp.txt" in claimed and "'hello'" in claimed
    gate.open()
    assert ended(client) == 0
    assert "resp.txt" in line(watching, "published", SHORT)
    assert "held " in line(watching, "server.lock      removed", SHORT)
    line(watching, "resp.txt         removed", SHORT)
    assert interrupt(watching) == 0
    assert "no breach of the protocol seen" in printed(watching)
    assert "!" not in "".join(line[:1] for line in events(watching))


def test_spec_peers(tmp_path: Path, watch: Any, spec: Any) -> None:
    watching = watch()
    peer_server = spec("server", "buf.txt", "pong", "--drawn")
    line(peer_server, "Waiting for clients...")
    peer = spec("client", "buf.txt", "resp.txt", "hello spec", "--drawn")
    assert ended(peer) == 0 and ended(peer_server) == 0
    lock = line(watching, "server.lock      created", SHORT)
    assert "a client that does not name itself" in lock
    message = line(watching, "'hello spec'", SHORT)
    assert "buf.txt" in message and ("created" in message or "written" in message)  # in place
    line(watching, "resp.txt         created", SHORT)
    assert "empty" in line(watching, "buf.txt          written", SHORT)     # cleared in place
    assert "held " in line(watching, "server.lock      removed", SHORT)
    assert interrupt(watching) == 0
    assert "no breach of the protocol seen" in printed(watching)


def test_breach_buffer_written_without_lock(tmp_path: Path, watch: Any, spec: Any) -> None:
    watching = watch()
    peer_server = spec("server", "buf.txt", "pong", "--drawn", "--keep-lock")
    line(peer_server, "Waiting for clients...")
    peer = spec("client", "buf.txt", "resp.txt", "hi", "--drawn", "--no-lock")
    said = line(watching, "buffer written while no lock exists", SHORT)
    assert said.startswith("!") and "buf.txt" in said
    assert ended(peer) == 0
    assert interrupt(watching) == 6
    assert ("1 breach of the protocol seen: 1 buffer written while no lock exists"
            in printed(watching))


def test_breach_lock_removed_before_reply(tmp_path: Path, watch: Any, spec: Any) -> None:
    watching = watch("--json")
    peer_server = spec("server", "buf.txt", "pong", "--drawn", "--unlock-early")
    line(peer_server, "Waiting for clients...")
    peer = spec("client", "buf.txt", "resp.txt", "hi", "--drawn")
    said = json.loads(line(watching, "lock removed before any reply", SHORT))
    assert (said["file"], said["event"]) == ("server.lock", "removed")
    assert ended(peer) == 0
    assert interrupt(watching) == 6
    assert json.loads(events(watching)[-1]) == {
        "event": "end", "breaches": 1, "counts": {"unanswered": 1}}


def test_json_line_by_line(server: Any, start: Any, watch: Any, gate: Gate) -> None:
    server("--auto-reply-cmd", gate.hook("echo pong"))     # the claim stays until the watch
    watching = watch("--json")                               # has read it
    client = start("client", "buf.txt", "-m", "hi")
    line(watching, '"event": "claimed"', SHORT)
    gate.open()
    assert ended(client) == 0
    line(watching, '"event": "removed"', SHORT)
    assert interrupt(watching) == 0
    records = [json.loads(text) for text in events(watching)]
    assert records[-1] == {"event": "end", "breaches": 0, "counts": {}}
    told = records[:-1]
    assert {"ms", "time", "file", "event", "pid", "host", "who", "breach", "together"} \
        <= set(told[0])
    assert [r["event"] for r in told if r["file"] == "server.lock"] == ["published", "removed"]
    assert [r["ms"] for r in told] == sorted(r["ms"] for r in told)
    assert any(r.get("first_line") == "hi" for r in told if r["event"] == "claimed")


def give_up(start: Any, tmp_path: Path) -> str:
    """Send with no server running, give up after a second; return what the client said."""
    client = start("client", "buf.txt", "-m", "anyone?", "--server-timeout", "1")
    assert ended(client) == 5
    assert not (tmp_path / "buf.txt").exists()
    return printed(client).splitlines()[-1]


def test_give_up_is_the_same_with_a_watch(tmp_path: Path, start: Any, watch: Any) -> None:
    alone = give_up(start, tmp_path)
    assert "the message was withdrawn" in alone
    watching = watch()
    client = start("client", "buf.txt", "-m", "anyone?", "--server-timeout", "1")
    line(watching, "'anyone?'", SHORT)           # the watch read it before the client gave up
    assert ended(client) == 5
    assert printed(client).splitlines()[-1] == alone
    line(watching, "buf.txt          removed", SHORT)
    assert interrupt(watching) == 0


def test_bindfs_mount_polls(tmp_path: Path, start: Any, spec: Any) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from mounts import Mounts, why_not
    why = why_not(["bindfs"])
    if why is not None:
        if os.environ.get("FILECHAT_MOUNT_TESTS") == "required":
            pytest.fail(f"the shared-directory tests must run here, but cannot: {why}")
        pytest.skip(f"cannot mount shared directories: {why}")
    mounts = Mounts(tmp_path / "mounts", ["bindfs"]).start()
    try:
        shared, _ = mounts.fresh_dir("bindfs")
        watching = start("watch", "buf.txt", "-v", cwd=shared)
        line(watching, "watching with polling every", SHORT)
        peer_server = spec("server", "buf.txt", "pong", "--drawn", "--interval=0.1", cwd=shared)
        line(peer_server, "Waiting for clients...")
        peer = spec("client", "buf.txt", "resp.txt", "over fuse", "--drawn", cwd=shared)
        assert ended(peer) == 0 and ended(peer_server) == 0
        assert "a client that does not name itself" in line(watching, "server.lock", SHORT)
        line(watching, "resp.txt", SHORT)
        line(watching, "server.lock      removed", SHORT)
        assert interrupt(watching) == 0
        assert "no breach of the protocol seen" in printed(watching)
    finally:
        mounts.stop()


@pytest.mark.parametrize("no_color", ["", "1"])
def test_a_narrow_window_wraps_and_no_color_is_plain(tmp_path: Path, terminal: Any,
                                                     no_color: str, spec: Any) -> None:
    screen = terminal("watch", "buf.txt", rows=40, columns=40, env={"NO_COLOR": no_color})
    screen.expect("Ctrl+C to stop.")
    peer_server = spec("server", "buf.txt", "pong", "--drawn", "--keep-lock")
    line(peer_server, "Waiting for clients...")
    peer = spec("client", "buf.txt", "resp.txt", "a message without its lock",
                "--drawn", "--no-lock")
    screen.expect("exists")        # the breach, its last word: words are not split
    assert ended(peer) == 0
    screen.child.sendintr()
    assert screen.exit_status() == 6
    rows = screen.rows()
    assert all(len(row) <= 40 for row in rows), rows
    said = " ".join(row.strip() for row in rows)
    # Nothing is cut off: the whole line is there, over several rows.
    assert "reply to resp.txt" in said and "'a message without its lock'" in said
    assert "! buffer written while no lock exists" in said
    assert any(row.startswith("!") for row in rows)     # the mark leads the breach's line
    assert ("\x1b[31m" in screen.output()) == (not no_color)


def test_breach_message_overwritten(tmp_path: Path, watch: Any, spec: Any) -> None:
    watching = watch()
    first = spec("client", "buf.txt", "one.txt", "first", "--drawn", "--send-only")
    assert ended(first) == 0                  # its lock and message stay: no server runs
    line(watching, "'first'", SHORT)
    second = spec("client", "buf.txt", "two.txt", "second", "--drawn", "--send-only",
                  "--no-lock")
    assert ended(second) == 0
    said = line(watching, "message overwritten before it was answered or withdrawn", SHORT)
    assert said.startswith("!") and "'second'" in said
    assert interrupt(watching) == 6


def test_breach_message_without_its_end_when_the_lock_goes(tmp_path: Path, watch: Any,
                                                           spec: Any) -> None:
    watching = watch()
    peer = spec("client", "buf.txt", "resp.txt", "cut short", "--send-only", "--no-end")
    assert ended(peer) == 0
    # Written in place: its creation, empty, may be seen first, as a line of its own.
    assert "buf.txt" in line(watching, "no end marker", SHORT)
    (tmp_path / "server.lock").unlink()       # its holder lets go, the message unended
    said = line(watching, "server.lock      removed", SHORT)
    assert said.startswith("!") and "message without the end marker when its lock goes" in said
    assert interrupt(watching) == 6


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory that another user may read: outside pytest's own, which is root's alone."""
    directory = Path(tempfile.mkdtemp(prefix="filechat-watch-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root, to run the watch as another user")
def test_another_user_s_message_is_sized_not_read(pyz: Path, spec: Any,
                                                   shared: Path) -> None:
    # O_NOATIME is refused on another user's file: a read would set its access time,
    # which filechat clients take for a spec server's read. The watch sizes it instead.
    copy = shared / "filechat.pyz"
    copy.write_bytes(pyz.read_bytes())
    copy.chmod(0o644)
    watching = spawn(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                      sys.executable, str(copy), "watch", "buf.txt"], shared)
    line(watching, "Ctrl+C to stop.", SHORT)
    peer = spec("client", "buf.txt", "resp.txt", "private", "--drawn", "--send-only",
                cwd=shared)
    assert ended(peer) == 0
    said = line(watching, "not read", SHORT)      # its creation, empty, may come first
    assert "buf.txt" in said and "private" not in said
    assert "messages are sized, not read" in printed(watching)
    before = (shared / "buf.txt").stat()
    assert before.st_atime_ns <= before.st_mtime_ns     # never read since it was written
    assert interrupt(watching) == 0
