#!/usr/bin/env bash
# The GPU run: install fastpeft, run the GPU tests, the full layer benchmark and the memory
# profile, all within a time budget (default 570 s), writing everything into one folder.
#
#   bash bench/gpu.sh [RESULTS_DIR] [--pack] [--sanitize]   # default: $OUT if set, else bench/results/gpu-<time>
#
# --sanitize runs, after the install, compute-sanitizer's memcheck and racecheck over every kernel
# at odd shapes (bench/sanitize.py: output and gradients against float64 as well) instead of the
# tests, the benchmark and the memory profile.
#
# Needs a machine with a GPU and a Python (python3, or $PYTHON) that has torch, triton,
# transformers, peft, matplotlib and tqdm. Nothing is fetched. fastpeft is installed with --no-deps
# into a folder of its own put first on PYTHONPATH (the Python's own packages stay as they are),
# with the CUDA extension when csrc/ and nvcc are there (pure Python if that build fails). Wheels
# in .whl/ (or $WHEELS) are installed there first; bitsandbytes (43 MB) is fetched, elsewhere, with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
#
# Every step has its own time limit and runs whatever the earlier ones did; the log ends with each
# step's status. In RESULTS_DIR:
#   gpu.log                  everything printed, ending with the summary
#   pytest-gpu.xml           the tests that run on the device (test files that use DEVICE or cuda)
#   inspect-vs-gpu.json      registers/spills/shared memory of the kernels the step compiled, against
#                            fastpeft inspect's for the same problem (bench/inspect_vs_gpu.py)
#   bench-*.json/csv/png     fastpeft bench (every provider, Llama projections)
#   memory-*.json/csv/png    fastpeft memory (1b preset; 4-bit rows need bitsandbytes)
#   dispatch.json            the package's dispatch table updated from the bench rows (fastpeft bench
#                            --update-dispatch): copy it to fastpeft/dispatch.json to ship it
#   sanitize-*.log           with --sanitize: each compute-sanitizer tool's report
# With --pack (the default when RESULTS_DIR is $OUT) the result files go into one
# gpu-results.tar.gz beside gpu.log: unpack it into bench/results/, then run `fastpeft report`.
#
# Environment: PYTHON, WHEELS, FASTPEFT_SITE (default /tmp/fastpeft-site), FASTPEFT_GPU_BUDGET
# (total seconds), FASTPEFT_GIT_COMMIT (the commit the results name, where the copy has no .git),
# FASTPEFT_GPU_SMOKE=1 (tiny settings that also run on a CPU, to check the script itself).

set -uo pipefail

PACK=""
SANITIZE=""
ARGS=()
for arg in "$@"; do
    case "$arg" in
        --pack) PACK=1 ;;
        --sanitize) SANITIZE=1 ;;
        -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
        -*) echo "bench/gpu.sh: unknown option $arg (options: --pack, --sanitize, --help)" >&2; exit 2 ;;
        *) ARGS+=("$arg") ;;
    esac
done
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
if [[ ${#ARGS[@]} -gt 0 ]]; then
    DIR=${ARGS[0]}
elif [[ -n ${OUT:-} ]]; then
    DIR=$OUT; PACK=${PACK:-1}
else
    DIR=bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)
fi
mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd) || exit 1
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-$REPO/.whl}
SITE=${FASTPEFT_SITE:-/tmp/fastpeft-site}
TOTAL=${FASTPEFT_GPU_BUDGET:-570}
SMOKE=${FASTPEFT_GPU_SMOKE:-}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SUMMARY=()

# budget DEFAULT: this step's seconds, cut to what the total leaves (minus a reserve for the rest)
budget() {
    local left=$(( TOTAL - SECONDS - 15 ))
    (( $1 < left )) && echo "$1" || echo "$left"
}

# step NAME SECONDS COMMAND...: run COMMAND under a time limit, note its status, never stop
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    if (( limit < 10 )); then
        echo "== $name: not run, the total budget of ${TOTAL}s is spent"
        SUMMARY+=("$name: not run (budget spent)")
        return 1
    fi
    local command="$*"
    echo "== $name (limit ${limit}s): ${command:0:200}"
    timeout -k 10 "$limit" "$@"
    rc=$?
    case $rc in
        0) SUMMARY+=("$name: ok in $(( SECONDS - start ))s") ;;
        124|137) SUMMARY+=("$name: stopped at its ${limit}s limit") ;;
        *) SUMMARY+=("$name: failed (exit $rc) after $(( SECONDS - start ))s") ;;
    esac
    return $rc
}

# everything below also goes to gpu.log
run_all() {
    echo "== bench/gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) in $REPO, results in $DIR, budget ${TOTAL}s"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "(no nvidia-smi)"

    # -- install into $SITE: carried wheels, then fastpeft itself (no deps, no index) -------------------
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        step "wheels" "$(budget 60)" "$PY" -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
    fi
    if [[ -z ${FASTPEFT_GIT_COMMIT:-} ]] && commit=$(git rev-parse --short=12 HEAD 2>/dev/null); then
        [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && commit+="-dirty"
        export FASTPEFT_GIT_COMMIT=$commit
    fi
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)}
    export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-$(nproc)}
    [[ -z $TORCH_CUDA_ARCH_LIST ]] && unset TORCH_CUDA_ARCH_LIST
    install=("$PY" -m pip install -q --no-deps --no-build-isolation --no-index --no-cache-dir --upgrade
             --target "$SITE" "$REPO")
    step "install" "$(budget 150)" "${install[@]}" ||
        FASTPEFT_BUILD_CUDA=0 step "install, pure Python" "$(budget 60)" "${install[@]}"

    # run Python from the results folder with -P: the repository's fastpeft/ and kernels/ folders
    # must not shadow the installed package (fastpeft.kernels lives in kernels/)
    cd "$DIR" || exit 1
    step "environment" "$(budget 60)" "$PY" -P -c '
import importlib.metadata as md, sys, torch, fastpeft
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("fastpeft", "triton", "transformers", "peft", "bitsandbytes", "matplotlib", "tqdm", "pytest-benchmark"):
    try: print(" ", name, md.version(name))
    except md.PackageNotFoundError: print(" ", name, "not installed")
print("  fastpeft from", fastpeft.__file__)
if not torch.cuda.is_available(): print("WARNING: torch sees no GPU; the numbers below are CPU numbers")
'

    if [[ -n $SANITIZE ]]; then
        sanitize
    else
        measure
    fi
    pack_and_summarise
}

# compute-sanitizer over bench/sanitize.py (every kernel, odd shapes, fast and deterministic modes)
sanitize() {
    local tool sanitizer
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    if [[ -z $sanitizer ]]; then
        echo "== sanitize: compute-sanitizer not found"; SUMMARY+=("sanitize: compute-sanitizer not found")
        return
    fi
    local args=("$REPO/bench/sanitize.py")
    [[ -n $SMOKE ]] && args+=(--smoke --dtypes fp32)
    # without the caching allocator every tensor is its own allocation, so memcheck sees an
    # access past a tensor's end instead of landing in a cached block
    for tool in memcheck racecheck; do
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "sanitize $tool" "$(budget 240)" "$sanitizer" --tool "$tool" --error-exitcode 3 \
            --log-file "$DIR/sanitize-$tool.log" --print-limit 50 "$PY" -P "${args[@]}"
        tail -n 20 "$DIR/sanitize-$tool.log" 2>/dev/null
    done
}

# the GPU tests, the benchmark, the memory profile and a README preview
measure() {
    # -- the tests that run on the device --------------------------------------------------------------
    mapfile -t TESTS < <(cd "$REPO" && grep -lE "DEVICE|cuda" tests/test_*.py | sed "s|^|$REPO/|")
    if [[ -n $SMOKE ]]; then TESTS=("$REPO/tests/test_lowrank_op.py"); fi
    step "tests" "$(budget 120)" "$PY" -P -m pytest -q -rfEs -p no:cacheprovider --rootdir "$REPO" \
        -c "$REPO/pyproject.toml" --junitxml="$DIR/pytest-gpu.xml" "${TESTS[@]}"

    # -- the binaries the step compiled on the device against fastpeft inspect's, for the same problem --
    step "inspect vs GPU" "$(budget 90)" "$PY" -P "$REPO/bench/inspect_vs_gpu.py" --out "$DIR/inspect-vs-gpu.json"

    # -- benchmark and memory profile ------------------------------------------------------------------
    b=$(budget 180)
    if [[ -n $SMOKE ]]; then
        step "bench" "$b" "$PY" -P -m fastpeft bench --quick --out "$DIR" --plot --no-progress
    else
        # --max-minutes stops starting new cases in time to write the files (the rest: skipped rows)
        minutes=$("$PY" -c "print(max(0.5, ($b - 45) / 60))")
        step "bench" "$b" "$PY" -P -m fastpeft bench --out "$DIR" --plot --no-progress --max-minutes "$minutes"
        results=$(ls -t "$DIR"/bench-*.json 2>/dev/null | head -n 1)
        if [[ -n $results ]] && cp "$REPO/fastpeft/dispatch.json" "$DIR/dispatch.json"; then
            step "dispatch" "$(budget 30)" "$PY" -P -m fastpeft bench --update-dispatch "$results" \
                --dispatch-table "$DIR/dispatch.json"
        fi
    fi
    if [[ -n $SMOKE ]]; then
        step "memory" "$(budget 120)" "$PY" -P -m fastpeft memory --preset tiny --batch-sizes 1,2 \
            --seq-lens 32 --steps 1 --out "$DIR" --plot --no-progress
    else
        step "memory" "$(budget 90)" "$PY" -P -m fastpeft memory --preset 1b --batch-sizes 1,2,4,8 \
            --seq-lens 512,1024 --steps 3 --out "$DIR" --plot --no-progress
    fi

    # -- the README section these results give (printed, nothing is rewritten) -------------------------
    printf '# preview\n' > /tmp/fastpeft-readme-preview.md
    step "report" "$(budget 20)" "$PY" -P -m fastpeft report --results "$DIR" --readme /tmp/fastpeft-readme-preview.md
}

pack_and_summarise() {
    if [[ -n $PACK ]]; then
        files=$(cd "$DIR" && ls | grep -vE '^(gpu\.log|gpu-results\.tar\.gz)$')
        if [[ -n $files ]] && (cd "$DIR" && tar czf gpu-results.tar.gz $files && rm -f $files); then
            SUMMARY+=("pack: $(cd "$DIR" && tar tzf gpu-results.tar.gz | wc -l) files in gpu-results.tar.gz")
        fi
    fi
    echo "== summary after ${SECONDS}s (budget ${TOTAL}s), results in $DIR"
    printf '  %s\n' "${SUMMARY[@]}"
}

run_all 2>&1 | tee -a "$DIR/gpu.log"
