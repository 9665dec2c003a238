"""A client and a server written from the spec's text alone, as other teams would.

They poll, write files in place and leave the lock empty; by default the
server writes its reply without an end marker. Options give each the quirk
of one program seen beside filechat:

    python spec_peer.py client BUFFER RESPONSE MESSAGE [--drawn] [--no-create] [--no-lock]
        [--keep-reply] [--send-only] [--no-end]
    python spec_peer.py server BUFFER REPLY [--esc] [--drawn] [--lock-first] [--keep-lock]
        [--unlock-early]
        [--gap=SECONDS] [--pause=SECONDS] [--think=SECONDS] [--interval=SECONDS] [--count=N]

--drawn       reads the "Message Format" as drawn: a message or reply ends when its
              last line is ESC; writes ESC on a line of its own (implies --esc)
--no-create   opens the buffer without O_CREAT, retrying while it is missing
--no-lock     breaks the protocol: writes the buffer without taking the lock
--keep-reply  leaves the response file in place once it has read it
--send-only   ends once it has sent, as a client killed then would
--no-end      breaks the protocol: writes the message without its end marker
--esc         ends the reply with ESC
--lock-first  removes the lock before it clears the buffer (--gap seconds before)
--keep-lock   never removes the lock
--unlock-early breaks the protocol: removes the lock before writing the reply
--pause       seconds the reply stays half written
--think       seconds before writing the first reply, as an operator typing it
--count       messages to answer (default 1)
"""

import os
import sys
import time
from typing import Dict, List, Tuple

LOCKFILE_NAME = "server.lock"
END_MARKER = "\x1b"
INTERVAL = 0.02     # the spec's intervals, shortened so that tests run quickly


def ended(content: str, drawn: bool) -> bool:
    """True once content holds its end marker (drawn: ESC as its last line)."""
    if drawn:
        return content.split("\n")[-1] == END_MARKER
    return END_MARKER in content


def as_drawn(text: str) -> str:
    """Return text with ESC on a line of its own after it."""
    return text + ("\n" if text and not text.endswith("\n") else "") + END_MARKER


def client(buffer: str, response: str, message: str, flags: List[str]) -> int:
    drawn = "--drawn" in flags
    while "--no-lock" not in flags:
        try:
            os.close(os.open(LOCKFILE_NAME, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            print("Server busy, please wait...", flush=True)
            time.sleep(INTERVAL)
    text = as_drawn(message) if drawn else message + END_MARKER
    if "--no-end" in flags:
        text = message
    if "--no-create" in flags:
        while True:                 # holding the lock, as the program seen did
            try:
                fd = os.open(buffer, os.O_WRONLY | os.O_TRUNC)
                break
            except FileNotFoundError:
                time.sleep(INTERVAL)
        with os.fdopen(fd, "w", newline="") as f:
            f.write(f"{response}\n{text}")
    else:
        with open(buffer, "w", newline="") as f:
            f.write(f"{response}\n{text}")
    print("Message sent to server.", flush=True)
    if "--send-only" in flags:
        return 0
    deadline = time.time() + 60
    while time.time() < deadline:
        if os.path.exists(response):
            with open(response, newline="") as f:
                content = f.read()
            if drawn and not ended(content, drawn):
                time.sleep(INTERVAL)
                continue
            if "--keep-reply" not in flags:
                os.remove(response)
            print("Server response:", flush=True)
            print(content.replace(END_MARKER, ""), end="", flush=True)
            return 0
        time.sleep(INTERVAL)
    os.remove(LOCKFILE_NAME)
    return 1


def options(flags: List[str]) -> Tuple[List[str], Dict[str, str]]:
    """Split --name and --name=value options."""
    return ([flag for flag in flags if "=" not in flag],
            dict(flag[2:].split("=", 1) for flag in flags if "=" in flag))


def server(buffer: str, reply: str, flags: List[str]) -> int:
    """Answer messages as the spec's server does, with the quirks options ask for."""
    switches, values = options(flags)
    drawn = "--drawn" in switches
    pause = float(values.get("pause", 0.2))
    think = float(values.get("think", 0))
    interval = float(values.get("interval", INTERVAL))
    for n in range(int(values.get("count", 1))):
        print("Waiting for clients...", flush=True)
        while True:
            if os.path.exists(buffer):
                with open(buffer, newline="") as f:
                    content = f.read()
                if ended(content, drawn):
                    break
            time.sleep(interval)
        response, _, message = content.partition("\n")
        message = message[:message.index(END_MARKER)]
        print(f"Message received from client (response file: {response})", flush=True)
        print(message, flush=True)
        time.sleep(think if n == 0 else 0)
        text = as_drawn(reply) if drawn else reply + END_MARKER * ("--esc" in switches)
        if "--unlock-early" in switches:
            os.remove(LOCKFILE_NAME)
        with open(response, "w", newline="") as f:
            half = len(text) // 2
            f.write(text[:half])
            f.flush()
            time.sleep(pause)
            f.write(text[half:])
        if "--lock-first" in switches:
            os.remove(LOCKFILE_NAME)
            time.sleep(float(values.get("gap", 0)))
            open(buffer, "w").close()
        else:
            open(buffer, "w").close()
            if "--keep-lock" not in switches and "--unlock-early" not in switches:
                os.remove(LOCKFILE_NAME)
        print(f"Response sent to: {response}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "client":
        sys.exit(client(*sys.argv[2:5], sys.argv[5:]))
    sys.exit(server(sys.argv[2], sys.argv[3], sys.argv[4:]))
