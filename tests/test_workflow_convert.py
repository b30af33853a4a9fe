"""UI-format workflow -> API prompt conversion, checked against a real server.

The node definitions come from a live ComfyUI's /object_info (never from a hand-kept
copy), and the converted core text-to-image graph is executed on that server with a
reduced random-weight SD1.5 checkpoint from scripts/make_checkpoint.py - which also
covers ComfyServer (start, queue, wait, images, timings, error reporting) and the
checkpoint's detection by CheckpointLoaderSimple.
"""

from __future__ import annotations

import copy

import pytest

from comfy_server import ComfyServer, ComfyServerError, PromptExecutionError
from make_checkpoint import make_checkpoint
from workflow_convert import WorkflowConversionError, map_widget_values, to_api

pytestmark = pytest.mark.e2e

# Shared with tests/e2e (same name and parameters, so the file is written once).
CKPT = "tpc_sd15_reduced.safetensors"


@pytest.fixture(scope="module")
def server(comfy_dir, tmp_path_factory):
    # The checkpoint must exist before the server lists the checkpoints folder.
    make_checkpoint(comfy_dir / "models" / "checkpoints" / CKPT, arch="sd15", reduced=True, seed=0)
    with ComfyServer(output_dir=tmp_path_factory.mktemp("comfy_out")) as s:
        yield s


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


# ---- a small UI-format workflow, as the frontend saves it ------------------------------
def _node(nid, type_, inputs=(), outputs=(), widgets=None, mode=0, title=None):
    node = {
        "id": nid, "type": type_, "pos": [nid * 50, 0], "size": [300, 100], "flags": {},
        "order": nid, "mode": mode,
        "inputs": [dict(i) for i in inputs],
        "outputs": [{"name": n, "type": t, "links": [], "slot_index": k} for k, (n, t) in enumerate(outputs)],
        "properties": {"Node name for S&R": type_},
    }
    if widgets is not None:
        node["widgets_values"] = widgets
    if title:
        node["title"] = title
    return node


def ui_workflow(steps_from_primitive=False):
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler ->
    VAEDecode -> SaveImage, plus a Note, a Reroute on the VAE wire and (optionally) a
    PrimitiveNode driving KSampler.steps."""
    links = [
        [1, 1, 1, 2, 0, "CLIP"],
        [2, 1, 1, 3, 0, "CLIP"],
        [3, 1, 0, 5, 0, "MODEL"],
        [4, 2, 0, 5, 1, "CONDITIONING"],
        [5, 3, 0, 5, 2, "CONDITIONING"],
        [6, 4, 0, 5, 3, "LATENT"],
        [7, 5, 0, 6, 0, "LATENT"],
        [8, 1, 2, 9, 0, "*"],        # VAE -> Reroute
        [9, 9, 0, 6, 1, "VAE"],       # Reroute -> VAEDecode.vae
        [10, 6, 0, 7, 0, "IMAGE"],
    ]
    ksampler_inputs = [
        {"name": "model", "type": "MODEL", "link": 3},
        {"name": "positive", "type": "CONDITIONING", "link": 4},
        {"name": "negative", "type": "CONDITIONING", "link": 5},
        {"name": "latent_image", "type": "LATENT", "link": 6},
        {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": None},
        {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 11 if steps_from_primitive else None},
    ]
    nodes = [
        _node(1, "CheckpointLoaderSimple", outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
              widgets=[CKPT]),
        _node(2, "CLIPTextEncode", inputs=[{"name": "clip", "type": "CLIP", "link": 1}],
              outputs=[("CONDITIONING", "CONDITIONING")], widgets=["a lighthouse at dusk"], title="Positive"),
        _node(3, "CLIPTextEncode", inputs=[{"name": "clip", "type": "CLIP", "link": 2}],
              outputs=[("CONDITIONING", "CONDITIONING")], widgets=["blurry"]),
        _node(4, "EmptyLatentImage", outputs=[("LATENT", "LATENT")], widgets=[64, 64, 1]),
        # seed, its "control after generate" value, steps, cfg, sampler, scheduler, denoise
        _node(5, "KSampler", inputs=ksampler_inputs, outputs=[("LATENT", "LATENT")],
              widgets=[123, "randomize", 2, 7.5, "euler", "normal", 1.0]),
        _node(6, "VAEDecode", inputs=[{"name": "samples", "type": "LATENT", "link": 7},
                                      {"name": "vae", "type": "VAE", "link": 9}],
              outputs=[("IMAGE", "IMAGE")]),
        _node(7, "SaveImage", inputs=[{"name": "images", "type": "IMAGE", "link": 10}],
              widgets=["tpc_convert_test"]),
        _node(8, "Note", widgets=["Frontend-only: must not reach the API prompt."]),
        _node(9, "Reroute", inputs=[{"name": "", "type": "*", "link": 8}], outputs=[("", "VAE")]),
    ]
    if steps_from_primitive:
        links.append([11, 10, 0, 5, 5, "INT"])
        nodes.append(_node(10, "PrimitiveNode", outputs=[("INT", "INT")], widgets=[3, "fixed"]))
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


EXPECTED = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "5": {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 123, "steps": 2, "cfg": 7.5, "sampler_name": "euler",
        "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "denoise": 1.0}},
    "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "tpc_convert_test", "images": ["6", 0]}},
}


def _strip_meta(prompt):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


# ---- conversion ------------------------------------------------------------------------
def test_core_workflow_converts_exactly(object_info):
    prompt = to_api(ui_workflow(), object_info)
    assert _strip_meta(prompt) == EXPECTED
    assert prompt["2"]["_meta"]["title"] == "Positive"


def test_primitive_node_value_feeds_the_widget_input(object_info):
    prompt = to_api(ui_workflow(steps_from_primitive=True), object_info)
    assert prompt["5"]["inputs"]["steps"] == 3
    assert "10" not in prompt


def test_missing_control_value_is_tolerated(object_info):
    # Tools that write widgets_values themselves may leave out the control value.
    ui = ui_workflow()
    ks = next(n for n in ui["nodes"] if n["id"] == 5)
    ks["widgets_values"] = [123, 2, 7.5, "euler", "normal", 1.0]
    assert _strip_meta(to_api(ui, object_info)) == EXPECTED


def test_seed_named_int_without_option_gets_frontend_control_value():
    # The frontend adds a control widget to INT inputs named seed/noise_seed unless the
    # definition says control_after_generate=False.
    definition = {"input": {"required": {"seed": ["INT", {}], "ratio": ["FLOAT", {}]}},
                  "input_order": {"required": ["seed", "ratio"]}}
    assert map_widget_values(definition, [5, "fixed", 0.5]) == {"seed": 5, "ratio": 0.5}
    definition["input"]["required"]["seed"][1]["control_after_generate"] = False
    assert map_widget_values(definition, [5, 0.5]) == {"seed": 5, "ratio": 0.5}


def test_widgets_past_the_saved_values_get_the_frontend_initial_value():
    # A file saved before inputs were added: the frontend keeps those widgets at their
    # initial value and sends it (seen in the real frontend, tests/e2e/test_browser.py).
    definition = {"input": {"required": {
        "ratio": ["FLOAT", {"default": 0.3}], "mode": ["COMBO", {"options": ["a", "b"]}],
        "legacy": [["x", "y"], {"default": "y"}], "n": ["INT", {}], "flag": ["BOOLEAN", {}],
        "text": ["STRING", {}], "empty": ["COMBO", {"options": []}]}},
        "input_order": {"required": ["ratio", "mode", "legacy", "n", "flag", "text", "empty"]}}
    assert map_widget_values(definition, [0.5]) == {"ratio": 0.5, "mode": "a", "legacy": "y", "n": 0,
                                                    "flag": False, "text": ""}


def test_bypassed_node_passes_its_input_through_and_muted_node_is_dropped(object_info):
    ui = ui_workflow()
    # Insert a bypassed ModelSamplingDiscrete between the checkpoint and KSampler...
    ui["nodes"].append(_node(11, "ModelSamplingDiscrete", inputs=[{"name": "model", "type": "MODEL", "link": 12}],
                             outputs=[("MODEL", "MODEL")], widgets=["eps", False], mode=4))
    ui["links"] = [l for l in ui["links"] if l[0] != 3] + [[12, 1, 0, 11, 0, "MODEL"], [3, 11, 0, 5, 0, "MODEL"]]
    # ...and a muted extra SaveImage.
    ui["nodes"].append(_node(12, "SaveImage", inputs=[{"name": "images", "type": "IMAGE", "link": 13}],
                             widgets=["muted"], mode=2))
    ui["links"].append([13, 6, 0, 12, 0, "IMAGE"])
    prompt = to_api(ui, object_info)
    assert prompt["5"]["inputs"]["model"] == ["1", 0]
    assert "11" not in prompt and "12" not in prompt
    assert _strip_meta(prompt) == EXPECTED


def test_unknown_node_type_is_reported(object_info):
    ui = ui_workflow()
    ui["nodes"].append(_node(20, "NoSuchNode", widgets=[]))
    with pytest.raises(WorkflowConversionError, match="NoSuchNode"):
        to_api(ui, object_info)


def test_api_format_passes_through(object_info):
    assert to_api(copy.deepcopy(EXPECTED), object_info) == EXPECTED


# ---- on the server -----------------------------------------------------------------------
def test_converted_workflow_runs_end_to_end(server, object_info):
    from PIL import Image

    assert CKPT in object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    entry = server.run(to_api(ui_workflow(), object_info), timeout=600)
    images = server.images(entry)
    assert len(images) == 1 and images[0].is_file()
    with Image.open(images[0]) as im:
        assert im.size == (64, 64)
    t = server.timings(entry)
    assert t["seconds"] is not None and t["seconds"] > 0


def test_validation_error_is_raised_with_comfyui_message(server, object_info):
    prompt = to_api(ui_workflow(), object_info)
    prompt["1"]["inputs"]["ckpt_name"] = "does_not_exist.safetensors"
    with pytest.raises(ComfyServerError, match="400.*ckpt_name"):
        server.queue(prompt)


def test_execution_error_is_raised_with_comfyui_message(server, object_info):
    # Valid graph, fails while running: a 16-channel (SD3) latent into the SD1.5 VAE.
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    with pytest.raises(PromptExecutionError, match="VAEDecode") as err:
        server.run(prompt, timeout=300)
    assert err.value.details.get("node_id") == "3"
