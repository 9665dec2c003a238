"""The spec's interactive sessions at a terminal, driven with pexpect against the .pyz."""

from pathlib import Path

import pytest

BANNER = "=" * 60

SPEC_SERVER = f"""\
Server starting...
Buffer file: server_buffer.txt
Lockfile: server.lock
Waiting for clients...

{BANNER}
Message received from client (response file: client1_response.txt)
{BANNER}
Hello server!
This is a test message.
{BANNER}

{BANNER}
Enter your response (press Ctrl+D or Ctrl+Z when done):
{BANNER}
Hello client!
Message received successfully.

Response sent to: client1_response.txt
Lockfile removed. Ready for next client.
"""

SPEC_CLIENT = f"""\
Enter your message (press Ctrl+D or Ctrl+Z when done):
Hello server!
This is a test message.
Lock acquired. Sending message to server...
Message sent to server.
Waiting for server response...

{BANNER}
Server response:
{BANNER}
Hello client!
Message received successfully.
{BANNER}
"""


@pytest.mark.parametrize("columns", [80, 120])
def test_spec_example_session_line_for_line(columns: int, terminal, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = terminal("server", "server_buffer.txt", columns=columns)
    server.expect("Waiting for clients...\r\n")
    client = terminal("client", "server_buffer.txt", "client1_response.txt", columns=columns)
    client.expect("(press Ctrl+D or Ctrl+Z when done):\r\n")
    client.type_lines("Hello server!", "This is a test message.")
    client.end_text()
    client.expect("Waiting for server response...")
    server.expect("(press Ctrl+D or Ctrl+Z when done):\r\n" + BANNER + "\r\n")
    server.type_lines("Hello client!", "Message received successfully.")
    server.end_text()
    server.expect("Lockfile removed. Ready for next client.\r\n")
    assert client.exit_status() == 0
    assert client.lines() == SPEC_CLIENT.splitlines()
    spec = SPEC_SERVER.splitlines()
    assert server.lines()[:len(spec)] == spec
    assert all(line.startswith("[waiting · 1 answered") for line in server.lines()[len(spec):])
    server.child.sendintr()
    server.expect("Server stopped.")
    assert server.exit_status() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_server_answers_message_after_message(terminal, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = terminal("server", "buf.txt")
    server.expect("Waiting for clients...")
    for n in range(3):
        client = terminal("client", "buf.txt", f"r{n}.txt")
        client.expect("when done):")
        client.type_lines(f"message {n}")
        client.end_text()
        server.expect(f"message {n}\r\n")
        server.expect("when done):\r\n" + BANNER + "\r\n")
        if n == 1:
            server.end_text()          # Ctrl+D at once: an empty reply
        else:
            server.type(f"reply {n} without newline")
            server.end_text()          # Ctrl+D after text ends the reply at once
        server.expect("Ready for next client.")
        client.expect(BANNER + "\r\nServer response:\r\n" + BANNER + "\r\n")
        expected = "" if n == 1 else f"reply {n} without newline\r\n"
        client.expect(expected + BANNER + "\r\n")
        assert client.exit_status() == 0
    assert "reply 2 without newline\r\n\r\nResponse sent to: r2.txt" in server.output()


def test_ctrl_d_after_text_on_the_client_line(terminal, tmp_path: Path, server) -> None:  # type: ignore[no-untyped-def]
    server("--auto-reply", "ok")
    client = terminal("client", "buf.txt", "r.txt")
    client.expect("when done):")
    client.type("no newline")
    client.end_text()
    client.expect("no newline\r\nLock acquired.")
    client.expect("Server response:")
    assert client.exit_status() == 0


def test_busy_scenario_from_the_spec(terminal, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = terminal("server", "server_buffer.txt")
    server.expect("Waiting for clients...")
    first = terminal("client", "server_buffer.txt", "client1_response.txt")
    first.expect("when done):")
    first.type_lines("first")
    first.end_text()
    server.expect("when done):\r\n" + BANNER + "\r\n")     # not answered yet
    second = terminal("client", "server_buffer.txt", "client2_response.txt")
    second.expect("when done):")
    second.type_lines("second")
    second.end_text()
    second.expect("Server busy, please wait... (1 ahead of you)")
    # A second line at the spec's pace: the first is rewritten without its timer.
    second.expect("Server busy, please wait... (1 ahead of you)\x1b[K\r\n")
    server.type_lines("to first")
    server.end_text()
    second.expect("Lock acquired. Sending message to server...")   # by itself
    server.expect("second\r\n")
    server.expect("when done):\r\n" + BANNER + "\r\n")
    server.type_lines("to second")
    server.end_text()
    first.expect("to first\r\n")
    second.expect("to second\r\n")
    assert first.exit_status() == 0
    assert second.exit_status() == 0
    assert "Server busy" not in first.output()


def test_ctrl_c_while_busy_leaves_the_holders_lock(terminal, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "server.lock").write_text("")      # held by a spec-following client
    client = terminal("client", "buf.txt", "r.txt")
    client.expect("when done):")
    client.type_lines("hi")
    client.end_text()
    client.expect("Server busy, please wait...")
    client.child.sendintr()
    client.expect("filechat: interrupted; nothing was sent")
    assert client.exit_status() == 130
    assert (tmp_path / "server.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.lock"]


def test_ctrl_c_while_waiting_withdraws_the_message(terminal, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = terminal("client", "buf.txt", "r.txt")
    client.expect("when done):")
    client.type_lines("nobody will answer")
    client.end_text()
    client.expect("Waiting for server response...")
    assert (tmp_path / "buf.txt").exists() and (tmp_path / "server.lock").exists()
    client.child.sendintr()
    client.expect("filechat: interrupted; the message was withdrawn")
    assert client.exit_status() == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_while_typing_exits_130(terminal, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = terminal("client", "buf.txt")
    client.expect("when done):")
    client.ctrl_c()
    assert client.exit_status() == 130


def test_server_ctrl_c_keeps_the_message_for_the_next_server(terminal, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = terminal("server", "buf.txt")
    server.expect("Waiting for clients...")
    client = terminal("client", "buf.txt", "r.txt")
    client.expect("when done):")
    client.type_lines("keep me")
    client.end_text()
    server.expect("when done):\r\n" + BANNER + "\r\n")
    server.ctrl_c()
    assert server.exit_status() == 0
    restarted = terminal("server", "buf.txt")
    restarted.expect("keep me\r\n")
    restarted.expect("when done):\r\n" + BANNER + "\r\n")
    restarted.type_lines("answered after a restart")
    restarted.end_text()
    client.expect("answered after a restart\r\n")
    assert client.exit_status() == 0
