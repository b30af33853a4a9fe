"""The benchmarks' one door to the pack: the bootstrap, and every pack internal they use.

``bootstrap()`` puts ComfyUI on ``sys.path`` in --cpu mode (or with the ComfyUI command-line
options a GPU run asks for: ``comfy_args``) and imports this pack as ``token_pruning_cache``;
it must run before anything imports ComfyUI or the pack, so nothing of either is imported when
this module is.

After it, ``pack.NAME`` is the pack's object of that name, looked up on each access (the
module's ``__getattr__``) in the module ``INTERNALS`` says it lives in. Every name the
benchmarks take from ``token_pruning_cache.nodes`` or ``token_pruning_cache.pruning_core`` is
in that table and nowhere else, so when the pack moves or renames one, the change is one line
here. Use ``pack.NAME`` inside functions; ``from pack import NAME`` at the top of a module would
import the pack before ``bootstrap()`` (only ``ROOT``, ``PACK_ALIAS``, ``INTERNALS`` and
``bootstrap`` are plain attributes).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_ALIAS = "token_pruning_cache"

# name -> (module of the pack, attribute there; None = the module itself)
INTERNALS = {
    # the nodes' entry points
    "apply_sito": ("nodes.sito_node", "apply_sito"),
    "apply_dato": ("nodes.dato_node", "apply_dato"),
    "schedule_maker": ("nodes.dato_node", "schedule_maker"),
    "apply_cat": ("nodes.cat_node", "apply_cat"),
    "CAT_PARAMS": ("nodes.cat_node", "PARAMS"),  # the CAT node's parameter table (defaults)
    # the hook layer: model family, block pruning (the random-pruning variant), CAT's full steps
    "attention_levels": ("nodes.hooks", "attention_levels"),
    "dit_family": ("nodes.hooks", "dit_family"),
    "resolve_max_downsample": ("nodes.hooks", "resolve_max_downsample"),
    "new_uid": ("nodes.hooks", "new_uid"),
    "install_block_pruning": ("nodes.hooks", "install_block_pruning"),
    "transformer_block_paths": ("nodes.hooks.model_info", "transformer_block_paths"),  # SiTo's per-block ablation
    "BlockPruning": ("nodes.hooks", "BlockPruning"),
    "install_run_lifecycle": ("nodes.hooks", "install_run_lifecycle"),
    "full_step_count": ("nodes.hooks", "full_step_count"),
    "max_cache_depth": ("nodes.hooks", "max_cache_depth"),  # the schedule search's deepest shallow step
    "Schedule": ("pruning_core.schedule", "Schedule"),  # the schedule search's candidates
    # the algorithms: random pruning's planner, and what --profile wraps to label
    "plan_random": ("pruning_core.selection", "plan_random"),
    "pruned_count": ("pruning_core.selection", "pruned_count"),
    "validate_prune_ratio": ("pruning_core.selection", "validate_prune_ratio"),
    "sito_core": ("pruning_core.sito", None),  # sito_plan
    "cat_core": ("pruning_core.cat", None),  # merge_prediction
    "CATState": ("pruning_core.cat", "CATState"),
    "PrunePlan": ("pruning_core.recovery", "PrunePlan"),
    # the preview node's drawing of a run's records (benchmarks/preview_maps.py)
    "preview_render": ("nodes.preview_node", "render"),
    "last_records": ("nodes.hooks", "last_records"),
}


def __getattr__(name: str):
    try:
        module, attr = INTERNALS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (not in pack.INTERNALS)") from None
    if PACK_ALIAS not in sys.modules:
        raise RuntimeError(f"pack.{name} asked for before pack.bootstrap()")
    obj = importlib.import_module(f"{PACK_ALIAS}.{module}")
    return obj if attr is None else getattr(obj, attr)


def bootstrap(comfy_dir: str, comfy_args: list[str] | None = None) -> None:
    """Put ComfyUI on sys.path in --cpu mode and import this pack as ``token_pruning_cache``.

    ``comfy_args``: ComfyUI's own command-line options instead (``comfy.cli_args``, e.g.
    ``["--use-pytorch-cross-attention", "--fp16-unet"]`` for a GPU run; ``--cpu`` among them
    keeps the CPU). Idempotent, so the script can also be driven in-process (e.g. from pytest,
    whose conftest has already done the same); a second call must ask for the same options.
    """
    sys.path.insert(0, str(ROOT / "scripts"))
    if comfy_args is None:
        from make_checkpoint import ensure_comfy_importable  # the one --cpu bootstrap of the repo
        ensure_comfy_importable(Path(comfy_dir).resolve())
        comfy_args = ["--cpu"]
    else:
        _import_comfy_with(Path(comfy_dir).resolve(), comfy_args)
    import comfy.cli_args
    import comfy.model_management as mm
    wants_cpu = "--cpu" in comfy_args
    if wants_cpu and (not comfy.cli_args.args.cpu or mm.cpu_state != mm.CPUState.CPU):
        raise SystemExit("comfy.model_management was imported without --cpu before pack.bootstrap()")
    if not wants_cpu and mm.get_torch_device().type != "cuda":
        raise SystemExit(f"ComfyUI chose the device {mm.get_torch_device()} instead of a CUDA GPU "
                         f"(options {comfy_args}; was it imported with --cpu before pack.bootstrap()?)")
    if PACK_ALIAS not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_ALIAS, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_ALIAS] = module
        spec.loader.exec_module(module)
    # Import everything the variants use now, so the whole run measures one version of the code.
    for module in dict.fromkeys(module for module, _ in INTERNALS.values()):
        importlib.import_module(f"{PACK_ALIAS}.{module}")
    importlib.import_module("comfy_extras.nodes_tomesd")


def _import_comfy_with(comfy_dir: Path, comfy_args: list[str]) -> None:
    """Import ComfyUI's ``comfy.cli_args`` / ``comfy.model_management`` having parsed ``comfy_args``
    (ComfyUI reads its options once, when ``comfy.cli_args`` is first imported, and picks its
    device and attention kernel from them when ``comfy.model_management`` is)."""
    if not (comfy_dir / "comfy").is_dir():
        raise SystemExit(f"ComfyUI not found at {comfy_dir}; run `bash scripts/setup_env.sh` (or `make test`).")
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    if "comfy.cli_args" in sys.modules:
        import comfy.cli_args
        parsed = comfy.cli_args.parser.parse_args(comfy_args)
        keys = ("cpu", "use_pytorch_cross_attention", "use_split_cross_attention", "use_quad_cross_attention",
                "use_flash_attention", "use_sage_attention", "fp16_unet", "bf16_unet", "fp32_unet")
        if any(getattr(parsed, k) != getattr(comfy.cli_args.args, k) for k in keys):
            raise SystemExit(f"ComfyUI was already imported with other options than {comfy_args}")
        return
    import comfy.options
    saved = sys.argv
    sys.argv = [saved[0] if saved else "bench", *comfy_args]
    comfy.options.enable_args_parsing(True)
    try:
        import comfy.cli_args  # noqa: F401
    finally:
        sys.argv = saved
        comfy.options.enable_args_parsing(False)
    import comfy.model_management  # noqa: F401
