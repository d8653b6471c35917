#!/usr/bin/env python3
"""SLURM's compressed host and task lists, expanded, as horovodrun and mpirun want them.

    launch/slurm_hosts.py                   # -> node01:4,node02:4  (from SLURM_JOB_NODELIST, SLURM_TASKS_PER_NODE)
    launch/slurm_hosts.py --hostfile        # -> one "node01 slots=4" line per host (mpirun --hostfile)
    launch/slurm_hosts.py "node[01-03,07],gpu-a[1-2]" "2(x3),1,4"

Host lists: ``prefix[a-b,c,...]suffix`` ranges keep their zero padding (``[01-03]`` gives 01 02 03),
several bracket groups in one name multiply out, and commas inside brackets do not split hosts.
Task lists: ``2(x3),1`` is 2,2,2,1. Standard library only: runs before any environment exists.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import sys

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    parts.append("".join(current))
    return [p for p in (q.strip() for q in parts) if p]


def _expand_range(body: str, text: str) -> list[str]:
    out = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise ValueError(f"bad range {item!r} in host list {text!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in host list {text!r}")
        width = len(lo) if lo.startswith("0") else 0
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_hostlist(text: str) -> list[str]:
    """``node[01-03,07],gpu-a[1-2]`` -> node01 node02 node03 node07 gpu-a1 gpu-a2 (in order)."""
    hosts = []
    for name in _split_top(text):
        pieces = re.split(r"(\[[^\]]*\])", name)
        choices = [_expand_range(p[1:-1], text) if p.startswith("[") else [p] for p in pieces if p]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    if not hosts:
        raise ValueError(f"empty host list {text!r}")
    return hosts


def expand_tasks(text: str) -> list[int]:
    """``2(x3),1`` -> [2, 2, 2, 1] (SLURM_TASKS_PER_NODE)."""
    out = []
    for item in text.split(","):
        m = re.match(r"^\s*(\d+)(?:\(x(\d+)\))?\s*$", item)
        if not m:
            raise ValueError(f"bad tasks-per-node item {item!r} in {text!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def hosts_with_slots(nodelist: str, tasks_per_node: str) -> list[tuple[str, int]]:
    hosts, tasks = expand_hostlist(nodelist), expand_tasks(tasks_per_node)
    if len(tasks) == 1 and len(hosts) > 1:
        tasks *= len(hosts)
    if len(hosts) != len(tasks):
        raise ValueError(f"{len(hosts)} hosts in {nodelist!r} but {len(tasks)} task counts in {tasks_per_node!r}")
    return list(zip(hosts, tasks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("nodelist", nargs="?", default=os.environ.get("SLURM_JOB_NODELIST"))
    parser.add_argument("tasks", nargs="?", default=os.environ.get("SLURM_TASKS_PER_NODE"))
    parser.add_argument("--hostfile", action="store_true", help="print an mpirun hostfile instead of -H's list")
    args = parser.parse_args(argv)
    if not args.nodelist or not args.tasks:
        sys.stderr.write("slurm_hosts: no SLURM_JOB_NODELIST / SLURM_TASKS_PER_NODE (not inside a SLURM job?)\n")
        return 2
    try:
        pairs = hosts_with_slots(args.nodelist, args.tasks)
    except ValueError as e:
        sys.stderr.write(f"slurm_hosts: error: {e}\n")
        return 2
    if args.hostfile:
        sys.stdout.write("".join(f"{h} slots={n}\n" for h, n in pairs))
    else:
        sys.stdout.write(",".join(f"{h}:{n}" for h, n in pairs) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
