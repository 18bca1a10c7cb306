#!/usr/bin/env bash
# The whole GPU check of the cuda backend as one offline command, in under 8 minutes:
#
#   PYTHONPATH=. bash scripts/gpu_check.sh              # on the GPU machine (python3, no installs)
#   bash scripts/gpu_check.sh --simulate                # here / in CI: the same stages, tiny,
#                                                       # in Numba's CUDA simulator
#   bash scripts/gpu_check.sh --out results/bench_gpu.pkl --python .venv/bin/python
#
# Stages, each stopped at its time limit:
#   1. env      the environment probe (versions, NVVM, device; the backend's probe kernel)
#   2. compile  every float32 kernel compiled for sm_90: registers, shared memory, spills
#   3. tests    pytest -m gpu: full-size equivalence with NumPy, 200 steps with device memory
#               flat, prefetched uploads bitwise equal, a short digits training run
#   4. bench    benchmarks/bench_gpu.py --grid gpu-quick -> $OUT/bench_gpu.pkl (or --out;
#               without either results/bench_gpu.pkl, or under $TMPDIR with --simulate)
# then one summary table. Logs go next to the benchmark file. Exit status 0 when every
# stage passed. Nothing is installed and nothing is fetched: the project runs from this
# source tree (PYTHONPATH=.) on the machine's own python3 and packages.
set -uo pipefail
cd "$(dirname "$0")/.."

simulate=0
python=python3
bench_out=""
while (($#)); do
    case "$1" in
        --simulate) simulate=1 ;;
        --out) bench_out=${2:?--out needs a path}; shift ;;
        --python) python=${2:?--python needs an interpreter}; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# simulator rows are a wiring check: they never land in results/ unless asked to
if ((simulate)); then out_dir=${OUT:-${TMPDIR:-/tmp}/gpu_check_simulate}; else out_dir=${OUT:-results}; fi
[[ -n "$bench_out" ]] || bench_out="$out_dir/bench_gpu.pkl"
log_dir=$(dirname "$bench_out")/gpu_check_logs
mkdir -p "$log_dir" || { echo "gpu_check.sh: cannot create $log_dir" >&2; exit 2; }

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-${TMPDIR:-/tmp}/cnn-numba-cache}
unset NUMBA_ENABLE_CUDASIM CNN_GPU_CHECK_SIMULATE

if ((simulate)); then
    mode="simulator (tiny sizes)"
    grid=sim-tiny
    sim_env=(env NUMBA_ENABLE_CUDASIM=1 CNN_GPU_CHECK_SIMULATE=1)
    limits=(120 240 420 240)  # the simulator is slow; CI runs this
else
    mode="GPU"
    grid=gpu-quick
    sim_env=(env)
    limits=(60 100 140 170)   # 470 s in all: under 8 minutes with start-up
fi

names=() results=() seconds=() notes=()
start_all=$SECONDS

stage() {  # stage NAME LIMIT_S COMMAND...: run it under a time limit, log it, record it
    local name=$1 limit=$2
    shift 2
    local log="$log_dir/$name.log" t0=$SECONDS rc
    printf '\n=== %s (limit %ss): %s\n' "$name" "$limit" "$*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local note result=ok
    note=$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-70)
    if ((rc == 124 || rc == 137)); then
        result="TIMEOUT"
        note="stopped after ${limit}s"
    elif ((rc != 0)); then
        result="FAIL($rc)"
    fi
    names+=("$name") results+=("$result") seconds+=("$((SECONDS - t0))") notes+=("$note")
}

printf 'gpu_check.sh: %s, %s, benchmark -> %s\n' "$mode" "$("$python" --version 2>&1)" \
    "$bench_out"

stage env "${limits[0]}" "${sim_env[@]}" "$python" -m cnn.backends.cuda_compile --env

# compiling needs numba-cuda's real target (NVVM), never the simulator
stage compile "${limits[1]}" "$python" -m cnn.backends.cuda_compile --cc 9.0 \
    --dtypes float32 --json "$log_dir/kernels_sm90.json"

stage tests "${limits[2]}" "${sim_env[@]}" "$python" -m pytest -q -m gpu -p no:cacheprovider \
    -rs -o addopts="" --timeout "${limits[2]}" tests/test_numba_cuda.py tests/test_cuda_memory.py
# a GPU test that skipped did not check anything: that is a failure here
if grep -qE '[0-9]+ skipped' "$log_dir/tests.log" && [[ ${results[-1]} == ok ]]; then
    results[-1]="FAIL"
    notes[-1]=$(grep -m1 -E '^SKIPPED' "$log_dir/tests.log" | cut -c1-70)
fi

stage bench "${limits[3]}" "${sim_env[@]}" "$python" benchmarks/bench_gpu.py --grid "$grid" \
    --require-cuda --out "$bench_out"

status=0
printf '\n=== summary (%s, %ss in all)\n' "$mode" "$((SECONDS - start_all))"
printf '%-8s %-9s %6s  %s\n' stage result seconds "last line"
for i in "${!names[@]}"; do
    printf '%-8s %-9s %6s  %s\n' "${names[$i]}" "${results[$i]}" "${seconds[$i]}" "${notes[$i]}"
    [[ ${results[$i]} == ok ]] || status=1
done
printf 'logs: %s; benchmark: %s\n' "$log_dir" "$bench_out"
exit $status
