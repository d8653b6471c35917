"""Run a CLI's main() with extra arguments on some ranks only: a job whose ranks were started
differently (a per-node environment file, a stale copy of the data or of the spec on one node).

argv: MODULE JSON ARGS...; JSON maps a rank (a string) to the arguments appended for it. The rank
comes from the launcher's environment: hvd.init() has not run yet when the arguments are parsed.
"""
import importlib
import json
import os
import sys

module, extra, args = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
rank = next(os.environ[v] for v in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID") if v in os.environ)
sys.exit(importlib.import_module(module).main(args + extra.get(rank, [])))
