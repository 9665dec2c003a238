"""A library client whose send() is interrupted by SIGINT, again and again.

    python interrupted_sends.py every-line BUFFER N     SIGINT at each of the first N lines
                                                        filechat runs, one send each
    python interrupted_sends.py random BUFFER N         N sends, SIGINT at a random moment
                                                        in the first 4 ms of each

A server must answer on BUFFER. After each send the process must hold the
descriptors it held before the first, and no temp file of its own may be
left beside the buffer. Prints one line per leak, then "<n> sends, <k>
interrupted, <m> leaks".
"""

import os
import random
import signal
import sys
from typing import List

import filechat

armed = [False]


def interrupt(signum: int, frame: object) -> None:
    """Ctrl+C, while a send runs: a SIGINT that comes after it is not the send's."""
    if armed[0]:
        armed[0] = False
        raise KeyboardInterrupt


def descriptors() -> List[str]:
    """This process's open descriptors, with what each names."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass                    # the directory listing's own descriptor, closed by now
    return sorted(found)


def at_line(n: int):  # type: ignore[no-untyped-def]
    """Return a tracer that sends this process SIGINT at the n-th line filechat runs."""
    source = os.path.abspath(filechat.__file__)
    count = [0]

    def local(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "line":
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGINT)
        return local

    def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
        return local(frame, event, arg) if frame.f_code.co_filename == source else None
    return tracer


def main(mode: str, buffer: str, n: int) -> int:
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGALRM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    filechat.send(buffer, "before", timeout=10)         # what every later send may keep open
    before = descriptors()
    mine = f".{os.getpid()}."          # in a temp file's name: .NAME.HOST.PID.RANDOM.tmp
    directory = os.path.dirname(os.path.abspath(buffer))
    interrupted = leaks = 0
    for i in range(1, n + 1):
        try:
            armed[0] = True
            if mode == "every-line":
                sys.settrace(at_line(i))
            else:
                signal.setitimer(signal.ITIMER_REAL, random.uniform(0, 0.004))
            filechat.send(buffer, f"message {i}", timeout=10, lock_timeout=10)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            armed[0] = False            # first: a signal from now on is not the send's
            sys.settrace(None)
            signal.setitimer(signal.ITIMER_REAL, 0)
        now = descriptors()
        temps = [name for name in os.listdir(directory)
                 if name.startswith(".") and name.endswith(".tmp") and mine in name]
        if now != before or temps:
            leaks += 1
            print(f"send {i}: descriptors {sorted(set(now) - set(before))}, temp files {temps}")
            before = now
    print(f"{n} sends, {interrupted} interrupted, {leaks} leaks")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
