#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py): unpatched / ToMe / SiTo / random / DaTo / DeepCache /
# EasyCache / CAT on the SD1.5 architecture at 512 and 1024 px and SDXL at 1024 px, fp16, SDPA, random
# weights, on one CUDA GPU; a markdown table, a JSON and the log under the output folder ($OUT, or
# bench_out/gpu_check, or --out DIR). Exit status 3 without a GPU; --cpu-dry-run tests the bootstrap on
# the CPU instead. Needs .gpu_carry/ (make gpu-carry) on a machine whose python lacks ComfyUI's
# requirements. PYTHON chooses the interpreter (default python3); the whole check is stopped after
# 8 minutes (what finished by then is already written).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch; set PYTHON to an interpreter that has torch" >&2
  exit 2
fi
cd "$root"
exec timeout --signal=INT --kill-after=20 480 "$PY" -u scripts/gpu_check.py "$@"
