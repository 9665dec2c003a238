"""The pure wire format: framing requests and replies, and refusing what cannot be framed."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import filechat
from filechat import (
    FramingError,
    encode_reply,
    encode_request,
    newline_added,
    parse_reply,
    parse_request,
)

ESC = "\x1b"
TEXTS = ["", "Hello server!\nThis is a test message.\n", "no final newline",
         "crlf\r\nlines\r\n", "\ttabs\tand  spaces ", "Unicode: héllo 世界 🎉\n",
         "\n\n\n", "x" * (1 << 20)]
text_without_esc = st.text(st.characters(blacklist_characters=ESC + "\0",
                                         blacklist_categories=("Cs",)))


def test_request_layout_is_the_specs() -> None:
    assert encode_request("/tmp/r.txt", "Hi\nthere\n") == b"/tmp/r.txt\nHi\nthere\n\x1b"
    assert encode_request("/tmp/r.txt", "Hi") == b"/tmp/r.txt\nHi\n\x1b"     # as drawn
    assert encode_request("/tmp/r.txt", "") == b"/tmp/r.txt\n\x1b"


def test_reply_layout() -> None:
    assert encode_reply("ok\n") == b"ok\n\x1b"
    assert encode_reply("ok") == b"ok\n\x1b"
    assert encode_reply("ok", drawn=False) == b"ok\x1b"          # for a filechat client
    assert encode_reply("it broke\n", error=True) == b"it broke\n\x1b\x1b"


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_esc_stands_on_a_line_of_its_own(text: str) -> None:
    assert encode_request("/r.txt", text).split(b"\n")[-1] == b"\x1b"
    assert encode_reply(text).split(b"\n")[-1] == b"\x1b"


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_request_round_trip(text: str) -> None:
    framed = encode_request("/dir/resp.txt", text)
    assert parse_request(framed, newline_added(text)) == ("/dir/resp.txt", text)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
@pytest.mark.parametrize("error", [False, True])
def test_reply_round_trip(text: str, error: bool) -> None:
    assert parse_reply(encode_reply(text, error, drawn=False)) == (text, error)


@given(text_without_esc, text_without_esc.filter(lambda p: "\n" not in p and "\r" not in p
                                                 and p.strip() != ""))
def test_any_text_round_trips(message: str, path: str) -> None:
    assert parse_request(encode_request(path, message), newline_added(message)) == (path, message)
    assert parse_reply(encode_reply(message, drawn=False)) == (message, False)
    drawn = message + "\n" * newline_added(message)
    assert parse_request(encode_request(path, message)) == (path, drawn)   # as a peer reads it
    assert parse_reply(encode_reply(message)) == (drawn, False)


@pytest.mark.parametrize("data", [b"", b"/tmp/r.txt\nhalf a mess", b"/tmp/r.txt"])
def test_incomplete_request_is_none(data: bytes) -> None:
    assert parse_request(data) is None


@pytest.mark.parametrize("data", [b"no path line\x1b", b"\nmessage\x1b", b"   \nmessage\x1b",
                                  b"/r.txt\n\xff\xfe\x1b"])
def test_malformed_request_raises(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_request(data)


def test_spec_peer_framing_is_accepted() -> None:
    # A peer that writes CRLF after the path, and a newline after ESC.
    assert parse_request(b"resp.txt\r\nhello\n\x1b\n") == ("resp.txt", "hello\n")


def test_reply_without_marker_is_incomplete() -> None:
    assert parse_reply(b"partial reply") is None


@pytest.mark.parametrize("text", ["a\x1bb", ESC, "end" + ESC])
def test_esc_cannot_be_framed(text: str) -> None:
    with pytest.raises(FramingError, match="ESC"):
        encode_request("/r.txt", text)
    with pytest.raises(FramingError, match="ESC"):
        encode_reply(text)


@pytest.mark.parametrize("path", ["/a\nb.txt", "/a\rb.txt"])
def test_response_path_with_line_break_is_refused(path: str) -> None:
    with pytest.raises(FramingError, match="line break"):
        encode_request(path, "hi")


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(FramingError, match="UTF-8"):
        encode_request("/r.txt", "bad \udcff byte")


def test_framing_error_is_a_usage_error() -> None:
    assert issubclass(FramingError, ValueError)
    assert FramingError("m", "r").exit_code == filechat.EXIT_USAGE == 2
