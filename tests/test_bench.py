"""scripts/bench.py's system call counting and its shared floor, without timing anything."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench

TABLE = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 68.12    0.000156           1       100           newfstatat
 24.02    0.000055          18         3         2 openat
------ ----------- ----------- --------- --------- ----------------
100.00    0.000211           2       103         2 total
"""


def test_strace_summary_reads_calls_and_failures(tmp_path: Path) -> None:
    (tmp_path / "summary").write_text(TABLE)
    assert bench.strace_summary(str(tmp_path / "summary")) == {
        "newfstatat": [100, 0, 0.000156], "openat": [3, 2, 0.000055],
        "total": [103, 2, 0.000211]}


def test_strace_summary_of_no_system_call_is_zero(tmp_path: Path) -> None:
    (tmp_path / "summary").write_text("")        # what strace writes then
    assert bench.strace_summary(str(tmp_path / "summary")) == {"total": [0, 0, 0.0]}


def test_without_strace_the_bench_says_so_and_leaves_no_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which",
                        lambda name: None if name == "strace" else real_which(name))
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):  # type: ignore[no-untyped-def]
        started.append(real_popen(*args, **kwargs))
        return started[-1]
    monkeypatch.setattr(subprocess, "Popen", popen)
    assert bench.measure_syscalls(str(tmp_path), 3) == {"error": bench.STRACE_MISSING}
    assert started and all(proc.poll() is not None for proc in started)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_floor_system_calls_per_exchange(tmp_path: Path) -> None:
    """strace sees each side's own work on the files, exchange by exchange.

    The client removes its reply and its lock and renames its request into
    place; the server removes the request and renames its reply into place.
    """
    run = bench.traced_run(str(tmp_path), "floor", 5)
    if run["client"]["total"][0] == 0:
        pytest.skip("strace attached but saw nothing")
    client, server = run["client"], run["server"]
    assert client["unlink"][0] == 2 * 5 and server["unlink"][0] == 5
    assert client["rename"][0] == 5 and server["rename"][0] == 5


def test_shared_floor_answers_each_of_four_clients_once(tmp_path: Path) -> None:
    """The shared benchmark's floor, here in one local directory: four clients at once
    each print their own reply, the server says each message once, nothing is left."""
    def python(code: str, *args: str) -> "subprocess.Popen[str]":
        return subprocess.Popen([sys.executable, *bench.FLOOR_FLAGS, "-c", code, *args],
                                cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    server = python(bench.FLOOR_SHARED_SERVER, "0.005")
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        clients = [python(bench.FLOOR_SHARED_CLIENT, f"hello {n}", f"reply-{n}.txt",
                          "0.005", "0.005", "30", "-") for n in range(4)]
        assert [client.communicate(timeout=60)[0] for client in clients] == [
            f"hello {n}" for n in range(4)]
    finally:
        server.terminate()            # it finishes what it holds first
        said = server.communicate(timeout=10)[0]
    assert sorted(json.loads(line)["message"] for line in said.splitlines()) == [
        f"hello {n}" for n in range(4)]
    assert not list(tmp_path.iterdir())
