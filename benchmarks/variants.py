"""Benchmark variants: their syntax, which model family each runs on, and how each patches the model.

A variant is ``method[-modifier...][@ratio]`` (the list is in bench.py's docstring and
benchmarks/README.md). ``parse_variant`` reads one into a ``Variant``; ``family_problem`` says
why some cannot run on a DiT; ``patch`` applies one to a model the way its node does
(``apply_random``: the pack's block-pruning hooks with a random planner, no node of its own).
``options`` is what the JSON records of a variant's settings, ``schedule_ideal`` the ideal
speedup of a DaTo/DeepCache schedule, and the ``cat_*`` functions CAT's step roles as the pack
defines them (which steps of a run are full model calls).

Pack internals come through ``pack`` (see pack.py), ComfyUI's nodes through their own imports;
both only inside functions, after ``pack.bootstrap()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pack

# Which variants can run on which model family. SiTo, DaTo/DeepCache, ToMe and random pruning
# hook the UNet's SpatialTransformer blocks (attn1/attn2/ff patches); an MMDiT never calls them.
UNET_ONLY_METHODS = {
    "tome": "ComfyUI's ToMe node patches the UNet's attn1",
    "sito": "SiTo patches the UNet's SpatialTransformer self-attention",
    "random": "random pruning goes through SiTo's UNet block patches",
    "dato": "DaTo's step cache and pruning patch the UNet's blocks",
    "deepcache": "DeepCache (DaTo node) caches the UNet's skip-connected blocks",
}
DIT_METHODS = ("unpatched", "cat", "lazycache", "easycache")


def family_problem(variants, family: str) -> str | None:
    """Why some of ``variants`` cannot run on a model of ``family`` ("unet", "mmdit", "flux"), or None."""
    if family == "unet":
        return None
    bad = [v for v in variants if v.method not in DIT_METHODS]
    if not bad:
        return None
    why = "; ".join(f"{v.spec}: {UNET_ONLY_METHODS.get(v.method, 'not a DiT method')}" for v in bad)
    return (f"UNet-only variant(s) asked for on the {family} (a DiT): {why}. On a DiT the benchmark runs "
            f"unpatched, cat@R (CAT Pruning), lazycache@T and easycache@T (ComfyUI core caches).")


@dataclass
class Variant:
    spec: str
    method: str  # unpatched | tome | sito | random
    ratio: float = 0.0
    qonly: bool = False
    max_downsample: str = "auto"
    xattn: bool = False
    mlp: bool = False
    search: str | None = None  # SiTo similarity_search ("local" | "global"); None = the node's default
    recovery: str | None = None  # SiTo recovery ("base" | "kept" | "merge"); None = the node's default
    preset: str | None = None  # DaTo schedule preset (dato / deepcache variants); "custom" = schedule
    schedule: str | None = None  # dato-custom: the custom_schedule text (--dato-schedule)
    parts: dict = field(default_factory=dict)  # SiTo taken apart (benchmarks/ablation.py): rbase, rprune, wstand, bN
    warmup: int | None = None  # CAT warmup_steps (modifier wN); None = the node's default
    node_options: dict = field(default_factory=dict)  # node options set by modifiers (CAT: residual, merged;
    #                                                   DaTo: align, global, kept, merge)


# DaTo modifiers that set a node option rather than name the schedule preset
DATO_OPTION_MODIFIERS = {"align": {"align_cfg": True}, "global": {"similarity_search": "global"},
                         "kept": {"recovery": "kept"}, "merge": {"recovery": "merge"}, "qonly": {"prune_kv": False},
                         "nodyn": {"dynamics_weight": 0.0}}  # nodyn: base tokens by the noise alone (random)

# Caching variants (issues 3 and 4): method -> how the ratio is read
CACHE_METHODS = {
    "dato": ("prune_ratio of DaToPruneCache; modifier = schedule preset (official, official-dense, aggressive, "
             "searched-<steps>-<name>) or custom; option modifiers align = align_cfg on, global = similarity_search global, kept / merge = "
             "recovery, qonly = prune_kv off, nodyn = dynamics_weight 0 (random base tokens)"),
    "deepcache": "prune_ratio (0 = caching only); modifier = interval (5, 10): DaToPruneCache deepcache_N",
    "cat": ("keep_ratio of CATPruneCache (warmup 6); modifiers ds1/ds2/ds4/ds8 = max_downsample (default 8: all "
            "levels), wN = warmup_steps N, residual = SD3 blocks without the K/V cache (dit_kv_cache off), merged = "
            "next selection from the merged prediction (signal_before_merge off), x0 = selection signal and reuse in "
            "the denoised estimate (prediction_space denoised, the pack's earlier default), eps = in the model's "
            "noise output (prediction_space noise, the default, as the official code)"),
    "easycache": "reuse_threshold of ComfyUI's EasyCache node",
    "lazycache": "reuse_threshold of ComfyUI's LazyCache node (PREDICT_NOISE level: works on every model)",
}


def parse_variant(spec: str, dato_schedule: str | None = None) -> Variant:
    """``dato_schedule``: the schedule text of a ``dato-custom`` variant (``--dato-schedule``)."""
    spec = spec.strip()
    name, _, ratio = spec.partition("@")
    method, *mods = name.split("-")
    if method == "unpatched":
        if ratio or mods:
            raise ValueError(f"variant {spec!r}: unpatched takes no ratio or modifiers")
        return Variant(spec, method)
    if method in CACHE_METHODS:
        if not ratio:
            raise ValueError(f"variant {spec!r}: needs a ratio ({CACHE_METHODS[method]})")
        v = Variant(spec, method, ratio=float(ratio))
        if method == "dato":
            preset = [m for m in mods if m not in DATO_OPTION_MODIFIERS]
            for mod in mods:
                v.node_options.update(DATO_OPTION_MODIFIERS.get(mod, {}))
            if preset == ["custom"]:
                if not (dato_schedule or "").strip():
                    raise ValueError(f"variant {spec!r} needs --dato-schedule")
                v.preset, v.schedule = "custom", dato_schedule
            elif preset[:1] == ["searched"]:  # the schedule search's presets: dato-searched-20-balanced
                v.preset = "_".join(preset)
            else:
                v.preset = "dato_" + ("_".join(preset) if preset else "official")
        elif method == "deepcache":
            v.preset = "deepcache_" + (mods[0] if mods else "5")
        elif method == "cat":
            v.max_downsample = "8"  # the node's default: every attention level
            for mod in mods:
                if mod in ("ds1", "ds2", "ds4", "ds8"):
                    v.max_downsample = mod[2:]
                elif mod[:1] == "w" and mod[1:].isdigit():
                    v.warmup = int(mod[1:])
                elif mod == "residual":
                    v.node_options["dit_kv_cache"] = False
                elif mod == "merged":
                    v.node_options["signal_before_merge"] = False
                elif mod in ("eps", "x0"):
                    v.node_options["prediction_space"] = "noise" if mod == "eps" else "denoised"
                else:
                    raise ValueError(f"variant {spec!r}: unknown cat modifier {mod!r} (ds1/ds2/ds4/ds8, wN, "
                                     f"residual, merged, eps, x0)")
        return v
    if method not in ("tome", "sito", "random"):
        raise ValueError(f"variant {spec!r}: unknown method {method!r} (unpatched, tome, sito, random, "
                         f"{', '.join(CACHE_METHODS)})")
    if not ratio:
        raise ValueError(f"variant {spec!r}: needs a ratio, e.g. {method}@0.5")
    v = Variant(spec, method, ratio=float(ratio))
    for mod in mods:
        if method == "tome":
            raise ValueError(f"variant {spec!r}: ComfyUI's ToMe node has no modifiers")
        if mod == "qonly":
            v.qonly = True
        elif mod in ("ds1", "ds2", "ds4"):
            v.max_downsample = mod[2:]
        elif mod == "xattn":
            v.xattn = True
        elif mod == "mlp":
            v.mlp = True
        elif mod in ("local", "global") and method == "sito":
            v.search = mod
        elif mod in ("base", "kept", "merge") and method == "sito":
            v.recovery = mod
        elif mod in ABLATION_MODIFIERS and method == "sito":
            v.parts.update(ABLATION_MODIFIERS[mod])
        elif mod[:1] == "b" and mod[1:].isdigit() and method == "sito":
            v.parts["block"] = int(mod[1:])
        elif mod == "rowwise" and method == "random":
            v.node_options["per_row"] = True  # each row its own draws: cond and uncond pruned apart
        elif mod[:1] == "a" and mod[1:].replace(".", "", 1).isdigit() and method == "sito":
            v.node_options["noise_alpha"] = float(mod[1:])  # aX: SiTo's noise_alpha X
        elif mod[:3] == "sim" and mod[3:].replace(".", "", 1).isdigit() and method == "sito":
            v.node_options["sim_beta"] = float(mod[3:])  # simX: SiTo's sim_beta X (sim0: random base tokens)
        else:
            raise ValueError(f"variant {spec!r}: unknown modifier {mod!r} (qonly, ds1, ds2, ds4, xattn, mlp; "
                             f"random also rowwise; sito also local, global, base, kept, merge, aX = noise_alpha "
                             f"X, simX = sim_beta X, and the ablation's rbase, rprune, wstand, xin, cfgnoise, "
                             f"cfgplan, cfgkey, cfgfixed, cfgrow, bN)")
    return v


# SiTo's parts switched one at a time (benchmarks/ablation.py; benchmark-only, not node options)
ABLATION_MODIFIERS = {"rbase": {"base": "random"}, "rprune": {"prune": "random"}, "wstand": {"stand": "window"},
                      "cfgnoise": {"cfg": "noise"}, "cfgplan": {"cfg": "plan"}, "cfgkey": {"cfg": "key"},
                      "cfgfixed": {"cfg": "fixed"}, "cfgrow": {"cfg": "row"}, "xin": {"space": "input"}}


def install_planner(model, label: str, ratio: float, max_downsample: str, make_planner, seed: int,
                    sx: int = 2, sy: int = 2, **how):
    """A clone of ``model`` with the planner ``make_planner(clone, factor)`` installed through the
    pack's block pruning and run lifecycle, as the SiTo node installs its own (``how``: the
    :class:`BlockPruning` fields besides ``max_downsample``)."""
    problem = pack.validate_prune_ratio(ratio, sx, sy)
    if problem:
        raise ValueError(f"{label}: {problem}")
    factor, warning = pack.resolve_max_downsample(model, str(max_downsample))
    if factor is None:
        raise ValueError(f"{label}: {warning}")
    m = model.clone()
    uid = pack.new_uid(label.replace(" ", "-"))

    def summary(state):
        return (f"{label}: r={ratio:g}, levels up to 1/{factor}: {state.summary_levels()}; "
                f"active in {len(state.active_steps)}/{state.total_steps} steps")

    pack.install_block_pruning(m, uid, pack.BlockPruning(max_downsample=factor, **how), make_planner(m, factor))
    pack.install_run_lifecycle(m, uid, label, 0.0, 1.0, seed, summary)
    return m


def apply_random(model, ratio: float, max_downsample: str, qonly: bool, xattn: bool, mlp: bool, seed: int,
                 sx: int = 2, sy: int = 2, per_row: bool = False):
    """Random pruning, installed exactly like ``apply_sito`` but with ``plan_random`` as planner."""
    def planner(n, grid, state, call):
        k = pack.pruned_count(ratio, grid.n, grid.window_count(sy, sx))
        if k == 0 or grid.window_count(sy, sx) == 0:
            return None
        if per_row:  # each row its own draws (the pack's random pruning before the CFG halves shared them)
            return pack.plan_random(n.shape[0], grid, k, sy, sx, state.generator(n.device), n.device)
        return pack.plan_random(n.shape[0], grid, k, sy, sx, call.generator, n.device, call.chunks)

    return install_planner(model, "random", ratio, max_downsample, lambda m, factor: planner, seed, sx, sy,
                           self_attn=True, cross_attn=xattn, mlp=mlp, prune_kv=not qonly)


def patch(base, v: Variant, seed: int):
    """``base`` with variant ``v`` applied (a patched clone; ``base`` itself for unpatched)."""
    if v.method == "unpatched":
        return base
    if v.method == "tome":
        from comfy_extras.nodes_tomesd import TomePatchModel
        return TomePatchModel.execute(base, v.ratio).result[0]
    if v.method == "sito" and v.parts:
        import ablation
        if v.xattn or v.mlp:
            raise ValueError(f"variant {v.spec!r}: the ablation prunes self-attention only")
        return ablation.apply_parts(base, v.ratio, search=v.search or "local", recovery=v.recovery or "base",
                                    prune_kv=not v.qonly, max_downsample=v.max_downsample, seed=seed,
                                    alpha=v.node_options.get("noise_alpha", ablation.NOISE_ALPHA), **v.parts)
    if v.method == "sito":
        extra = {"similarity_search": v.search} if v.search else {}
        if v.recovery:
            extra["recovery"] = v.recovery
        return pack.apply_sito(base, prune_ratio=v.ratio, max_downsample=v.max_downsample, prune_self_attn=True,
                               prune_cross_attn=v.xattn, prune_mlp=v.mlp, prune_kv=not v.qonly, seed=seed, **extra,
                               **v.node_options)
    if v.method == "random":
        return apply_random(base, v.ratio, v.max_downsample, v.qonly, v.xattn, v.mlp, seed, **v.node_options)
    if v.method in ("dato", "deepcache"):
        if v.preset == "custom":
            return pack.apply_dato(base, prune_ratio=v.ratio, custom_schedule=v.schedule, seed=seed, **v.node_options)
        return pack.apply_dato(base, prune_ratio=v.ratio, schedule=v.preset, seed=seed, **v.node_options)
    if v.method == "cat":
        warmup = {} if v.warmup is None else {"warmup_steps": v.warmup}
        return pack.apply_cat(base, keep_ratio=v.ratio, max_downsample=v.max_downsample, seed=seed, **warmup,
                              **v.node_options)
    if v.method == "easycache":
        from comfy_extras.nodes_easycache import EasyCacheNode
        return EasyCacheNode.execute(base, reuse_threshold=v.ratio, start_percent=0.15, end_percent=0.95,
                                     verbose=False).result[0]
    if v.method == "lazycache":
        from comfy_extras.nodes_easycache import LazyCacheNode
        return LazyCacheNode.execute(base, reuse_threshold=v.ratio, start_percent=0.15, end_percent=0.95,
                                     verbose=False).result[0]
    raise ValueError(v.method)


# What a DaTo/DeepCache shallow step costs against a full one, in the schedule's ideal speedup.
SHALLOW_COST = 0.13


def schedule_ideal(v: Variant, steps: int, shallow_cost: float = SHALLOW_COST) -> float | None:
    """Ideal speedup of a DaTo/DeepCache schedule: T / (full + shallow_cost·shallow), reuse free."""
    if v.method not in ("dato", "deepcache"):
        return None
    make, _ = pack.schedule_maker(v.preset, v.schedule or "")
    return make(steps, 1).ideal_speedup(shallow_cost=shallow_cost)


def parse_variants(text: str, dato_schedule: str | None = None) -> list[Variant]:
    """A comma-separated variant list, with the unpatched model first and only once (the reference)."""
    variants = [parse_variant(s, dato_schedule) for s in text.split(",") if s.strip()]
    if not variants or variants[0].method != "unpatched":
        return [parse_variant("unpatched")] + [v for v in variants if v.method != "unpatched"]
    return [variants[0]] + [v for v in variants[1:] if v.method != "unpatched"]


def options(v: Variant) -> dict:
    """The variant's settings as the JSON records them (``options`` of its row)."""
    if v.method in CACHE_METHODS:
        return (({"preset": v.preset} if v.preset else {}) | ({"schedule": v.schedule} if v.schedule else {})
                | v.node_options)
    if v.method not in ("sito", "random"):
        return {}
    opts = {"prune_kv": not v.qonly, "max_downsample": v.max_downsample, "cross_attn": v.xattn, "mlp": v.mlp}
    if v.search:
        opts["similarity_search"] = v.search
    if v.recovery:
        opts["recovery"] = v.recovery
    if v.parts:
        opts["ablation"] = dict(v.parts)
    return opts | v.node_options


# --------------------------------------------------------------------------------------
# CAT's step roles, as the pack defines them: ``warmup_steps`` full steps, a reference step and
# a clustering step (both full model calls too), then pruned steps.
# --------------------------------------------------------------------------------------

def cat_default_warmup() -> int:
    """The warm-up of a ``cat@R`` variant: the CAT node's default ``warmup_steps`` (its parameter table)."""
    return pack.CAT_PARAMS.defaults["warmup_steps"]


def cat_full_steps(steps: int, warmup_steps: int | None = None) -> int:
    """How many of a CAT run's ``steps`` are full model calls (default warm-up: ``cat_default_warmup()``)."""
    if warmup_steps is None:
        warmup_steps = cat_default_warmup()
    return min(steps, pack.full_step_count(warmup_steps))


def cat_probe_steps() -> int:
    """Steps of a warmup-0 CAT run up to and including its first pruned one (reference, clustering, pruned)."""
    return pack.full_step_count(0) + 1


def cat_probe(base, v: Variant, seed: int):
    """CAT variant ``v`` with warm-up 0, so that its first pruned step comes after ``cat_probe_steps() - 1``
    full ones: the FLOPs pass and ``--profile`` measure that step."""
    return pack.apply_cat(base, keep_ratio=v.ratio, max_downsample=v.max_downsample, warmup_steps=0, seed=seed,
                          **v.node_options)
