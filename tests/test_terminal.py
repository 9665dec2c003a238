"""What a person sees at a real terminal, small windows included (a pty and an emulator)."""

import re
from pathlib import Path

from conftest import release

LONG = "a-directory-with-a-rather-long-name"


def test_a_reply_without_a_final_newline_ends_its_line_at_a_terminal(terminal, server, run) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "no newline")
    client = terminal("client", "buf.txt", "-m", "hi", "--quiet")
    assert client.exit_status() == 0
    assert client.output().endswith("no newline\r\n")       # the prompt starts on its own line
    assert run("client", "buf.txt", "-m", "hi").stdout == b"no newline"   # a pipe gets it exact


def test_live_lines_fit_a_narrow_window(terminal, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / LONG).mkdir()
    buffer = f"{LONG}/buf.txt"
    client = terminal("client", buffer, "-m", "hi", columns=40)
    for _ in range(10):                                     # ten redraws, a second of waiting
        client.child.expect(r" \d+\.\d s\x1b\[K")
    server("--auto-reply", "answered", buffer=buffer)
    assert client.exit_status() == 0
    lines = client.lines()
    said = f"No server is running on {buffer}; waiting for one to start..."
    assert lines.count(said) == 1, lines
    assert sum("No server" in row for row in client.rows()) == 1
    assert lines.count("Lock acquired. Sending message to server...") == 1
    assert lines.count("A server started; waiting for server response...") == 1
    assert all(len(row) <= 40 for row in client.rows())
    assert lines[-1] == "answered"


def test_the_busy_line_fits_a_narrow_window(terminal, holder, server) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "answered")
    client = terminal("client", "buf.txt", "-m", "hi", "--lock-retry-interval", "600",
                      columns=40)
    for _ in range(10):
        client.child.expect(r" \d+\.\d s\x1b\[K")
    release(holder)
    assert client.exit_status() == 0
    lines = client.lines()
    assert lines.count("Server busy, please wait... (1 ahead of you)") == 1, lines
    assert sum("Server busy" in row for row in client.rows()) == 1
    assert lines.count("Lock acquired. Sending message to server...") == 1


def test_too_narrow_a_window_gets_plain_lines(terminal, holder, server) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "answered")
    client = terminal("client", "buf.txt", "-m", "hi", "--lock-retry-interval", "600",
                      columns=16)
    client.expect("Server busy, please wait... (1 ahead of you)\r\n")
    release(holder)
    assert client.exit_status() == 0
    assert "\x1b[K" not in client.output()
    assert client.lines().count("Server busy, please wait... (1 ahead of you)") == 1


def test_the_servers_state_line_fits_a_narrow_window(terminal, holder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = terminal("server", "buf.txt", "--auto-reply", "answered", columns=40)
    for _ in range(3):                    # held by a live client: redrawn every second
        server.expect("[waiting · 0 answered · lock held")
    assert all(len(row) <= 40 for row in server.rows())
    assert sum("[waiting" in row for row in server.rows()) == 1
    assert re.fullmatch(r"\[waiting · 0 answered · lock hel.*…", server.rows()[-1])


def test_a_resized_window_is_redrawn_at_its_new_width(terminal, holder, server) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "answered")
    client = terminal("client", "buf.txt", "-m", "hi", "--lock-retry-interval", "600",
                      columns=80)
    client.expect("Server busy, please wait... (1 ahead of you) ")
    client.child.setwinsize(24, 30)       # the kernel tells the client with SIGWINCH
    client.screen.resize(24, 30)
    client.child.expect(r"\rServer busy, please wa?… \d+\.\d s\x1b\[K")
    for _ in range(3):
        client.child.expect(r" \d+\.\d s\x1b\[K")
    release(holder)
    assert client.exit_status() == 0
    assert sum("Server busy" in row for row in client.rows()) == 1
    assert "Server busy, please wait... (1 ahead of you)" in client.lines()


def test_text_typed_at_an_idle_server_is_discarded_and_said(terminal, start) -> None:  # type: ignore[no-untyped-def]
    server = terminal("server", "buf.txt")
    server.expect("Waiting for clients...")
    server.child.send("typed too early\nand half a line")
    server.expect("half a line")                  # echoed: the terminal has it
    client = start("client", "buf.txt", "-m", "hi")
    server.expect("when done):\r\n" + "=" * 60 + "\r\n")
    assert "filechat: note: 31 bytes typed before the prompt were discarded" in server.output()
    server.type_lines("the real reply")
    server.child.sendeof()
    assert client.wait() == 0
    assert client.out == "the real reply\n"
