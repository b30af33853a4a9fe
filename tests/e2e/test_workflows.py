"""End to end on the real embedded ComfyUI server: our nodes are registered, every shipped
UI-format workflow converts (through the live /object_info) and runs on generated
random-weight checkpoints, and bad settings are refused at validation time.

The DiT workflows (Wan, Qwen-Image, Chroma, HunyuanVideo, LTX-Video: scripts/make_workflows.py
DIT_WORKFLOWS) cannot run here: their text encoders have fixed full-size configurations of 5-8
billion parameters, too large to generate with random weights and load on these machines. They
are queued with empty placeholder files under their model names: ComfyUI validates the whole
prompt (our node included) and the run must get as far as loading a model file."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from comfy_server import ComfyServer, ComfyServerError, PromptExecutionError
from make_checkpoint import make_checkpoint
from make_workflows import DIT_WORKFLOWS, dit_model_files
from workflow_convert import load, to_api

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
RUNNABLE = [p for p in WORKFLOWS if p.stem not in DIT_WORKFLOWS]
DIT = [p for p in WORKFLOWS if p.stem in DIT_WORKFLOWS]
LOADERS = ("UNETLoader", "CLIPLoader", "DualCLIPLoader", "VAELoader", "CheckpointLoaderSimple")
OUR_NODES = ("SiToTokenPruning", "DaToPruneCache", "CATPruneCache", "TokenPruningPreview")
CKPTS = {"sd15": "tpc_sd15_reduced.safetensors", "sdxl": "tpc_sdxl_reduced.safetensors"}


@pytest.fixture(scope="module")
def server(comfy_dir, tmp_path_factory):
    folder = comfy_dir / "models" / "checkpoints"
    for arch, name in CKPTS.items():
        make_checkpoint(folder / name, arch=arch, reduced=True, seed=0)
    # empty placeholders under the DiT workflows' model names, in a model path of their own
    base = tmp_path_factory.mktemp("dit_models")
    lines = ["tpc_dit_placeholders:", f"  base_path: {base}"]
    for kind, names in dit_model_files().items():
        (base / kind).mkdir()
        for name in names:
            (base / kind / name).write_bytes(b"")
        lines.append(f"  {kind}: {kind}")
    (base / "extra_model_paths.yaml").write_text("\n".join(lines) + "\n")
    with ComfyServer(extra_args=["--extra-model-paths-config", str(base / "extra_model_paths.yaml")]) as s:
        yield s


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def shrink(prompt: dict, arch: str) -> dict:
    """Run a shipped workflow as CI can afford: generated checkpoint, 64 px, at most 10 steps."""
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CKPTS[arch]
        elif kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = 64
        elif kind == "KSampler":
            inputs["steps"] = min(inputs["steps"], 10)
        elif kind == "CATPruneCache":
            inputs["warmup_steps"] = min(inputs["warmup_steps"], 2)  # so that 10 steps include pruned ones
    return prompt


# Each patch node's summary line in the server log (one per sampling run) and what "did work" means:
# SiTo/DaTo prune tokens (DaTo also takes shallow or reused steps), CAT has pruned steps.
WORK = {
    "SiToTokenPruning": ("SiTo:", lambda line: re.search(r"[1-9]\d*/\d+ tokens pruned", line)),
    "DaToPruneCache": ("DaTo:", lambda line: re.search(r"[1-9]\d*/\d+ tokens pruned", line)
                       and re.search(r"(?:[1-9]\d* shallow|[1-9]\d* reused)", line)),
    "CATPruneCache": ("CAT:", lambda line: re.match(r"CAT: [1-9]\d* pruned / ", line)),
}


def _pixels(path):
    from PIL import Image
    import numpy as np
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_object_info_lists_our_nodes_with_tooltips(object_info):
    for name in OUR_NODES:
        assert name in object_info, name
        node = object_info[name]
        assert node["category"] == "model_patches/token_pruning"
        for section in node["input"].values():
            for input_name, spec in section.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_all_expected_workflows_are_shipped():
    names = {p.stem for p in WORKFLOWS}
    for expected in ("sd15_sito", "sd15_dato", "sd15_cat", "sdxl_sito", "sd15_hires_sito", "sd15_side_by_side_sito",
                     *DIT_WORKFLOWS):
        assert expected in names
    for p in WORKFLOWS:
        ui = json.loads(p.read_text())
        assert any(n["type"] in ("Note", "MarkdownNote") for n in ui["nodes"]), f"{p.name} has no Note node"
        assert p.with_suffix(".png").is_file(), f"{p.name} has no thumbnail (scripts/make_workflows.py --thumbnails)"


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem.startswith("sdxl") else p
                                  for p in RUNNABLE], ids=[p.stem for p in RUNNABLE])
def test_shipped_workflow_runs(server, object_info, path):
    ui = load(path)
    prompt = shrink(to_api(ui, object_info), "sdxl" if path.stem.startswith("sdxl") else "sd15")
    assert any(n["class_type"] in OUR_NODES for n in prompt.values())
    log_start = server.log_path.stat().st_size
    entry = server.run(prompt, timeout=900)
    images = server.images(entry)
    saves = [n for n in prompt.values() if n["class_type"] == "SaveImage"]
    assert len(images) == len(saves) and all(p.exists() and p.stat().st_size > 0 for p in images)
    # the pack did its work: every patch node's summary line in the server log reports it
    log = server.log_path.read_bytes()[log_start:].decode(errors="replace").splitlines()
    # (a sampler ComfyUI served from its execution cache, e.g. the same sampler of an earlier
    # workflow, logs nothing: only patch nodes feeding a sampler that ran are checked)
    cached = set(server.timings(entry)["cached_nodes"])
    ran = {prompt[k]["inputs"]["model"][0] for k, n in prompt.items()
           if n["class_type"] == "KSampler" and k not in cached}
    for cls in {n["class_type"] for k, n in prompt.items() if k in ran} & set(WORK):
        prefix, worked = WORK[cls]
        lines = [line[line.index(prefix):] for line in log if prefix in line]
        assert lines, f"no {prefix} summary line in the server log"
        assert all(worked(line) for line in lines), lines
    # per SaveImage node: which image it saved, and from which node its input came
    saved = {nid: server.images({"outputs": {nid: out}}) for nid, out in entry["outputs"].items() if out.get("images")}
    sources = {nid: prompt[nid]["inputs"]["images"][0] for nid in saved}
    previews = [nid for nid, src in sources.items() if prompt[src]["class_type"] == "TokenPruningPreview"]
    for nid in previews:  # a real drawing, not the "no recorded run yet" placeholder (64x320, two colours)
        px = _pixels(saved[nid][0])
        assert px.shape[:2] != (64, 320), "the preview is the 'no recorded run yet' placeholder"
        assert len({tuple(c) for c in px.reshape(-1, 3)[::7]}) > 3, "the preview has no drawing"
    decoded = [nid for nid in saved if nid not in previews]
    if path.stem.startswith("sd15_side_by_side"):
        assert len(decoded) == 2
        a, b = (_pixels(saved[nid][0]) for nid in decoded)
        assert a.shape == b.shape and (a != b).any(), "side by side: the pruned image equals the unpatched one"


@pytest.mark.parametrize("path", DIT, ids=[p.stem for p in DIT])
def test_dit_workflow_validates_and_gets_to_its_model_files(server, object_info, path):
    """A DiT workflow converts, ComfyUI accepts the whole prompt (every node's inputs validated,
    the CAT node's own validation included), and the run stops where it loads a placeholder
    model file, nowhere else."""
    prompt = to_api(load(path), object_info)
    cat = [n for n in prompt.values() if n["class_type"] == "CATPruneCache"]
    assert len(cat) == 1
    sampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")
    assert sampler["inputs"]["steps"] >= 30 and cat[0]["inputs"]["warmup_steps"] == 6
    assert sampler["inputs"]["model"][0] in prompt and prompt[sampler["inputs"]["model"][0]]["class_type"] == "CATPruneCache"
    with pytest.raises(PromptExecutionError) as err:
        server.run(prompt, timeout=300)
    assert err.value.details.get("node_type") in LOADERS, str(err.value)[:2000]


def test_bad_ratio_is_refused_at_validation_time(server, object_info):
    prompt = shrink(to_api(load(ROOT / "workflows" / "sd15_sito.json"), object_info), "sd15")
    node = next(n for n in prompt.values() if n["class_type"] == "SiToTokenPruning")
    node["inputs"]["prune_ratio"] = 0.8
    with pytest.raises(ComfyServerError) as err:
        server.queue(prompt)
    assert "0.75" in str(err.value) and "400" in str(err.value)


def test_bad_custom_schedule_is_refused_at_validation_time(server, object_info):
    prompt = shrink(to_api(load(ROOT / "workflows" / "sd15_dato.json"), object_info), "sd15")
    node = next(n for n in prompt.values() if n["class_type"] == "DaToPruneCache")
    node["inputs"]["custom_schedule"] = "F Q S1"
    with pytest.raises(ComfyServerError) as err:
        server.queue(prompt)
    assert "custom_schedule" in str(err.value)
