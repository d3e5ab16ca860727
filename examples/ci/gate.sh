#!/usr/bin/env bash
# CI gate for an edge deployment: the model's activations must fit the chip's SRAM, and a
# compressed model must keep its accuracy.
#
#   examples/ci/gate.sh MODEL.onnx [CEILING] [DATA] [INPUT_SHAPE]
#
# 1. `analyze --fail-over-ceiling`: exit 0 when every stored map already fits (nothing to do).
# 2. Otherwise `compile` with a fidelity gate (MIN_AGREEMENT, default 0.99; with labelled DATA
#    also MAX_ACCURACY_DROP points, default 0.5): exit 1 and no model when the held-out figures
#    miss it.
# 3. `verify` the result on the same data.
# COMPILE_ARGS adds compile flags (e.g. "--epochs 20 --num-samples 512").
# Reports are kept in ./fmcompress-reports for the CI's artifact store. Exit codes are
# fmcompress's: 0 ok, 1 gate missed (ceiling or fidelity), 2 unusable model, data or flags.
set -euo pipefail
model=${1:?usage: gate.sh MODEL.onnx [CEILING] [DATA] [INPUT_SHAPE]}
ceiling=${2:-256KB}
reports=${REPORTS:-fmcompress-reports}
shape=()
data=()
if [[ -n "${3:-}" ]]; then data=(--data "$3"); fi
if [[ -n "${4:-}" ]]; then shape=(--input-shape "$4"); fi
gates=(--min-agreement "${MIN_AGREEMENT:-0.99}")
if [[ -n "${MAX_ACCURACY_DROP:-}" ]]; then gates+=(--max-accuracy-drop "$MAX_ACCURACY_DROP"); fi
read -r -a extra <<< "${COMPILE_ARGS:-}"
mkdir -p "$reports"

status=0
fmcompress analyze "$model" --ceiling "$ceiling" "${shape[@]}" --json "$reports/analysis.json" \
    --fail-over-ceiling --quiet || status=$?
if [[ $status -eq 0 ]]; then
    echo "every stored feature map of $model fits $ceiling"
    exit 0
elif [[ $status -ne 1 ]]; then
    exit $status
fi
echo "activations of $model do not fit $ceiling: compressing" >&2
compressed="${model%.onnx}.fmc.onnx"
fmcompress compile "$model" --ceiling "$ceiling" "${shape[@]}" "${data[@]}" "${gates[@]}" -o "$compressed" \
    --report "$reports/compile" --json-log "$reports/training.jsonl" --quiet "${extra[@]}"
fmcompress verify "$model" "$compressed" "${shape[@]}" "${data[@]}" --json "$reports/verify.json"
