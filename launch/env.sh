# Sourced by the launch/ wrappers and slurm/ scripts: where the project and its environment are.
# HVD_SPARSE_HOME: the checkout (default: the folder above launch/; inside a batch job, whose script
# SLURM copies to a spool folder, the folder sbatch ran in). HVD_SPARSE_VENV: the environment
# (default: $HVD_SPARSE_HOME/.venv, which `make setup` creates).
if [[ -z ${HVD_SPARSE_HOME:-} ]]; then
    _hvd_home="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if [[ -f $_hvd_home/setup.cfg ]]; then HVD_SPARSE_HOME=$_hvd_home; else HVD_SPARSE_HOME=${SLURM_SUBMIT_DIR:-$PWD}; fi
fi
export HVD_SPARSE_HOME
export HVD_SPARSE_VENV=${HVD_SPARSE_VENV:-$HVD_SPARSE_HOME/.venv}
if [[ ! -x $HVD_SPARSE_VENV/bin/python ]]; then
    echo "hvd_sparse: no environment at $HVD_SPARSE_VENV (run 'make setup' in $HVD_SPARSE_HOME, or set HVD_SPARSE_VENV)" >&2
    exit 2
fi
export PATH="$HVD_SPARSE_VENV/bin:$PATH"
export PYTHONUNBUFFERED=1
# Open MPI's TCP between nodes: only the network the node's hostname resolves to (see tcp_network.py),
# unless the user chose interfaces already (OMPI_MCA_btl_tcp_if_include or _exclude).
if [[ -z ${OMPI_MCA_btl_tcp_if_include:-}${OMPI_MCA_btl_tcp_if_exclude:-} ]]; then
    _hvd_net=$(python3 "$HVD_SPARSE_HOME/launch/tcp_network.py" 2>/dev/null || true)
    if [[ -n $_hvd_net ]]; then
        export OMPI_MCA_btl_tcp_if_include=$_hvd_net OMPI_MCA_oob_tcp_if_include=$_hvd_net
    fi
fi
# The sruns started from here (launch/srun-resumable): every PMIx fence by SLURM's ring algorithm
# (SLURM_PMIX_FENCE, read by the step's PMIx plugin when srun starts it; set it to mixed or tree to choose
# otherwise). By default SLURM's PMIx plugin runs a fence that carries no data by its tree algorithm, and
# on SLURM 22.05 with slurm.conf's default TreeWidth that fence returned at once on the first node instead
# of waiting for the others (tests/test_multinode.py checks that the fence waits). Open MPI 4.1 ends
# MPI_Init with such a fence and counts on it as a barrier: a rank that leaves MPI_Init early sends its
# first message to a rank on another node that is still exchanging addresses, whose MPI cannot take it
# yet, and that rank dies of a segmentation fault (found in CI, on a study packed on two nodes).
export SLURM_PMIX_FENCE=${SLURM_PMIX_FENCE:-ring}
# A node that vanishes (power, network) ends the job within about 30 s instead of hanging mpirun: TCP
# keepalive between mpirun and its daemons on the other nodes, 10 s idle then 4 probes 5 s apart
# (Open MPI's default, 300 s then 9 x 20 s, never ends a job whose launcher is busy aborting it).
export OMPI_MCA_oob_tcp_keepalive_time=${OMPI_MCA_oob_tcp_keepalive_time:-10}
export OMPI_MCA_oob_tcp_keepalive_intvl=${OMPI_MCA_oob_tcp_keepalive_intvl:-5}
export OMPI_MCA_oob_tcp_keepalive_probes=${OMPI_MCA_oob_tcp_keepalive_probes:-4}
