"""Directories shared as hosts share them: bindfs, sshfs, GlusterFS and CephFS, each mounted twice.

For the shared-directory tests and `scripts/bench.py --shared`. Mounting needs
root, /dev/fuse and each setup's tools: `scripts/test.sh` installs them from
Debian where it can, and `why_not(setups)` names what a setup lacks.

Each setup names two mounts, "a" and "b". The bindfs and sshfs setups mount
one local base directory (`Mounts.base`); the sshd is this module's own, bound
to 127.0.0.1 on a free port. The cluster setups mount a volume served on this
machine by daemons of this module's own: GlusterFS (one glusterd, a volume per
setup) and CephFS (one monitor, one OSD in memory, one MDS, no manager, no
auth). Every daemon's state, sockets and logs are under the root directory,
and `stop()` ends every daemon and mount, also after a failed `start()`.
`fresh_dir(setup)` makes a new directory through mount a and returns it as
both mounts see it. A process run through `as_host(name, argv)` gets a UTS
namespace of its own, so its host name differs and filechat must treat the
other side as another host.

`python3 scripts/mounts.py --check SETUP...` brings setups up, checks what the
tests rely on (a file written on a is read on b, O_CREAT|O_EXCL is exclusive
across the mounts, whether flock is) and tears them down.
"""

import argparse
import fcntl
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

# FUSE options that make a mount look at the file server on every call.
NO_CACHE = "entry_timeout=0,attr_timeout=0,negative_timeout=0"
SSH_NO_CACHE = NO_CACHE + ",cache=no,dir_cache=no"
# The glusterfs client's own flags for the same, and the page cache dropped at each open.
GLUSTER_NO_CACHE = ("--attribute-timeout=0", "--entry-timeout=0", "--negative-timeout=0",
                    "--fopen-keep-cache=false")
# Every caching translator of a gluster volume off, and md-cache's timeout 0.
GLUSTER_VOLUME_NO_CACHE = (
    "performance.stat-prefetch off", "performance.quick-read off", "performance.open-behind off",
    "performance.write-behind off", "performance.flush-behind off", "performance.io-cache off",
    "performance.read-ahead off", "performance.readdir-ahead off", "performance.nl-cache off",
    "performance.md-cache-timeout 0")


class Setup(NamedTuple):
    """How a setup's two mounts are made."""
    tool: str                           # bindfs, sshfs, glusterfs or ceph-fuse
    options: Tuple[str, ...] = ()       # the mount command's own options
    volume: Tuple[str, ...] = ()        # glusterfs: the volume's options, "KEY VALUE" each


SETUPS = {
    "bindfs": Setup("bindfs", ("-o", NO_CACHE)),
    "bindfs-cached": Setup("bindfs"),                      # FUSE's defaults: one second
    "sshfs": Setup("sshfs", ("-o", SSH_NO_CACHE)),
    "sshfs-cached": Setup("sshfs"),                        # sshfs's defaults: 20 seconds
    "glusterfs": Setup("glusterfs"),                       # gluster's defaults, volume and client
    "glusterfs-nocache": Setup("glusterfs", GLUSTER_NO_CACHE, GLUSTER_VOLUME_NO_CACHE),
    "cephfs": Setup("ceph-fuse"),                          # ceph-fuse's defaults
}
# The setups of one local directory: what Mounts and why_not() take unless told.
LOCAL_SETUPS = ("bindfs", "bindfs-cached", "sshfs", "sshfs-cached")
CLUSTER_SETUPS = ("glusterfs", "glusterfs-nocache", "cephfs")
# What each tool needs on PATH, and the Debian packages that have it.
TOOLS = {
    "bindfs": (("bindfs",), "bindfs"),
    "sshfs": (("sshfs", "ssh", "ssh-keygen", "/usr/sbin/sshd"), "sshfs openssh-server"),
    "glusterfs": (("glusterd", "gluster", "glusterfs", "nsenter", "ip", "mount"),
                  "glusterfs-server glusterfs-client"),
    "ceph-fuse": (("ceph", "ceph-mon", "ceph-osd", "ceph-mds", "ceph-fuse", "monmaptool"),
                  "ceph-mon ceph-osd ceph-mds ceph-fuse"),
}
COMMON_TOOLS = ("unshare", "hostname", "umount", "stat")

START_TIMEOUT = 60.0    # seconds: the longest any daemon or mount may take to be ready
STOP_TIMEOUT = 10.0     # seconds a daemon or mount client has to exit before it is killed
POLL = 0.05             # seconds between looks while waiting for readiness
# The host name of gluster's bricks when this machine's own does not resolve to 127.0.0.1 only.
LOOPBACK_NAME = "filechat-gluster"


def why_not(setups: Sequence[str] = LOCAL_SETUPS) -> Optional[str]:
    """Return why this machine cannot make the setups' mounts, or None if it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "mounting needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    missing, packages = [], []
    for tool in dict.fromkeys(SETUPS[name].tool for name in setups):
        needs, debian = TOOLS[tool]
        lacking = [need for need in needs if shutil.which(need) is None]
        if lacking:
            users = [name for name in setups if SETUPS[name].tool == tool]
            missing.append(f"{', '.join(lacking)} (for {', '.join(users)})")
            packages.append(debian)
    missing += [need for need in COMMON_TOOLS if shutil.which(need) is None]
    if missing:
        return (f"not installed: {'; '.join(missing)} (scripts/test.sh installs them as root"
                + (f", from the Debian packages {' '.join(packages)})" if packages else ")"))
    return None


def as_host(name: str, argv: Sequence[str]) -> List[str]:
    """Return argv run with its own host name, as a process on another host."""
    return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]


# --- Waiting and stopping ---

def tail(path: Path, lines: int = 20) -> str:
    """Return the last lines of a log, or why there are none."""
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(no log: {error.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def wait_for(what: str, ready: Callable[[], bool], logs: Sequence[Path] = (),
             procs: Sequence["subprocess.Popen[bytes]"] = (),
             timeout: float = START_TIMEOUT) -> None:
    """Poll ready() until it holds; raise naming what, with the logs' tails, if a proc exits or
    the timeout passes first."""
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [proc for proc in procs if proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = (f"exit status {dead[0].returncode} of {dead[0].args!r}" if dead
                   else f"not within {timeout:g} s")
            raise RuntimeError(f"{what}: {why}" + "".join(f"\n--- {log}:\n{tail(log)}"
                                                          for log in logs))
        time.sleep(POLL)


def end(proc: "subprocess.Popen[bytes]", sig: int = signal.SIGTERM) -> None:
    """Send proc sig unless it has exited, and wait for it; kill it if it takes too long."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(argv: Sequence[str], what: str, logs: Sequence[Path] = (),
        timeout: float = START_TIMEOUT) -> str:
    """Run a setup step and return its output; raise naming what, with its error and the logs'
    tails, if it fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        problem = f"not done within {timeout:g} s"
    else:
        if done.returncode == 0:
            return done.stdout
        problem = f"exit status {done.returncode}: {(done.stderr or done.stdout).strip()}"
    raise RuntimeError(f"{what} ({' '.join(argv)}): {problem}"
                       + "".join(f"\n--- {log}:\n{tail(log)}" for log in logs))


def mounted(point: Path) -> bool:
    """Whether point is a mount point, as /proc says (a look at point itself could hang)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(point) for line in f)


def answers(point: Path) -> bool:
    """Whether point is a mount whose file server answers, asked in a child: a hung server
    costs a timeout, not the caller."""
    try:
        return mounted(point) and subprocess.run(
            ["stat", "-f", str(point)], capture_output=True, timeout=5).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- GlusterFS ---

def loopback_name() -> str:
    """Return a host name that resolves to 127.0.0.1 only, added to /etc/hosts if need be."""
    # gluster refuses "localhost" and 127.0.0.1 as a brick's host, and takes a name for
    # this machine only if it resolves to an address of its own.
    def loopback_only(name: str) -> bool:
        try:
            found = {info[4][0] for info in socket.getaddrinfo(name, None)}
        except OSError:
            return False
        return found == {"127.0.0.1"}

    for name in (socket.gethostname(), LOOPBACK_NAME):
        if loopback_only(name):
            return name
    with open("/etc/hosts", "a") as hosts:
        hosts.write(f"127.0.0.1\t{LOOPBACK_NAME}\t# filechat's scripts/mounts.py\n")
    return LOOPBACK_NAME


class Gluster:
    """One glusterd and its bricks, a volume per setup, in namespaces of their own.

    glusterd starts each brick with the default volfile port (24007) and a socket in
    /run/gluster, neither of which it lets one change. In a network namespace of its own
    that port is always free and nothing listens where other hosts could reach; in a mount
    namespace of its own /run/gluster is a private tmpfs; in a pid namespace, with its own
    /proc for glusterd to find the bricks' pids in, the bricks it daemonizes end with it.
    Mount clients join only its network namespace.
    """

    def __init__(self, root: Path) -> None:
        self.dir = root
        self.log = root / "log" / "glusterd.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self, volumes: Dict[str, Tuple[str, ...]]) -> None:
        """Start glusterd, then create and start each volume with its options."""
        for sub in ("work", "run", "log", "bricks"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        volfile = self.dir / "glusterd.vol"
        volfile.write_text(
            "volume management\n    type mgmt/glusterd\n"
            f"    option working-directory {self.dir / 'work'}\n"
            f"    option run-directory {self.dir / 'run'}\n"
            f"    option logging-directory {self.dir / 'log'}\n"
            f"    option glusterd-sockfile {self.dir / 'glusterd.socket'}\n"
            "    option transport-type socket\n    option transport.address-family inet\n"
            "    option transport.socket.bind-address 127.0.0.1\n"
            "    option ping-timeout 0\n    option event-threads 1\nend-volume\n")
        inside = ('mkdir -p /run/gluster && mount -t tmpfs tmpfs /run/gluster'
                  ' && ip link set lo up && exec "$@"')
        with open(self.dir / "log" / "namespace.out", "wb") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child",
                 "sh", "-c", inside, "sh", "glusterd", "-N", "-f", str(volfile),
                 "-l", str(self.log)], stdout=out, stderr=subprocess.STDOUT)
        wait_for("glusterd did not answer", lambda: self.cli_ok("volume", "list"),
                 [self.log, self.dir / "log" / "namespace.out"], [self.proc])
        host = loopback_name()
        for volume, options in volumes.items():
            brick = self.dir / "bricks" / volume
            brick.mkdir(exist_ok=True)
            # force: the brick is a directory on the root file system, which gluster
            # otherwise refuses.
            self.cli("volume", "create", volume, f"{host}:{brick}", "force")
            if options:
                self.cli("volume", "set", volume, *" ".join(options).split())
            self.cli("volume", "start", volume)
        for volume in volumes:
            wait_for(f"the brick of gluster volume {volume} did not come online",
                     lambda volume=volume: self.online(volume),     # type: ignore[misc]
                     [self.log, *(self.dir / "log" / "bricks").glob("*.log")], [self.proc])

    def cli_argv(self, *args: str) -> List[str]:
        return ["gluster", "--mode=script", f"--glusterd-sock={self.dir / 'glusterd.socket'}",
                f"--log-file={self.dir / 'log' / 'cli.log'}", *args]

    def cli(self, *args: str) -> str:
        return run(self.cli_argv(*args), "gluster", [self.log])

    def cli_ok(self, *args: str) -> bool:
        return subprocess.run(self.cli_argv(*args), capture_output=True,
                              timeout=START_TIMEOUT).returncode == 0

    def online(self, volume: str) -> bool:
        """Whether every brick of volume is online, as glusterd says."""
        done = subprocess.run(self.cli_argv("volume", "status", volume, "--xml"),
                              capture_output=True, text=True, timeout=START_TIMEOUT)
        if done.returncode != 0:
            return False
        nodes = ElementTree.fromstring(done.stdout).findall(".//volume/node")
        return bool(nodes) and all(node.findtext("status") == "1" for node in nodes)

    def mount_argv(self, volume: str, options: Sequence[str], point: Path) -> List[str]:
        assert self.proc is not None
        return ["nsenter", f"--net=/proc/{self.proc.pid}/ns/net", "glusterfs", "--no-daemon",
                f"--log-file={self.mount_logs(point, 0)[0]}", "--volfile-server=127.0.0.1",
                f"--volfile-id={volume}", *options, str(point)]

    def mount_logs(self, point: Path, pid: int) -> List[Path]:
        return [self.dir / "log" / f"mount-{point.name}.log"]

    def stop(self) -> None:
        """Kill glusterd, and with it its namespaces and bricks."""
        if self.proc is None:
            return
        # unshare ignores SIGTERM while it waits for its child, glusterd, the first process
        # of the pid namespace: when that exits, the kernel kills the bricks. Killed, not
        # asked to leave: the volumes are thrown away with root.
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            for child in children.read_text().split():
                os.kill(int(child), signal.SIGKILL)
        except OSError:         # unshare or glusterd has exited already
            pass
        end(self.proc)
        self.proc = None


# --- CephFS ---

class Ceph:
    """A single-node Ceph cluster and a file system: a monitor, an OSD that keeps its objects in
    memory, an MDS; no manager, no authentication, pools of one copy. Everything it writes is
    under root; it listens on 127.0.0.1 only, the monitor on a free port."""

    DAEMONS = (("ceph-mon", "mon.a", ("-i", "a")), ("ceph-osd", "osd.0", ("-i", "0")),
               ("ceph-mds", "mds.a", ("-i", "a")))

    def __init__(self, root: Path) -> None:
        self.dir = root
        self.conf = root / "ceph.conf"
        self.daemons: List[subprocess.Popen[bytes]] = []

    def log(self, name: str) -> Path:
        return self.dir / "log" / f"{name}.log"

    def logs(self) -> List[Path]:
        """The daemons' own output (where a bad start says why), then their logs."""
        return ([self.dir / "log" / f"{name}.out" for _, name, _ in self.DAEMONS]
                + [self.log(name) for _, name, _ in self.DAEMONS])

    def start(self) -> None:
        """Make the cluster, start its daemons and wait until the file system is active."""
        for sub in ("log", "run", "crash"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        fsid, port = uuid.uuid4(), free_port()
        self.write_conf(fsid, f"v2:127.0.0.1:{port}")
        monmap = self.dir / "monmap"
        run(["monmaptool", "--create", "--addv", "a", f"[v2:127.0.0.1:{port}]",
             "--fsid", str(fsid), str(monmap)], "monmaptool")
        run(["ceph-mon", "-c", str(self.conf), "-i", "a", "--mkfs", "--monmap", str(monmap)],
            "ceph-mon --mkfs", self.logs())
        self.daemon(0)
        osd_uuid = str(uuid.uuid4())
        osd_id = self.cli("osd", "new", osd_uuid).strip()       # waits for the monitor
        (self.dir / f"osd.{osd_id}").mkdir()
        run(["ceph-osd", "-c", str(self.conf), "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid],
            "ceph-osd --mkfs", self.logs())
        self.daemon(1)
        self.cli("osd", "pool", "create", "cephfs_metadata")
        self.cli("osd", "pool", "create", "cephfs_data")
        self.cli("fs", "new", "cephfs", "cephfs_metadata", "cephfs_data")
        self.daemon(2)
        wait_for("the ceph MDS did not become active", self.active, self.logs(), self.daemons)

    def write_conf(self, fsid: uuid.UUID, mon: str) -> None:
        d = self.dir
        self.conf.write_text(
            f"[global]\nfsid = {fsid}\nmon host = {mon}\n"
            "public addr = 127.0.0.1\ncluster addr = 127.0.0.1\n"
            "auth cluster required = none\nauth service required = none\n"
            "auth client required = none\n"
            "mon allow pool size one = true\nosd pool default size = 1\n"
            "osd pool default min size = 1\nosd objectstore = memstore\n"
            f"run dir = {d / 'run'}\ncrash dir = {d / 'crash'}\nkeyring = {d / 'keyring'}\n"
            f"mon data = {d / '$name'}\nosd data = {d / '$name'}\nmds data = {d / '$name'}\n"
            f"log file = {d / 'log' / '$name.log'}\n"
            f"mon cluster log file = {d / 'log' / 'cluster.log'}\n"
            "admin socket = $run_dir/$name.asok\n"
            # Clients (each ceph-fuse, each ceph command) are many of one name.
            f"[client]\nlog file = {d / 'log' / '$name.$pid.log'}\n"
            "admin socket = $run_dir/$name.$pid.asok\n")

    def daemon(self, index: int) -> None:
        program, name, args = self.DAEMONS[index]
        with open(self.dir / "log" / f"{name}.out", "wb") as out:
            self.daemons.append(subprocess.Popen(
                [program, "-f", "-c", str(self.conf), *args], stdout=out,
                stderr=subprocess.STDOUT))

    def cli(self, *args: str) -> str:
        return run(["ceph", "-c", str(self.conf), "--connect-timeout", f"{START_TIMEOUT:g}",
                    *args], "ceph", self.logs(), START_TIMEOUT + 5)

    def active(self) -> bool:
        """Whether the file system's rank 0 is up:active, as the monitor says."""
        fsmap = json.loads(self.cli("fs", "dump", "--format=json"))
        return any(info["state"] == "up:active" for fs in fsmap["filesystems"]
                   for info in fs["mdsmap"]["info"].values())

    def mount_argv(self, setup: str, options: Sequence[str], point: Path) -> List[str]:
        return ["ceph-fuse", "-f", "-c", str(self.conf), *options, str(point)]

    def mount_logs(self, point: Path, pid: int) -> List[Path]:
        return [self.log(f"client.admin.{pid}"), self.log("mds.a")]

    def stop(self) -> None:
        """Kill the daemons: the cluster is thrown away with root, and an MDS asked to leave
        takes five seconds to."""
        for proc in self.daemons:
            end(proc, signal.SIGKILL)
        self.daemons.clear()


# --- The mounts ---

class Mounts:
    """The setups' servers and mounts under root, made by start() and undone by stop()."""

    def __init__(self, root: Path, setups: Sequence[str] = LOCAL_SETUPS) -> None:
        self.root = root
        self.base = root / "base"               # what the bindfs and sshfs setups mount
        self.setups = list(setups)
        self.points: Dict[str, Tuple[Path, Path]] = {}
        self.mounted: List[Path] = []
        self.clients: List[subprocess.Popen[bytes]] = []   # mount clients that stay ours
        self.timings: Dict[str, float] = {}     # seconds each server and setup took to start
        self.sshd: Optional[subprocess.Popen[bytes]] = None
        self.gluster: Optional[Gluster] = None
        self.ceph: Optional[Ceph] = None
        self.port = 0
        self.key = root / "ssh" / "user_key"

    def start(self) -> "Mounts":
        self.base.mkdir(parents=True, exist_ok=True)
        tools = {SETUPS[name].tool for name in self.setups}
        try:
            if "sshfs" in tools:
                self._start_sshd()
            if "glusterfs" in tools:
                self.gluster = Gluster(self.root / "gluster")
                self._timed("glusterd", lambda: self.gluster.start(      # type: ignore[union-attr]
                    {name: SETUPS[name].volume for name in self.setups
                     if SETUPS[name].tool == "glusterfs"}))
            if "ceph-fuse" in tools:
                self.ceph = Ceph(self.root / "ceph")
                self._timed("ceph", self.ceph.start)
            for name in self.setups:
                pair = (self.root / f"{name}-a", self.root / f"{name}-b")
                self._timed(name, lambda name=name, pair=pair: self._mount_pair(  # type: ignore[misc]
                    name, pair))
                self.points[name] = pair
        except BaseException:
            self.stop()
            raise
        return self

    def _timed(self, what: str, step: Callable[[], None]) -> None:
        started = time.monotonic()
        step()
        self.timings[what] = time.monotonic() - started

    def _mount_pair(self, name: str, pair: Tuple[Path, Path]) -> None:
        for point in pair:
            point.mkdir(exist_ok=True)
            self._mount(name, point)

    def fresh_dir(self, setup: str) -> Tuple[Path, Path]:
        """Make a new directory through setup's mount a; return its paths through a and b.

        Returns once mount b sees it too; raises RuntimeError if it does not within
        START_TIMEOUT seconds.
        """
        a, b = self.points[setup]
        name = "d-" + uuid.uuid4().hex[:12]
        (a / name).mkdir()
        wait_for(f"{setup}: {name}, made through {a}, not seen through {b}", (b / name).is_dir)
        return a / name, b / name

    def _start_sshd(self) -> None:
        ssh = self.root / "ssh"
        ssh.mkdir(exist_ok=True)
        for key in ("host_key", "user_key"):
            if not (ssh / key).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                                str(ssh / key)], check=True)
        shutil.copy(ssh / "user_key.pub", ssh / "authorized_keys")
        self.port = free_port()                 # for this sshd alone
        (ssh / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {ssh / 'host_key'}\n"
            f"PidFile {ssh / 'sshd.pid'}\nAuthorizedKeysFile {ssh / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "Subsystem sftp internal-sftp\n")
        os.makedirs("/run/sshd", exist_ok=True)     # its privilege separation directory
        self.sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-E", str(ssh / "sshd.log"),
                                      "-f", str(ssh / "sshd_config")])

        def accepts() -> bool:                  # until it accepts connections: its own event
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_for("sshd did not start", accepts, [ssh / "sshd.log"], [self.sshd], 10)

    def _mount(self, name: str, point: Path) -> None:
        tool, options, _ = SETUPS[name]
        if tool in ("bindfs", "sshfs"):     # they return once mounted, as daemons
            if tool == "bindfs":
                argv = ["bindfs", *options, str(self.base), str(point)]
            else:
                ssh_options = (f"port={self.port},IdentityFile={self.key},"
                               "StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,"
                               "BatchMode=yes,LogLevel=ERROR")
                argv = ["sshfs", "-o", ssh_options, *options, f"root@127.0.0.1:{self.base}",
                        str(point)]
            subprocess.run(argv, check=True, timeout=30, capture_output=True)
            self.mounted.append(point)
            return
        # The cluster clients run in the foreground as children of ours, so that stop() can
        # end them even if their mount never came.
        server = self.gluster if tool == "glusterfs" else self.ceph
        assert server is not None
        out = self.root / f"{point.name}.out"
        with open(out, "wb") as f:
            client = subprocess.Popen(server.mount_argv(name, options, point), stdout=f,
                                      stderr=subprocess.STDOUT)
        self.clients.append(client)
        self.mounted.append(point)
        wait_for(f"{name}: {point} was not mounted", lambda: answers(point),
                 [out, *server.mount_logs(point, client.pid)], [client])

    def stop(self) -> None:
        """Unmount everything, then end the mount clients and the servers."""
        for point in reversed(self.mounted):
            # Lazily: a process still in the mount (a test's leftover) does not keep it.
            subprocess.run(["umount", "--lazy", str(point)], capture_output=True)
        self.mounted.clear()
        self.points.clear()
        for client in self.clients:             # each exits once its mount is gone
            end(client)
        self.clients.clear()
        if self.gluster is not None:
            self.gluster.stop()
            self.gluster = None
        if self.ceph is not None:
            self.ceph.stop()
            self.ceph = None
        if self.sshd is not None:
            end(self.sshd)
            self.sshd = None


# --- The check: python3 scripts/mounts.py --check SETUP... ---

def write_read(a: Path, b: Path) -> str:
    """Write a file through a and read it through b; say what b read, and after how long."""
    text = f"written through a: {uuid.uuid4().hex}\n"
    started = time.monotonic()
    (a / "file.txt").write_text(text)
    written = time.monotonic()
    while True:
        try:
            seen = (b / "file.txt").read_text()
        except FileNotFoundError:
            seen = None
        if seen == text:
            return (f"ok: the write took {1000 * (written - started):.1f} ms, b read it "
                    f"{1000 * (time.monotonic() - written):.1f} ms after")
        if time.monotonic() - written > 5:
            return f"FAILED: b read {seen!r} for 5 s, not {text!r}"
        time.sleep(POLL)


def racer(directory: str, rounds: int, barrier: "multiprocessing.synchronize.Barrier",
          results: "multiprocessing.Queue[Tuple[List[int], List[str]]]") -> None:
    """Create race-N in directory with O_CREAT|O_EXCL for each round, all at the barrier."""
    won, errors = [], []
    for n in range(rounds):
        barrier.wait(30)
        try:
            os.close(os.open(os.path.join(directory, f"race-{n}"),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            won.append(n)
        except FileExistsError:
            pass
        except OSError as error:
            errors.append(f"round {n}: {error}")
    results.put((won, errors))


def race_exclusive(a: Path, b: Path, rounds: int) -> Tuple[List[int], int, List[str]]:
    """Race a process on a against one on b to create each of rounds names exclusively;
    return how many rounds each won, how many both won, and the errors."""
    fork = multiprocessing.get_context("fork")
    barrier, results = fork.Barrier(2), fork.Queue()
    procs = [fork.Process(target=racer, args=(str(side), rounds, barrier, results))
             for side in (a, b)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join()
    wins = [set(won) for won, _ in outcomes]
    return ([len(won) for won in wins], len(wins[0] & wins[1]),
            [error for _, errors in outcomes for error in errors])


def flock_excludes(a: Path, b: Path) -> str:
    """Whether an exclusive flock through a keeps one through b from being taken."""
    # A flock belongs to an open file description: two opens in one process are as two
    # processes.
    mine = os.open(a / "flock.txt", os.O_RDWR | os.O_CREAT, 0o644)
    theirs = -1
    try:
        fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
        theirs = os.open(b / "flock.txt", os.O_RDWR)
        fcntl.flock(theirs, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "no (b took it while a held it)"
    except BlockingIOError:
        return "yes"
    except OSError as error:
        return f"error: {error}"
    finally:
        for fd in (mine, theirs):
            if fd >= 0:
                os.close(fd)


def check(made: Mounts, setup: str, rounds: int) -> bool:
    """Print what setup's mounts do of what the tests rely on; return whether it is enough."""
    started = time.monotonic()
    a, b = made.fresh_dir(setup)
    print(f"{setup}: fresh_dir: {a.name}, seen through b after "
          f"{1000 * (time.monotonic() - started):.1f} ms")
    written = write_read(a, b)
    print(f"{setup}: a file written through a, read through b: {written}")
    started = time.monotonic()
    (won_a, won_b), both, errors = race_exclusive(a, b, rounds)
    neither = rounds - (won_a + won_b - both)
    print(f"{setup}: O_CREAT|O_EXCL across the mounts, {rounds} rounds: {both} double winners, "
          f"{neither} rounds without a winner; a won {won_a}, b {won_b} "
          f"({time.monotonic() - started:.1f} s)")
    if errors:      # sshfs says EPERM, not EEXIST, to the loser
        print(f"{setup}:   {len(errors)} losses with another error than EEXIST, the first: "
              f"{errors[0]}")
    print(f"{setup}: flock through a excludes flock through b: {flock_excludes(a, b)}")
    return written.startswith("ok") and both == 0 and neither == 0


def main(argv: Optional[Sequence[str]] = None) -> int:

    parser = argparse.ArgumentParser(prog="mounts.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", nargs="+", required=True, choices=list(SETUPS),
                        metavar="SETUP", help=f"the setups to check: {', '.join(SETUPS)}")
    parser.add_argument("--rounds", type=int, default=200,
                        help="rounds of the O_CREAT|O_EXCL race (default: 200)")
    args = parser.parse_args(argv)
    why = why_not(args.check)
    if why is not None:
        print(f"mounts.py: cannot mount: {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="filechat-mounts-") as root:
        made = Mounts(Path(root), args.check)
        started = time.monotonic()
        made.start()
        print(f"up in {time.monotonic() - started:.2f} s: " + ", ".join(
            f"{what} {seconds:.2f} s" for what, seconds in made.timings.items()))
        try:
            ok = all([check(made, setup, args.rounds) for setup in args.check])
        finally:
            started = time.monotonic()
            made.stop()
            print(f"stopped in {time.monotonic() - started:.2f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
