#!/usr/bin/env bash
# horovodrun with the settings this toolkit relies on; all arguments go to horovodrun unchanged.
#   launch/hvdrun.sh -np 8 python -m hvd_sparse.train --sparsity 0.9 ...
# As root (containers, CI), OpenMPI refuses to start unless both variables below are set; they
# are set only then, so that a normal user's mistake is still caught by OpenMPI.
set -euo pipefail
if [ "$(id -u)" -eq 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export PYTHONUNBUFFERED=1
exec horovodrun "$@"
