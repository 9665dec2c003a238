"""filechat watch: the protocol's timeline beside filechat, spec peers, a FUSE mount, breaches."""

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import ROOT, Proc

SPEC_PEER = str(Path(__file__).resolve().parent / "spec_peer.py")
SHORT = 5.0       # seconds: the longest a watch line may take to follow its file's change


def spec(tmp_path: Path, *args: str) -> Proc:
    """Start a spec peer in tmp_path, where it finds server.lock, as the spec has it."""
    return Proc([sys.executable, SPEC_PEER, *args], tmp_path)


@pytest.fixture
def watch(start: Any) -> Iterator[Any]:
    """Start filechat watch on buf.txt and wait until it has looked once."""
    def _watch(*options: str, cwd: Any = None) -> Proc:
        proc: Proc = start("watch", "buf.txt", "-v", *options, cwd=cwd)
        proc.expect("watching ", SHORT)
        return proc
    yield _watch


def test_filechat_exchange_in_order(server: Any, start: Any, watch: Any,
                                    tmp_path: Path) -> None:
    # The reply waits for a file of the test's: the claim stays until the watch has read it.
    go = tmp_path / "go"
    serving = server("--auto-reply-cmd", f"while [ ! -e {go} ]; do sleep 0.05; done; echo pong")
    watching = watch()
    client = start("client", "buf.txt", "resp.txt", "-m", "hello\nworld")
    lock = watching.expect("server.lock      published", SHORT)
    assert f"pid {client.popen.pid} on " in lock
    # What a message held may be gone before a look (a server claims it at once).
    message = watching.expect("buf.txt          published", SHORT)
    assert f"pid {client.popen.pid} on " in message
    claimed = watching.expect("claimed", SHORT)
    assert "buf.txt.taken." in claimed and f"pid {serving.popen.pid} on " in claimed
    assert "reply to resp.txt" in claimed and "'hello'" in claimed
    go.touch()
    assert client.wait() == 0
    assert "resp.txt" in watching.expect("published", SHORT)
    assert "held " in watching.expect("server.lock      removed", SHORT)
    watching.expect("resp.txt         removed", SHORT)
    assert watching.interrupt() == 0
    assert "no breach of the protocol seen" in watching.out
    assert "!" not in "".join(line[:1] for line in watching.stdout)


def test_spec_peers(tmp_path: Path, watch: Any) -> None:
    watching = watch()
    peer_server = spec(tmp_path, "server", "buf.txt", "pong", "--drawn")
    peer_server.expect("Waiting for clients...")
    peer = spec(tmp_path, "client", "buf.txt", "resp.txt", "hello spec", "--drawn")
    assert peer.wait() == 0 and peer_server.wait() == 0
    lock = watching.expect("server.lock      created", SHORT)
    assert "a client that does not name itself" in lock
    message = watching.expect("'hello spec'", SHORT)
    assert "buf.txt" in message and ("created" in message or "written" in message)  # in place
    watching.expect("resp.txt         created", SHORT)
    assert "empty" in watching.expect("buf.txt          written", SHORT)     # cleared in place
    assert "held " in watching.expect("server.lock      removed", SHORT)
    assert watching.interrupt() == 0
    assert "no breach of the protocol seen" in watching.out


def test_breach_buffer_written_without_lock(tmp_path: Path, watch: Any) -> None:
    watching = watch()
    peer_server = spec(tmp_path, "server", "buf.txt", "pong", "--drawn", "--keep-lock")
    peer_server.expect("Waiting for clients...")
    peer = spec(tmp_path, "client", "buf.txt", "resp.txt", "hi", "--drawn", "--no-lock")
    line = watching.expect("buffer written while no lock exists", SHORT)
    assert line.startswith("!") and "buf.txt" in line
    assert peer.wait() == 0
    assert watching.interrupt() == 6
    assert "1 breach of the protocol seen: 1 buffer written while no lock exists" in watching.out


def test_breach_lock_removed_before_reply(tmp_path: Path, watch: Any) -> None:
    watching = watch("--json")
    peer_server = spec(tmp_path, "server", "buf.txt", "pong", "--drawn", "--unlock-early")
    peer_server.expect("Waiting for clients...")
    peer = spec(tmp_path, "client", "buf.txt", "resp.txt", "hi", "--drawn")
    line = json.loads(watching.expect("lock removed before any reply", SHORT))
    assert (line["file"], line["event"]) == ("server.lock", "removed")
    assert peer.wait() == 0
    assert watching.interrupt() == 6
    assert json.loads(watching.stdout[-1]) == {
        "event": "end", "breaches": 1, "counts": {"unanswered": 1}}


def test_json_line_by_line(server: Any, start: Any, watch: Any, tmp_path: Path) -> None:
    go = tmp_path / "go"            # the claim stays until the watch has read it
    server("--auto-reply-cmd", f"while [ ! -e {go} ]; do sleep 0.05; done; echo pong")
    watching = watch("--json")
    client = start("client", "buf.txt", "-m", "hi")
    watching.expect('"event": "claimed"', SHORT)
    go.touch()
    assert client.wait() == 0
    watching.expect('"event": "removed"', SHORT)
    assert watching.interrupt() == 0
    records = [json.loads(line) for line in watching.stdout]
    assert records[-1] == {"event": "end", "breaches": 0, "counts": {}}
    events = records[:-1]
    assert {"ms", "time", "file", "event", "pid", "host", "who", "breach", "together"} \
        <= set(events[0])
    assert [r["event"] for r in events if r["file"] == "server.lock"] == ["published", "removed"]
    assert [r["ms"] for r in events] == sorted(r["ms"] for r in events)
    assert any(r.get("first_line") == "hi" for r in events if r["event"] == "claimed")


def give_up(start: Any, tmp_path: Path) -> str:
    """Send with no server running, give up after a second; return what the client said."""
    client = start("client", "buf.txt", "-m", "anyone?", "--server-timeout", "1")
    assert client.wait() == 5
    assert not (tmp_path / "buf.txt").exists()
    return client.err.splitlines()[-1]


def test_give_up_is_the_same_with_a_watch(tmp_path: Path, start: Any, watch: Any) -> None:
    alone = give_up(start, tmp_path)
    assert "the message was withdrawn" in alone
    watching = watch()
    client = start("client", "buf.txt", "-m", "anyone?", "--server-timeout", "1")
    watching.expect("'anyone?'", SHORT)           # the watch read it before the client gave up
    assert client.wait() == 5
    assert client.err.splitlines()[-1] == alone
    watching.expect("buf.txt          removed", SHORT)
    assert watching.interrupt() == 0


def test_bindfs_mount_polls(tmp_path: Path, start: Any) -> None:
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
        watching.expect("watching with polling every", SHORT)
        peer_server = spec(shared, "server", "buf.txt", "pong", "--drawn", "--interval=0.1")
        peer_server.expect("Waiting for clients...")
        peer = spec(shared, "client", "buf.txt", "resp.txt", "over fuse", "--drawn")
        assert peer.wait() == 0 and peer_server.wait() == 0
        assert "a client that does not name itself" in watching.expect("server.lock", SHORT)
        watching.expect("resp.txt", SHORT)
        watching.expect("server.lock      removed", SHORT)
        assert watching.interrupt() == 0
        assert "no breach of the protocol seen" in watching.out
    finally:
        mounts.stop()


@pytest.mark.parametrize("no_color", ["", "1"])
def test_a_narrow_window_wraps_and_no_color_is_plain(tmp_path: Path, terminal: Any,
                                                     no_color: str) -> None:
    screen = terminal("watch", "buf.txt", rows=40, columns=40, env={"NO_COLOR": no_color})
    screen.expect("Ctrl+C to stop.")
    peer_server = spec(tmp_path, "server", "buf.txt", "pong", "--drawn", "--keep-lock")
    peer_server.expect("Waiting for clients...")
    peer = spec(tmp_path, "client", "buf.txt", "resp.txt", "a message without its lock",
                "--drawn", "--no-lock")
    screen.expect("exists")        # the breach, its last word: words are not split
    assert peer.wait() == 0
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
