"""Byte-exact round trips of generated text through a real server process."""

import sys
from pathlib import Path
from typing import Iterator

import pytest
from conftest import WAIT, interrupt, spawn
from hypothesis import given, settings
from hypothesis import strategies as st

import filechat

text = st.text(st.characters(blacklist_characters="\x1b\0", blacklist_categories=("Cs",)),
               max_size=2000)


@pytest.fixture(scope="module")
def echo_buffer(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server that echoes every message back through the cat hook."""
    directory = tmp_path_factory.mktemp("echo")
    proc = spawn([sys.executable, str(pyz), "server", "buf.txt", "--auto-reply-cmd", "cat"],
                 directory)
    proc.expect_exact("Waiting for clients...")
    yield str(directory / "buf.txt")
    assert interrupt(proc) == 0


@settings(max_examples=60, deadline=None)
@given(message=text)
def test_any_text_without_esc_survives_send_and_serve(echo_buffer: str, message: str) -> None:
    assert filechat.send(echo_buffer, message, timeout=WAIT) == message
