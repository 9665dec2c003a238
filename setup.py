"""Packaging beside pyproject.toml: filechat.py, and a copy of it as its own stub package.

Type checkers find an installed module's annotations only in a package with a
py.typed marker or in a stub package (PEP 561), and a single module can be
neither; a copy of it named filechat-stubs/__init__.pyi is read as its stub.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithStub(build_py):
    """Build the module, then its stub package beside it."""

    def run(self) -> None:
        super().run()
        stubs = os.path.join(self.build_lib, "filechat-stubs")
        os.makedirs(stubs, exist_ok=True)
        shutil.copyfile("filechat.py", os.path.join(stubs, "__init__.pyi"))


setup(cmdclass={"build_py": BuildWithStub})
