#!/usr/bin/env bash
# Build .gpu_carry/ (git-ignored): what the GPU check (scripts/gpu_check.sh) needs on a machine whose
# python has torch, torchvision, transformers, safetensors, einops, numpy, scipy, Pillow and
# torchmetrics but nothing else of ComfyUI's requirements, and that cannot reach a package registry:
#   .gpu_carry/comfyui/   the embedded ComfyUI 0.3.75 (.comfyui/) without its tests, models, custom
#                         nodes and the files over 256 KiB (tokenizer vocabularies the benchmark never
#                         reads), ~6 MiB
#   .gpu_carry/wheels/    torchsde + trampoline (pure Python) and psutil (abi3 manylinux x86-64),
#                         downloaded here with pip for CPython 3.12
#   .gpu_carry/MANIFEST   what is in it and its size
# Re-running rebuilds it. The device tool carries it with `carry: [".gpu_carry"]` (64 MiB limit for the
# whole working tree; the folder is ~6 MiB).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PY="${PYTHON:-$root/.venv/bin/python}"
src="${COMFYUI_DIR:-$root/.comfyui}"
dest="$root/.gpu_carry"
[ -f "$src/comfy/model_management.py" ] || { echo "[gpu-carry] no ComfyUI at $src: run 'make setup' first" >&2; exit 1; }

rm -rf "$dest.partial"
mkdir -p "$dest.partial/wheels"
"$PY" - "$src" "$dest.partial/comfyui" <<'PYEOF'
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
skip_dirs = {"tests", "tests-unit", "custom_nodes", "models", "input", "output", "user", "temp", "__pycache__",
             ".git", "script_examples"}
limit = 256 * 1024
for here, dirs, files in os.walk(src):
    dirs[:] = [d for d in dirs if d not in skip_dirs and not os.path.islink(os.path.join(here, d))]
    rel = os.path.relpath(here, src)
    for f in files:
        p = os.path.join(here, f)
        if os.path.islink(p) or os.path.getsize(p) > limit or f.endswith(".pyc"):
            continue
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        shutil.copy2(p, os.path.join(dst, rel, f))
PYEOF
# CPython 3.12 on x86-64 Linux (the GPU machine); torchsde and trampoline are pure Python, psutil's
# wheel is abi3, so the same files also serve this machine's python for the CPU dry run.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
  -d "$dest.partial/wheels" torchsde==0.2.6 trampoline==0.1.2 psutil==7.2.2
{
  echo "GPU-check carry folder, built $(date -u +%Y-%m-%dT%H:%M:%SZ) by scripts/gpu_carry.sh from $src"
  echo "ComfyUI: $(grep -o '"[0-9.]*"' "$src/comfyui_version.py" | tr -d '"')"
  ls "$dest.partial/wheels"
  du -sh "$dest.partial" | cut -f1
} > "$dest.partial/MANIFEST"
rm -rf "$dest"
mv "$dest.partial" "$dest"
cat "$dest/MANIFEST"
