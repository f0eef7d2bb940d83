#!/usr/bin/env bash
# Everything a lent GPU should run, in one call (see README, "Benchmarks"): the Triton kernels'
# correctness on the device, then the GPU presets of the benchmarks.
#
#   bash benchmarks/gpu_run.sh                # on a CUDA machine; at most GPU_RUN_BUDGET_S (480 s)
#   GPU_RUN_DRY=1 bash benchmarks/gpu_run.sh  # on a CPU, to try this script: the same steps at toy
#                                             # sizes (Triton interpreter), results in a temporary dir
#
# PYTHON picks the interpreter (default python3; for a dry run, the project's venv). Nothing already
# there is installed, and torch never: a CUDA build of it must be there. The package is installed
# editable (pip's build needs setuptools >= 77, upgraded first where an index is reachable); where
# that cannot be done (offline with an older setuptools), or with GPU_RUN_SHIM=1, it is imported
# from a temporary directory that mirrors the installed layout (fastunlearn/).
#
# Each step has its own time limit, cut to what is left of the budget, so one slow step cannot use
# up a session; the benchmarks write every row as they measure it, so a step stopped at its limit
# keeps what it measured. Results: benchmarks/results/*_<device tag>* and gpu_run_<tag>.log. With
# $OUT set (the device tool returns what is written there, at most 8 files), the log, the CSV and
# JSON files and a tarball of everything, plots included, are copied there too.
set -uo pipefail
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # steps run elsewhere
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=${GPU_RUN_DRY:-0}
START=$SECONDS
status=0
log() { echo "[gpu_run +$((SECONDS - START))s] $*"; }

if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
    BUDGET=${GPU_RUN_BUDGET_S:-1200}
    LIMITS=(600 600 600 120 600 600 60 300 300)  # check, bench_ihl, bench_loss, bench_scale, bench_fisher, its --memory, deepspeed, smoke, bench_kl: the interpreter on a shared CPU is slow
    RESULTS=$(mktemp -d)  # the committed CPU results are not touched
    PRESET=dry
    CHECK=(--dry-run)
    # One full-width layer, 16 tokens, r = 2: every phase planned and measured (the Fisher passes,
    # FILA, a training step, save) in about a minute; no memory limit (CUDA only).
    SCALE=(--layers 1 --batch 1 --max-length 16 --rank 2 --threads 1)
else
    # 480 s: one call of the device tool (at most 600 s) with room for a rerun in a 15-minute session.
    # It covers the correctness check, the loss benchmarks and the 32-layer scale run (their limits;
    # they usually finish sooner); the whole job end to end, the KL benchmark, the Fisher benchmarks
    # and DeepSpeed run in what is left (every step's limit: 960 s in all, GPU_RUN_BUDGET_S=960 over
    # two device calls' worth of time).
    BUDGET=${GPU_RUN_BUDGET_S:-480}
    LIMITS=(75 150 100 150 100 55 150 120 60)
    RESULTS=$ROOT/benchmarks/results
    PRESET=gpu
    CHECK=()
    # The memory plan against the device, phase by phase: Llama-2-7B width, all 32 layers, the TOFU
    # setting, in 24 GB of the card (the plan itself runs on the CPU, about a minute).
    SCALE=(--device cuda --layers 32 --batch 4 --max-length 512 --rank 32 --memory-limit 24GiB
        --fisher-memory 4GiB --gradient-checkpointing)
fi
export FASTUNLEARN_BENCH_RESULTS=$RESULTS
mkdir -p "$RESULTS"
MARK=$(mktemp)  # result files newer than this one are this run's

# --- torch: required, never installed ------------------------------------------------------------
if ! "$PY" -c "import torch" 2>/dev/null; then
    log "'$PY' cannot import torch; this script installs no torch (a CUDA build must be there)"
    exit 1
fi
if [ "$DRY" != 1 ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    log "torch sees no CUDA device (GPU_RUN_DRY=1 tries this script on a CPU)"
    exit 1
fi
TAG=$(cd benchmarks && "$PY" -c "import torch; from _common import slug; \
print(slug(torch.device('cpu' if '$DRY' == '1' else 'cuda')))") || exit 1
LOG=$(mktemp)
exec 3>&1 4>&2 > >(tee "$LOG") 2>&1
TEE=$!
log "device tag '$TAG', budget ${BUDGET}s, results in $RESULTS"

# --- other dependencies: installed only if missing, with torch pinned to the installed build ------
CONSTRAINTS=$(mktemp)
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINTS"
pip_install() {  # offline, pip gives up quickly
    timeout 120 "$PY" -m pip install -q --retries 0 --timeout 10 -c "$CONSTRAINTS" "$@"
}
missing=$("$PY" - <<'EOF'
import importlib.util
needed = ["triton", "transformers", "peft", "safetensors", "tqdm", "matplotlib"]
print(" ".join(m for m in needed if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    log "installing missing packages: $missing"
    # shellcheck disable=SC2086
    pip_install $missing || { log "could not install: $missing"; status=1; }
fi
# Other libraries' fused losses, which bench_loss and bench_kl compare with when they are importable
# (the `bench-gpu` extra): installed if missing and an index answers; the benchmarks skip them otherwise.
optional=$("$PY" - <<'EOF'
import importlib.util
wanted = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}
print(" ".join(pip for module, pip in wanted.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$optional" ] && [ "$DRY" != 1 ]; then
    # shellcheck disable=SC2086
    pip_install $optional || log "not installed (the benchmarks skip them): $optional"
fi

# --- the package -----------------------------------------------------------------------------------
from_this_tree() {  # does `import fastunlearn.kernels` (outside the tree) resolve to this checkout?
    (cd benchmarks && "$PY" -c "import sys, fastunlearn.kernels as k, fastunlearn as f; from pathlib import Path; \
sys.exit(not Path(f.__file__).resolve().is_relative_to(Path('$ROOT').resolve()))") 2>/dev/null
}
setuptools_ok() {
    "$PY" -c "import sys, setuptools; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null
}
shim() {
    local dir
    dir=$(mktemp -d)
    mkdir "$dir/fastunlearn"
    ln -s "$ROOT"/fastunlearn/* "$dir/fastunlearn/"
    export PYTHONPATH=$dir${PYTHONPATH:+:$PYTHONPATH}
    log "package imported from $dir (links to this checkout)"
}
if [ "${GPU_RUN_SHIM:-0}" = 1 ]; then
    shim
elif from_this_tree; then
    log "package already installed from this checkout"
else
    setuptools_ok || pip_install --upgrade "setuptools>=77" || true
    if setuptools_ok && "$PY" -m pip install -q --no-deps --no-build-isolation -e .; then
        log "package installed (editable)"
    else
        shim
    fi
fi
from_this_tree || { log "fastunlearn does not import from this checkout"; exit 1; }

if [ "$DRY" != 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# --- the steps ---------------------------------------------------------------------------------------
step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 15 ]; then
        log "$name: skipped, ${left}s of the budget left"
        status=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    log "$name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        log "$name: stopped at its time limit; the rows measured so far are kept"
    fi
    if [ $rc -ne 0 ]; then
        log "$name: exit status $rc"
        status=1
    fi
}
step gpu_check "${LIMITS[0]}" "$PY" benchmarks/gpu_check.py ${CHECK[@]+"${CHECK[@]}"}
step bench_ihl "${LIMITS[1]}" "$PY" benchmarks/bench_ihl.py --preset "$PRESET"
step bench_loss "${LIMITS[2]}" "$PY" benchmarks/bench_loss.py --preset "$PRESET"
# The memory plan at scale: every phase of a FILA + IHL run measured next to the plan's figures
step bench_scale "${LIMITS[3]}" "$PY" benchmarks/bench_scale.py "${SCALE[@]}"
# The whole job on the device: the tiny demo (Trainer, TOFU protocol) and a run stopped by a rule
step gpu_smoke "${LIMITS[7]}" "$PY" benchmarks/gpu_smoke.py ${CHECK[@]+"${CHECK[@]}"}
# The KL retain term from logits and hidden states, against eager PyTorch and Liger's fused linear JSD
step bench_kl "${LIMITS[8]}" "$PY" benchmarks/bench_kl.py --preset "$PRESET"
step bench_fisher "${LIMITS[4]}" "$PY" benchmarks/bench_fisher.py --preset "$PRESET" --quick
step bench_fisher_memory "${LIMITS[5]}" "$PY" benchmarks/bench_fisher.py --preset "$PRESET" --memory
# DeepSpeed ZeRO-3 unlearn vs DDP / one process; writes why it skipped without deepspeed or CUDA
step gpu_deepspeed "${LIMITS[6]}" "$PY" benchmarks/gpu_deepspeed.py

# --- collect -----------------------------------------------------------------------------------------
mapfile -t files < <(find "$RESULTS" -maxdepth 1 -type f -newer "$MARK" -name "*_${TAG}*" ! -name "*.tmp" | sort)
log "exit status $status; result files of this run:"
printf '  %s\n' "${files[@]}"
exec 1>&3 2>&4  # close the pipe to tee, so the log is complete before it is copied
wait "$TEE" 2>/dev/null || sleep 1
cp "$LOG" "$RESULTS/gpu_run_$TAG.log"
files+=("$RESULTS/gpu_run_$TAG.log")
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    tar -czf "$OUT/gpu_results_$TAG.tar.gz" -C "$RESULTS" "${files[@]##*/}"
    copied=1
    for f in "$RESULTS/gpu_run_$TAG.log" "${files[@]}"; do
        case $f in *.csv | *.json | *.log) ;; *) continue ;; esac
        [ -e "$OUT/${f##*/}" ] && continue
        [ $copied -ge 7 ] && break  # the device tool returns at most 8 files, the tarball included
        cp "$f" "$OUT/" && copied=$((copied + 1))
    done
fi
exit $status
