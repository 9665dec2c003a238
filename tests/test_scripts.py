"""The shell scripts in scripts/, run as a user would run them."""

import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

import build_zipapp

SCRIPTS = ROOT / "scripts"


@pytest.fixture(scope="module")
def repo_pyz() -> Path:
    """filechat.pyz in the checkout, where the scripts look for it."""
    target = ROOT / "filechat.pyz"
    build_zipapp.build(str(target))
    return target


def test_demo_prints_the_conversation_and_leaves_nothing(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    result = subprocess.run(["bash", str(SCRIPTS / "demo.sh")], capture_output=True, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[:6] == [
        "client: Hello server!", "server: Got your 13-byte message, thanks!",
        "client: How are you today?", "server: Got your 18-byte message, thanks!",
        "client: Bye.", "server: Got your 4-byte message, thanks!"]
    assert lines.count("Lockfile removed. Ready for next client.") == 3
    assert list(tmp_path.iterdir()) == []


def test_ask_branches_on_the_reply(repo_pyz: Path, start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    echo = subprocess.Popen(["bash", str(SCRIPTS / "echo_server.sh"), "buf.txt",
                             "--max-messages", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL)
    ask = subprocess.run(["bash", str(SCRIPTS / "ask.sh"), "buf.txt", "yes, go"],
                         cwd=tmp_path, capture_output=True, timeout=60)
    assert ask.stdout.decode() == "answer was yes: going ahead\n"
    assert echo.wait(30) == 0
    start("server", "buf.txt", "--auto-reply", "no", "--max-messages", "1")
    ask = subprocess.run(["bash", str(SCRIPTS / "ask.sh"), "buf.txt", "Deploy now?"],
                         cwd=tmp_path, capture_output=True, timeout=60)
    assert ask.returncode == 0
    assert ask.stdout.decode() == "answer was 'no': stopping\n"


def test_ask_reports_a_failure_status(repo_pyz: Path, tmp_path: Path) -> None:
    (tmp_path / "server.lock").mkdir()          # an unusable lock path: exit status 2
    ask = subprocess.run(["bash", str(SCRIPTS / "ask.sh"), "buf.txt", "anyone?"],
                         cwd=tmp_path, capture_output=True, timeout=60)
    assert ask.returncode == 2
    assert ask.stdout.decode() == "filechat failed with exit status 2\n"
    assert ask.stderr.decode() == ("filechat: error: lock file server.lock is a directory; "
                                   "name a file\n")       # filechat's own word, not hidden
