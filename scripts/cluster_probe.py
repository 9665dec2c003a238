"""What filechat, and a reader on the other mount, meet on the cluster setups: measurements.

    python3 build_zipapp.py && python3 scripts/cluster_probe.py [--setups SETUP,...]

Needs root and the packages of scripts/mounts.py's cluster setups. Three probes, on each
setup, with a fresh directory (Mounts.fresh_dir) for each:

1. exchanges: `filechat server buf.txt --auto-reply ok --log LOG` on mount a (this host),
   then sequential clients `filechat client buf.txt -m hi --timeout 20` on mount b as
   host "otherhost" (mounts.as_host): replies received, errors, latency per client run;
   beside the same on a local directory.
2. in place: a small file on mount a rewritten at offset 0 at the same length (pwrite,
   new bytes each time, kept open); a reader on mount b opens and reads it every 100 ms:
   plainly, after POSIX_FADV_DONTNEED, or with O_DIRECT. Does it see each new content,
   how soon, and what does one look cost?
3. rename: a file renamed into place on mount a, with and without a reader on mount b
   opening that name every 20 ms: how long each rename takes.
4. open after a write on the other mount: a process on mount a polls for a name every
   20 ms (opens it, then removes it, as filechat's server takes a message); the name is
   written on mount b (into a temp name then renamed into place, or the same with an
   fsync, or written in place, in turn): how long after the write the open returns.
"""

import argparse
import mmap
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import mounts

ROOT = Path(__file__).resolve().parent.parent
PYZ = ROOT / "filechat.pyz"
LOOK_EVERY = 0.1        # seconds between the in-place reader's looks
LOOK_FOR = 5.0          # seconds the in-place reader looks for each new content
POLL_EVERY = 0.02       # seconds between the rename probe's reader's opens
MODES = ("plain", "fadvise", "direct")
# What a client and a server say on stderr when all goes well; anything else is reported.
PROGRESS = {"Lock acquired. Sending message to server...", "Message sent to server.",
            "Waiting for server response...", "Server stopped."}


# --- 1. Exchanges ---

def exchanges(a: Path, b: Path, work: Path, count: int) -> Dict[str, Any]:
    """Start a server on a, run count clients one after another on b as another host."""
    out = work / f"server-{time.monotonic_ns()}.out"
    err = out.with_suffix(".err")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        server = subprocess.Popen([sys.executable, str(PYZ), "server", str(a / "buf.txt"),
                                   "--auto-reply", "ok", "--log", str(a / "log.jsonl")],
                                  stdout=stdout, stderr=stderr)
    runs: List[Dict[str, Any]] = []
    try:
        mounts.wait_for("the filechat server did not start",
                        lambda: "Waiting for clients" in out.read_text(), [out, err], [server],
                        30)
        for _ in range(count):
            started = time.monotonic()
            done = subprocess.run(mounts.as_host("otherhost", [
                sys.executable, str(PYZ), "client", str(b / "buf.txt"), "-m", "hi",
                "--timeout", "20"]), capture_output=True, text=True, timeout=120)
            runs.append({"code": done.returncode, "reply": done.stdout, "err": done.stderr,
                         "took": time.monotonic() - started})
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    replied = [run["took"] for run in runs if run["code"] == 0 and run["reply"] == "ok"]
    errors = Counter(line.strip() for run in runs for line in run["err"].splitlines()
                     if line.strip() and line.strip() not in PROGRESS)
    server_errors = Counter(line.strip() for line in err.read_text().splitlines()
                            if line.strip() and line.strip() not in PROGRESS)
    return {"replied": len(replied), "count": count,
            "codes": Counter(run["code"] for run in runs),
            "median": statistics.median(replied) if replied else None,
            "max": max(replied) if replied else None,
            "errors": errors, "server_errors": server_errors,
            "server_code": server.returncode}


# --- 2. A file rewritten in place ---

def look(path: Path, mode: str) -> bytes:
    """Open path, read it as mode says, close it."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0))
    try:
        if mode == "fadvise":
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if mode == "direct":        # O_DIRECT reads into an aligned buffer: a page of mmap
            buffer = mmap.mmap(-1, mmap.PAGESIZE)
            return bytes(buffer[:os.readv(fd, [buffer])])
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def version(n: int) -> bytes:
    """The n-th content of the in-place file: new bytes, always 128 of them."""
    return f"version {n:06d} {os.urandom(8).hex()} ".encode().ljust(128, b".")


def in_place(a: Path, b: Path, mode: str, rounds: int) -> Dict[str, Any]:
    """Rewrite a file on a rounds times; after each, look on b every LOOK_EVERY s for it."""
    name = f"in-place-{mode}"
    writer = os.open(a / name, os.O_RDWR | os.O_CREAT, 0o644)
    seen: List[Optional[float]] = []
    costs: List[float] = []
    errors: Counter = Counter()     # type: ignore[type-arg]
    try:
        for n in range(rounds + 1):
            content = version(n)
            os.pwrite(writer, content, 0)
            written = time.monotonic()
            found = None
            while time.monotonic() - written < LOOK_FOR:
                started = time.monotonic()
                try:
                    got = look(b / name, mode)
                except OSError as error:
                    errors[str(error)] += 1
                    got = b""
                costs.append(time.monotonic() - started)
                if got == content:
                    found = time.monotonic() - written
                    break
                time.sleep(max(0.0, LOOK_EVERY - (time.monotonic() - started)))
            if n > 0:           # the first: b's first look, which caches what a wrote
                seen.append(found)
    finally:
        os.close(writer)
    delays = [delay for delay in seen if delay is not None]
    return {"rounds": rounds, "seen": len(delays),
            "first_look": sum(1 for delay in delays if delay < LOOK_EVERY / 2),
            "median_delay": statistics.median(delays) if delays else None,
            "look_cost": statistics.median(costs) if costs else None, "errors": errors}


# --- 3. Rename into place, with a reader polling the name ---

def poller(path: str, stop: Any, counts: Any) -> None:
    """Open and read path every POLL_EVERY s until stop is set; count opens and misses."""
    while not stop.is_set():
        try:
            with open(path, "rb") as f:
                f.read()
            counts[0] += 1
        except FileNotFoundError:
            counts[1] += 1
        except OSError:
            counts[2] += 1
        time.sleep(POLL_EVERY)


def renames(a: Path, b: Path, count: int, reader: bool) -> Dict[str, Any]:
    """Rename count files into one name on a, one every 0.1 s, with or without a poller on b."""
    target = a / "target.txt"
    target.write_bytes(b"first")
    fork = multiprocessing.get_context("fork")
    stop, counts = fork.Event(), fork.Array("i", 3)
    proc = None
    if reader:
        proc = fork.Process(target=poller, args=(str(b / "target.txt"), stop, counts))
        proc.start()
        time.sleep(0.2)         # a probe, not a test: the reader is polling by now
    took = []
    for n in range(count):
        temp = a / f"temp-{n}"
        temp.write_bytes(f"version {n}".encode())
        started = time.monotonic()
        os.rename(temp, target)
        took.append(time.monotonic() - started)
        time.sleep(0.1)
    stop.set()
    if proc is not None:
        proc.join(30)
    return {"count": count, "median": statistics.median(took), "max": max(took),
            "min": min(took), "reads": counts[0], "missing": counts[1], "errors": counts[2]}


# --- 4. Open what the other mount wrote ---

WRITES = ("write, rename", "write, fsync, rename", "write in place")


def taker(path: str, stop: Any, opened: Any) -> None:
    """Try to open path every POLL_EVERY s; when it opens, say when, and remove it."""
    while not stop.is_set():
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            time.sleep(POLL_EVERY)
            continue
        opened.put(time.monotonic())        # CLOCK_MONOTONIC: one clock for all processes
        os.close(fd)
        os.unlink(path)


def open_after_write(a: Path, b: Path, count: int) -> Dict[str, List[float]]:
    """With a process on a polling for a name, as filechat's server does, write it on b in
    each way of WRITES in turn, count times each: how long after the write the poller's open
    returns."""
    fork = multiprocessing.get_context("fork")
    stop, opened = fork.Event(), fork.Queue()
    proc = fork.Process(target=taker, args=(str(a / "message.txt"), stop, opened))
    proc.start()
    took: Dict[str, List[float]] = {how: [] for how in WRITES}
    try:
        for n in range(count * len(WRITES)):
            how = WRITES[n % len(WRITES)]
            final = b / "message.txt"
            path = b / f".temp-{n}" if "rename" in how else final
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"a message\x1b")
            if "fsync" in how:
                os.fsync(fd)
            os.close(fd)
            if path != final:
                os.rename(path, final)
            written = time.monotonic()
            took[how].append(opened.get(timeout=60) - written)
            time.sleep(0.2)
    finally:
        stop.set()
        proc.join(30)
    return took


# --- Report ---

def ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster_probe.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default=",".join(mounts.CLUSTER_SETUPS),
                        help="comma-separated setups (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=20, help="default: %(default)s")
    parser.add_argument("--rounds", type=int, default=10,
                        help="in-place rewrites per mode (default: %(default)s)")
    parser.add_argument("--renames", type=int, default=20, help="default: %(default)s")
    args = parser.parse_args(argv)
    setups = args.setups.split(",")
    why = mounts.why_not(setups)
    if why is not None or not PYZ.exists():
        parser.error(why or f"no {PYZ}: run python3 build_zipapp.py first")
    with tempfile.TemporaryDirectory(prefix="filechat-probe-") as root:
        work = Path(root) / "work"
        work.mkdir()
        made = mounts.Mounts(Path(root), setups).start()
        try:
            print(f"up: {', '.join(f'{k} {v:.2f} s' for k, v in made.timings.items())}\n")
            print("| setup | replies | exit codes | median | max | client errors "
                  "| server stderr |\n| --- | --- | --- | --- | --- | --- | --- |")
            local = work / "local"
            local.mkdir()
            for setup, (a, b) in [("local", (local, local)),
                                  *[(s, made.fresh_dir(s)) for s in setups]]:
                r = exchanges(a, b, work, args.clients)
                print(f"| {setup} | {r['replied']} of {r['count']} | {dict(r['codes'])} | "
                      f"{ms(r['median'])} | {ms(r['max'])} | "
                      f"{dict(r['errors']) or '-'} | {dict(r['server_errors']) or '-'} |",
                      flush=True)
            print("\n| setup | reader | new content seen | at the first look | median delay "
                  "| cost of a look | errors |\n| --- | --- | --- | --- | --- | --- | --- |")
            for setup in setups:
                a, b = made.fresh_dir(setup)
                for mode in MODES:
                    r = in_place(a, b, mode, args.rounds)
                    print(f"| {setup} | {mode} | {r['seen']} of {r['rounds']} | "
                          f"{r['first_look']} | {ms(r['median_delay'])} | "
                          f"{ms(r['look_cost'])} | {dict(r['errors']) or '-'} |", flush=True)
            print("\n| setup | reader on b | renames | median | min | max | reader's opens "
                  "(found / missing / errors) |\n| --- | --- | --- | --- | --- | --- | --- |")
            for setup in setups:
                for reader in (False, True):
                    a, b = made.fresh_dir(setup)
                    r = renames(a, b, args.renames, reader)
                    opens = f"{r['reads']} / {r['missing']} / {r['errors']}" if reader else "-"
                    print(f"| {setup} | {'every 20 ms' if reader else 'none'} | {r['count']} | "
                          f"{ms(r['median'])} | {ms(r['min'])} | {ms(r['max'])} | {opens} |",
                          flush=True)
            print("\n| setup | written on b | opened on a | median | max | over 100 ms |\n"
                  "| --- | --- | --- | --- | --- | --- |")
            for setup in setups:
                a, b = made.fresh_dir(setup)
                for how, took in open_after_write(a, b, args.renames).items():
                    print(f"| {setup} | {how} | {len(took)} | {ms(statistics.median(took))} | "
                          f"{ms(max(took))} | {sum(t > 0.1 for t in took)} |", flush=True)
        finally:
            made.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
