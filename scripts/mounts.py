"""One directory mounted several times, as hosts that share it see it: bindfs and sshfs.

For the shared-directory tests and `scripts/bench.py --shared`. Mounting needs
root, /dev/fuse, bindfs, sshfs and sshd: `scripts/test.sh` installs the
packages from Debian where it can. The sshd is this module's own, bound to
127.0.0.1 on a free port, with its config and keys in a temp directory.

Each setup names two mounts of one base directory, "a" and "b". A process
run through `as_host(name, argv)` gets a UTS namespace of its own, so its
host name differs and filechat must treat the other side as another host.
"""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# FUSE options that make a mount look at the file server on every call.
NO_CACHE = "entry_timeout=0,attr_timeout=0,negative_timeout=0"
SSH_NO_CACHE = NO_CACHE + ",cache=no,dir_cache=no"
SETUPS = {
    # name: (tool, options of its two mounts)
    "bindfs": ("bindfs", NO_CACHE),
    "bindfs-cached": ("bindfs", ""),              # FUSE's defaults: one second
    "sshfs": ("sshfs", SSH_NO_CACHE),
    "sshfs-cached": ("sshfs", ""),                # sshfs's defaults: 20 seconds
}
TOOLS = ("bindfs", "sshfs", "ssh", "ssh-keygen", "/usr/sbin/sshd", "unshare", "hostname")


def why_not() -> Optional[str]:
    """Return why this machine cannot make the mounts, or None if it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "mounting needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (scripts/test.sh installs them as root)"
    return None


def as_host(name: str, argv: Sequence[str]) -> List[str]:
    """Return argv run with its own host name, as a process on another host."""
    return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]


class Mounts:
    """The base directory under root and its mounts, made by start() and undone by stop()."""

    def __init__(self, root: Path, setups: Sequence[str] = tuple(SETUPS)) -> None:
        self.root = root
        self.base = root / "base"
        self.setups = list(setups)
        self.points: Dict[str, Tuple[Path, Path]] = {}
        self.mounted: List[Path] = []
        self.sshd: Optional[subprocess.Popen] = None     # type: ignore[type-arg]
        self.port = 0
        self.key = root / "ssh" / "user_key"

    def start(self) -> "Mounts":
        self.base.mkdir(parents=True, exist_ok=True)
        try:
            if any(SETUPS[name][0] == "sshfs" for name in self.setups):
                self._start_sshd()
            for name in self.setups:
                tool, options = SETUPS[name]
                pair = (self.root / f"{name}-a", self.root / f"{name}-b")
                for point in pair:
                    point.mkdir(exist_ok=True)
                    self._mount(tool, options, point)
                    self.mounted.append(point)
                self.points[name] = pair
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sshd(self) -> None:
        ssh = self.root / "ssh"
        ssh.mkdir(exist_ok=True)
        for key in ("host_key", "user_key"):
            if not (ssh / key).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                                str(ssh / key)], check=True)
        shutil.copy(ssh / "user_key.pub", ssh / "authorized_keys")
        with socket.socket() as probe:          # a free port, for this sshd alone
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        (ssh / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {ssh / 'host_key'}\n"
            f"PidFile {ssh / 'sshd.pid'}\nAuthorizedKeysFile {ssh / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "Subsystem sftp internal-sftp\n")
        os.makedirs("/run/sshd", exist_ok=True)     # its privilege separation directory
        self.sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-E", str(ssh / "sshd.log"),
                                      "-f", str(ssh / "sshd_config")])
        deadline = time.monotonic() + 10
        while True:                    # until it accepts connections: its own event
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.sshd.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("sshd did not start: " + (ssh / "sshd.log").read_text(
                        errors="replace")) from None
                time.sleep(0.05)

    def _mount(self, tool: str, options: str, point: Path) -> None:
        if tool == "bindfs":
            argv = ["bindfs", *(["-o", options] if options else []), str(self.base), str(point)]
        else:
            ssh_options = (f"port={self.port},IdentityFile={self.key},StrictHostKeyChecking=no,"
                           "UserKnownHostsFile=/dev/null,BatchMode=yes,LogLevel=ERROR")
            argv = ["sshfs", "-o", ssh_options + ("," + options if options else ""),
                    f"root@127.0.0.1:{self.base}", str(point)]
        subprocess.run(argv, check=True, timeout=30, capture_output=True)

    def stop(self) -> None:
        for point in reversed(self.mounted):
            subprocess.run(["fusermount3", "-u", "-z", str(point)], capture_output=True)
        self.mounted.clear()
        self.points.clear()
        if self.sshd is not None:
            self.sshd.terminate()
            self.sshd.wait(10)
            self.sshd = None
