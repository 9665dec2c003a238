#!/usr/bin/env python3
"""Build filechat.pyz, a zipapp of filechat.py, byte for byte reproducibly.

Entries are sorted, dated from SOURCE_DATE_EPOCH (default: 1980-01-01, the
earliest date a zip file can hold) and given fixed mode bits, so two builds
of the same source are identical.

The archive also holds filechat.pyc, compiled by the Python that builds it:
zipimport cannot cache bytecode, and compiling the module at every start
would cost more than everything else a client does. Another Python version
sees a magic number it does not know and compiles filechat.py instead.
"""

import argparse
import importlib.util
import marshal
import os
import stat
import sys
import time
import zipfile
from typing import List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
SHEBANG = b"#!/usr/bin/env python3\n"
MAIN = "import filechat\nfilechat.exit_now(filechat.main())\n"
ZIP_EPOCH = 315532800           # 1980-01-01T00:00:00Z: zip's earliest date


def entries(source_dir: str) -> List[Tuple[str, bytes]]:
    """Return the archive's (name, content) pairs, sorted by name."""
    with open(os.path.join(source_dir, "filechat.py"), "rb") as f:
        module = f.read()
    return sorted([("__main__.py", MAIN.encode()), ("filechat.py", module),
                   ("filechat.pyc", bytecode(module))])


def bytecode(source: bytes) -> bytes:
    """Return an unchecked hash-based .pyc (PEP 552) of source.

    Hash-based, not timestamped, because zipimport reads zip dates in local
    time: a timestamp would tie the archive to the time zone it was built in.
    Unchecked, because it is built together with the source it was compiled
    from, so checking would only spend start-up time reading the source again.
    """
    code = compile(source, "filechat.py", "exec", dont_inherit=True)
    unchecked_hash = 0b01
    header = (importlib.util.MAGIC_NUMBER + unchecked_hash.to_bytes(4, "little")
              + importlib.util.source_hash(source))
    return header + marshal.dumps(code)


def build(target: str, source_dir: str = HERE, epoch: Optional[int] = None) -> None:
    """Write the zipapp to target and make it executable."""
    if epoch is None:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", ZIP_EPOCH))
    date = time.gmtime(max(epoch, ZIP_EPOCH))[:6]
    temp = target + ".tmp"
    with open(temp, "wb") as f:
        f.write(SHEBANG)
        # Stored, not deflated: a client starts measurably faster without
        # inflating the bytecode, and the archive stays small anyway.
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in entries(source_dir):
                info = zipfile.ZipInfo(name, date_time=date)
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.create_system = 3      # Unix, whatever the build machine
                archive.writestr(info, data)
    os.chmod(temp, 0o755)
    os.replace(temp, target)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build filechat.pyz from the command line."""
    parser = argparse.ArgumentParser(prog="build_zipapp.py", description=__doc__)
    parser.add_argument("-o", "--output", metavar="PATH",
                        default=os.path.join(HERE, "filechat.pyz"),
                        help="where to write the zipapp (default: filechat.pyz here)")
    args = parser.parse_args(argv)
    build(args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
