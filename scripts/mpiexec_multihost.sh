#!/bin/bash
# The MPI strategies on several hosts with MPICH's Hydra mpiexec (no batch system).
#
#   scripts/mpiexec_multihost.sh hosts.txt 8 allreduce --epochs 5
#
# hosts.txt: one host per line, optionally "host:slots" (slots = ranks to put there), e.g.
#   node01:4
#   node02:4
# Needs: passwordless ssh between the hosts; this checkout, its .venv and the data at the
# same path on every host (or a shared file system; --data-dir to point at the data); the
# same MPI everywhere. The run compares flags and a data digest across ranks and stops
# with an error naming the mismatch.
#
# Placement: -ppn ranks per host, each bound to T cores (-bind-to core:T) running T Numba
# threads: ranks x T per host = its physical cores. -iface picks the network interface
# (e.g. ib0 for IPoIB, eth0); with UCX/libfabric the fast fabric is used when present.
set -euo pipefail

HOSTS=${1:?usage: $0 HOSTFILE NRANKS [STRATEGY] [cnn.parallel.mpi flags...]}
P=${2:?number of ranks}
STRATEGY=${3:-allreduce}
shift 3 || shift $#
T=${THREADS:-1}
PPN=${PPN:-4}
VENV=${VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}
IFACE_ARGS=()
[ -n "${IFACE:-}" ] && IFACE_ARGS=(-iface "$IFACE")

exec "$VENV/bin/mpiexec" -f "$HOSTS" -n "$P" -ppn "$PPN" -bind-to "core:$T" \
    "${IFACE_ARGS[@]}" \
    -genv OMP_NUM_THREADS 1 -genv NUMBA_NUM_THREADS "$T" \
    -genv NUMBA_CACHE_DIR "${NUMBA_CACHE_DIR:-$PWD/.numba_cache}" \
    "$VENV/bin/python" -m cnn.parallel.mpi --strategy "$STRATEGY" \
    --backend "${BACKEND:-numba}" --threads "$T" --dataset fashion-mnist --no-progress \
    --experiment mpi_multihost "$@"
