"""A client and a server written from the spec's text alone, as another team would.

They poll, write files in place, leave the lock empty, and the server writes
its reply without an end marker (unless --esc): the interoperability tests run
filechat against them in both directions.

    python spec_peer.py client BUFFER RESPONSE MESSAGE
    python spec_peer.py server BUFFER REPLY [--esc] [--pause=SECONDS]   (answers one message)
"""

import os
import sys
import time

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


def server(buffer: str, reply: str, esc: bool, pause: float = 0.2) -> int:
    print("Waiting for clients...", flush=True)
    while True:
        if os.path.exists(buffer):
            with open(buffer, newline="") as f:
                content = f.read()
            if END_MARKER in content:
                break
        time.sleep(INTERVAL)
    response, _, message = content.partition("\n")
    message = message[:message.index(END_MARKER)]
    print(f"Message received from client (response file: {response})", flush=True)
    print(message, flush=True)
    with open(response, "w", newline="") as f:
        half = len(reply) // 2
        f.write(reply[:half])
        f.flush()
        time.sleep(pause)   # a slow disk: the reply is half there for a while
        f.write(reply[half:])
        if esc:
            f.write(END_MARKER)
    open(buffer, "w").close()
    os.remove(LOCKFILE_NAME)
    print(f"Response sent to: {response}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "client":
        sys.exit(client(*sys.argv[2:5]))
    pauses = [float(arg.split("=")[1]) for arg in sys.argv[4:] if arg.startswith("--pause=")]
    sys.exit(server(sys.argv[2], sys.argv[3], "--esc" in sys.argv[4:], *pauses))
