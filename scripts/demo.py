#!/usr/bin/env python
"""`make demo`: run the shipped SiTo workflow on the embedded ComfyUI, with and without pruning.

Starts the embedded ComfyUI headless on 127.0.0.1, converts ``workflows/sd15_sito.json``
through the live ``/object_info``, and queues it twice more: once as shipped (SiTo at
prune_ratio 0.5) and once with the SiTo node bypassed (the unpatched model), after one
warm-up run that loads the model. Images land in ``out/demo/`` (unpatched, SiTo, and the
preview node's heatmap); the speedup is the ratio of the server's own execution times.

Without ``--checkpoint`` a random-weight SD1.5-format checkpoint is generated (full size,
so the timing is representative; its images are abstract patterns, not pictures).

Then it samples the pack's trained reference model (models/reference/, emoji at 32x32) with
ComfyUI's sampler, unpatched and with each node at its recommended setting, through
benchmarks/quality.py: ``out/demo/reference/quality-20-euler-grid.png`` has the pictures (one
row per setting, the same seeds), and the table printed beside it the quality numbers and the
speedups (FLOPs-ideal on the reference model; the measured SD1.5-size speedup of the setting).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_server import ComfyServer  # noqa: E402
from workflow_convert import load, to_api  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "demo"


def bypass(prompt: dict, class_type: str) -> dict:
    """The same prompt with every ``class_type`` node removed and its MODEL input passed through."""
    prompt = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    for nid in [k for k, v in prompt.items() if v["class_type"] == class_type]:
        src = prompt.pop(nid)["inputs"]["model"]
        for node in prompt.values():
            for name, value in node["inputs"].items():
                if isinstance(value, list) and value and value[0] == nid:
                    node["inputs"][name] = src
    prompt = {k: v for k, v in prompt.items() if v["class_type"] != "TokenPruningPreview"}
    return {k: v for k, v in prompt.items()
            if not (v["class_type"] == "SaveImage" and v["inputs"]["images"][0] not in prompt)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a real SD1.x checkpoint (.safetensors); default: a generated random one")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps (default 4: ~1 min per image on 2 CPU cores)")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (default 512)")
    ap.add_argument("--ratio", type=float, default=0.5, help="SiTo prune_ratio (default 0.5)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference-model pictures")
    args = ap.parse_args()

    ckpt_dir = ROOT / ".comfyui" / "models" / "checkpoints"
    if args.checkpoint:
        src = Path(args.checkpoint).expanduser().resolve()
        if not src.is_file():
            print(f"demo: checkpoint {src} not found", file=sys.stderr)
            return 2
        link = ckpt_dir / src.name
        if not link.exists():
            link.symlink_to(src)
        ckpt_name = src.name
        print(f"demo: using the checkpoint {src}")
    else:
        from make_checkpoint import ensure_comfy_importable, make_checkpoint
        ensure_comfy_importable()
        ckpt_name = "tpc_sd15_full_random.safetensors"
        print("demo: no CHECKPOINT given - generating a random-weight SD1.5-format checkpoint (full size). "
              "Timings are representative; the images are abstract patterns, not pictures.")
        make_checkpoint(ckpt_dir / ckpt_name, arch="sd15", reduced=False, seed=0)

    OUT.mkdir(parents=True, exist_ok=True)
    with ComfyServer() as server:
        prompt = to_api(load(ROOT / "workflows" / "sd15_sito.json"), server.object_info())
        for node in prompt.values():
            if node["class_type"] == "CheckpointLoaderSimple":
                node["inputs"]["ckpt_name"] = ckpt_name
            elif node["class_type"] == "EmptyLatentImage":
                node["inputs"]["width"] = node["inputs"]["height"] = args.size
            elif node["class_type"] == "KSampler":
                node["inputs"]["steps"] = args.steps
            elif node["class_type"] == "SiToTokenPruning":
                node["inputs"]["prune_ratio"] = args.ratio
        plain = bypass(prompt, "SiToTokenPruning")
        print(f"demo: ComfyUI at {server.url}; {args.size}x{args.size}, {args.steps} euler steps, CFG 7.5, seed 42")
        print("demo: warm-up run (loads the model) ...")
        server.run(plain, timeout=3600)
        times = {}
        for i, (label, p) in enumerate((("unpatched", plain), ("sito", prompt), ("unpatched again", plain))):
            # Trailing spaces change the prompt's cache key but not the CLIP tokens, so ComfyUI
            # re-runs text encoding and sampling instead of serving its cached outputs.
            for node in p.values():
                if node["class_type"] == "CLIPTextEncode":
                    node["inputs"]["text"] = node["inputs"]["text"].rstrip() + " " * (i + 1)
                if node["class_type"] == "SaveImage":
                    role = "_preview" if node["inputs"]["filename_prefix"].endswith("_preview") else ""
                    node["inputs"]["filename_prefix"] = f"demo_{label.replace(' ', '_')}_{time.time_ns()}{role}"
            entry = server.run(p, timeout=3600)
            times[label] = server.timings(entry)["seconds"]
            for path in server.images(entry):
                kind = "preview" if "_preview" in path.name else label.replace(" ", "_")
                if label != "unpatched again":
                    shutil.copy(path, OUT / f"{kind}.png")
            print(f"demo: {label:16s} {times[label]:.1f} s")
    base = min(times["unpatched"], times["unpatched again"])
    print(f"demo: SiTo prune_ratio {args.ratio}: {base:.1f} s -> {times['sito']:.1f} s = "
          f"{base / times['sito']:.2f}x faster (whole prompt: text encoding + sampling + VAE decode)")
    print(f"demo: images in {OUT}: unpatched.png, sito.png, preview.png")
    if not args.no_reference:
        return reference_pictures()
    return 0


# The settings shown on the reference model: each node at the setting the README recommends.
REFERENCE_VARIANTS = "unpatched,sito@0.5,tome@0.5,dato-official@0.4,cat-w6@0.3"


def reference_pictures() -> int:
    out = OUT / "reference"
    print("demo: the trained reference model (emoji, 32x32), 9 labels x 1 seed, 20 euler steps, CFG 3 ...")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--variants", REFERENCE_VARIANTS, "--seeds", "1",
           "--grid-seeds", "9", "--steps", "20", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    table = proc.stdout[proc.stdout.index("| variant |"):] if "| variant |" in proc.stdout else proc.stdout
    print(table)
    print(f"demo: reference-model pictures in {out / 'quality-20-euler-grid.png'} (one row per setting)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
