#!/usr/bin/env bash
# CI gate for an edge deployment: the model's feature maps must fit the chip's memory, and a
# compressed model must keep its accuracy. The same gate as the `gate` step of fmcompress.yml,
# for CI systems other than GitHub Actions.
#
#   gate.sh MODEL.onnx [CEILING] [DATA] [INPUT_SHAPE]
#
# 1. `fmcompress analyze --fail-over-ceiling`: exit 0 when every stored map already fits.
# 2. Otherwise `fmcompress compile` with a fidelity gate: held-out top-1 agreement at least
#    MIN_AGREEMENT (default 0.99) and, if set, an accuracy drop of at most MAX_ACCURACY_DROP
#    points (needs labels in DATA). A missed gate is exit 1 and no model.
# 3. `fmcompress verify` the compressed model on the same data.
#
# CEILING defaults to 256KB; DATA (an .npz, an image folder) defaults to surrogate photographs.
# COMPILE_ARGS adds compile flags (e.g. "--epochs 20 --num-samples 512").
# Writes OUT (default fmcompress-out): MODEL.fmc.onnx and reports/ (analysis.json,
# compile/report.json, report.md, memory.png, training.jsonl, verify.json).
# Exit codes are fmcompress's: 0 ok, 1 gate missed (ceiling or fidelity), 2 unusable model,
# data or flags, 3 internal error.
MODEL=${1:?usage: gate.sh MODEL.onnx [CEILING] [DATA] [INPUT_SHAPE]}
CEILING=${2:-256KB}
DATA=${3:-}
INPUT_SHAPE=${4:-}

# --- the gate: the same lines as the `gate` step of fmcompress.yml ---
set -euo pipefail
out=${OUT:-fmcompress-out}
shape=()
data=()
if [[ -n "${INPUT_SHAPE:-}" ]]; then shape=(--input-shape "$INPUT_SHAPE"); fi
if [[ -n "${DATA:-}" ]]; then data=(--data "$DATA"); fi
gates=(--min-agreement "${MIN_AGREEMENT:-0.99}")
if [[ -n "${MAX_ACCURACY_DROP:-}" ]]; then gates+=(--max-accuracy-drop "$MAX_ACCURACY_DROP"); fi
read -r -a extra <<< "${COMPILE_ARGS:-}"
mkdir -p "$out/reports"

status=0
fmcompress analyze "$MODEL" --ceiling "$CEILING" "${shape[@]}" --json "$out/reports/analysis.json" \
    --fail-over-ceiling --quiet || status=$?
if [[ $status -eq 0 ]]; then
    echo "every stored feature map of $MODEL fits $CEILING"
    exit 0
elif [[ $status -ne 1 ]]; then
    exit $status
fi
echo "feature maps of $MODEL do not fit $CEILING: compressing" >&2
name=$(basename "$MODEL")
compressed="$out/${name%.onnx}.fmc.onnx"
fmcompress compile "$MODEL" --ceiling "$CEILING" "${shape[@]}" "${data[@]}" "${gates[@]}" -o "$compressed" \
    --report "$out/reports/compile" --json-log "$out/reports/training.jsonl" --quiet "${extra[@]}"
fmcompress verify "$MODEL" "$compressed" "${shape[@]}" "${data[@]}" --json "$out/reports/verify.json"
echo "compressed model: $compressed"
