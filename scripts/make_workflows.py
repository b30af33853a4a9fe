#!/usr/bin/env python
"""Regenerate the shipped UI-format workflows in ``workflows/`` from compact specs.

The node sockets, outputs and widget order come from the live embedded server's
``/object_info``, so the files match what the ComfyUI frontend itself would save. Run after
changing a node's inputs: ``.venv/bin/python scripts/make_workflows.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_server import ComfyServer  # noqa: E402
from workflow_convert import widget_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
POSITIVE = "a lighthouse on a rocky coast at sunset, dramatic clouds, highly detailed photograph"
NEGATIVE = "blurry, low quality, watermark"


# Row heights of the ComfyUI frontend's LiteGraph (1.32.x): a slot row, a widget row with its gap.
SLOT_HEIGHT, WIDGET_HEIGHT = 20, 24
TITLE_AND_GAP = 70  # node title bar (30 px, outside "size") plus a gap


class Graph:
    def __init__(self, info: dict):
        self.info, self.nodes, self.links = info, [], []

    def add(self, type_: str, widgets: dict | None = None, pos=(0, 0), size=(320, 200), title: str | None = None) -> int:
        widgets = dict(widgets or {})
        nid = len(self.nodes) + 1
        node = {"id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": nid - 1,
                "mode": 0, "inputs": [], "outputs": [], "properties": {"Node name for S&R": type_}}
        if title:
            node["title"] = title
        if type_ in ("Note", "MarkdownNote"):
            node["widgets_values"] = [widgets["text"]]
            node["properties"] = {}
            self.nodes.append(node)
            return nid
        d = self.info[type_]
        values = []
        for name, opts in widget_inputs(d):
            spec = {**d["input"].get("required", {}), **d["input"].get("optional", {})}[name]
            default = opts.get("default", spec[0][0] if isinstance(spec[0], list) and spec[0] else None)
            values.append(widgets.pop(name, default))
            if opts.get("control_after_generate"):
                values.append("fixed")
        if any(opts.get("image_upload") for _, opts in widget_inputs(d)):
            values.append("image")  # the frontend's upload button stores its value after all others
        if widgets:
            raise KeyError(f"{type_} has no widget(s) {sorted(widgets)}")
        node["widgets_values"] = values
        widget_names = {n for n, _ in widget_inputs(d)}
        for section in ("required", "optional"):
            for name in (d.get("input_order") or {}).get(section, []):
                if name not in widget_names:
                    node["inputs"].append({"name": name, "type": d["input"][section][name][0], "link": None})
        for i, (t, n) in enumerate(zip(d["output"], d["output_name"])):
            node["outputs"].append({"name": n, "type": t, "links": [], "slot_index": i})
        # The frontend grows a node to fit its slots and widgets; a smaller saved size would
        # make it overlap the node below once loaded (seen in tests/e2e/test_browser.py).
        rows = max(len(node["inputs"]), len(node["outputs"]), 1)
        node["size"][1] = max(node["size"][1], rows * SLOT_HEIGHT + len(values) * WIDGET_HEIGHT + 16)
        self.nodes.append(node)
        return nid

    def height(self, nid: int) -> int:
        return self.nodes[nid - 1]["size"][1]

    def link(self, src: int, out_slot: int, dst: int, input_name: str) -> None:
        lid = len(self.links) + 1
        s, t = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, inp in enumerate(t["inputs"]) if inp["name"] == input_name)
        typ = s["outputs"][out_slot]["type"]
        self.links.append([lid, src, out_slot, dst, slot, typ])
        s["outputs"][out_slot]["links"].append(lid)
        t["inputs"][slot]["link"] = lid

    def ui(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
                "version": 0.4}


def txt2img(g: Graph, ckpt: str, size: int, steps: int, patch: tuple[str, dict] | None, prefix: str,
            cfg: float = 7.5, y: int = 0, shared: dict | None = None, preview: bool = False) -> dict:
    """Loader → (patch) → KSampler → VAE decode → SaveImage; returns the node ids.

    ``shared`` (ids of an earlier call) reuses its loader and prompts for a second pipeline."""
    if shared is None:
        ids = {"ckpt": g.add("CheckpointLoaderSimple", {"ckpt_name": ckpt}, pos=(0, y), size=(320, 100))}
        ids["pos"] = g.add("CLIPTextEncode", {"text": POSITIVE}, pos=(360, y + 160), size=(400, 160))
        ids["neg"] = g.add("CLIPTextEncode", {"text": NEGATIVE}, pos=(360, y + 360), size=(400, 160))
        g.link(ids["ckpt"], 1, ids["pos"], "clip")
        g.link(ids["ckpt"], 1, ids["neg"], "clip")
    else:
        ids = {k: shared[k] for k in ("ckpt", "pos", "neg")}
    model = (ids["ckpt"], 0)
    top = y + 160  # where the prompts start in the second column
    if patch is not None:
        ids["patch"] = g.add(patch[0], patch[1], pos=(360, y), size=(340, 120))
        g.link(*model, ids["patch"], "model")
        model = (ids["patch"], 0)
        top = max(top, y + g.height(ids["patch"]) + TITLE_AND_GAP)
    if shared is None:  # prompts below the patch node, not behind it
        g.nodes[ids["pos"] - 1]["pos"][1] = top
        g.nodes[ids["neg"] - 1]["pos"][1] = top + g.height(ids["pos"]) + TITLE_AND_GAP
        top = g.nodes[ids["neg"] - 1]["pos"][1] + g.height(ids["neg"]) + TITLE_AND_GAP
    ids["latent"] = g.add("EmptyLatentImage", {"width": size, "height": size, "batch_size": 1}, pos=(360, top),
                          size=(320, 110))
    ids["sampler"] = g.add("KSampler", {"seed": 42, "steps": steps, "cfg": cfg, "sampler_name": "euler",
                                        "scheduler": "normal", "denoise": 1.0}, pos=(800, y), size=(320, 270))
    g.link(*model, ids["sampler"], "model")
    g.link(ids["pos"], 0, ids["sampler"], "positive")
    g.link(ids["neg"], 0, ids["sampler"], "negative")
    g.link(ids["latent"], 0, ids["sampler"], "latent_image")
    ids["decode"] = g.add("VAEDecode", {}, pos=(1160, y), size=(220, 50))
    g.link(ids["sampler"], 0, ids["decode"], "samples")
    g.link(ids["ckpt"], 2, ids["decode"], "vae")
    ids["save"] = g.add("SaveImage", {"filename_prefix": prefix}, pos=(1420, y), size=(320, 320))
    g.link(ids["decode"], 0, ids["save"], "images")
    if preview and patch is not None:
        ids["preview"] = g.add("TokenPruningPreview", {"panels": 6}, pos=(1160, y + 380), size=(240, 100))
        g.link(ids["patch"], 0, ids["preview"], "model")
        g.link(ids["sampler"], 0, ids["preview"], "samples")
        ids["preview_save"] = g.add("SaveImage", {"filename_prefix": prefix + "_preview"}, pos=(1420, y + 380),
                                    size=(320, 320))
        g.link(ids["preview"], 0, ids["preview_save"], "images")
    return ids


def dit_pipeline(g: Graph, spec: dict) -> dict:
    """The loaders of a DiT family (diffusion model, text encoder(s), VAE: how ComfyUI's own
    templates load them), its latent node, optional model-sampling and conditioning nodes, CAT,
    KSampler, VAE decode and a save node; returns the node ids. ``spec`` keys: ``unet`` (file,
    or ``checkpoint`` with the VAE inside), ``clip`` ((files...), type), ``vae``, ``latent``
    (type, widgets), ``sampling`` (type, widgets) or None, ``guidance`` (FluxGuidance value) or
    None, ``ltxv_conditioning`` (frame rate) or None, ``start_image`` (the latent node takes a
    start image and a VAE), ``steps``, ``cfg``, ``sampler``, ``scheduler``, ``save`` ("image" or
    "video"), ``prefix``. Nodes are stacked in columns by their sizes, so none overlaps another."""
    ids: dict = {}
    tops = {0: 0, 360: 0, 800: 0}  # next free y of each column

    def put(column: int, type_: str, widgets: dict | None, size: tuple, title: str | None = None) -> int:
        nid = g.add(type_, widgets, pos=(column, tops[column]), size=size, title=title)
        tops[column] += g.height(nid) + TITLE_AND_GAP
        return nid

    if "checkpoint" in spec:
        ids["model"] = put(0, "CheckpointLoaderSimple", {"ckpt_name": spec["checkpoint"]}, (320, 100))
        model, vae = (ids["model"], 0), (ids["model"], 2)
    else:
        ids["model"] = put(0, "UNETLoader", {"unet_name": spec["unet"]}, (320, 90))
        model = (ids["model"], 0)
    files, clip_type = spec["clip"]
    if len(files) == 1:
        ids["clip"] = put(0, "CLIPLoader", {"clip_name": files[0], "type": clip_type}, (320, 110))
    else:
        ids["clip"] = put(0, "DualCLIPLoader", {"clip_name1": files[0], "clip_name2": files[1], "type": clip_type},
                          (320, 130))
    if "checkpoint" not in spec:
        ids["vae"] = put(0, "VAELoader", {"vae_name": spec["vae"]}, (320, 60))
        vae = (ids["vae"], 0)
    if spec.get("sampling") is not None:
        ids["sampling"] = put(360, spec["sampling"][0], spec["sampling"][1], (340, 60))
        g.link(*model, ids["sampling"], "model")
        model = (ids["sampling"], 0)
    ids["patch"] = put(360, CAT[0], CAT[1], (340, 120))
    g.link(*model, ids["patch"], "model")
    model = (ids["patch"], 0)
    ids["pos"] = put(360, "CLIPTextEncode", {"text": spec.get("positive", POSITIVE)}, (400, 160))
    ids["neg"] = put(360, "CLIPTextEncode", {"text": spec.get("negative", NEGATIVE)}, (400, 160))
    g.link(ids["clip"], 0, ids["pos"], "clip")
    g.link(ids["clip"], 0, ids["neg"], "clip")
    positive, negative = (ids["pos"], 0), (ids["neg"], 0)
    if spec.get("guidance") is not None:
        ids["guidance"] = put(800, "FluxGuidance", {"guidance": spec["guidance"]}, (300, 60))
        g.link(*positive, ids["guidance"], "conditioning")
        positive = (ids["guidance"], 0)
    if spec.get("ltxv_conditioning") is not None:
        ids["ltxv"] = put(800, "LTXVConditioning", {"frame_rate": spec["ltxv_conditioning"]}, (300, 80))
        g.link(*positive, ids["ltxv"], "positive")
        g.link(*negative, ids["ltxv"], "negative")
        positive, negative = (ids["ltxv"], 0), (ids["ltxv"], 1)
    latent_type, latent_widgets = spec["latent"]
    # The frontend (1.32.x) titles some renamed nodes by their class name (EmptyHunyuanLatentVideo,
    # not its display name): an explicit title is what both the user and the server see.
    ids["latent"] = put(800, latent_type, latent_widgets, (320, 130), title=LATENT_TITLES.get(latent_type))
    if spec.get("start_image"):
        ids["image"] = put(800, "LoadImage", {"image": "example.png"}, (320, 320))
        g.link(ids["image"], 0, ids["latent"], "start_image")
        g.link(*vae, ids["latent"], "vae")
    ids["sampler"] = g.add("KSampler", {"seed": 42, "steps": spec["steps"], "cfg": spec["cfg"],
                                        "sampler_name": spec.get("sampler", "euler"),
                                        "scheduler": spec.get("scheduler", "simple"), "denoise": 1.0},
                           pos=(1160, 0), size=(320, 270))
    g.link(*model, ids["sampler"], "model")
    g.link(*positive, ids["sampler"], "positive")
    g.link(*negative, ids["sampler"], "negative")
    g.link(ids["latent"], 0, ids["sampler"], "latent_image")
    ids["decode"] = g.add("VAEDecode", {}, pos=(1520, 0), size=(220, 50))
    g.link(ids["sampler"], 0, ids["decode"], "samples")
    g.link(*vae, ids["decode"], "vae")
    if spec["save"] == "video":
        ids["save"] = g.add("SaveAnimatedWEBP", {"filename_prefix": spec["prefix"], "fps": spec.get("fps", 16.0)},
                            pos=(1780, 0), size=(320, 380))
    else:
        ids["save"] = g.add("SaveImage", {"filename_prefix": spec["prefix"]}, pos=(1780, 0), size=(320, 320))
    g.link(ids["decode"], 0, ids["save"], "images")
    ids["note_y"] = tops[0]
    return ids


# The DiT families of docs/dit-families.md, with the file names and settings of ComfyUI's own
# example workflows (docs.comfy.org / comfyanonymous.github.io/ComfyUI_examples).
DIT_WORKFLOWS = {
    "wan21_t2v_cat": {
        "unet": "wan2.1_t2v_1.3B_fp16.safetensors", "clip": (["umt5_xxl_fp8_e4m3fn_scaled.safetensors"], "wan"),
        "vae": "wan_2.1_vae.safetensors", "sampling": ("ModelSamplingSD3", {"shift": 8.0}),
        "latent": ("EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
        "steps": 30, "cfg": 6.0, "sampler": "uni_pc", "scheduler": "simple", "save": "video", "fps": 16.0,
        "positive": "a fox running through a snowy forest, morning light, cinematic",
        "negative": "blurry, static, low quality, watermark",
    },
    "wan22_ti2v_5b_i2v_cat": {
        "unet": "wan2.2_ti2v_5B_fp16.safetensors", "clip": (["umt5_xxl_fp8_e4m3fn_scaled.safetensors"], "wan"),
        "vae": "wan2.2_vae.safetensors", "sampling": ("ModelSamplingSD3", {"shift": 8.0}),
        "latent": ("Wan22ImageToVideoLatent", {"width": 1280, "height": 704, "length": 41, "batch_size": 1}),
        "start_image": True, "steps": 30, "cfg": 5.0, "sampler": "uni_pc", "scheduler": "simple",
        "save": "video", "fps": 24.0, "positive": "the lighthouse beam sweeps over the waves as the clouds drift",
        "negative": "blurry, static, low quality, watermark",
    },
    "qwen_image_cat": {
        "unet": "qwen_image_fp8_e4m3fn.safetensors", "clip": (["qwen_2.5_vl_7b_fp8_scaled.safetensors"], "qwen_image"),
        "vae": "qwen_image_vae.safetensors", "sampling": ("ModelSamplingAuraFlow", {"shift": 3.1}),
        "latent": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        "steps": 50, "cfg": 2.5, "sampler": "euler", "scheduler": "simple", "save": "image",
    },
    "chroma_cat": {
        "unet": "chroma-unlocked-v50.safetensors", "clip": (["t5xxl_fp8_e4m3fn.safetensors"], "chroma"),
        "vae": "ae.safetensors",
        "latent": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        "steps": 30, "cfg": 4.0, "sampler": "euler", "scheduler": "beta", "save": "image",
    },
    "hunyuan_video_cat": {
        "unet": "hunyuan_video_t2v_720p_bf16.safetensors",
        "clip": (["clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors"], "hunyuan_video"),
        "vae": "hunyuan_video_vae_bf16.safetensors", "sampling": ("ModelSamplingSD3", {"shift": 7.0}),
        "guidance": 6.0, "latent": ("EmptyHunyuanLatentVideo", {"width": 848, "height": 480, "length": 49, "batch_size": 1}),
        "steps": 30, "cfg": 1.0, "sampler": "euler", "scheduler": "simple", "save": "video", "fps": 24.0,
        "positive": "a paper boat drifting down a rainy street gutter, close-up, cinematic",
    },
    "ltxv_cat": {
        "checkpoint": "ltx-video-2b-v0.9.5.safetensors", "clip": (["t5xxl_fp16.safetensors"], "ltxv"),
        "ltxv_conditioning": 25.0,
        "latent": ("EmptyLTXVLatentVideo", {"width": 768, "height": 512, "length": 97, "batch_size": 1}),
        "steps": 30, "cfg": 3.0, "sampler": "euler", "scheduler": "simple", "save": "video", "fps": 24.0,
        "positive": "waves crashing against a rocky shore at dusk, slow camera pan",
    },
}

LATENT_TITLES = {"EmptyHunyuanLatentVideo": "Empty Latent Video"}


def dit_model_files() -> dict[str, set[str]]:
    """{ComfyUI model folder: file names} the DiT workflows load (the end-to-end tests list
    placeholders under these names: these families' files cannot be generated here)."""
    out: dict[str, set[str]] = {}
    for spec in DIT_WORKFLOWS.values():
        if "checkpoint" in spec:
            out.setdefault("checkpoints", set()).add(spec["checkpoint"])
        else:
            out.setdefault("diffusion_models", set()).add(spec["unet"])
            out.setdefault("vae", set()).add(spec["vae"])
        out.setdefault("text_encoders", set()).update(spec["clip"][0])
    return out


NOTES_DIT = ("CAT Pruning on {family} (docs/dit-families.md). keep_ratio 0.3: after 6 warm-up steps, a reference and a "
             "clustering step, each step recomputes 30% of the latent's tokens (on video: frames x height x width "
             "tokens, clusters spanning frames); {path}. {extra}Pruning starts at step 8: use 30-50 steps. The "
             "model files are those of ComfyUI's example workflows; load them or pick yours in the loaders.")
DIT_NOTES = {
    "wan21_t2v_cat": ("Wan 2.1 (also 2.2 A14B: one CAT node per model of the two samplers)",
                      "official K/V cache: the selected tokens attend to every token's cached keys and values",
                      "The text is never pruned. Memory: the caches hold 5 tensors per block (see the docs). "),
    "wan22_ti2v_5b_i2v_cat": ("Wan 2.2 TI2V 5B, image to video", "official K/V cache",
                              "The start frame (denoise mask 0) is computed on every step, like the text. "),
    "qwen_image_cat": ("Qwen-Image", "official K/V cache in the joint attention",
                       "Qwen-Image-Edit's reference latents are always computed. "),
    "chroma_cat": ("Chroma", "residual update (as Flux): the block runs on the selected tokens, the others reuse "
                   "their last update", ""),
    "hunyuan_video_cat": ("HunyuanVideo", "residual update (as Flux)",
                          "Image-to-video v2: the guiding frame is computed on every step. "),
    "ltxv_cat": ("LTX-Video", "official K/V cache",
                 "Image-to-video and guide frames (denoise mask 0) are computed on every step. "),
}


SITO = ("SiToTokenPruning", {"prune_ratio": 0.5})
DATO = ("DaToPruneCache", {"prune_ratio": 0.4, "schedule": "dato_official"})
CAT = ("CATPruneCache", {"keep_ratio": 0.3, "warmup_steps": 6})

NOTES = {
    "sito": ("SiTo Token Pruning (AAAI 2025). prune_ratio 0.5 = half of the tokens in the highest-resolution "
             "transformer blocks skip self-attention and borrow the result of their most similar base token. "
             "0 turns it off (bit-identical output); at most 0.75 with 2x2 windows. max_downsample auto picks the "
             "highest-resolution level that has attention (SDXL: its 1/2 level). prune_kv off = queries only "
             "(more faithful, slower). The preview node shows base (green), kept (grey) and pruned (red) tokens."),
    "dato": ("DaTo Prune + Cache (arXiv 2501.00375). schedule dato_official = the paper's final schedule "
             "(5 full / 20 shallow / 25 reused steps at 50 steps), resampled to your step count with each kind of "
             "step keeping its share (3 / 8 / 9 at 20 steps); dato_official_dense keeps all 5 full steps at any "
             "step count (slower below 50 steps, closer to the unpatched image). prune_ratio 0.4 prunes "
             "self-attention tokens whose prediction changed least. custom_schedule e.g. 'F S1x4 F R S1x3' "
             "overrides the preset."),
    "cat": ("CAT Pruning (arXiv 2502.00433). After warmup_steps full steps, a reference step and a clustering "
            "step, each step recomputes only keep_ratio (0.3) of the tokens: the most-changed clusters plus the "
            "stalest tokens, on every UNet level with attention (max_downsample 8); the rest reuse cached features "
            "and their previous prediction. Needs enough steps: "
            "with the default warm-up, pruning starts at step 8 (28-50 steps recommended)."),
    "hires": ("Two-pass hires fix with SiTo: the same patched model samples at 512, the latent is upscaled 1.5x "
              "and sampled again at 768 with denoise 0.5. SiTo keeps no state between the passes, so the second "
              "pass works at its own resolution."),
    "side": ("Side by side: the same seed sampled with the unpatched model (top) and with SiTo (bottom); both "
             "images are saved (prefixes 'unpatched' and 'sito') so you can compare them."),
}


def build_all(info: dict) -> dict[str, dict]:
    out = {}

    def simple(name, ckpt, size, steps, patch, note, preview=False):
        g = Graph(info)
        txt2img(g, ckpt, size, steps, patch, name, preview=preview)
        g.add("Note", {"text": NOTES[note]}, pos=(0, 160), size=(320, 260))
        out[name] = g.ui()

    simple("sd15_sito", SD15, 512, 20, SITO, "sito", preview=True)
    simple("sd15_dato", SD15, 512, 50, DATO, "dato", preview=True)
    simple("sd15_cat", SD15, 512, 28, CAT, "cat", preview=True)
    simple("sdxl_sito", SDXL, 1024, 25, SITO, "sito")
    simple("sdxl_dato", SDXL, 1024, 50, DATO, "dato", preview=True)
    simple("sdxl_cat", SDXL, 1024, 28, CAT, "cat", preview=True)

    g = Graph(info)
    ids = txt2img(g, SD15, 512, 20, SITO, "sd15_hires_sito_base")
    up = g.add("LatentUpscaleBy", {"upscale_method": "bislerp", "scale_by": 1.5}, pos=(1160, 420), size=(300, 90))
    g.link(ids["sampler"], 0, up, "samples")
    s2 = g.add("KSampler", {"seed": 42, "steps": 15, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
                            "denoise": 0.5}, pos=(1500, 420), size=(320, 270))
    g.link(ids["patch"], 0, s2, "model")
    g.link(ids["pos"], 0, s2, "positive")
    g.link(ids["neg"], 0, s2, "negative")
    g.link(up, 0, s2, "latent_image")
    dec = g.add("VAEDecode", {}, pos=(1860, 420), size=(220, 50))
    g.link(s2, 0, dec, "samples")
    g.link(ids["ckpt"], 2, dec, "vae")
    sv = g.add("SaveImage", {"filename_prefix": "sd15_hires_sito"}, pos=(2100, 420), size=(320, 320))
    g.link(dec, 0, sv, "images")
    g.add("Note", {"text": NOTES["hires"]}, pos=(0, 160), size=(320, 200))
    out["sd15_hires_sito"] = g.ui()

    g = Graph(info)
    ids = txt2img(g, SD15, 512, 20, None, "unpatched")
    txt2img(g, SD15, 512, 20, SITO, "sito", y=800, shared=ids)  # same loader, prompts and VAE
    g.add("Note", {"text": NOTES["side"]}, pos=(0, 160), size=(320, 200))
    out["sd15_side_by_side_sito"] = g.ui()

    for name, spec in DIT_WORKFLOWS.items():
        g = Graph(info)
        ids = dit_pipeline(g, {**spec, "prefix": name})
        family, path, extra = DIT_NOTES[name]
        g.add("Note", {"text": NOTES_DIT.format(family=family, path=path, extra=extra)}, pos=(0, ids["note_y"]),
              size=(320, 300))
        out[name] = g.ui()
    return out


def main() -> int:
    with ComfyServer() as server:
        info = server.object_info()
    folder = ROOT / "workflows"
    folder.mkdir(exist_ok=True)
    for name, ui in build_all(info).items():
        (folder / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
        print("wrote", folder / f"{name}.json")
    thumbnails()
    return 0




def render_thumbnail(ui: dict, path: Path, width: int = 640) -> None:
    """A small PNG of the graph (boxes, titles, links) to sit beside the workflow JSON."""
    from PIL import Image, ImageDraw

    nodes = ui["nodes"]
    x0 = min(n["pos"][0] for n in nodes) - 20
    y0 = min(n["pos"][1] for n in nodes) - 20
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes) + 20
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes) + 20
    scale = width / (x1 - x0)
    img = Image.new("RGB", (width, max(int((y1 - y0) * scale), 120)), (40, 40, 44))
    draw = ImageDraw.Draw(img)
    boxes = {}
    for n in nodes:
        x, y = (n["pos"][0] - x0) * scale, (n["pos"][1] - y0) * scale
        w, h = n["size"][0] * scale, max(n["size"][1] * scale, 18)
        ours = n["type"] in ("SiToTokenPruning", "DaToPruneCache", "CATPruneCache", "TokenPruningPreview")
        fill = (70, 120, 80) if ours else (90, 90, 60) if n["type"] == "Note" else (70, 70, 80)
        draw.rectangle([x, y, x + w, y + h], fill=fill, outline=(160, 160, 170))
        draw.text((x + 3, y + 2), n.get("title") or n["type"], fill=(235, 235, 235))
        boxes[n["id"]] = (x, y, w, h)
    for _, src, _, dst, _, _ in ui["links"]:
        sx, sy, sw, _ = boxes[src]
        dx, dy, _, _ = boxes[dst]
        draw.line([sx + sw, sy + 8, dx, dy + 8], fill=(200, 180, 90), width=1)
    img.save(path, optimize=True)


def thumbnails() -> None:
    for path in sorted((ROOT / "workflows").glob("*.json")):
        render_thumbnail(json.loads(path.read_text()), path.with_suffix(".png"))
        print("wrote", path.with_suffix(".png"))


if __name__ == "__main__":
    if sys.argv[1:] == ["--thumbnails"]:
        thumbnails()
        raise SystemExit(0)
    raise SystemExit(main())
