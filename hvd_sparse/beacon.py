"""Heartbeats between the ranks of one job, outside MPI, so that a rank stuck in a collective can say
which ranks did not arrive.

When a collective hangs, MPI says nothing about who is missing, and the ranks that wait cannot ask it
(their one channel is the one that hangs). So every rank's watchdog thread (``dist.waiting``) also
sends, once per poll, a small UDP datagram to its job's rank 0: its rank, how many collectives it
has entered, and whether it waits in one now. Rank 0 keeps the latest of each, and answers every
rank with the list of ranks that are late: silent (a frozen or lost process sends nothing) or alive
but not waiting in the newest collective. A rank whose wait times out names those ranks; one that
hears nothing from rank 0 names rank 0. UDP costs nothing when all is well (one datagram per rank
per second) and never blocks; where it is filtered the watchdog still ends the job, without names.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Sequence

MAX_NAMED = 8  # ranks named in one line; the rest are counted
SILENT_POLLS = 3  # a rank unheard for this many polls (and at least 2 s) is silent


def host_addresses() -> list[str]:
    """This host's IPv4 addresses other hosts may reach it at (loopback first, for ranks on it)."""
    found = ["127.0.0.1"]
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET, socket.SOCK_DGRAM):
            found.append(str(info[4][0]))
    except OSError:
        pass
    try:  # the address this host sends from by default (no datagram leaves: UDP connect only routes)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routed like any outside address, never used
            found.append(probe.getsockname()[0])
    except OSError:
        pass
    return list(dict.fromkeys(a for a in found if not a.startswith("127.") or a == "127.0.0.1"))


def late_ranks(table: dict[int, tuple[float, int, bool]], size: int, now: float, silent_after: float) -> list[list]:
    """[rank, why] for every rank not waiting in the newest collective: from ``table``, rank ->
    (when last heard, collectives entered, waiting now)."""
    target = max((entered for _, entered, waits in table.values() if waits), default=None)
    late = []
    for rank in range(size):
        if rank not in table:
            late.append([rank, "never heard from"])
            continue
        heard, entered, waits = table[rank]
        if now - heard > silent_after:
            late.append([rank, f"silent for {now - heard:.0f} s: frozen or lost"])
        elif not waits or (target is not None and entered < target):
            late.append([rank, "alive, not in the collective: busy or stuck elsewhere"])
    return late


def describe(late: Sequence[Sequence[Any]], total: int) -> str:
    """``rank 1 (silent for 12 s: frozen or lost), rank 3 (...)``: at most MAX_NAMED of the ``total``."""
    named = ", ".join(f"rank {rank} ({why})" for rank, why in late[:MAX_NAMED])
    shown = min(len(late), MAX_NAMED)
    return named + (f" and {total - shown} more" if total > shown else "")


class Beacon:
    """One rank's end of the heartbeats (see the module doc); ``beat`` may be called from two threads."""

    def __init__(self, rank: int, size: int, poll: float):
        self.rank, self.size = rank, size
        self.silent_after = max(2.0, SILENT_POLLS * poll)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.setblocking(False)
        self.root: list[tuple[str, int]] = []  # where rank 0 listens (every address it may be reached at)
        self.table: dict[int, tuple[float, int, bool]] = {}  # rank 0: what each rank last said
        self.senders: dict[int, Any] = {}  # rank 0: the address each rank sends from
        self.reply: tuple[float, list, int] | None = None  # other ranks: when rank 0 last answered, its list, its count
        self.quiet: list[tuple[int, float]] = []  # other ranks: the silent ranks in rank 0's last answer, and for how long
        self.lock = threading.Lock()

    def listen_at(self) -> list[tuple[str, int]]:
        """Rank 0's addresses, for the other ranks (``dist.init`` broadcasts them)."""
        port = self.sock.getsockname()[1]
        return [(address, port) for address in host_addresses()]

    def connect(self, root: Sequence[Sequence[Any]]) -> None:
        self.root = [(str(a), int(p)) for a, p in root]

    def _drain(self) -> list[tuple[dict, Any]]:
        received = []
        while True:
            try:
                data, sender = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return received
            except OSError:
                return received  # e.g. ICMP port unreachable reported on a later call
            try:
                received.append((json.loads(data), sender))
            except ValueError:
                continue

    def _send(self, message: dict, to: Any) -> None:
        try:
            self.sock.sendto(json.dumps(message).encode(), to)
        except OSError:
            pass  # unreachable address (one of rank 0's may be), a full buffer: the next poll tries again

    def beat(self, entered: int, waits: bool, now: float | None = None) -> None:
        """Say where this rank is; on rank 0, take in what the others said and answer each of them."""
        with self.lock:
            self._beat(entered, waits, time.monotonic() if now is None else now)

    def _beat(self, entered: int, waits: bool, now: float) -> None:
        if self.rank == 0:
            self.table[0] = (now, entered, waits)
            for message, sender in self._drain():
                rank = message.get("rank")
                if isinstance(rank, int) and 0 < rank < self.size:
                    self.table[rank] = (now, int(message.get("entered", 0)), bool(message.get("waits")))
                    self.senders[rank] = sender
            late = late_ranks(self.table, self.size, now, self.silent_after)
            quiet = self._quiet(now, self.silent_after)[:MAX_NAMED + 1]
            for sender in self.senders.values():
                self._send({"late": late[:MAX_NAMED + 1], "count": len(late), "quiet": quiet}, sender)
            return
        for message, _ in self._drain():
            if isinstance(message.get("late"), list):
                self.reply = (now, message["late"], int(message.get("count", len(message["late"]))))
                self.quiet = [(int(r), float(age)) for r, age in message.get("quiet", [])]
        for address in self.root:
            self._send({"rank": self.rank, "entered": entered, "waits": waits}, address)

    def late(self, now: float | None = None) -> str | None:
        """The ranks that did not arrive, in words; None if nothing is known (UDP filtered)."""
        now = time.monotonic() if now is None else now
        if self.rank == 0:
            late = late_ranks(self.table, self.size, now, self.silent_after)
            return describe(late, len(late)) if any(r != 0 for r in self.table) and late else None
        if self.reply is None:
            return None
        heard, late, count = self.reply
        if now - heard > self.silent_after:
            return describe([[0, f"silent for {now - heard:.0f} s: frozen or lost"]], 1)
        return describe(late, count) if late else None

    def someone_silent(self, now: float | None = None) -> bool:
        """Whether a rank known here has gone silent (frozen or lost): rank 0 (seen from the others),
        or any rank heard from before (seen from rank 0)."""
        now = time.monotonic() if now is None else now
        if self.rank == 0:
            return any(now - heard > self.silent_after for r, (heard, _, _) in self.table.items() if r != 0)
        return self.reply is not None and now - self.reply[0] > self.silent_after

    def _quiet(self, now: float, longer_than: float) -> list[list]:
        """[rank, seconds] for every rank heard from before and silent longer than ``longer_than`` (rank 0)."""
        return [[r, now - heard] for r, (heard, _, _) in sorted(self.table.items()) if r != 0 and now - heard > longer_than]

    def silent_for(self, seconds: float, now: float | None = None) -> str | None:
        """The ranks silent for longer than ``seconds``, in words (rank 0 among them, seen from the
        others); None if there is none, or nothing is known (UDP filtered)."""
        now = time.monotonic() if now is None else now
        if self.rank == 0:
            quiet = self._quiet(now, seconds)
        elif self.reply is None:
            return None
        elif now - self.reply[0] > seconds:
            quiet = [(0, now - self.reply[0])]
        else:  # rank 0's last word, aged by the time since
            quiet = [(r, age + now - self.reply[0]) for r, age in self.quiet if age + now - self.reply[0] > seconds]
        if not quiet:
            return None
        return "silent: " + describe([[r, f"silent for {age:.0f} s: frozen or lost"] for r, age in quiet], len(quiet))

    def pause(self, seconds: float) -> None:
        """This process was stopped itself for ``seconds``: what it heard before is not news of silence."""
        with self.lock:
            self.table = {r: (t + seconds, n, w) for r, (t, n, w) in self.table.items()}
            if self.reply is not None:
                self.reply = (self.reply[0] + seconds, *self.reply[1:])

    def close(self) -> None:
        self.sock.close()
