"""Soak test on the real server: 50 prompts through the HTTP API, mixing our three nodes,
sizes (some not multiples of 16) and batch sizes on the small generated SD1.5 checkpoint.

Checks what a user running a queue all afternoon relies on: every prompt completes, the
same prompt gives the same pixels 40 prompts later (and really was sampled again, not served
from ComfyUI's cache), and the server process does not keep growing: its peak RSS over the last round of ten
prompts is within 5 % of the first round's and within 2 % of the round before (per-run state
is dropped; the preview records stay bounded). A leak of a few MB per prompt fails either
bound; one low reading after a prompt (the allocator handing memory back) fails neither.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_server import ComfyServer
from make_checkpoint import make_checkpoint
from workflow_convert import load, to_api

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CKPT = "tpc_sd15_reduced.safetensors"
ROUNDS = 5
# (workflow, node settings, width, height, batch): ten different prompts, queued five times over
CONFIGS = [
    ("sd15_sito", {"prune_ratio": 0.5}, 64, 64, 1),
    ("sd15_dato", {"schedule": "dato_official"}, 96, 64, 2),
    ("sd15_cat", {"keep_ratio": 0.3}, 64, 96, 3),
    ("sd15_sito", {"prune_ratio": 0.0}, 80, 64, 1),
    ("sd15_sito", {"prune_ratio": 0.7}, 128, 128, 2),
    ("sd15_dato", {"schedule": "dato_aggressive"}, 64, 64, 3),
    ("sd15_cat", {"keep_ratio": 0.5}, 96, 96, 1),
    ("sd15_sito", {"prune_ratio": 0.5}, 72, 56, 1),
    ("sd15_dato", {"schedule": "deepcache_5"}, 64, 80, 2),
    ("sd15_cat", {"keep_ratio": 0.3}, 128, 64, 2),
]
NODES = {"SiToTokenPruning", "DaToPruneCache", "CATPruneCache"}
# the patch node's summary line in the server log and what it must report for a prompt to count as
# patched (SiTo/DaTo: tokens pruned, DaTo also cached steps; CAT: pruned steps)
WORK = {
    "SiToTokenPruning": ("SiTo:", lambda line: re.search(r"[1-9]\d*/\d+ tokens pruned", line)),
    "DaToPruneCache": ("DaTo:", lambda line: re.search(r"[1-9]\d*/\d+ tokens pruned", line)
                       and re.search(r"(?:[1-9]\d* shallow|[1-9]\d* reused)", line)),
    "CATPruneCache": ("CAT:", lambda line: re.match(r"CAT: [1-9]\d* pruned / ", line)),
}


def assert_patched(prompt: dict, settings: dict, log_lines: list[str], n: int) -> None:
    """The prompt's patch node ran on the sampler: its summary line is in the log of this prompt
    and reports work. SiTo at prune_ratio 0 passes the model through unpatched (no patch, so no
    run and no summary line): that prompt must have none."""
    cls = next(c["class_type"] for c in prompt.values() if c["class_type"] in NODES)
    prefix, worked = WORK[cls]
    lines = [line[line.index(prefix):] for line in log_lines if prefix in line]
    if settings.get("prune_ratio", 1) == 0:
        assert lines == [], (n, cls, lines)
        return
    assert len(lines) == 1, (n, cls, lines)
    assert worked(lines[0]), (n, lines[0])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def build(templates: dict, config) -> tuple[dict, str]:
    name, settings, width, height, batch = config
    prompt = copy.deepcopy(templates[name])
    sampler_id = None
    for node_id, node in prompt.items():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CKPT
        elif kind == "EmptyLatentImage":
            inputs.update(width=width, height=height, batch_size=batch)
        elif kind == "KSampler":
            inputs.update(steps=8, seed=1234)
            sampler_id = node_id
        elif kind in NODES:
            inputs.update(settings)
            if kind == "CATPruneCache":
                inputs["warmup_steps"] = 2  # so that 8 steps include pruned ones
    assert sampler_id is not None
    return prompt, sampler_id


def main_images(server, prompt: dict, entry: dict):
    """The images of the SaveImage fed by the VAE decode (the preview node saves its own)."""
    decode = {i for i, n in prompt.items() if n["class_type"] == "VAEDecode"}
    save = [i for i, n in prompt.items() if n["class_type"] == "SaveImage" and n["inputs"]["images"][0] in decode]
    assert len(save) == 1, save
    return server.images({"outputs": {save[0]: entry["outputs"][save[0]]}})


def pixels(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(paths, key=lambda p: p.name)]


def test_fifty_prompts_complete_deterministic_and_flat_memory(comfy_dir, tmp_path):
    make_checkpoint(comfy_dir / "models" / "checkpoints" / CKPT, arch="sd15", reduced=True, seed=0)
    with ComfyServer(output_dir=tmp_path / "out") as server:
        info = server.object_info()
        templates = {name: to_api(load(ROOT / "workflows" / f"{name}.json"), info)
                     for name in {c[0] for c in CONFIGS}}
        first_round: dict[int, list[np.ndarray]] = {}
        rss: dict[int, int] = {}
        for n in range(1, ROUNDS * len(CONFIGS) + 1):
            index = (n - 1) % len(CONFIGS)
            prompt, sampler_id = build(templates, CONFIGS[index])
            log_start = server.log_path.stat().st_size
            entry = server.run(prompt, timeout=600)
            assert_patched(prompt, CONFIGS[index][1],
                           server.log_path.read_bytes()[log_start:].decode(errors="replace").splitlines(), n)
            rss[n] = rss_kib(server.proc.pid)
            images = pixels(main_images(server, prompt, entry))
            assert len(images) == CONFIGS[index][4], (n, CONFIGS[index])
            if n <= len(CONFIGS):
                first_round[index] = images
            elif n > (ROUNDS - 1) * len(CONFIGS):
                # the sampler really ran again (the previous prompt differed), and gave the same pixels
                assert sampler_id not in server.timings(entry)["cached_nodes"], (n, CONFIGS[index])
                for a, b in zip(first_round[index], images):
                    assert np.array_equal(a, b), f"prompt {n} ({CONFIGS[index]}) differs from its first run"

    peaks = round_peaks(rss, len(CONFIGS))
    print("server RSS per prompt (MiB):", " ".join(f"{rss[n] / 1024:.0f}" for n in sorted(rss)))
    print("peak per round (MiB):", " ".join(f"{p / 1024:.0f}" for p in peaks))
    growth = peaks[-1] / peaks[0] - 1.0
    last = peaks[-1] / peaks[-2] - 1.0
    assert growth < 0.05, f"server memory grew {growth:.1%} from the first round of prompts to the last: {peaks}"
    assert last < 0.02, f"server memory still grew {last:.1%} over the last round of ten prompts: {peaks}"


def round_peaks(rss: dict[int, int], per_round: int) -> list[int]:
    """Highest RSS after any prompt of each round. Every round queues the same prompts, so a
    leak shows as round-over-round growth of the peak, while a single low reading (the allocator
    returning memory after one prompt) cannot make a baseline."""
    n = max(rss)
    return [max(rss[i] for i in range(start, min(start + per_round, n + 1)))
            for start in range(1, n + 1, per_round)]
