"""The zipapp build: reproducible, executable, runnable."""

import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import build_zipapp
import filechat


def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    build_zipapp.build(str(tmp_path / "a.pyz"))
    os.utime(build_zipapp.__file__)     # a newer source mtime must not matter
    build_zipapp.build(str(tmp_path / "b.pyz"))
    assert (tmp_path / "a.pyz").read_bytes() == (tmp_path / "b.pyz").read_bytes()


def test_source_date_epoch_sets_the_dates(tmp_path: Path) -> None:
    build_zipapp.build(str(tmp_path / "a.pyz"), epoch=1700000000)
    with zipfile.ZipFile(tmp_path / "a.pyz") as archive:
        assert [i.filename for i in archive.infolist()] == ["__main__.py", "filechat.py",
                                                            "filechat.pyc"]
        assert {i.date_time for i in archive.infolist()} == {(2023, 11, 14, 22, 13, 20)}


def test_pyz_is_executable_with_a_shebang(pyz: Path) -> None:
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.stat(pyz).st_mode & stat.S_IXUSR
    result = subprocess.run([str(pyz), "--version"], capture_output=True, timeout=30)
    assert result.stdout.decode() == f"filechat {filechat.__version__}\n"


def test_build_script_command_line(tmp_path: Path) -> None:
    target = tmp_path / "out.pyz"
    result = subprocess.run([sys.executable, build_zipapp.__file__, "-o", str(target)],
                            capture_output=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.decode().strip() == str(target)
    assert subprocess.run([sys.executable, str(target), "--help"], capture_output=True,
                          timeout=30).returncode == 0


def loaded_from(archive: Path) -> str:
    """Return the file name filechat's code objects carry when imported from archive."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import filechat; "
            "print(filechat.main.__code__.co_filename)")
    probe = subprocess.run([sys.executable, "-c", code, str(archive)], capture_output=True,
                           text=True, timeout=30)
    assert probe.returncode == 0, probe.stderr
    return probe.stdout.strip()


def test_bytecode_is_used_and_source_is_the_fallback(pyz: Path, tmp_path: Path) -> None:
    assert loaded_from(pyz) == "filechat.py"          # the archive's .pyc, as compiled
    # Another Python version cannot use the .pyc and must compile filechat.py:
    # simulate it with a magic number no Python knows.
    with zipfile.ZipFile(pyz) as archive:
        entries = {i.filename: archive.read(i.filename) for i in archive.infolist()}
    entries["filechat.pyc"] = b"\0\0\0\0" + entries["filechat.pyc"][4:]
    spoiled = tmp_path / "spoiled.pyz"
    with zipfile.ZipFile(spoiled, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    assert loaded_from(spoiled) == str(spoiled / "filechat.py")
    result = subprocess.run([sys.executable, str(spoiled), "--version"], capture_output=True,
                            timeout=30)
    assert result.stdout.decode() == f"filechat {filechat.__version__}\n"
