"""Several hosts on this one machine, for real multi-node tests (as root).

Each host is a Linux network namespace with one address on a private bridge; the bridge sits in a
namespace of its own, so the machine's own interfaces, routes and addresses are never touched and
only the addresses made here are used. Every process started on a host (``bin/enter HOST ...``) runs
in its namespace under the host's name (``unshare --uts``), with an ``/etc/hosts`` naming every host
bind-mounted in a mount namespace of its own (the rest of the file system, /sys and its cgroups
included, is the machine's, as a shared file system is on a cluster). So ranks on two hosts talk over TCP only, as on a
cluster: Open MPI sees two nodes (no shared memory between them), Horovod and torch count the ranks
per host, and killing one namespace's processes is a node failure.

Each host also has a ``docker0`` bridge holding 172.17.0.1, the same address on every host, as on
nodes that run Docker: the classic multi-node trap, where Open MPI's TCP transport connects to that
address and reaches the rank's own host (a hang) unless a launcher selects the interfaces.

Hosts are reached the way launchers reach them, through ``ssh``: ``bin/ssh`` here (first on the PATH
of ``env()``) is the rsh agent, and runs the command on the host with the fresh login environment sshd
would give (HOME, USER, a system PATH), in HOME. mpirun, horovodrun and the tests all go through it.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil

SUBNET = "10.213.0"  # inside the cluster's own namespaces only
ENTER = r"""#!/bin/bash
# enter HOST COMMAND...: run COMMAND on the virtual host HOST (its network namespace, its /etc/hosts, its
# hostname), keeping the caller's environment.
set -eu
dir=$(cd "$(dirname "$0")/.." && pwd)
ns=$(awk -v h="$1" '$1 == h { print $2 }' "$dir/hosts")
[[ -n $ns ]] || { echo "enter: no virtual host $1" >&2; exit 255; }
exec nsenter --net="/run/netns/$ns" unshare --mount --uts -- \
    /bin/sh -c 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' "$dir/etc-hosts" "$@"
"""
SSH = r"""#!/bin/bash
# ssh to the virtual hosts: `ssh [options] HOST [COMMAND...]` runs COMMAND on HOST with a login's fresh
# environment (HOME, USER, a system PATH), in HOME, through a shell as sshd does; options are ignored.
set -u
host=
while (($#)); do  # options may come before and after HOST (as OpenSSH takes them); the rest is COMMAND
    case $1 in
        -[BbcDEeFIiJLlmOopQRSWw]) shift 2 ;;
        -[BbcDEeFIiJLlmOopQRSWw]*) shift ;;
        --) shift; break ;;
        -*) shift ;;
        *) [[ -z $host ]] || break; host=$1; shift ;;
    esac
done
[[ -n $host ]] || { echo "usage: ssh HOST COMMAND" >&2; exit 255; }
grep -q "^$host " "$(dirname "$0")/../hosts" \
    || { echo "ssh: Could not resolve hostname $host: Name or service not known" >&2; exit 255; }
exec "$(dirname "$0")/enter" "$host" env -i HOME="$HOME" USER="${USER:-root}" LOGNAME="${USER:-root}" \
    SHELL=/bin/sh PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/sh -c 'cd && exec /bin/sh -c "$0"' "$*"
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class VirtualHosts:
    """``VirtualHosts(["vh1", "vh2"])``: ``start()``, then ``ssh(host, command)``; ``stop()`` always."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.tag = f"hvs{uuid.uuid4().hex[:6]}"  # this cluster's namespaces: hvsXXXXXX-net, hvsXXXXXX-<host>
        self.root = Path(tempfile.mkdtemp(prefix="hvd-sparse-hosts-"))
        self.address = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(names)}

    def namespace(self, host: str) -> str:
        return f"{self.tag}-{host}"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def start(self) -> None:
        net = f"{self.tag}-net"
        _ip("netns", "add", net)
        _ip("-n", net, "link", "add", "br0", "type", "bridge")
        _ip("-n", net, "link", "set", "br0", "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in self.address.items())
        for i, host in enumerate(self.names):
            ns = self.namespace(host)
            _ip("netns", "add", ns)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", net)
            _ip("-n", net, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address[host]}/24", "dev", "eth0")
            for link in ("eth0", "lo"):
                _ip("-n", ns, "link", "set", link, "up")
            self._docker0(ns)
        (self.root / "etc-hosts").write_text(hosts)
        (self.root / "hosts").write_text("".join(f"{h} {self.namespace(h)}\n" for h in self.names))
        self.bin.mkdir()
        for name, text in (("enter", ENTER), ("ssh", SSH)):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)

    @staticmethod
    def _docker0(ns: str) -> None:
        """Docker's bridge with one container's link attached (so it is up), 172.17.0.1 on every host."""
        _ip("-n", ns, "link", "add", "docker0", "type", "bridge")
        _ip("-n", ns, "link", "add", "vethd0", "type", "veth", "peer", "name", "vethd1")
        _ip("-n", ns, "link", "set", "vethd0", "master", "docker0")
        for link in ("vethd0", "vethd1", "docker0"):
            _ip("-n", ns, "link", "set", link, "up")
        _ip("-n", ns, "addr", "add", "172.17.0.1/16", "dev", "docker0")

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` with this cluster's ssh first on the PATH."""
        return {**base, "PATH": f"{self.bin}{os.pathsep}{base.get('PATH', '')}"}

    def command(self, host: str, command: str, env: dict[str, str]) -> list[str]:
        """The argv that runs ``command`` (a shell line) on ``host`` as a login there, with ``env``'s
        variables exported first (a login's own environment is bare, as after ssh)."""
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k.isidentifier() and "\n" not in v)
        return [str(self.bin / "ssh"), host, f"export {exports}; {command}"]

    def enter(self, host: str) -> list[str]:
        """The argv prefix that runs a command on ``host`` keeping the caller's environment (daemons)."""
        return [str(self.bin / "enter"), host]

    def ssh(self, host: str, command: str, env: dict[str, str], timeout: float, cwd: Path) -> subprocess.CompletedProcess:
        line = f"cd {shlex.quote(str(cwd))} && {command}"
        return subprocess.run(self.command(host, line, self.env(env)), capture_output=True, text=True, timeout=timeout)

    def pids(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.namespace(host)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def processes(self, host: str, settle: float = 5.0) -> list[str]:
        """What still runs on ``host`` ``settle`` s after the call at the latest: "pid (parent) command
        line" per process. Zombies are left out: they have ended, and one whose parent is this machine's
        init waits there until init reaps it. The wait is for processes on their way out (seen in CI: a
        rank killed as its job ended, its command line already gone, listed a moment after mpirun
        returned); one that goes on running is still listed."""
        deadline = time.monotonic() + settle
        while (left := self._running(host)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def _running(self, host: str) -> list[str]:
        out = []
        for pid in self.pids(host):
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{pid} (parent {p.ppid()}) {' '.join(p.cmdline())[:200]}")
            except psutil.Error:
                pass
        return out

    def kill_host(self, host: str) -> None:
        """Every process on ``host`` killed at once (SIGKILL), as when a node dies."""
        for pid in self.pids(host):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Every process on every host killed, the namespaces and their files removed."""
        for host in self.names:
            for _ in range(20):
                self.kill_host(host)
                if not self.pids(host):
                    break
                time.sleep(0.1)
            subprocess.run(["ip", "netns", "del", self.namespace(host)], capture_output=True)
        subprocess.run(["ip", "netns", "del", f"{self.tag}-net"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

