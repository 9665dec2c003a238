"""What a person sees at a real terminal, small windows included (a pty and an emulator)."""

import io
import json
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import pexpect
import pytest
from conftest import WAIT, ended, release, reply

import filechat

LONG = "a-directory-with-a-rather-long-name"


def test_a_reply_without_a_final_newline_ends_its_line_at_a_terminal(terminal, server, run) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "no newline")
    client = terminal("client", "buf.txt", "-m", "hi", "--quiet")
    assert client.exit_status() == 0
    assert client.output().endswith("no newline\r\n")       # the prompt starts on its own line
    assert run("client", "buf.txt", "-m", "hi").stdout == b"no newline"   # a pipe gets it exact


def test_live_lines_fit_a_narrow_window(terminal, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / LONG).mkdir()
    buffer = f"{LONG}/buf.txt"
    client = terminal("client", buffer, "-m", "hi", columns=40)
    for _ in range(10):                                     # ten redraws, a second of waiting
        client.child.expect(r" \d+\.\d s\x1b\[K")
    # The reply is typed once the client has said so: however loaded the
    # machine, it shows the server start before the reply.
    operator = terminal("server", buffer)
    client.child.expect(r"A server sta.*… \d+\.\d s\x1b\[K")
    operator.expect("when done):\r\n" + "=" * 60 + "\r\n")
    operator.type("answered\x04")
    assert client.exit_status() == 0
    lines = client.lines()
    said = f"No filechat server is running on {buffer}; waiting for a server to answer..."
    assert lines.count(said) == 1, lines
    assert sum("No filechat server" in row for row in client.rows()) == 1
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
    server.end_text()
    assert ended(client) == 0
    assert reply(client) == "the real reply\n"


LEFT, UP, QUOTE = "\x1b[D", "\x1b[A", "\x16"      # as the terminal sends them; Ctrl+V


def test_arrow_keys_edit_the_message_line(terminal, server) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply-cmd", "cat")
    client = terminal("client", "buf.txt")
    client.expect("when done):")
    client.type("hllo" + LEFT * 3 + "e\n")
    client.type_lines("second line")
    client.type(UP * 2 + "\n")                   # the history: the first line again
    client.end_text()
    assert client.exit_status() == 0
    lines = client.lines()
    assert lines[-5:] == ["=" * 60, "hello", "second line", "hello", "=" * 60], lines
    assert "^[" not in client.output()


def test_an_esc_that_reaches_the_message_asks_again(terminal, server) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply-cmd", "cat")
    client = terminal("client", "buf.txt")
    client.expect("when done):")
    client.type(f"with an {QUOTE}\x1b in it\n")     # Ctrl+V Esc puts a real ESC in the text
    client.end_text()
    client.expect("error\x1b[0m: message contains the ESC character")
    client.expect("please type the message again (the Up key brings back what you typed)")
    client.expect("Enter your message (press Ctrl+D or Ctrl+Z when done):")
    client.type(UP + "\b" * 8 + " in it\n")       # the line back, the ESC taken out
    client.end_text()
    assert client.exit_status() == 0
    assert client.lines()[-3:] == ["=" * 60, "with an in it", "=" * 60], client.lines()


def test_an_esc_that_reaches_the_reply_asks_again(terminal, start) -> None:  # type: ignore[no-untyped-def]
    server = terminal("server", "buf.txt")
    server.expect("Waiting for clients...")
    client = start("client", "buf.txt", "-m", "hi")
    server.expect("when done):\r\n" + "=" * 60 + "\r\n")
    server.type(f"bad {QUOTE}\x1b\n")
    server.end_text()
    server.expect("please type the reply again (the Up key brings back what you typed)")
    server.expect("when done):\r\n" + "=" * 60 + "\r\n")
    server.type_lines("good")
    server.end_text()
    assert ended(client) == 0
    assert reply(client) == "good\n"


class Typed(io.StringIO):
    """A terminal without line editing, as where readline is missing: keys arrive as sent."""

    def __init__(self, *texts: str) -> None:
        super().__init__()
        self.texts = list(texts)

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        raise OSError("no descriptor")

    def read(self, size: Optional[int] = -1) -> str:
        return self.texts.pop(0)


def test_without_line_editing_an_arrow_key_asks_again(tmp_path: Path) -> None:
    buffer = str(tmp_path / "buf.txt")
    server = threading.Thread(target=filechat.serve, daemon=True, kwargs=dict(
        buffer=buffer, responder=lambda request: "ok", max_messages=1))
    server.start()
    out, err = io.StringIO(), io.StringIO()
    term = filechat.Terminal(Typed(f"an arrow{LEFT}\n", "typed again\n"), out, err)
    assert filechat.main(["client", buffer, "--timeout", str(WAIT)], term) == 0
    assert err.getvalue().count("Enter your message") == 2
    assert "message contains the ESC character" in err.getvalue()
    assert "please type the message again\n" in err.getvalue()
    assert out.getvalue() == "ok"                  # stdout not a terminal: the reply alone
    server.join(WAIT)


def test_the_server_says_how_long_the_client_waits_and_when_it_gives_up(  # type: ignore[no-untyped-def]
        terminal, start, tmp_path: Path) -> None:
    server = terminal("server", "buf.txt")
    server.expect("Waiting for clients...")
    client = start("client", "buf.txt", "r.txt", "-m", "hi", "--timeout", "2")
    server.expect("(the client waits 2 s for the reply, until ")
    server.expect("when done):\r\n" + "=" * 60 + "\r\n")
    server.type("half a rep")
    assert ended(client) == filechat.EXIT_TIMEOUT
    server.expect("the client has stopped waiting for this reply, which will be discarded")
    server.expect("half a rep")                   # the line being typed, shown again
    server.type("ly\n")
    server.end_text()
    server.expect("the client for")
    server.expect("has gone; no reply sent")
    assert not (tmp_path / "r.txt").exists()


def test_a_restarted_server_gets_the_clients_whole_time(terminal) -> None:  # type: ignore[no-untyped-def]
    client = terminal("client", "buf.txt", "-m", "hi", "--timeout", "3", columns=120)
    client.child.expect(r"waiting for a server to answer\.\.\. 1\.\d s")
    server = terminal("server", "buf.txt")
    server.expect("when done):\r\n" + "=" * 60 + "\r\n")
    # Past its three seconds since it sent the message, and the client still
    # waits: its time counts from when the server started.
    client.child.expect(r"A server started; waiting for server response\.\.\. "
                        r"(3\.[5-9]|[4-9]\.\d) s")
    server.type_lines("in time")
    server.end_text()
    assert client.exit_status() == 0
    assert client.lines()[-1] == "in time"


# Typed before the prompt is up, with no pause between keys: a paste, a quick
# typist, an expect script. Ctrl+D either on a line of its own or straight
# after the text.
AHEAD = [("Hello server!\nThis is a test message.\n\x04",
          "Hello server!\nThis is a test message.\n"),
         ("no newline\x04", "no newline")]


@pytest.mark.parametrize("readline", [True, False], ids=["readline", "no-readline"])
@pytest.mark.parametrize("keys, text", AHEAD, ids=["ctrl-d-on-its-own-line", "ctrl-d-after-text"])
def test_a_message_typed_ahead_ends_where_ctrl_d_was_typed(  # type: ignore[no-untyped-def]
        keys: str, text: str, readline: bool, terminal, server, tmp_path: Path) -> None:
    server("--auto-reply-cmd", "cat")
    client = terminal("client", "buf.txt", readline=readline)
    client.child.send(keys)                       # at once: the prompt is not up yet
    assert client.exit_status() == 0
    shown = ["Server response:", "=" * 60, *text.splitlines(), "=" * 60]
    assert client.lines()[-len(shown):] == shown, client.lines()


@pytest.mark.parametrize("shown", ["Message received from client", "when done):"])
@pytest.mark.parametrize("readline", [True, False], ids=["readline", "no-readline"])
@pytest.mark.parametrize("keys, text", AHEAD, ids=["ctrl-d-on-its-own-line", "ctrl-d-after-text"])
def test_a_reply_typed_ahead_once_the_message_shows_ends_where_ctrl_d_was_typed(  # type: ignore[no-untyped-def]
        keys: str, text: str, readline: bool, shown: str, terminal, start) -> None:
    server = terminal("server", "buf.txt", readline=readline)
    server.expect("Waiting for clients...")
    client = start("client", "buf.txt", "-m", "the question")
    server.expect(shown)          # the message, or the prompt's text: the reply is typed at once
    server.child.send(keys)
    assert ended(client) == 0
    assert reply(client) == text
    server.expect("Lockfile removed. Ready for next client.")
    assert "discarded" not in server.output()


def test_the_operator_hears_at_once_that_the_client_ended(terminal, start, run) -> None:  # type: ignore[no-untyped-def]
    server = terminal("server", "buf.txt")
    server.expect("Waiting for clients...")
    client = start("client", "buf.txt", "-m", "hi")         # it would wait 60 s
    server.expect("when done):\r\n" + "=" * 60 + "\r\n")
    client.kill(signal.SIGKILL)
    client.proc.wait(WAIT)
    server.child.expect_exact("the client has stopped waiting for this reply", timeout=3)
    state = json.loads(run("status", "buf.txt", "--json").stdout)
    assert state["lock"]["state"] == "being answered; its client has ended"
    server.end_text()
    server.expect("has gone; no reply sent")


def test_a_message_typed_at_a_terminal_with_stdout_a_pipe_gets_the_reply_alone(  # type: ignore[no-untyped-def]
        pyz: Path, server, tmp_path: Path) -> None:
    # reply=$(filechat client buf.txt), the message typed: the prompt and the
    # status lines stay on the terminal, stdout gets the reply exactly.
    server("--auto-reply", "exactly this")
    child = pexpect.spawn("sh", ["-c", f"{sys.executable} {pyz} client buf.txt > out.txt"],
                          cwd=str(tmp_path), encoding="utf-8", timeout=WAIT)
    child.expect_exact("Enter your message (press Ctrl+D or Ctrl+Z when done):")
    child.send("hello\n\x04")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (tmp_path / "out.txt").read_bytes() == b"exactly this"
    assert "Waiting for server response..." in child.before


HIDDEN = "Please delete ALL backups now\rPlease keep the backups safe \b"


def test_control_characters_show_at_a_terminal_and_pass_exactly_through_a_pipe(  # type: ignore[no-untyped-def]
        terminal, run, tmp_path: Path) -> None:
    operator = terminal("server", "buf.txt", "--auto-reply-cmd", "cat")
    operator.expect("Waiting for clients...")
    client = terminal("client", "buf.txt", "-m", HIDDEN)
    assert client.exit_status() == 0
    operator.expect("Lockfile removed. Ready for next client.")
    shown = "Please delete ALL backups now^MPlease keep the backups safe ^H"
    assert shown in operator.lines()
    assert shown in client.lines()
    assert run("client", "buf.txt", "-m", HIDDEN).stdout == HIDDEN.encode()


def test_debug_lines_stand_on_lines_of_their_own_at_a_terminal(terminal) -> None:  # type: ignore[no-untyped-def]
    client = terminal("client", "buf.txt", "-m", "hi", "-v", columns=120)
    client.child.expect(r"waiting for a server to answer\.\.\. \d+\.\d s")
    server = terminal("server", "buf.txt", "--auto-reply", "ok", "-v", columns=120)
    assert client.exit_status() == 0
    server.expect("[waiting · 1 answered")
    for screen in (client, server):
        assert all(line.startswith("filechat: debug: ") for line in screen.lines()
                   if "debug:" in line), screen.lines()
    assert client.lines()[-3].startswith("filechat: debug: reply read from")
    assert client.lines()[-2] == "ok"                     # the reply, on its own line
    assert client.lines()[-1].startswith("filechat: debug: reply ")


def test_ctrl_d_at_an_empty_prompt_asks_again(terminal, server) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply-cmd", "cat")
    client = terminal("client", "buf.txt")
    client.child.send("\x04")                     # nothing typed, at once
    client.expect("nothing was typed, and an empty message is sent only with --message ''")
    client.expect("Enter your message (press Ctrl+D or Ctrl+Z when done):")
    client.type_lines("now something")
    client.end_text()
    assert client.exit_status() == 0
    assert client.lines()[-2] == "now something"


def test_after_ctrl_z_and_fg_the_reply_being_typed_is_shown_again(  # type: ignore[no-untyped-def]
        terminal, start, pyz: Path) -> None:
    shell = terminal(shell=True, env={"PS1": "$ "})
    shell.child.send(f"{sys.executable} {pyz} server buf.txt\n")
    shell.expect("Waiting for clients...")
    client = start("client", "buf.txt", "-m", "the question")
    shell.expect("when done):\r\n" + "=" * 60 + "\r\n")
    shell.type("half a line")
    shell.expect("half a line")                   # read by the prompt, as a person sees it
    shell.child.send("\x1a")                      # Ctrl+Z: the server is stopped
    shell.expect("Stopped")
    shell.child.send("fg\n")
    shell.expect("half a line")                   # drawn again, below what the shell said
    shell.type(" more\n")
    shell.type("next\x04")
    assert ended(client) == 0
    assert reply(client) == "half a line more\nnext"
    shell.expect("Lockfile removed. Ready for next client.")
    lines = shell.lines()
    typed = lines[lines.index("$ fg") + 2:]          # after the shell's line for the job
    assert typed[:2] == ["half a line more", "next"], lines


# Typed together with the command, as one burst (an expect script, a quick
# typist): the keys wait while the shell's line editor holds the terminal raw,
# unprocessed, the Enter as a carriage return and Ctrl+D as a character.
@pytest.mark.parametrize("keys, text", [
    ("typed ahead\rsecond\x04", "typed ahead\nsecond"),
    ("typed ahead\r\x04", "typed ahead\n")], ids=["ctrl-d-after-text", "ctrl-d-on-its-own-line"])
def test_a_message_typed_with_the_command_ends_where_ctrl_d_was_typed(  # type: ignore[no-untyped-def]
        keys: str, text: str, terminal, server, pyz: Path) -> None:
    server("--auto-reply-cmd", "cat")
    shell = terminal(shell=True, env={"PS1": "$ "})
    shell.expect("$ ")
    shell.child.send(f"{sys.executable} {pyz} client buf.txt\r{keys}")
    shell.expect("Server response:")
    shell.expect("$ ")
    lines = shell.lines()
    shown = lines[lines.index("Server response:") + 2:-2]
    assert shown == text.splitlines(), lines


def test_lines_typed_with_the_command_wait_for_ctrl_d(  # type: ignore[no-untyped-def]
        terminal, server, pyz: Path) -> None:
    server("--auto-reply-cmd", "cat")
    shell = terminal(shell=True, env={"PS1": "$ "})
    shell.expect("$ ")
    shell.child.send(f"{sys.executable} {pyz} client buf.txt\rfirst\r")
    shell.expect("first")                         # shown, as if it had been when typed
    shell.child.send("second\r\x04")               # Enter, Ctrl+D: line mode reads on
    shell.expect("Server response:")
    shell.expect("$ ")
    lines = shell.lines()
    assert lines[lines.index("Server response:") + 2:-2] == ["first", "second"], lines


def test_sigterm_at_the_prompt_says_so_on_a_line_of_its_own(terminal) -> None:  # type: ignore[no-untyped-def]
    client = terminal("client", "buf.txt")
    client.expect("when done):")
    client.type("hel")
    client.expect("hel")                         # echoed: the line is half typed
    client.child.kill(signal.SIGTERM)
    assert client.exit_status() == 143
    lines = client.lines()
    assert lines[-2:] == ["hel", "filechat: ended by SIGTERM; nothing was sent"], lines
