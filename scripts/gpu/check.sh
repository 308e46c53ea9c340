#!/usr/bin/env bash
# The GPU machine's one check, run from the repository root with nothing built there: the
# release binary (target/release/fastcache) travels with the tree and the ONNX Runtime GPU
# libraries travel as parts (scripts/gpu/stage.py, one part per transfer).
#
#   scripts/gpu/check.sh PART_DIR...        reassemble, verify, then check on CUDA
#   EP=cpu scripts/gpu/check.sh             the same checks on the CPU provider (how it is tested
#                                           here, where there is no GPU)
#
# It prints one Markdown table: for each model, whether the never-skip rewrite and the host split
# reproduce the original on the provider (relative difference of a whole sampling run), the
# provider against the CPU, and the ms per step of the original, the rewrite that never skips,
# a rewrite that skips every other step (interval 2, the forced schedule), its host split, and
# (on a GPU provider) that split with CUDA graphs, which also says how many segments captured.
# Every step is bounded in time (`timeout`), so the whole stays under the GPU machine's limits.
set -euo pipefail
cd "$(dirname "$0")/../.."

EP=${EP:-cuda}
BIN=${BIN:-target/release/fastcache}
STEPS=${STEPS:-10}
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if ! "$PYTHON" -c "import numpy" 2>/dev/null; then
    echo "error: $PYTHON has no numpy; set PYTHON to one that has (the GPU image's PyTorch environment does)" >&2
    exit 1
fi
if [[ ! -x "$BIN" ]]; then
    echo "error: $BIN is missing: build it with \`cargo build --release\` before the transfer" >&2
    exit 1
fi

if [[ "$EP" != cpu ]]; then
    if [[ $# -eq 0 ]]; then
        echo "error: give the folders the staged parts arrived in (scripts/gpu/stage.py)" >&2
        exit 1
    fi
    LIBDIR=${LIBDIR:-$WORK/ort}
    timeout 120 "$PYTHON" scripts/gpu/unstage.py "$@" -o "$LIBDIR"
    export ORT_DYLIB_PATH="$LIBDIR/libonnxruntime.so"
    # The CUDA provider's own dependencies (cuBLAS, cuDNN, the CUDA runtime) come from the
    # nvidia-* wheels of the machine's Python environment.
    NVIDIA_LIBS=$("$PYTHON" - <<'EOF'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "lib"))})
print(":".join(dirs))
EOF
)
    export LD_LIBRARY_PATH="${NVIDIA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# Relative difference of two .npy files: max |a - b| / max |a|.
rel() {
    "$PYTHON" - "$1" "$2" <<'EOF'
import sys
import numpy as np
a, b = np.load(sys.argv[1]).astype(np.float64), np.load(sys.argv[2]).astype(np.float64)
print(f"{np.abs(a - b).max() / max(np.abs(a).max(), 1e-30):.1e}")
EOF
}

# ms per step of a run, as `fastcache run` reports it.
per_step() {
    sed -n 's/.*(\([0-9.]*\) ms per step).*/\1/p' "$1" | tail -1
}

run() {
    local model=$1 out=$2 log=$3 ep=$4
    shift 4
    timeout 300 "$BIN" run "$model" -o "$out" --engine ort --ep "$ep" --steps "$STEPS" \
        --seed 7 "$@" >"$log" 2>&1 || { echo "error: run of $model on $ep failed:" >&2; cat "$log" >&2; exit 1; }
}

rows=()
for case in "models/trained/mnist_dit.onnx|--class 3 --cfg 2" \
            "models/trained/fashion_dit.onnx|--class 3 --cfg 2" \
            "models/fixtures/dit_ts_f16.onnx|--batch 2 --cfg 3" \
            "models/fixtures/sd3_ts.onnx|--batch 2 --cfg 3" \
            "models/fixtures/flux_ts.onnx|--batch 2"; do
    model=${case%%|*}
    read -r -a args <<<"${case#*|}"
    name=$(basename "$model" .onnx)
    never="$WORK/${name}_never.onnx"
    skip="$WORK/${name}_interval.onnx"
    timeout 120 "$BIN" rewrite "$model" -o "$never" --max-skips 0 --split "$WORK/${name}_never_split" >/dev/null
    timeout 120 "$BIN" rewrite "$model" -o "$skip" --policy interval --interval 2 \
        --split "$WORK/${name}_interval_split" >/dev/null
    run "$model" "$WORK/o.npy" "$WORK/o.log" "$EP" "${args[@]}"
    run "$model" "$WORK/c.npy" "$WORK/c.log" cpu "${args[@]}"
    run "$never" "$WORK/n.npy" "$WORK/n.log" "$EP" "${args[@]}"
    run "$never" "$WORK/ns.npy" "$WORK/ns.log" "$EP" --split "$WORK/${name}_never_split" "${args[@]}"
    run "$skip" "$WORK/s.npy" "$WORK/s.log" "$EP" "${args[@]}"
    run "$skip" "$WORK/ss.npy" "$WORK/ss.log" "$EP" --split "$WORK/${name}_interval_split" "${args[@]}"
    # CUDA graphs exist on the GPU providers only; the engine line says how many segments.
    graphs="n/a (CPU) | n/a"
    if [ "$EP" != cpu ]; then
        run "$skip" "$WORK/gs.npy" "$WORK/gs.log" "$EP" --split "$WORK/${name}_interval_split" \
            --cuda-graphs "${args[@]}"
        captured=$(sed -n 's/.*CUDA graphs in \([0-9]* of [0-9]*\) segment models.*/\1/p' "$WORK/gs.log" | head -1)
        graphs="$(rel "$WORK/s.npy" "$WORK/gs.npy") (${captured:-0 of ?} captured) | $(per_step "$WORK/gs.log")"
    fi
    rows+=("| $name | $(rel "$WORK/o.npy" "$WORK/n.npy") | $(rel "$WORK/n.npy" "$WORK/ns.npy") | $(rel "$WORK/s.npy" "$WORK/ss.npy") | $(rel "$WORK/c.npy" "$WORK/o.npy") | $(per_step "$WORK/o.log") | $(per_step "$WORK/n.log") | $(per_step "$WORK/s.log") | $(per_step "$WORK/ss.log") | $graphs |")
done

provider=$(sed -n 's/^provider *//p' "$WORK/o.log" | head -1)
echo
echo "provider: ${provider:-$EP}; $STEPS steps; ONNX Runtime from ${ORT_DYLIB_PATH:-.ort/}"
echo
echo "| model | never-skip vs original | never-skip split vs single | interval-2 split vs single | $EP vs cpu (original) | original ms/step | never-skip ms/step | interval 2 ms/step | interval 2 split ms/step | interval-2 split with CUDA graphs vs single | interval 2 split + CUDA graphs ms/step |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
