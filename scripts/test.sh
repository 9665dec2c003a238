#!/usr/bin/env bash
# Make .venv, install the pinned test tools into it, then run every check:
# ruff (the tests and scripts too), mypy --strict, vermin (the code must run
# on Python 3.8, the oldest the README claims), the pytest suite against a
# freshly built filechat.pyz; first, the demo and a scripted exchange under
# every Python from 3.8 to 3.13 that this machine has (pyenv's, or on PATH).
set -euo pipefail

cd "$(dirname "$0")/.."
venv=${FILECHAT_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt

# The shared-directory tests mount one directory twice with bindfs and twice
# with sshfs, through an sshd of their own (tests/test_shared.py), and
# scripts/mounts.py serves GlusterFS and CephFS volumes on this machine, each
# mounted twice: as root, their tools come from Debian (tested: bindfs 1.14.7,
# sshfs 3.7.3, OpenSSH 9.2, GlusterFS 10.3, Ceph 16.2.15).
# Elsewhere those tests skip and say why. scripts/bench.py counts system calls
# with strace (tested: 6.1); without it, it says so and measures the rest.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need=()
    command -v strace >/dev/null || need+=(strace)
    command -v bindfs >/dev/null || need+=(bindfs)
    command -v sshfs >/dev/null || need+=(sshfs)
    [ -x /usr/sbin/sshd ] || need+=(openssh-server)
    [ -x /usr/sbin/glusterd ] || need+=(glusterfs-server)
    [ -x /usr/sbin/glusterfs ] || need+=(glusterfs-client)
    for ceph in ceph-mon ceph-osd ceph-mds ceph-fuse; do
        command -v "$ceph" >/dev/null || need+=("$ceph")
    done
    if [ ${#need[@]} -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null \
                 && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
    fi
fi

"$venv/bin/ruff" check filechat.py build_zipapp.py setup.py scripts tests
"$venv/bin/mypy" filechat.py build_zipapp.py
"$venv/bin/vermin" --no-tips --violations --target=3.8- filechat.py build_zipapp.py
found=$( (ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.*/bin/python3 2>/dev/null || true;
          for minor in 8 9 10 11 12 13; do command -v "python3.$minor" || true; done) )
declare -A seen=()
for python in $found; do
    version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
    case $version in 3.8|3.9|3.10|3.11|3.12|3.13) ;; *) continue ;; esac
    [ -z "${seen[$version]:-}" ] || continue
    seen[$version]=1
    PYTHON="$python" bash scripts/demo.sh >/dev/null
    "$python" scripts/exchange.py | sed "s/exchanges ok/demo and exchanges ok/"
done
python3 build_zipapp.py >/dev/null      # filechat.pyz as the default python3 builds it

"$venv/bin/python" -m pytest "$@"
