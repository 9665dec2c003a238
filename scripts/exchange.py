#!/usr/bin/env python3
"""Exchange a few messages through the library on this Python; exit 1 if any goes wrong.

    python3.8 scripts/exchange.py

A server in a thread answers a text, a 300 KB message file copied to a sink
and a non-ASCII text; nothing may be left behind. scripts/test.sh runs it
with every Python it finds.
"""

import io
import os
import sys
import tempfile
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import filechat


def main() -> int:
    with tempfile.TemporaryDirectory() as directory:
        buffer = os.path.join(directory, "buf.txt")
        server = threading.Thread(target=filechat.serve,
                                  args=(buffer, lambda request: request.message.upper()),
                                  kwargs={"max_messages": 3})
        server.start()
        sink = io.StringIO()
        checks = {
            "text": filechat.send(buffer, "hello", timeout=10) == "HELLO",
            "file to sink": filechat.send(buffer, io.BytesIO(b"x" * 300000), timeout=10,
                                          reply_to=sink) == "" and sink.getvalue() == "X" * 300000,
            "non-ASCII": filechat.send(buffer, "é" * 1000, timeout=10) == "É" * 1000,
        }
        server.join(10)
        checks["server done, nothing left"] = not server.is_alive() and os.listdir(directory) == []
    failed = [name for name, ok in checks.items() if not ok]
    version = "{}.{}".format(*sys.version_info[:2])
    print(f"python {version}: " + (f"FAILED {', '.join(failed)}" if failed else "exchanges ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
