#!/usr/bin/env bash
# CI gate: fail the pipeline when a model's activations do not fit the chip's SRAM.
#
#   examples/ci_gate.sh MODEL.onnx [CEILING] [INPUT_SHAPE]
#
# Exit codes are fmcompress's: 0 fits, 1 a stored feature map is above the ceiling,
# 2 the model or the flags are unusable. The JSON report is kept as an artifact.
set -euo pipefail
model=${1:?usage: ci_gate.sh MODEL.onnx [CEILING] [INPUT_SHAPE]}
ceiling=${2:-256KB}
shape_args=()
if [[ -n "${3:-}" ]]; then shape_args=(--input-shape "$3"); fi

status=0
fmcompress analyze "$model" --ceiling "$ceiling" "${shape_args[@]}" \
    --json memory-report.json --fail-over-ceiling --quiet || status=$?
if [[ $status -eq 1 ]]; then
    echo "activations do not fit $ceiling; compressing so that they do:" >&2
    fmcompress compile "$model" --ceiling "$ceiling" "${shape_args[@]}" --report compile-report --quiet
    compressed="${model%.onnx}.fmc.onnx"
    fmcompress verify "$model" "$compressed" "${shape_args[@]}" --num-samples 16 --json verify-report.json
    exit 0
fi
exit $status
