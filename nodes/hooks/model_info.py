"""Model inspection: what kind of model a patch sees, by feature detection (never version parsing).

UNets (SD1.x, SD2.x, SDXL): the levels that hold transformer blocks, the paths of those blocks,
and each block's depth rank for DaTo's shallow steps. DiTs: the block layout family.
"""
from __future__ import annotations


def diffusion_model(model):
    return model.get_model_object("diffusion_model")


def attention_levels(model) -> list[int]:
    """Downsample factors of the UNet levels that hold transformer blocks (SD1.5: 1,2,4; SDXL: 2,4).

    Empty when the model is not a UNet with ``input_blocks`` (a DiT, or something unknown).
    """
    dm = diffusion_model(model)
    blocks = getattr(dm, "input_blocks", None)
    if blocks is None:
        return []
    levels, factor = set(), 1
    for block in blocks:
        for layer in block:
            name = type(layer).__name__
            if "SpatialTransformer" in name or "SpatialVideoTransformer" in name:
                levels.add(factor)
            if name == "Downsample":
                factor *= 2
    return sorted(levels)


def transformer_block_paths(model, max_downsample: int | None = None) -> list[str]:
    """Dotted paths (under ``diffusion_model``) of UNet BasicTransformerBlocks at eligible levels."""
    dm = diffusion_model(model)
    paths: list[str] = []

    def visit(prefix: str, module, factor: int) -> None:
        if max_downsample is not None and factor > max_downsample:
            return
        for name, sub in module.named_modules():
            if type(sub).__name__ == "BasicTransformerBlock":
                paths.append(f"{prefix}.{name}" if name else prefix)

    factor = 1
    for i, block in enumerate(getattr(dm, "input_blocks", [])):
        visit(f"input_blocks.{i}", block, factor)
        if any(type(layer).__name__ == "Downsample" for layer in block):
            factor *= 2
    if getattr(dm, "middle_block", None) is not None:
        visit("middle_block", dm.middle_block, factor)
    for i, block in enumerate(getattr(dm, "output_blocks", [])):
        visit(f"output_blocks.{i}", block, factor)
        if any(type(layer).__name__ == "Upsample" for layer in block):
            factor //= 2
    return paths


def model_class_name(model) -> str:
    try:
        return type(diffusion_model(model)).__name__
    except Exception:  # noqa: BLE001 - only used for messages
        return type(getattr(model, "model", model)).__name__


def unet_block_ranks(model) -> list[tuple[str, int, list[str]]]:
    """(block key, depth rank, layer paths) for every UNet block a shallow step may skip.

    Input block i has rank i, output block j has rank L−1−j, the middle block ranks deepest.
    A shallow step of depth d runs blocks of rank < d and reuses the others.
    """
    dm = diffusion_model(model)
    ins, outs = list(getattr(dm, "input_blocks", [])), list(getattr(dm, "output_blocks", []))
    blocks = []
    for i, block in enumerate(ins):
        blocks.append((f"input_blocks.{i}", i, [f"input_blocks.{i}.{k}" for k in range(len(block))]))
    mid = getattr(dm, "middle_block", None)
    if mid is not None:
        blocks.append(("middle_block", 1 << 16, [f"middle_block.{k}" for k in range(len(mid))]))
    for j, block in enumerate(outs):
        blocks.append((f"output_blocks.{j}", len(outs) - 1 - j, [f"output_blocks.{j}.{k}" for k in range(len(block))]))
    return blocks


def max_cache_depth(model) -> int:
    dm = diffusion_model(model)
    return max(len(getattr(dm, "input_blocks", [])) - 1, 0)


def dit_family(model) -> str | None:
    """The DiT block layout of ``model`` by feature detection, or None when no CAT path fits:

    - ``"mmdit"``: SD3/SD3.5 joint blocks; ``"flux"``: Flux double + single blocks;
      ``"chroma"``: the same blocks without their own modulation (Chroma's approximator feeds
      every block); ``"hunyuan_video"``: Flux-style blocks with the image stream first in the
      joint sequence (``flipped_img_txt``), video latents;
    - ``"wan"``: Wan 2.x attention blocks (``self_attn`` + ``cross_attn`` + ``ffn``);
      ``"qwen_image"``: Qwen-Image dual-stream blocks (``attn`` with text projections + ``img_mlp``);
      ``"ltxv"``: LTX-Video blocks (``attn1`` + ``attn2`` + ``ff``): their sub-modules take the
      rotary table and ``transformer_options`` as arguments (checked on the signature), which
      the K/V-cache path needs.
    """
    from .cat_dit_kv import kv_layout

    dm = diffusion_model(model)
    if hasattr(dm, "joint_blocks"):
        return "mmdit"
    doubles, singles = getattr(dm, "double_blocks", None), getattr(dm, "single_blocks", None)
    if doubles is not None and singles is not None:
        if hasattr(dm, "nerf_blocks") or not len(doubles):  # Chroma Radiance: pixel-space head, untested
            return None
        first = doubles[0]
        if getattr(first, "flipped_img_txt", False):
            return "hunyuan_video"
        if not getattr(first, "modulation", True):
            return "chroma"
        return "flux"
    return kv_layout(dm)


def dit_patch_size(model) -> tuple[int, int, int]:
    """``(pt, ph, pw)``: latent frames, rows and columns per DiT token, read from the diffusion
    model (``patch_size``, or LTX-Video's ``patchifier.patch_size``); 2x2 when it says nothing."""
    dm = diffusion_model(model)
    patch = getattr(getattr(dm, "patchifier", None), "patch_size", None)
    if patch is None:
        patch = getattr(dm, "patch_size", 2)
    if isinstance(patch, int):
        return (1, patch, patch)
    patch = tuple(int(p) for p in patch)
    return (1,) + patch if len(patch) == 2 else patch  # type: ignore[return-value]


def resolve_max_downsample(model, choice: str) -> tuple[int | None, str | None]:
    """Map the ``max_downsample`` combo to a factor; (None, warning) when the model has no UNet attention."""
    levels = attention_levels(model)
    if not levels:
        return None, (f"{model_class_name(model)} has no UNet transformer blocks (input_blocks with "
                      f"SpatialTransformer); supported are SD1.x, SD2.x and SDXL UNets")
    if choice == "auto":
        return levels[0], None
    factor = int(choice)
    if factor < levels[0]:
        return factor, (f"max_downsample={factor} selects no attention level of {model_class_name(model)}: its "
                        f"highest-resolution attention is at downsample {levels[0]} (use 'auto')")
    return factor, None
