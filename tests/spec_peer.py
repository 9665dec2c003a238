"""A client and a server written from the spec's text alone, as another team would.

They poll, write files in place, leave the lock empty, and the server writes
its reply without an end marker (unless --esc): the interoperability tests run
filechat against them in both directions.

    python spec_peer.py client BUFFER RESPONSE MESSAGE
    python spec_peer.py server BUFFER REPLY [--esc] [--lock-first] [--pause=SECONDS]
        [--think=SECONDS] [--interval=SECONDS] [--count=N]     (answers N messages, default 1;
        --think: seconds before writing the first reply, as an operator typing it)
"""

import os
import sys
import time
from typing import List

LOCKFILE_NAME = "server.lock"
END_MARKER = "\x1b"
INTERVAL = 0.02     # the spec's intervals, shortened so that tests run quickly


def client(buffer: str, response: str, message: str) -> int:
    while True:
        try:
            os.close(os.open(LOCKFILE_NAME, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            print("Server busy, please wait...", flush=True)
            time.sleep(INTERVAL)
    with open(buffer, "w", newline="") as f:
        f.write(f"{response}\n{message}{END_MARKER}")
    print("Message sent to server.", flush=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if os.path.exists(response):
            with open(response, newline="") as f:
                content = f.read()
            os.remove(response)
            print("Server response:", flush=True)
            print(content.replace(END_MARKER, ""), end="", flush=True)
            return 0
        time.sleep(INTERVAL)
    os.remove(LOCKFILE_NAME)
    return 1


def server(buffer: str, reply: str, options: List[str]) -> int:
    """Answer messages as the spec's server does, with the quirks options ask for."""
    esc = "--esc" in options
    lock_first = "--lock-first" in options       # removes the lock before clearing the buffer
    values = dict(option[2:].split("=", 1) for option in options if "=" in option)
    pause = float(values.get("pause", 0.2))      # the reply half written for a while
    think = float(values.get("think", 0))        # the operator slow to type the first reply
    interval = float(values.get("interval", INTERVAL))
    for n in range(int(values.get("count", 1))):
        print("Waiting for clients...", flush=True)
        while True:
            if os.path.exists(buffer):
                with open(buffer, newline="") as f:
                    content = f.read()
                if END_MARKER in content:
                    break
            time.sleep(interval)
        response, _, message = content.partition("\n")
        message = message[:message.index(END_MARKER)]
        print(f"Message received from client (response file: {response})", flush=True)
        print(message, flush=True)
        time.sleep(think if n == 0 else 0)
        with open(response, "w", newline="") as f:
            half = len(reply) // 2
            f.write(reply[:half])
            f.flush()
            time.sleep(pause)
            f.write(reply[half:])
            if esc:
                f.write(END_MARKER)
        if lock_first:
            os.remove(LOCKFILE_NAME)
            open(buffer, "w").close()
        else:
            open(buffer, "w").close()
            os.remove(LOCKFILE_NAME)
        print(f"Response sent to: {response}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "client":
        sys.exit(client(*sys.argv[2:5]))
    sys.exit(server(sys.argv[2], sys.argv[3], sys.argv[4:]))
