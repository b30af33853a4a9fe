"""SiTo taken apart, for the quality benchmark (the "why is SiTo behind ToMe" question).

SiTo makes four choices per block call; ComfyUI's ToMe makes the same four differently:

  base tokens   SiTo: the per-window argmax of SimScore + noise   ToMe: one random token per window
  pruned set    both: the non-base tokens most similar to a base token (``rprune``: random instead)
  stand-in      both: the most similar base token (``wstand``: the base token of the token's own window)
  what enters   SiTo: the kept tokens as they are, keys/values pruned too
                ToMe: each base token as the mean of its group (``merge``), all keys/values (``qonly``)

A ``sito`` variant with the modifiers ``rbase``, ``rprune``, ``wstand`` or ``bN`` is built here from
the pack's own selection pieces (``pruning_core.selection``), installed exactly like the SiTo node
(the pack's block pruning and run lifecycle), so that one part at a time can be switched to ToMe's
or to chance: ``sito-rbase-global-merge-qonly`` is ToMe rebuilt from our parts. ``bN`` prunes only
the N-th eligible transformer block (in the order the forward runs them), for the per-block error.
``xin`` measures the similarities (SimScore, the pruned set, the stand-ins) on the block input
instead of on ``norm1``'s output, which is what the attention patch sees: the official SiTo scores
the block input. The patch recovers it from ``norm1(x)`` through the norm's own weight and bias,
``(n - b) / w`` = the block input minus its per-token mean, divided by its per-token spread; the
spread cancels in a cosine, the mean does not come back (it is the one difference left).
Benchmark-only: none of this is a node option.
"""
from __future__ import annotations

import zlib

import torch

import pack

SY = SX = 2
NOISE_ALPHA = 0.1  # SiTo's default noise on the similarity score


def _selection():
    import importlib
    return importlib.import_module(f"{pack.PACK_ALIAS}.pruning_core.selection")


def parts_planner(ratio: float, base: str, prune: str, stand: str, search: str, recovery: str, cfg: str,
                  alpha: float = NOISE_ALPHA, space=None):
    """A planner ``(n, grid, state, call) -> PrunePlan`` with each of SiTo's parts chosen:
    ``base`` "sim" | "random", ``prune`` "sim" | "random", ``stand`` "nearest" | "window";
    ``cfg``: how the rows of a CFG batch draw their randomness: "key" (the pack's way: draws
    keyed by the step and the block, the same for every chunk of the call and for the cond and
    uncond calls when ComfyUI runs them apart), "row" (each row its own draws from the run's
    generator, as the pack drew them before), "noise" (one noise row for every row), "plan" (the
    first half's plan for both halves of a batch),
    "fixed" (as "key", but the same draws at every step: which tokens are pruned and what they
    copy stops changing from step to step). ``space``: None (similarities of ``norm1(x)``) or
    ``{block: (weight, bias)}`` of each block's ``norm1``, to measure them on the block input."""
    sel = _selection()
    sito = pack.sito_core

    def draws(n, state, call):
        """(generator, rows to draw, times to repeat them)."""
        b = n.shape[0]
        if cfg == "fixed":  # shared by the CFG chunks like "key", but the same draws at every step
            g = torch.Generator(device=n.device)
            g.manual_seed(zlib.crc32(repr((state.seed, call.block)).encode()))
            return g, b // call.chunks, call.chunks
        if cfg != "key":
            return state.generator(n.device), b, 1
        return call.generator, b // call.chunks, call.chunks

    def shared(n, grid, state, call):
        # one plan for both halves of a CFG batch (computed on the first half)
        b = n.shape[0]
        if b % 2:
            return planner(n, grid, state, call)
        plan = planner(n[: b // 2], grid, state, call)
        if plan is None:
            return None
        twice = lambda t: None if t is None else torch.cat([t, t])
        return type(plan)(kept=twice(plan.kept), source=twice(plan.source), n_tokens=plan.n_tokens,
                          base=twice(plan.base), merge=plan.merge)

    def planner(n, grid, state, call):
        n_base = grid.window_count(SY, SX)
        k = sel.pruned_count(ratio, grid.n, n_base)
        if n_base == 0 or k == 0:
            return None
        g, rows, times = draws(n, state, call)
        b = n.shape[0]
        if space is None:
            xn = sel.normalized(n)
        else:  # undo norm1's affine: the block input, centred and scaled per token
            weight, bias = space[call.block]
            xn = sel.normalized((n - bias) / torch.where(weight.abs() < 1e-6, 1e-6, weight))

        def noise(fn):
            rows_shape = (1 if cfg == "noise" else rows, grid.n)
            return fn(rows_shape, generator=g, device=g.device).to(n.device).repeat(times, 1)
        if base == "random":
            base_ids = sel.random_base_tokens(rows, grid, SY, SX, g, n.device).repeat(times, 1)
        else:
            score = sel.similarity_score(xn) + alpha * noise(torch.randn)
            base_ids = sel.select_base_tokens(score, grid, SY, SX)
        if prune == "sim" and stand == "nearest":
            return sito.recovery_plan(xn, base_ids, grid, SY, SX, k, search, recovery)
        # the other combinations on the global similarity to the base tokens
        base_xn = xn.gather(1, base_ids.unsqueeze(-1).expand(-1, -1, xn.shape[-1]))
        best, nearest = torch.bmm(xn, base_xn.transpose(1, 2)).max(dim=-1)
        if prune == "random":
            best = noise(torch.rand)
        best.scatter_(1, base_ids, float("-inf"))  # base tokens are never pruned
        order = best.argsort(dim=1, descending=True)
        if stand == "window":
            stand_in = base_ids.gather(1, sel._home_windows(grid, SY, SX, n.device).expand(b, -1))
        else:
            stand_in = base_ids.gather(1, nearest)
        plan = sel.plan_from_order(order, k, stand_in)
        plan.base, plan.merge = base_ids, recovery == "merge"
        return plan
    return shared if cfg == "plan" else planner


def block_target(model, block: int, max_downsample: int) -> tuple:
    """ComfyUI's ``extra_options["block"]`` of the ``block``-th eligible transformer block."""
    paths = pack.transformer_block_paths(model, max_downsample)
    if not 0 <= block < len(paths):
        raise ValueError(f"b{block}: the model has {len(paths)} eligible transformer blocks (b0..b{len(paths) - 1})")
    part, index = paths[block].split(".")[:2]
    return ({"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[part],
            0 if part == "middle_block" else int(index))


def norm1_affines(model, max_downsample: int) -> dict:
    """``{block: (weight, bias)}`` of the ``norm1`` of every eligible transformer block, keyed as the
    pack's ``BlockCall.block`` names it (ComfyUI's ``extra_options["block"]`` + the block index)."""
    dm = model.model.diffusion_model
    parts = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
    out = {}
    for path in pack.transformer_block_paths(model, max_downsample):
        names = path.split(".")
        index = 0 if names[0] == "middle_block" else int(names[1])
        norm = dm.get_submodule(path).norm1
        out[(parts[names[0]], index, int(names[-1]))] = (norm.weight.detach(), norm.bias.detach())
    return out


def apply_parts(model, ratio: float, *, base="sim", prune="sim", stand="nearest", search="local",
                recovery="base", prune_kv=True, block=None, cfg="key", max_downsample="auto", seed=0,
                alpha=NOISE_ALPHA, space="norm1"):
    """``model`` patched with SiTo's parts chosen as above (a clone; the SiTo node's installation)."""
    import variants

    def make_planner(m, factor):
        affines = norm1_affines(m, factor) if space == "input" else None
        planner = parts_planner(ratio, base, prune, stand, search, recovery, cfg, alpha, affines)
        if block is None:
            return planner
        target = block_target(m, block, factor)
        return lambda n, grid, state, call: planner(n, grid, state, call) if call.block[:2] == target else None

    return variants.install_planner(model, "sito parts", ratio, max_downsample, make_planner, seed, SX, SY,
                                    self_attn=True, prune_kv=prune_kv)
