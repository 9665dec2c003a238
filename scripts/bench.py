#!/usr/bin/env python3
"""Measure filechat beside the filesystem's floor and the spec's pace; print a table.

    python3 scripts/bench.py            # the full run (about a minute)
    python3 scripts/bench.py --quick    # tiny counts: a smoke check, numbers not meaningful
    python3 scripts/bench.py --json     # the same measurements as JSON
    python3 scripts/bench.py --shared   # across hosts: GlusterFS, CephFS, bindfs, sshfs (root)
    python3 scripts/bench.py --shared --setups glusterfs,cephfs   # or any of mounts.SETUPS

Everything runs on this machine in one go, so the ratios compare like with
like; the absolute numbers depend on the machine and its load.
"""

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipapp
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, cast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import build_zipapp  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import mounts  # noqa: E402

PYZ = os.path.join(ROOT, "filechat.pyz")
MIB = 1 << 20

# The floor: the bare protocol in two Python processes and nothing else.
# The client takes the lock with O_CREAT|O_EXCL and renames its request into
# place; the server, woken by inotify, reads it and renames its reply into
# place; the client, woken by inotify, reads it and removes reply and lock.
# Each client says "ready" once set up and waits for a line on its stdin, so
# that the benchmark can look at the server (its CPU time), or attach strace
# to both, before the exchanges; each reports the CPU time it used over them.
CPU = r"""
import resource
def cpu():        # [user, system] seconds (to the microsecond), children's included
    both = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return [sum(u.ru_utime for u in both), sum(u.ru_stime for u in both)]
"""
# A server says its CPU time so far when the benchmark sends it SIGUSR1.
SAY_CPU = CPU + r"""
import json, signal
signal.signal(signal.SIGUSR1, lambda *_: print(json.dumps(cpu()), flush=True))
"""
INOTIFY = CPU + r"""
import ctypes, os, select
libc = ctypes.CDLL(None, use_errno=True)
def watch(directory):
    fd = libc.inotify_init1(os.O_NONBLOCK)
    libc.inotify_add_watch(fd, directory.encode(), 0x080)     # IN_MOVED_TO
    return fd
def read_when_there(fd, path):
    while True:
        try:
            file = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            select.select([fd], [], [])
            os.read(fd, 65536)
            continue
        data = os.read(file, 65536)
        os.close(file)
        return data
def publish(path, data):
    temp = path + ".tmp"
    file = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.write(file, data)
    os.close(file)
    os.rename(temp, path)
"""
FLOOR_SERVER = SAY_CPU + INOTIFY + r"""
import sys
directory = sys.argv[1]
fd = watch(directory)
request, reply = os.path.join(directory, "buf"), os.path.join(directory, "reply")
print("ready", flush=True)
while True:                       # until the benchmark stops it
    data = read_when_there(fd, request)
    os.unlink(request)
    publish(reply, data.partition(b"\n")[2])
"""
FLOOR_CLIENT = INOTIFY + r"""
import sys, time, json
directory, count = sys.argv[1], int(sys.argv[2])
fd = watch(directory)
request, reply = os.path.join(directory, "buf"), os.path.join(directory, "reply")
lock = os.path.join(directory, "lock")
print("ready", flush=True)
sys.stdin.readline()              # the benchmark looks at the server first
before = cpu()
times = []
for i in range(count):
    start = time.perf_counter()
    os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    publish(request, reply.encode() + b"\nhello\x1b")
    read_when_there(fd, reply)
    os.unlink(reply)
    os.unlink(lock)
    times.append(time.perf_counter() - start)
used = [after - then for after, then in zip(cpu(), before)]
print(json.dumps({"times": times, "cpu": used}))
"""
ECHO_SERVER = SAY_CPU + r"""
import sys, time, json
sys.path.insert(0, sys.argv[1])
import filechat
poll = {"poll": True, "events": False}.get(sys.argv[3])     # "auto": the filesystem decides
count = int(sys.argv[4]) if len(sys.argv) > 4 else None   # then say when each came
received = []
def report(event, **info):
    if event == "ready":
        print("ready", flush=True)
    elif event == "received" and count:
        received.append((info["request"].message, time.time()))
filechat.serve(sys.argv[2], lambda request: request.message, poll=poll,
               poll_interval=filechat.POLL_INTERVAL if poll else None, max_bytes=64 << 20,
               report=report, max_messages=count)
print(json.dumps(received), flush=True)
"""
LIBRARY_CLIENT = CPU + r"""
import sys, time, json, os
sys.path.insert(0, sys.argv[1])
import filechat
buffer, count, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[5])
poll = True if sys.argv[4] == "poll" else None      # "auto": the filesystem decides
message = "x" * size if size else "hello"
def rss(field="VmRSS:"):       # VmHWM: the peak of this program, not of what forked it
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field))
filechat.send(buffer, "warm-up", poll=poll)   # what any first exchange loads
baseline = rss()                  # message made, nothing large sent yet
print("ready", flush=True)
sys.stdin.readline()              # the benchmark looks at the server first
before = cpu()
times = []
for i in range(count):
    start = time.perf_counter()
    reply = filechat.send(buffer, message, poll=poll, max_bytes=64 << 20,
                          poll_interval=filechat.RESPONSE_POLL_INTERVAL if poll else None)
    times.append(time.perf_counter() - start)
    assert reply == message
    del reply                     # the caller is done with it before the next exchange
used = [after - then for after, then in zip(cpu(), before)]
print(json.dumps({"times": times, "baseline": baseline, "maxrss": rss("VmHWM:"), "cpu": used}))
"""
# Runs a command with stdout to a file and says its wall time and peak memory.
# A process's peak counts the memory of the process it was forked from, so
# the command is forked from this small one rather than from the benchmark:
# what is reported is the larger of the two ("spawner").
SPAWN = r"""
import os, sys, time
with open("/proc/self/status") as f:
    spawner = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.dup2(out, 1)
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)             # not started: say so through the status
_, status, usage = os.wait4(pid, 0)
took = time.perf_counter() - start
print('{"time": %r, "status": %d, "maxrss": %d, "spawner": %d}'
      % (took, status, usage.ru_maxrss, spawner))
"""
# A parent that uses filechat, then forks the clients, as a program with a
# process pool would; each child writes its records to its own file and
# exits as soon as its own messages are done.
LINE_CLIENTS = r"""
import sys, time, json, os
sys.path.insert(0, sys.argv[1])
import filechat
buffer, clients, count, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
filechat.send(buffer, "warm-up")          # used before the fork, as alone
print("ready", flush=True)
sys.stdin.readline()                      # all start together
def client(name):
    records = []
    for i in range(count):
        record = {"ahead": 0}
        def status(event, **info):
            if event == "queued":
                record["queued"] = info["at"]          # when its ticket appeared in line
                record["named"] = info["named"]        # when it was named, just before
            elif event == "locked":
                record["asked"] = info["asked"]         # when it asked for the lock
                record["locked"] = time.time()
        record["arrived"] = time.time()
        message = record["message"] = f"{name}-{i}"
        assert filechat.send(buffer, message, status=status) == message
        record["done"] = time.time()
        records.append(record)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(records, f)
pids = []
for n in range(clients):
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            client(f"c{n}")
            status = 0
        except BaseException:
            import traceback
            traceback.print_exc()                 # os._exit would swallow it
        finally:
            os._exit(status)
    pids.append(pid)
failed = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
print(json.dumps(failed), flush=True)
"""


def start_process(code: str, *args: str, stdin: bool = False) -> "subprocess.Popen[str]":
    """Start a Python snippet and wait for its "ready" line."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE if stdin else None, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"helper did not start: {line!r}")
    return proc


def run_client(code: str, *args: str, at_ready: Callable[[int], None] = lambda pid: None,
               timeout: float = 600) -> Any:
    """Run a client snippet and return the JSON it prints.

    The snippet says "ready" once it is set up and then waits for a line on
    its stdin: in between, at_ready(its pid) looks at the server (its CPU
    time so far) or attaches strace to both.
    """
    proc = start_process(code, *args, stdin=True)
    try:
        at_ready(proc.pid)
        out = proc.communicate("go\n", timeout=timeout)[0]
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode:
        raise RuntimeError(f"a client snippet failed: exit {proc.returncode}")
    return json.loads(out)


def run_json(code: str, *args: str, timeout: float = 600) -> Any:
    """Run a Python snippet and return the JSON it prints."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=timeout, check=True).stdout
    return json.loads(out)


def stop(proc: "subprocess.Popen[str]") -> None:
    """Stop a helper process."""
    proc.terminate()
    proc.wait(10)


def quantile(values: Sequence[float], q: float) -> float:
    """Return the q-quantile of values (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def client_and_server_cpu(server: "subprocess.Popen[str]", code: str, *args: str
                          ) -> Tuple[Any, Dict[str, float]]:
    """Run a client snippet against a running server; its JSON, and the CPU time of both.

    The server's is read once the client is set up (the library client's
    warm-up exchange done) and again once it has exited, so that it covers
    the client's exchanges and nothing else but waiting; the client's is
    its own over its exchanges. Seconds: all, and in the kernel ("system").
    """
    before: List[List[float]] = []
    result = run_client(code, *args, at_ready=lambda pid: before.append(server_cpu(server)))
    after = server_cpu(server)
    user, system = result["cpu"]
    return result, {"client": user + system, "client_system": system,
                    "server": sum(after) - sum(before[0]), "server_system": after[1] - before[0][1]}


def server_cpu(server: "subprocess.Popen[str]") -> List[float]:
    """A running server's [user, system] CPU seconds so far, children's included: it says."""
    assert server.stdout is not None
    server.send_signal(signal.SIGUSR1)
    return list(json.loads(server.stdout.readline()))


def measure_floor(directory: str, count: int) -> Tuple[List[float], Dict[str, float]]:
    """Round trips of the bare inotify file protocol; returns (times, CPU seconds used).

    CPU: each side's over the count exchanges, children included (none here).
    """
    server = start_process(FLOOR_SERVER, directory)
    try:
        result, cpu = client_and_server_cpu(server, FLOOR_CLIENT, directory, str(count))
    finally:
        stop(server)
    return list(result["times"])[count // 10:], {**cpu, "exchanges": float(count)}


def measure_library(directory: str, count: int, poll: bool, size: int = 0
                    ) -> Tuple[List[float], Dict[str, int], Dict[str, float]]:
    """Round trips of send() against serve(); returns (times, memory in KiB, CPU seconds).

    Memory: each process's peak resident size, and its size before the
    exchanges (the client with its message already made), in KiB. CPU:
    each side's over the count exchanges (not the client's warm-up),
    children included.
    """
    buffer = os.path.join(directory, "buf.txt")
    mode = "poll" if poll else "auto"
    server = start_process(ECHO_SERVER, PYZ, buffer, mode)
    try:
        server_baseline = rss(server.pid, "VmRSS:")
        result, cpu = client_and_server_cpu(server, LIBRARY_CLIENT, PYZ, buffer, str(count),
                                            mode, str(size))
        memory = {"client_peak": result["maxrss"], "client_baseline": result["baseline"],
                  "server_peak": rss(server.pid, "VmHWM:"), "server_baseline": server_baseline}
    finally:
        stop(server)
    times = result["times"]
    return times[count // 10:] if count >= 10 else times, memory, {**cpu, "exchanges": count}


STRACE_MISSING = "strace is not installed (scripts/test.sh installs it, as root, with apt)"


class StraceFailed(Exception):
    """strace could not trace (not installed, or ptrace not allowed here)."""


def strace_summary(path: str) -> Dict[str, List[float]]:
    """Parse strace -c's table: {syscall: [calls, failed calls, seconds]}, "total" among them.

    The seconds are the kernel's time in those calls as strace measures it,
    which tracing inflates: only their shares mean something. strace writes
    no table when what it traced made no system call.
    """
    counts: Dict[str, List[float]] = {"total": [0, 0, 0.0]}
    with open(path) as f:
        for line in f:
            fields = line.split()
            # % time, seconds, usecs/call, calls, [errors,] syscall
            if len(fields) in (5, 6) and fields[3].isdigit():
                counts[fields[-1]] = [int(fields[3]), int(fields[4]) if len(fields) == 6 else 0,
                                      float(fields[1])]
    return counts


def attach_strace(pid: int, out: str) -> "subprocess.Popen[str]":
    """Start strace -c on a running process (its threads too, and any child it starts).

    Returns once the kernel says the process is traced; raises StraceFailed
    with what strace said if it cannot attach.
    """
    if shutil.which("strace") is None:
        raise StraceFailed(STRACE_MISSING)
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-c", "-o", out, "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while tracer.poll() is None and time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            if any(line.split() == ["TracerPid:", str(tracer.pid)] for line in f):
                return tracer
        time.sleep(0.01)
    if tracer.poll() is None:
        tracer.kill()
    said = tracer.communicate()[1].strip()
    raise StraceFailed(f"strace could not attach: {said or 'no word from it in 30 s'}")


def detach(tracer: "subprocess.Popen[str]") -> None:
    """Stop strace: it detaches and writes its summary."""
    if tracer.poll() is None:
        tracer.send_signal(signal.SIGINT)
    try:
        tracer.wait(30)
    except subprocess.TimeoutExpired:
        tracer.kill()
        tracer.wait()


def traced_run(directory: str, kind: str, count: int) -> Dict[str, Dict[str, List[float]]]:
    """strace -c of each side over count exchanges, from the client's ready to its exit."""
    buffer = os.path.join(directory, "buf.txt")
    if kind == "floor":
        server = start_process(FLOOR_SERVER, directory)
        client: Tuple[str, ...] = (FLOOR_CLIENT, directory, str(count))
    else:
        server = start_process(ECHO_SERVER, PYZ, buffer, "auto")
        client = (LIBRARY_CLIENT, PYZ, buffer, str(count), "auto", "0")
    out = {side: os.path.join(directory, f"strace-{kind}-{count}-{side}.txt")
           for side in ("client", "server")}
    tracers: List[subprocess.Popen[str]] = []

    def attach(pid: int) -> None:
        tracers.append(attach_strace(server.pid, out["server"]))
        tracers.append(attach_strace(pid, out["client"]))
    try:
        run_client(*client, at_ready=attach)
    finally:
        for tracer in tracers:            # the client's has ended with it
            detach(tracer)
        stop(server)
    return {side: strace_summary(path) for side, path in out.items()}


def measure_syscalls(directory: str, count: int) -> Dict[str, Any]:
    """System calls per exchange of each side, of the floor and of the library.

    Each is a run of count exchanges less a run of none, divided by count:
    what is left is the exchanges' own, without the client's handshake with
    the benchmark and its exit.
    """
    result: Dict[str, Any] = {"exchanges": count}
    try:
        for kind in ("floor", "library"):
            runs = [traced_run(directory, kind, n) for n in (count, 0)]
            result[kind] = {
                side: {name: [(value - runs[1][side].get(name, [0, 0, 0.0])[i]) / count
                              for i, value in enumerate(values)]
                       for name, values in runs[0][side].items()}
                for side in ("client", "server")}
    except StraceFailed as e:
        return {"error": str(e)}
    return result


def rss(pid: int, field: str) -> int:
    """Return a running process's resident memory (VmRSS:) or its peak (VmHWM:), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """Return the CPU time a process has used, in seconds (nanosecond precision on Linux)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_runs(command: Sequence[str], count: int, cwd: str) -> List[float]:
    """Wall times of running a command count times."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def measure_cli(directory: str, count: int, flags: Sequence[str] = ("-I",)
                ) -> Tuple[List[float], List[float]]:
    """CLI exchanges against an auto-reply server, beside the start of an empty zipapp.

    Both run with flags: -I keeps the user's site-packages out of both; -S
    also keeps out what the interpreter's own site loads (.pth files may
    import modules filechat would otherwise import itself). The difference
    is filechat's own cost.
    """
    server = subprocess.Popen([sys.executable, PYZ, "server", "buf.txt", "--auto-reply", "pong"],
                              cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    assert server.stdout is not None
    while "Waiting for clients" not in server.stdout.readline():
        pass
    empty = os.path.join(directory, "empty")
    os.mkdir(empty)
    with open(os.path.join(empty, "__main__.py"), "w"):
        pass
    zipapp.create_archive(empty, empty + ".pyz")
    client = [sys.executable, *flags, PYZ, "client", "buf.txt", "--message", "ping"]
    cli: List[float] = []
    zipped: List[float] = []
    for _ in range(count):                    # interleaved, so that load hits both alike
        cli += timed_runs(client, 1, directory)
        zipped += timed_runs([sys.executable, *flags, empty + ".pyz"], 1, directory)
    server.terminate()
    server.wait(10)
    return cli, zipped


def measure_line(directory: str, clients: int, messages: int) -> Dict[str, Any]:
    """Forked client processes at once: throughput, latency, waits and order of service.

    A client is served when the server takes its message, as the server
    says. The bound on a client's wait is (place in line + 1) x 2 x the
    median exchange, an exchange being the time from being served to having
    the reply: the line adds little beyond serving those ahead.
    """
    buffer = os.path.join(directory, "buf.txt")
    server = start_process(ECHO_SERVER, PYZ, buffer, "auto", str(clients * messages + 1))
    out = os.path.join(directory, "records")
    os.mkdir(out)
    parent = subprocess.Popen([sys.executable, "-c", LINE_CLIENTS, PYZ, buffer, str(clients),
                               str(messages), out], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None and parent.stdout.readline() == "ready\n"
    failed = json.loads(parent.communicate("go\n", timeout=600)[0].splitlines()[-1])
    if failed:
        stop(server)
        raise RuntimeError(f"{len(failed)} of {clients} forked clients failed (see above)")
    records = []
    for name in os.listdir(out):
        with open(os.path.join(out, name)) as f:
            records += json.load(f)
    assert server.stdout is not None
    served = dict(json.loads(server.stdout.readline()))    # each message, when taken
    server.wait(10)
    for r in records:
        r["served"] = served[r["message"]]
    wall = max(r["done"] for r in records) - min(r["arrived"] for r in records)
    latencies = [r["done"] - r["arrived"] for r in records]
    service = statistics.median(r["done"] - r["served"] for r in records)
    # Order of service against order of arrival in line: a client arrives
    # when its ticket appears, or, if it found nobody waiting and took the
    # lock, when it takes it. Neither can be timed from outside the file
    # system exactly, so each arrival is the span between a timestamp taken
    # just before (the ticket's name; the ask) and one taken just after; a
    # process descheduled in between widens it. A pair counts as overtaken
    # when one surely arrived before the other (its span ended before the
    # other's began) yet was served after it.
    for r in records:
        r["in_line"], r["in_line_by"] = ((r["named"], r["queued"]) if "queued" in r
                                         else (r["asked"], r["locked"]))
    waits = [r["served"] - r["in_line"] for r in records]        # time spent in line
    by_arrival = sorted(records, key=lambda r: r["in_line"])
    overtaken = sum(1 for i, a in enumerate(by_arrival) for b in by_arrival[i + 1:]
                    if b["in_line"] > a["in_line_by"] and b["served"] < a["served"])
    # A client's place in line: how many others had arrived before it and
    # were not done yet (the one being served included), from the timestamps,
    # which unlike a count taken on arrival cannot race with other arrivals.
    places = [sum(1 for o in records if o["in_line"] < r["in_line"] < o["done"]) for r in records]
    over_bound = [w / ((p + 1) * 2 * service) for w, p in zip(waits, places)]
    return {"clients": clients, "count": len(records), "expected": clients * messages,
            "exchanges_per_s": len(records) / wall, "p50": quantile(latencies, 0.5),
            "p99": quantile(latencies, 0.99), "slowest": max(latencies),
            "median_exchange": service, "overtaken": overtaken, "max_place": max(places),
            "wait_vs_bound_p95": quantile(over_bound, 0.95)}


def measure_idle(directory: str, seconds: float) -> float:
    """CPU time an idle server uses over a number of seconds."""
    buffer = os.path.join(directory, "buf.txt")
    server = start_process(ECHO_SERVER, PYZ, buffer, "auto")
    time.sleep(0.5)                           # past start-up
    before = cpu_seconds(server.pid)
    time.sleep(seconds)
    used = cpu_seconds(server.pid) - before
    stop(server)
    return used


def measure_big(directory: str, size: int, count: int) -> Dict[str, float]:
    """A large message's round trip beside cp of a file that size, and peak memory.

    Through the library (message and reply held as text by the caller), and
    through the CLI: the message from a file (--message-file), the reply
    printed to a file, as a script sending a file would.
    """
    source = os.path.join(directory, "big.src")
    with open(source, "wb") as f:
        f.write(b"x" * size)
    cp = timed_runs(["cp", source, os.path.join(directory, "big.dst")], count, directory)
    times, memory, _ = measure_library(directory, count, False, size)
    cli = measure_big_cli(directory, source, count)
    return {"round_trip": statistics.median(times), "cp": statistics.median(cp),
            **{key: kib * 1024 for key, kib in memory.items()}, **cli}


def measure_big_cli(directory: str, source: str, count: int) -> Dict[str, float]:
    """CLI exchanges of the file source with an echo server: wall time and peak memory (bytes)."""
    buffer = os.path.join(directory, "cli-buf.txt")
    server = start_process(ECHO_SERVER, PYZ, buffer, "auto")
    server_baseline = rss(server.pid, "VmRSS:")
    reply = os.path.join(directory, "big.reply")
    runs = [run_json(SPAWN, reply, sys.executable, PYZ, "client", buffer, "--message-file",
                     source, "--max-bytes", str(64 * MIB), "--quiet") for _ in range(count)]
    server_peak = rss(server.pid, "VmHWM:")
    stop(server)
    if any(run["status"] for run in runs) or os.path.getsize(reply) != os.path.getsize(source):
        raise RuntimeError(f"a CLI exchange failed: {runs}")
    return {"cli_round_trip": statistics.median(run["time"] for run in runs),
            "cli_client_peak": max(run["maxrss"] for run in runs) * 1024,
            "cli_spawner": max(run["spawner"] for run in runs) * 1024,
            "cli_server_peak": server_peak * 1024, "cli_server_baseline": server_baseline * 1024}


def filesystem_of(path: str) -> str:
    """Return the type of the filesystem path is on, as /proc/self/mounts says."""
    best, kind = "", "unknown"
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mount = fields[1].replace("\\040", " ")
            if (path + "/").startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                best, kind = mount, fields[2]
    return kind


# --- Across hosts (--shared) ---
# Each setup's two mounts of one directory: a server on mount a as host
# "alpha", clients on mount b as host "beta", everything through the CLI of
# the zipapp, as people and scripts on two machines would run it.

SHARED_SETUPS = ("glusterfs", "glusterfs-nocache", "cephfs", "bindfs", "sshfs")
MODES = ("sequential", "4 at once")
# Median CLI exchange targets (seconds) for each mode, where the file server is a cluster's.
CLUSTER_TARGETS = {"glusterfs": (0.15, 0.25), "glusterfs-nocache": (0.15, 0.25),
                   "cephfs": (1.0, 2.0)}
CLIENT_TIMEOUT = 60         # the client's --timeout: the spec's
STATUS_WITHIN = 2.0         # seconds status may take to be right after a change
STATUS_LOOK = 5.0           # seconds status is looked at after a change, at most
STATUS_EVERY = 0.1          # seconds between looks
SLOW_REPLY = 6              # seconds the slow server takes to answer: past STATUS_LOOK
IDLE_SECONDS = 3.0          # seconds an idle server's system calls are counted over
KEPT = ("log.jsonl",)       # the only name a stopped server may leave behind: ours


def filechat_argv(host: str, *args: str) -> List[str]:
    """The zipapp's command line, run as another host (a UTS namespace of its own)."""
    return mounts.as_host(host, [sys.executable, PYZ, *args])


class Server:
    """A CLI server on side's buf.txt as host alpha, started and waited for.

    Its output is read by threads all along: a server whose pipe fills up
    would stop answering, and its stderr says what went wrong.
    """

    READY = "Waiting for clients"     # the line that says it is ready

    def __init__(self, side: str, *options: str) -> None:
        self.proc = subprocess.Popen(self.argv(*options), cwd=side, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.ready = threading.Event()
        self.stdout: List[str] = []
        self.stderr: List[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                        for stream, lines in ((self.proc.stdout, self.stdout),
                                              (self.proc.stderr, self.stderr))]
        for reader in self.readers:
            reader.start()
        if not self.ready.wait(60):
            self.stop()
            raise RuntimeError(f"the server did not start: {''.join(self.stderr)}")
        self.started = time.monotonic()

    def argv(self, *options: str) -> List[str]:
        return filechat_argv("alpha", "server", "buf.txt", *options)

    def _read(self, stream: IO[str], lines: List[str]) -> None:
        for line in stream:
            lines.append(line)
            if self.READY in line:
                self.ready.set()

    def interrupt(self) -> float:
        """Send SIGINT, as Ctrl+C; return when."""
        self.proc.send_signal(signal.SIGINT)
        return time.monotonic()

    def stop(self) -> List[str]:
        """Stop it as Ctrl+C does (killed if it takes 30 s); return what it said on stderr."""
        if self.proc.poll() is None:
            self.interrupt()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.stderr.append("bench.py: killed: not stopped 30 s after SIGINT\n")
        for reader in self.readers:       # what it said to the end
            reader.join(10)
        return [line.rstrip("\n") for line in self.stderr]


# The floor across hosts: the bare protocol as the specification has it and
# nothing of filechat, on the same mounts as the same hosts. Each client is a
# fresh interpreter (python -I -S: no site, no user environment), as host beta
# in the directory it uses; the server is one long-running interpreter, as
# host alpha in its directory (a spec server resolves the response path
# against its own). The client writes its request under a temp name of its
# own, takes the lock with O_CREAT|O_EXCL (looking again every LOCK s while it
# exists; where filechat asks the file server past the mount's cache of names,
# the floor too asks it with listxattr, and looks again at once if the lock is
# gone), renames the request over the buffer, and looks at its response
# file every REPLY s until it ends with ESC; then it removes the response file
# and prints the reply. The server looks at the buffer every BUFFER s until it
# holds a message that ends with ESC, renames its reply (the message) into
# place at the response path, removes the buffer and then the lock, and says
# the message on stdout. Both wait by sleeping: inotify sees nothing of
# another mount's changes. The intervals are filechat's (floor_intervals).
FLOOR_FLAGS = ("-I", "-S")
FLOOR_READ = r"""
import os, sys, time
def read(path):                   # b"" if it is not there
    data = b""
    try:
        file = os.open(path, os.O_RDONLY)
        try:
            chunk = os.read(file, 65536)
            while chunk:
                data += chunk
                chunk = os.read(file, 65536)
        finally:
            os.close(file)
    except OSError as e:
        if e.errno not in (2, 116):   # ENOENT; ESTALE: removed through another mount
            raise
    return data
def whole(data):                  # ends with ESC, on a line of its own or not
    return data.rstrip(b"\n").endswith(b"\x1b")
def text_of(data):                # what comes before ESC, less the newline before it
    text = data[:data.rindex(b"\x1b")]
    return text[:-1] if text.endswith(b"\n") else text
"""
FLOOR_SHARED_CLIENT = FLOOR_READ + r"""
message, reply = sys.argv[1], sys.argv[2]
lock_every, reply_every = float(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + float(sys.argv[5])
ask = sys.argv[6] == "ask"        # GlusterFS's md-cache keeps a removed name for up to 1 s
def later(what):
    if time.monotonic() > deadline:
        sys.exit("floor client: no %s within the timeout" % what)
temp = "." + reply + ".tmp"       # written before the lock is taken, as filechat's client does
file = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
os.write(file, reply.encode() + b"\n" + message.encode() + b"\n\x1b")
os.close(file)
while True:
    try:
        os.close(os.open("server.lock", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        break
    except FileExistsError:
        later("lock")
        if ask:
            try:
                os.listxattr("server.lock", follow_symlinks=False)
            except OSError as e:
                if e.errno in (2, 116):   # gone on the file server: at once, then
                    continue
        time.sleep(lock_every)
os.rename(temp, "buf.txt")
data = read(reply)
while not whole(data):
    later("reply")
    time.sleep(reply_every)
    data = read(reply)
os.unlink(reply)
sys.stdout.buffer.write(text_of(data))
"""
FLOOR_SHARED_SERVER = FLOOR_READ + r"""
import json, signal
every = float(sys.argv[1])
stopping = []                     # SIGTERM: once the message in hand is answered
signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
print("ready", flush=True)
while not stopping:
    data = read("buf.txt")
    if not whole(data):           # none yet (or not all of it)
        time.sleep(every)
        continue
    path, _, request = data.partition(b"\n")
    text = text_of(request)
    file = os.open(".reply.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.write(file, text + b"\n\x1b")
    os.close(file)
    os.rename(".reply.tmp", path)
    os.unlink("buf.txt")
    os.unlink("server.lock")      # last: the next client may write the buffer now
    print(json.dumps({"message": text.decode(), "outcome": "replied"}), flush=True)
"""


class FloorServer(Server):
    """The floor's server on side as host alpha; its stdout says each message it answered."""

    READY = "ready"

    def argv(self, *options: str) -> List[str]:
        return mounts.as_host("alpha", [sys.executable, *FLOOR_FLAGS, "-c", FLOOR_SHARED_SERVER,
                                        *options])

    def interrupt(self) -> float:
        """Send SIGTERM: it ends once it has answered what it holds; return when."""
        self.proc.terminate()
        return time.monotonic()

    def log(self) -> Tuple["Counter[str]", Set[str]]:
        """What it answered, as read_log says it of filechat's --log."""
        return count_log(line for line in self.stdout if line.startswith("{"))


def floor_intervals(a: str, b: str) -> Optional[Dict[str, float]]:
    """The floor's intervals: how often filechat looks on these mounts, as it picks it.

    filechat's client waits for the lock and for its reply with one waiter,
    whose interval Paths.waiting_mode picks (when it polls it looks for the
    lock at that interval; LOCK_RETRY_INTERVAL only spaces its "Server busy"
    lines); its server looks at the buffer at the interval waiting_mode
    picks for it. None where filechat would wait for inotify's events
    instead: there the floor would poll where filechat does not.
    """
    import filechat
    client = filechat.Paths(os.path.join(b, "buf.txt")).waiting_mode(
        None, None, filechat.RESPONSE_POLL_INTERVAL)
    server = filechat.Paths(os.path.join(a, "buf.txt")).waiting_mode(
        None, None, filechat.POLL_INTERVAL)
    if not (client[0] and server[0]):
        return None
    return {"lock": client[1], "reply": client[1], "buffer": server[1]}


def floor_asks(b: str) -> bool:
    """Whether the floor's client, refused the lock, asks the file server whether it is
    gone: where filechat does (a FUSE mount that keeps names, GlusterFS's md-cache for up
    to a second after another mount removed one), as filechat decides it."""
    import filechat
    return bool(filechat._names_cached(os.path.join(b, "server.lock")))


def floor_exchange(side: str, message: str, intervals: Dict[str, float], ask: bool
                   ) -> Dict[str, Any]:
    """One floor client as host beta, as exchange() runs filechat's."""
    reply = f"reply-{uuid.uuid4().hex[:12]}.txt"
    return timed_client(mounts.as_host("beta", [
        sys.executable, *FLOOR_FLAGS, "-c", FLOOR_SHARED_CLIENT, message, reply,
        repr(intervals["lock"]), repr(intervals["reply"]), str(CLIENT_TIMEOUT),
        "ask" if ask else "-"]), side, message)


# Processes of the mounts' file servers and clients, by the name /proc gives them.
FS_PROCESSES = ("glusterfsd", "glusterfs", "glusterd", "ceph-mon", "ceph-osd", "ceph-mds",
                "ceph-fuse", "bindfs", "sshfs", "sshd", "sftp-server")


def cpu_snapshot() -> Dict[str, Any]:
    """CPU seconds used so far: by the machine (all its CPUs busy, in clock ticks), by this
    benchmark and its ended children (the clients), and by each running process, its
    ended children included: {pid: [name, seconds]}."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        ticks = [int(field) for field in f.readline().split()[1:9]]
    processes: Dict[int, Tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:               # it has ended
            continue
        name, _, rest = stat[stat.index("(") + 1:].rpartition(")")
        fields = rest.split()         # utime, stime, cutime, cstime: the 12th to 15th
        processes[int(entry)] = (name, sum(int(field) for field in fields[11:15]) / tick)
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": time.monotonic(),
            "busy": (sum(ticks) - ticks[3] - ticks[4]) / tick,     # less idle and iowait
            "bench": own.ru_utime + own.ru_stime,
            "clients": children.ru_utime + children.ru_stime, "processes": processes}


def cpu_used(before: Dict[str, Any], after: Dict[str, Any], servers: Dict[str, int]
             ) -> "Counter[str]":
    """CPU seconds used between two snapshots, by whom; "other" is the rest of the machine's.

    Clients: the benchmark's children that ended in between (the exchanges'
    processes; the servers are its children too, but end later); each
    server by its pid; the file system's processes by name, those that ran
    throughout. Other: the rest, such as other users' work and the kernel's
    own threads.
    """
    used: Counter[str] = Counter()
    for key in ("wall", "busy", "bench", "clients"):
        used[key] = after[key] - before[key]
    common = before["processes"].keys() & after["processes"].keys()
    pids = {pid: name for name, pid in servers.items()}
    for pid in common:
        name, seconds = after["processes"][pid]
        if pid in pids:
            used[pids[pid]] += seconds - before["processes"][pid][1]
        elif name in FS_PROCESSES:
            used[f"fs {name}"] += seconds - before["processes"][pid][1]
    used["other"] = used["busy"] - sum(value for key, value in used.items()
                                       if key not in ("wall", "busy"))
    used["times"] = 1
    return used


def exchange(side: str, message: str) -> Dict[str, Any]:
    """One CLI client as host beta: what it printed, and its wall time from start to exit."""
    return timed_client(filechat_argv("beta", "client", "buf.txt", "-m", message,
                                      "--timeout", str(CLIENT_TIMEOUT)), side, message)


def timed_client(argv: List[str], side: str, message: str) -> Dict[str, Any]:
    """Run a client that sends message from side: what it printed, and its wall time."""
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=side, capture_output=True, text=True,
                              timeout=2 * CLIENT_TIMEOUT)
        status, reply, error = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired:
        status, reply, error = -1, "", f"bench.py: no exit within {2 * CLIENT_TIMEOUT} s"
    took = time.perf_counter() - start
    last = (error.strip().splitlines() or [""])[-1]
    return {"message": message, "time": took, "status": status, "reply": reply,
            "error": f"exit {status}: {last}" if status else None}


Send = Callable[[str, str], Dict[str, Any]]     # a client: (side, message) -> its record


def at_once(side: str, tag: str, rounds: int, clients: int = 4, send: Send = exchange
            ) -> List[Dict[str, Any]]:
    """Rounds of clients started together, each round once the last has ended."""
    records: List[Dict[str, Any]] = []
    with ThreadPoolExecutor(clients) as pool:
        for r in range(rounds):
            messages = [f"{tag} round {r} client {i}" for i in range(clients)]
            records += pool.map(functools.partial(send, side), messages)
    return records


def read_log(path: str) -> Tuple["Counter[str]", Set[str]]:
    """How often the server's --log names each message, and which it says it replied to."""
    with open(path, encoding="utf-8") as f:
        return count_log(f)


def count_log(lines: Iterable[str]) -> Tuple["Counter[str]", Set[str]]:
    """How often a log's JSON lines name each message, and which say it was replied to."""
    logged: Counter[str] = Counter()
    replied: Set[str] = set()
    for line in lines:
        record = json.loads(line)
        logged[record["message"]] += 1
        if record["outcome"] == "replied":
            replied.add(record["message"])
    return logged, replied


def tally(records: List[Dict[str, Any]], logged: "Counter[str]", replied: Set[str]
          ) -> Dict[str, Any]:
    """Delivered: logged once, as replied, and printed back right by its own client.

    Both ends count: a server that answers twice, or a client that prints
    another's reply, would each look fine from one end alone.
    """
    times = [r["time"] for r in records]
    return {
        "attempted": len(records),
        "delivered": sum(1 for r in records if logged[r["message"]] == 1
                         and r["message"] in replied and not r["status"]
                         and r["reply"] == r["message"]),
        "duplicates": sum(1 for r in records if logged[r["message"]] > 1),
        "wrong": sum(1 for r in records if not r["status"] and r["reply"] != r["message"]),
        "failures": [r["error"] for r in records if r["status"]],
        "median": statistics.median(times), "max": max(times)}


def shared_exchanges(a: str, b: str, count: int, rounds: int,
                     floor: Optional[Tuple[str, str]] = None) -> Dict[str, Any]:
    """Sequential exchanges, then rounds of 4 at once, from beta on b to alpha on a.

    With floor (another directory, as mounts a and b see it), the floor's
    too, with a server of its own there: interleaved with filechat's,
    exchange by exchange and round by round, both servers running all along,
    so that the machine's load weighs on both alike. The CPU time each
    exchange and round used is counted (cpu_used), and summed by kind and mode.
    """
    servers: Dict[str, Server] = {"filechat": Server(a, "--auto-reply-cmd", "cat",
                                                     "--log", "log.jsonl")}
    clients: Dict[str, Tuple[str, Send]] = {"filechat": (b, exchange)}
    intervals = floor_intervals(*floor) if floor is not None else None
    tag = uuid.uuid4().hex[:8]
    records: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    cpu: Dict[str, Dict[str, Counter[str]]] = {}
    try:
        if floor is not None and intervals is not None:
            servers["floor"] = FloorServer(floor[0], repr(intervals["buffer"]))
            ask = floor_asks(floor[1])
            clients["floor"] = (floor[1], functools.partial(floor_exchange,
                                                            intervals=intervals, ask=ask))
        pids = {f"{kind} server": server.proc.pid for kind, server in servers.items()}
        records = {kind: {mode: [] for mode in MODES} for kind in clients}
        cpu = {kind: {mode: Counter() for mode in MODES} for kind in clients}
        with ThreadPoolExecutor(4) as pool:
            def run(kind: str, mode: str, messages: List[str]) -> None:
                side, send = clients[kind]
                before = cpu_snapshot()
                records[kind][mode] += pool.map(functools.partial(send, side), messages)
                cpu[kind][mode].update(cpu_used(before, cpu_snapshot(), pids))
            for i in range(count):
                for kind in clients:
                    run(kind, "sequential", [f"{tag} {kind} sequential {i}"])
            for r in range(rounds):
                for kind in clients:
                    run(kind, "4 at once", [f"{tag} {kind} round {r} client {n}"
                                            for n in range(4)])
    finally:
        said = {kind: server.stop() for kind, server in servers.items()}
    logged, replied = read_log(os.path.join(a, "log.jsonl"))
    result: Dict[str, Any] = {
        "modes": {mode: tally(records["filechat"][mode], logged, replied) for mode in MODES},
        "server_stderr": said["filechat"], "floor": None,
        "cpu": {kind: {mode: dict(used) for mode, used in modes.items()}
                for kind, modes in cpu.items()}}
    if "floor" in clients:
        logged, replied = cast(FloorServer, servers["floor"]).log()
        result["floor"] = {
            "modes": {mode: tally(records["floor"][mode], logged, replied) for mode in MODES},
            "server_stderr": said["floor"], "intervals": intervals, "asks": ask}
    return result


def shared_idle(a: str, floor: str) -> Dict[str, Any]:
    """What a server asks of the file system while no client comes: its system calls per
    second (each on a file there is at least one request to the file server), filechat's
    server and then the floor's, each running alone; {} without strace."""
    intervals = floor_intervals(a, a)
    kinds: Dict[str, Callable[[], Server]] = {
        "filechat": lambda: Server(a, "--auto-reply-cmd", "cat")}
    if intervals is not None:
        kinds["floor"] = lambda: FloorServer(floor, repr(intervals["buffer"]))
    result: Dict[str, Any] = {}
    for kind, start in kinds.items():
        server = start()
        out = os.path.join(a, f"strace-idle-{kind}.txt")
        try:
            time.sleep(0.5)               # past its start
            tracer = attach_strace(server.proc.pid, out)
            time.sleep(IDLE_SECONDS)
            detach(tracer)
            calls = strace_summary(out)
        except StraceFailed:
            return {}
        finally:
            server.stop()
            if os.path.exists(out):
                os.unlink(out)
        result[kind] = {name: counted[0] / IDLE_SECONDS for name, counted in calls.items()}
    return result


def status_of(host: str, side: str) -> Optional[Dict[str, Any]]:
    """What `filechat status buf.txt --json` says, as host on side (None: no JSON)."""
    done = subprocess.run(filechat_argv(host, "status", "buf.txt", "--json"), cwd=side,
                          capture_output=True, text=True, timeout=30)
    try:
        return dict(json.loads(done.stdout))
    except ValueError:
        return None


def said(report: Optional[Dict[str, Any]]) -> str:
    """A status report in a few words, for the JSON results when it was not right."""
    if report is None:
        return "no JSON"
    return (f"server {'running' if report['server'] else 'none'}, lock "
            f"{report['lock']['state']}, being answered {report['being_answered']}")


def time_to_right(host: str, side: str, right: Callable[[Dict[str, Any]], bool],
                  since: float) -> Dict[str, Any]:
    """Look at status until it is right, up to STATUS_LOOK s after since.

    The time is when the look that was right returned: what a person or a
    script asking then would have learned, the look's own cost included.
    """
    report = None
    while time.monotonic() - since <= STATUS_LOOK:
        began = time.monotonic()
        report = status_of(host, side)
        if report is not None and right(report):
            return {"after": time.monotonic() - since, "look": time.monotonic() - began,
                    "said": said(report)}
        time.sleep(max(0.0, STATUS_EVERY - (time.monotonic() - began)))
    return {"after": None, "look": None, "said": said(report)}


def from_both(a: str, b: str, right: Callable[[Dict[str, Any]], bool], since: float
              ) -> Dict[str, Any]:
    """time_to_right from alpha on a and beta on b at once."""
    with ThreadPoolExecutor(2) as pool:
        looks = [pool.submit(time_to_right, host, side, right, since)
                 for host, side in (("alpha", a), ("beta", b))]
        return {"a": looks[0].result(), "b": looks[1].result()}


def running(report: Dict[str, Any]) -> bool:
    return report["server"] is not None


def held(report: Dict[str, Any]) -> bool:
    return bool(report["lock"]["held"]) and report["lock"]["state"] in ("alive",
                                                                         "being answered")


def stopped(report: Dict[str, Any]) -> bool:
    return report["server"] is None


def shared_status(a: str, b: str) -> Dict[str, Any]:
    """Whether status on either side is right within STATUS_WITHIN s of each change.

    The changes: a server starts; a client on beta takes the lock and waits
    for a slow reply; the server stops on SIGINT. Another host's files are
    seen through caches and judged by heartbeats, so each side may lag.
    """
    server = Server(a, "--auto-reply-cmd", f"sleep {SLOW_REPLY}; cat")
    checks = {"server started": from_both(a, b, running, server.started)}
    sent = time.monotonic()
    client = subprocess.Popen(filechat_argv("beta", "client", "buf.txt", "-m", "slow"), cwd=b,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checks["lock held"] = from_both(a, b, held, sent)
    client.communicate(timeout=2 * CLIENT_TIMEOUT)
    checks["server stopped"] = from_both(a, b, stopped, server.interrupt())
    server.stop()
    return checks


def shared_dead_lock(a: str, b: str) -> Dict[str, Any]:
    """A client on host beta dies holding the lock; one on alpha then sends.

    lock_wait, as the client's --json says it, is how long the dead
    holder's lock kept it waiting.
    """
    env = dict(os.environ, FILECHAT_CRASH_AT="client-locked")
    subprocess.run(filechat_argv("beta", "client", "buf.txt", "-m", "never sent"), cwd=b,
                   env=env, capture_output=True, timeout=60)
    if not os.path.exists(os.path.join(a, "server.lock")):
        raise RuntimeError("the dying client left no lock")
    server = Server(a, "--auto-reply-cmd", "cat")
    done = subprocess.run(filechat_argv("alpha", "client", "buf.txt", "-m", "after the dead one",
                                        "--json"),
                          cwd=a, capture_output=True, text=True, timeout=120)
    server.stop()
    record = json.loads(done.stdout)
    return {"lock_wait": record["lock_wait"], "ok": record["reply"] == "after the dead one",
            "error": record["error"]}


def shared_live_holder(a: str, b: str, stale_after: float) -> Dict[str, Any]:
    """An exchange 10 x longer than --stale-after, with a client on another host behind it."""
    def cli(host: str, side: str, *args: str) -> "subprocess.Popen[str]":
        return subprocess.Popen(filechat_argv(host, *args), cwd=side, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    server = Server(a, "--auto-reply-cmd", f"sleep {10 * stale_after:g}; cat",
                    "--stale-after", f"{stale_after:g}",
                    "--hook-timeout", f"{20 * stale_after + 10:g}")
    slow = cli("beta", b, "client", "buf.txt", "-m", "slow", "--stale-after", f"{stale_after:g}")
    time.sleep(stale_after)       # a benchmark, not a test: the one behind comes later
    behind = cli("gamma", a, "client", "buf.txt", "-m", "behind",
                 "--stale-after", f"{stale_after:g}")
    outputs = [proc.communicate(timeout=120) for proc in (slow, behind)]
    server.stop()
    broken = sum(err.count("removed stale lock") for _, err in outputs)
    return {"held": 10 * stale_after, "broken": broken,
            "ok": [out for out, _ in outputs] == ["slow", "behind"]}


def leftovers(dirs: Dict[str, Tuple[str, str]]) -> List[str]:
    """Names left in each step's directory once its server stopped, as each mount lists it."""
    return [f"{step}: {name} (mount {mount})" for step, (a, b) in dirs.items()
            for mount, side in (("a", a), ("b", b))
            for name in sorted(os.listdir(side)) if name not in KEPT]


def shared_setup(made: mounts.Mounts, setup: str, quick: bool) -> Dict[str, Any]:
    """Every measurement on one setup, each step in a directory of its own."""
    started = time.monotonic()
    dirs: Dict[str, Tuple[str, str]] = {}

    def fresh(step: str) -> Tuple[str, str]:
        a, b = made.fresh_dir(setup)
        dirs[step] = (str(a), str(b))
        return dirs[step]
    result = {"setup": setup, "loadavg": loadavg(),
              **shared_exchanges(*fresh("exchanges"), 3 if quick else 24, 1 if quick else 6,
                                 fresh("floor")),
              "idle": shared_idle(fresh("idle")[0], fresh("idle floor")[0]),
              "status": shared_status(*fresh("status")),
              "dead": shared_dead_lock(*fresh("dead holder")),
              "live": shared_live_holder(*fresh("live holder"), 0.3 if quick else 1.0)}
    return {**result, "leftovers": leftovers(dirs), "seconds": time.monotonic() - started}


def loadavg() -> str:
    """The machine's load averages over 1, 5 and 15 minutes, as /proc/loadavg says them."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def shared_local(made: mounts.Mounts, quick: bool) -> Dict[str, Any]:
    """The same exchanges in a local directory: what bindfs and sshfs add to."""
    local = made.base / "local"
    local.mkdir()
    result = shared_exchanges(str(local), str(local), 3 if quick else 24, 1 if quick else 6)
    return {"setup": f"local ({filesystem_of(str(local))})", "loadavg": loadavg(), **result}


def run_shared(quick: bool, setups: Sequence[str] = SHARED_SETUPS) -> Dict[str, Any]:
    """Measure each mount setup across hosts, beside the local directory."""
    why = mounts.why_not(setups)
    if why is not None:
        raise SystemExit(f"bench.py --shared: cannot mount: {why}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="filechat-bench-shared-") as root:
        made = mounts.Mounts(Path(root), setups).start()
        try:
            local = shared_local(made, quick)
            results = [shared_setup(made, setup, quick) for setup in setups]
            timings = dict(made.timings)
        finally:
            made.stop()
    return {"local": local, "setups": results, "quick": quick, "mount_timings": timings,
            "seconds": time.monotonic() - started,
            "poll": filechat_constant("SHARED_POLL_INTERVAL"),
            "heartbeat": filechat_constant("HEARTBEAT_INTERVAL"),
            "lock_retry": filechat_constant("LOCK_RETRY_INTERVAL")}


def filechat_constant(name: str) -> float:
    """One of filechat's constants, which the targets derive from."""
    sys.path.insert(0, ROOT)
    import filechat
    return float(getattr(filechat, name))


def exchange_target(r: Dict[str, Any], setup: str, mode: str) -> Optional[float]:
    """A mode's median target on a setup: a cluster's own, else 3 polls beyond local."""
    if setup in CLUSTER_TARGETS:
        return CLUSTER_TARGETS[setup][MODES.index(mode)]
    if setup in ("bindfs", "sshfs"):
        return float(3 * r["poll"] + r["local"]["modes"][mode]["median"])
    return 0.2 if setup == "bindfs-cached" else None


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def all_right(row: Dict[str, Any], target: Optional[float]) -> bool:
    """True if every exchange of row arrived once and right, its median within target."""
    return (row["delivered"] == row["attempted"] and not row["duplicates"] and not row["wrong"]
            and (target is None or row["median"] <= target))


def target_cell(target: Optional[float]) -> str:
    """A median target as a table cell ("" if none)."""
    return "" if target is None else "<= " + fmt_ms(target)


def exchanges_table(r: Dict[str, Any]) -> List[str]:
    """One row per setup and mode: what arrived, and how fast, beside its target."""
    out = ["| setup | mode | delivered | duplicates | wrong | failures | median | max | "
           "target (median) | met |", "|" + " --- |" * 10]
    for result in [r["local"], *r["setups"]]:
        for mode in MODES:
            row = result["modes"][mode]
            target = exchange_target(r, result["setup"], mode)
            out.append(f"| {result['setup']} | {mode} | {row['delivered']} of "
                       f"{row['attempted']} | {row['duplicates']} | {row['wrong']} | "
                       f"{len(row['failures'])} | {fmt_ms(row['median'])} | "
                       f"{fmt_ms(row['max'])} | {target_cell(target)} | "
                       f"{met(all_right(row, target))} |")
    return out


def floor_table(r: Dict[str, Any]) -> List[str]:
    """One row per setup and mode: filechat's exchange beside the floor's, measured together."""
    out = ["| setup | mode | filechat median | floor median | filechat / floor | filechat max | "
           "floor max | floor delivered | target (median) | floor met | floor looks every, s: "
           "lock / reply / buffer |", "|" + " --- |" * 11]
    for result in r["setups"]:
        floor = result.get("floor")
        if floor is None:
            continue
        every = " / ".join(f"{floor['intervals'][key]:g}" for key in ("lock", "reply", "buffer"))
        every += " (lock: + listxattr)" if floor["asks"] else ""
        for mode in MODES:
            mine, bare = result["modes"][mode], floor["modes"][mode]
            target = exchange_target(r, result["setup"], mode)
            out.append(f"| {result['setup']} | {mode} | {fmt_ms(mine['median'])} | "
                       f"{fmt_ms(bare['median'])} | {mine['median'] / bare['median']:.2f} | "
                       f"{fmt_ms(mine['max'])} | {fmt_ms(bare['max'])} | {bare['delivered']} of "
                       f"{bare['attempted']} | {target_cell(target)} | "
                       f"{met(all_right(bare, target))} | {every} |")
    return out


def cpu_table(r: Dict[str, Any]) -> List[str]:
    """One row per setup, kind and mode: where the CPU time of an exchange or round went."""
    cpus = os.cpu_count() or 1
    out = ["| setup | kind | mode | wall | machine busy | clients | filechat server | "
           "floor server | file system (by process name) | bench.py | other |",
           "|" + " --- |" * 11]
    for result in [r["local"], *r["setups"]]:
        for kind, modes in result["cpu"].items():
            for mode, used in modes.items():
                def ms(key: str, used: Dict[str, float] = used) -> str:
                    return f"{1000 * used.get(key, 0.0) / used['times']:.0f}"
                fs = sorted((key for key in used if key.startswith("fs ")),
                            key=lambda key, used=used: -used[key])    # type: ignore[misc]
                busy = used["busy"] / (cpus * used["wall"])
                out.append(f"| {result['setup']} | {kind} | {mode} | {ms('wall')} | {ms('busy')} "
                           f"({100 * busy:.0f} % of {cpus} CPUs) | {ms('clients')} | "
                           f"{ms('filechat server')} | {ms('floor server')} | "
                           + ", ".join(f"{key[3:]} {ms(key)}" for key in fs
                                       if 1000 * used[key] / used["times"] >= 0.5)
                           + f" | {ms('bench')} | {ms('other')} |")
    return out


def idle_table(r: Dict[str, Any]) -> List[str]:
    """One row per setup and kind: the system calls an idle server makes each second."""
    out = ["| setup | idle server | system calls per s | the most made, per s |",
           "|" + " --- |" * 4]
    for result in r["setups"]:
        for kind, calls in result["idle"].items():
            most = sorted((name for name in calls if name != "total"), key=lambda n: -calls[n])
            out.append(f"| {result['setup']} | {kind} | {calls['total']:.0f} | "
                       + ", ".join(f"{name} {calls[name]:.0f}" for name in most[:6]) + " |")
    return out


def lag(look: Dict[str, Any]) -> str:
    return "never" if look["after"] is None else f"{look['after']:.2f}"


def faults_table(r: Dict[str, Any]) -> List[str]:
    """One row per setup: status's lag, the dead and live holders, what was left behind."""
    beats = 3 * r["heartbeat"]
    out = ["| setup | status right after, s (a / b): started | lock held | stopped | "
           f"<= {STATUS_WITHIN:g} s | dead holder cleared after | <= {beats:g} s "
           "(3 heartbeats) | live holder broken | leftovers |",
           "|" + " --- |" * 9]
    for result in r["setups"]:
        looks = [look for check in result["status"].values() for look in check.values()]
        quick = all(look["after"] is not None and look["after"] <= STATUS_WITHIN
                    for look in looks)
        dead, live = result["dead"], result["live"]
        wait = dead["lock_wait"]
        cleared = dead["ok"] and wait is not None and wait <= beats
        out.append(
            f"| {result['setup']} | "
            + " | ".join(" / ".join(lag(check[side]) for side in ("a", "b"))
                         for check in result["status"].values())
            + f" | {met(quick)} | "
            + ("failed" if wait is None else f"{wait:.2f} s") + f" | {met(cleared)} | "
            + f"{live['broken']} (held {live['held']:g} s): "
            + met(live["ok"] and not live["broken"])
            + f" | {', '.join(result['leftovers']) or 'none'} |")
    return out


def shared_table(r: Dict[str, Any]) -> str:
    """Format run_shared's measurements as Markdown tables, and the failures' messages."""
    out = [*exchanges_table(r), "", *floor_table(r), "", *cpu_table(r), "", *idle_table(r), "",
           *faults_table(r)]
    for result in [r["local"], *r["setups"]]:
        for mode in MODES:
            for error in sorted(set(result["modes"][mode]["failures"])):
                out.append(f"\n{result['setup']}, {mode}: a client failed: {error}")
            if result.get("floor"):
                for error in sorted(set(result["floor"]["modes"][mode]["failures"])):
                    out.append(f"\n{result['setup']}, {mode}: a floor client failed: {error}")
        if result.get("floor") and result["floor"]["server_stderr"]:
            out.append(f"\n{result['setup']}: the floor server said: "
                       + " / ".join(result["floor"]["server_stderr"][-3:]))
    looks = [look["look"] for result in r["setups"] for check in result["status"].values()
             for look in check.values() if look["look"] is not None]
    if looks:
        out.append("\nStatus: the time is when the look that was right returned; the "
                   f"slowest such look itself took {max(looks):.2f} s")
    note = " (--quick: counts too small to mean anything)" if r["quick"] else ""
    took = ", ".join(f"{result['setup']} {result['seconds']:.0f} s" for result in r["setups"])
    loads = "; ".join(f"{result['setup']} {result['loadavg']}"
                      for result in [r["local"], *r["setups"]])
    return "\n".join(out) + (
        f"\n\nClients on mount b as host beta, the server on mount a as host alpha; poll "
        f"interval {r['poll']:g} s, heartbeat {r['heartbeat']:g} s; bindfs and sshfs target: "
        f"3 x the poll interval + the local exchange. Run took {r['seconds']:.0f} s "
        f"({took}){note}"
        f"\n\nFloor: the bare protocol and nothing of filechat, in a directory of its own on "
        f"the same mounts as the same hosts: each client a fresh `python {' '.join(FLOOR_FLAGS)} "
        "-c` (filechat's: `python filechat.pyz client`), which writes its request to a temp "
        "file, takes the lock (O_CREAT|O_EXCL), renames the request over the buffer and looks "
        "for its reply until it ends with ESC, then removes it (refused the lock, it asks "
        "the file server with listxattr whether it is gone where filechat does, past GlusterFS's "
        "md-cache); its server, one process, looks "
        "at the buffer, renames the reply into place, removes the buffer, then the lock "
        "(filechat's answers through --auto-reply-cmd cat). It looks as often as filechat does "
        "there (Paths.waiting_mode: the client for its lock and reply, the server for the "
        f"buffer; LOCK_RETRY_INTERVAL {r['lock_retry']:g} s spaces only filechat's \"Server "
        "busy\" lines). Interleaved with filechat's exchanges, one by one and round by round, "
        "both servers running all along."
        "\n\nCPU: milliseconds per exchange (sequential) or per round of 4 (4 at once), "
        "from /proc: machine busy is every CPU's; clients are the exchanges' processes; the "
        "file system's processes are named as /proc names them; other is the rest of the "
        "machine's (other users' work, the kernel's threads)."
        f"\n\nIdle server: each alone on mount a, {IDLE_SECONDS:g} s with no client, under "
        "strace -c: its system calls per second (the floor's server looks at its buffer as "
        "often as filechat's polls)."
        f"\n\nLoad average (1, 5, 15 min) as each setup began: {loads}")


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms" if seconds < 0.01 else f"{seconds * 1000:.1f} ms"


def run(quick: bool, where: Optional[str] = None) -> Dict[str, Any]:
    """Take every measurement, in a new directory in where (default: the temp dir)."""
    n = 20 if quick else 2000
    with tempfile.TemporaryDirectory(prefix="filechat-bench-", dir=where) as directory:
        filesystem = filesystem_of(directory)

        def fresh(name: str) -> str:
            path = os.path.join(directory, name)
            os.mkdir(path)
            return path
        # Floor and library in alternating rounds, so that a change in the
        # machine's load during the run weighs on both alike, and in one
        # directory: what creating a file costs differs from one directory
        # to another on some filesystems (ext4 without a journal, here, by
        # up to 100 x), and both sides create files on every exchange.
        floor: List[float] = []
        library: List[float] = []
        cpu = {kind: dict.fromkeys(("client", "client_system", "server", "server_system",
                                    "exchanges"), 0.0) for kind in ("floor", "library")}
        rounds = 2 if quick else 10
        shared = fresh("round-trips")
        for _ in range(rounds):
            times, used = measure_floor(shared, n // rounds)
            floor += times
            cpu["floor"] = {key: cpu["floor"][key] + used[key] for key in used}
            times, _, used = measure_library(shared, n // rounds, False)
            library += times
            cpu["library"] = {key: cpu["library"][key] + used[key] for key in used}
        # strace slows what it traces many times over: its own runs, untimed.
        syscalls = measure_syscalls(fresh("syscalls"), 3 if quick else 200)
        spec, _, _ = measure_library(fresh("spec"), 3 if quick else 12, True)
        cli, zipped = measure_cli(fresh("cli"), 3 if quick else 30)
        bare_cli, bare_zipped = measure_cli(fresh("cli-bare"), 3 if quick else 30, ("-I", "-S"))
        lines = [measure_line(fresh(f"line{clients}"), clients, 3 if quick else messages)
                 for clients, messages in ((2, 150), (4, 75), (16, 20))]
        idle = measure_idle(fresh("idle"), 1 if quick else 10)
        big = measure_big(fresh("big"), (1 if quick else 10) * MIB, 1 if quick else 5)
    return {
        "machine": f"{platform.node()}: {platform.machine()}, {os.cpu_count()} cores, "
                   f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        "filesystem": filesystem,
        "quick": quick,
        "floor_median": statistics.median(floor), "floor_p99": quantile(floor, 0.99),
        "library_median": statistics.median(library), "library_p99": quantile(library, 0.99),
        "library_per_s": len(library) / sum(library),
        "cpu_per_exchange": {kind: {side: used[side] / used["exchanges"]
                                    for side in used if side != "exchanges"}
                             for kind, used in cpu.items()},
        "syscalls_per_exchange": syscalls,
        "spec_median": statistics.median(spec),
        "cli_median": statistics.median(cli), "empty_zipapp_median": statistics.median(zipped),
        "bare_cli_cost": statistics.median(bare_cli) - statistics.median(bare_zipped),
        "lines": lines, "idle_cpu_10s": idle * (10 if quick else 1),
        "big": big, "big_size": (1 if quick else 10) * MIB,
    }


def table(r: Dict[str, Any]) -> str:
    """Format the measurements as a Markdown table, each beside its target."""
    big, size = r["big"], r["big_size"]
    floor = r["floor_median"]

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    rows = [
        ("floor: the bare protocol, round trip, median", fmt_ms(floor), "", ""),
        ("floor, p99 (how noisy this machine is)", fmt_ms(r["floor_p99"]),
         f"{r['floor_p99'] / floor:.2f} x floor median", ""),
        ("library send()/serve() round trip, median", fmt_ms(r["library_median"]),
         f"{r['library_median'] / floor:.2f} x floor median", "<= 3 x",
         met(r["library_median"] <= 3 * floor)),
        ("library round trip, p99", fmt_ms(r["library_p99"]),
         f"{r['library_p99'] / r['floor_p99']:.2f} x floor p99", "<= 8 x",
         met(r["library_p99"] <= 8 * r["floor_p99"])),
        ("library exchanges per second", f"{r['library_per_s']:.0f}/s", "", ""),
        *cost_rows(r),
        ("spec's pace (--poll, spec intervals), median", fmt_ms(r["spec_median"]),
         f"{r['spec_median'] / r['library_median']:.0f} x filechat's", ""),
        ("CLI exchange (python -I filechat.pyz client), median", fmt_ms(r["cli_median"]),
         "", ""),
        ("  start of an empty zipapp (python -I empty.pyz), median",
         fmt_ms(r["empty_zipapp_median"]), "", ""),
        ("  filechat's own cost: the difference", fmt_ms(r["cli_median"] -
                                                       r["empty_zipapp_median"]), "",
         "<= 10 ms", met(r["cli_median"] - r["empty_zipapp_median"] <= 0.010)),
        ("  the same with -I -S (nothing loaded by the interpreter's site)",
         fmt_ms(r["bare_cli_cost"]), "", ""),
    ]
    for line in r["lines"]:
        share = line["exchanges_per_s"] / r["library_per_s"]
        rows += [
            (f"{line['clients']} forked clients: answered", f"{line['count']} of "
             f"{line['expected']}", "", "all", met(line["count"] == line["expected"])),
            ("  exchanges per second, together", f"{line['exchanges_per_s']:.0f}/s",
             f"{100 * share:.0f} % of one client's", ">= 50 %", met(share >= 0.5)),
            ("  latency p50 / p99 / slowest",
             f"{fmt_ms(line['p50'])} / {fmt_ms(line['p99'])} / {fmt_ms(line['slowest'])}",
             "", "none over 100 ms", met(line["slowest"] <= 0.1)),
            ("  pairs served out of their order of arrival", f"{line['overtaken']}",
             f"most ahead {line['max_place']}", "0", met(line["overtaken"] == 0)),
            ("  95th percentile of wait / ((place + 1) x 2 x median exchange)",
             f"{line['wait_vs_bound_p95']:.2f}",
             f"median exchange {fmt_ms(line['median_exchange'])}", "<= 1",
             met(line["wait_vs_bound_p95"] <= 1)),
        ]
    added = big["client_peak"] - big["client_baseline"] - size    # less the reply it returns
    rows += [
        ("idle server CPU time over 10 s", fmt_ms(r["idle_cpu_10s"]), "", "< 10 ms",
         met(r["idle_cpu_10s"] < 0.010)),
        (f"{size // MIB} MiB message, library round trip", fmt_ms(big["round_trip"]),
         f"{big['round_trip'] / big['cp']:.1f} x cp ({fmt_ms(big['cp'])})", "<= 5 x cp",
         met(big["round_trip"] <= 5 * big["cp"])),
        ("  send() with text: peak above the caller's message and reply",
         f"{added / MIB:.1f} MiB", f"{added / size:.2f} x the message", "<= 1.5 x",
         met(added <= 1.5 * size)),
        (f"{size // MIB} MiB CLI exchange (--message-file, reply to a file)",
         fmt_ms(big["cli_round_trip"]), f"{big['cli_round_trip'] / big['cp']:.1f} x cp", ""),
        ("  peak memory of the CLI client", f"{big['cli_client_peak'] / MIB:.1f} MiB",
         f"{big['cli_client_peak'] / size:.2f} x the message", "<= 3 x",
         met(big["cli_client_peak"] <= 3 * size)),
        ("  peak memory of the server", f"{big['cli_server_peak'] / MIB:.1f} MiB",
         f"{big['cli_server_peak'] / size:.2f} x the message", "<= 3 x",
         met(big["cli_server_peak"] <= 3 * size)),
        ("    of which the server before the message", f"{big['cli_server_baseline'] / MIB:.1f}"
         " MiB", f"{big['cli_server_baseline'] / size:.2f} x the message", ""),
    ]
    out = ["| measure | filechat | ratio | target | met |", "| --- | --- | --- | --- | --- |"]
    out += ["| " + " | ".join((*row, "", "")[:5]) + " |" for row in rows]
    note = " (--quick: counts too small to mean anything)" if r["quick"] else ""
    return ("\n".join(out) + f"\n\nMachine: {r['machine']}; files on {r['filesystem']}{note}"
            + top_syscalls(r["syscalls_per_exchange"]))


def cost_rows(r: Dict[str, Any]) -> List[Tuple[str, ...]]:
    """CPU time and system calls per exchange of each side, beside the floor's."""
    cpu, syscalls = r["cpu_per_exchange"], r["syscalls_per_exchange"]
    rows: List[Tuple[str, ...]] = []
    for side in ("client", "server"):
        mine, floor = cpu["library"][side], cpu["floor"][side]
        kernel = cpu["library"][f"{side}_system"]
        rows.append((f"  {side}: CPU time per exchange (children included)",
                     f"{fmt_ms(mine)}, {100 * kernel / mine:.0f} % in the kernel",
                     f"{mine / floor:.1f} x floor's {fmt_ms(floor)} "
                     f"({100 * cpu['floor'][f'{side}_system'] / floor:.0f} %)", ""))
    if "error" in syscalls:
        return [*rows, ("  system calls per exchange", "not measured", syscalls["error"], "")]
    for side in ("client", "server"):
        mine, floor = (syscalls[kind][side]["total"][0] for kind in ("library", "floor"))
        rows.append((f"  {side}: system calls per exchange (strace -c)", f"{mine:.1f}",
                     f"{mine / floor:.1f} x floor's {floor:.1f}", ""))
    return rows


def top_syscalls(syscalls: Dict[str, Any], most: int = 10) -> str:
    """Each side's most frequent system calls per exchange, with how many of them failed."""
    if "error" in syscalls:
        return f"\n\nSystem calls not measured: {syscalls['error']}"
    out = [f"\n\nSystem calls per exchange, most frequent first (strace -c over "
           f"{syscalls['exchanges']} exchanges less a run of none), with how many failed and "
           "their share of the kernel's time in system calls, as strace saw it:"]
    for kind in ("library", "floor"):
        for side in ("client", "server"):
            counts = syscalls[kind][side]
            ranked = sorted((name for name in counts if name != "total"),
                            key=lambda name: -counts[name][0])
            kernel = counts["total"][2] or 1.0
            out.append(f"* {kind} {side}, {counts['total'][0]:.1f}: " + ", ".join(
                f"{name} {calls:.1f} ("
                + (f"{failed:.1f} failed, " if failed >= 0.05 else "")
                + f"{100 * seconds / kernel:.0f} %)"
                for name, (calls, failed, seconds) in ((name, counts[name])
                                                        for name in ranked[:most])
                if calls >= 0.05))
    return "\n".join(out)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke check")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--dir", metavar="DIR",
                        help="run in a new directory in DIR (default: the system's temp "
                             "directory); e.g. /dev/shm for tmpfs")
    parser.add_argument("--shared", action="store_true",
                        help="measure across hosts on two mounts of one directory instead: "
                             "exchanges, status, dead and live holders, leftovers (needs "
                             "root and /dev/fuse)")
    parser.add_argument("--setups", metavar="SETUP,...", default=",".join(SHARED_SETUPS),
                        help="with --shared: the mount setups, of "
                             f"{', '.join(mounts.SETUPS)} (default: %(default)s)")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux") or shutil.which("cp") is None:
        parser.error("the benchmark needs Linux (inotify, /proc) and cp")
    build_zipapp.build(PYZ)
    if args.shared:
        shared = run_shared(args.quick, args.setups.split(","))
        print(json.dumps(shared, indent=2) if args.json else shared_table(shared))
        return 0
    results = run(args.quick, args.dir)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
