"""CAT Pruning's step wrapper and everything CAT keeps for one run (:class:`CATRun`).

An APPLY_MODEL wrapper (the one hook every model family fires, in every ComfyUI version; SD3
has no DIFFUSION_MODEL wrapper in 0.3.x) publishes the step's selection to the blocks
(:data:`CALL`), replaces the prediction of unselected tokens with the previous step's
(noise-space reuse, on the denoised estimate APPLY_MODEL returns), and makes the next selection
from the cond rows. What the blocks do with the selection: :mod:`.cat_unet`, :mod:`.cat_dit`.

Step roles (docs/algorithms.md §4.3): ``warmup_steps`` full steps, the reference step, the
clustering step (still full), then pruned steps, each using the selection the step before made.

Video latents (``[B, C, T, H, W]``: Wan, HunyuanVideo, LTX-Video; Qwen-Image's one-frame
latents) give a ``t × h × w`` token grid (docs/dit-families.md). Frames the sampler keeps fixed
(a denoise mask of 0 over the whole frame, or HunyuanVideo's guiding frame) are conditioning:
their tokens are computed on every step and the selection policy never sees them; it runs on
the grid of the other frames.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ...pruning_core import cat as cat_core
from ...pruning_core.cat import CATState
from ...pruning_core.geometry import TokenGrid, coarser_token_counts, latent_token_grid, video_token_grid
from .calls import CallSlot, chunk_key, cond_rows, latent_of, take_rows, transformer_options_of
from .patching import add_wrapper, wrapper_kinds
from .run import RunState, run_state

CAT_FULL, CAT_REFERENCE, CAT_CLUSTER, CAT_PRUNED = "full", "reference", "cluster", "pruned"
PREDICTION_SPACES = ("denoised", "noise")


def cat_role(step: int, warmup_steps: int) -> str:
    """Role of a step: ``warmup_steps`` full steps, the reference step, the clustering step, then pruned."""
    if step < warmup_steps:
        return CAT_FULL
    if step == warmup_steps:
        return CAT_REFERENCE
    if step == warmup_steps + 1:
        return CAT_CLUSTER
    return CAT_PRUNED


def full_step_count(warmup_steps: int) -> int:
    """Steps that run in full before the first pruned one (warm-up, reference, clustering)."""
    return warmup_steps + 2


@dataclass
class BlockCache:
    """What one block (or sub-layer) of one chunk left on the last step that computed it.

    A full step stores every token; a pruned step merges its selected tokens into the stored
    tensor (:meth:`merge`), so the cache always holds the newest value of each token.
    """

    kv: torch.Tensor | None = None  # UNet self-attention: the norm1 input its keys/values came from
    to_k: torch.Tensor | None = None  # UNet self-attention: projected keys
    to_v: torch.Tensor | None = None  # UNet self-attention: projected values
    out: torch.Tensor | None = None  # UNet attention / feed-forward output
    delta: torch.Tensor | None = None  # DiT block: its residual update of the image tokens

    def ready(self, x: torch.Tensor, selection: torch.Tensor | None, slots: tuple[str, ...]) -> bool:
        """A pruned call can run: there is a selection and every slot holds a tensor of ``x``'s
        batch and token count."""
        if selection is None or x.dim() != 3:
            return False
        for slot in slots:
            t = getattr(self, slot)
            if t is None or t.shape[0] != x.shape[0] or t.shape[1] != x.shape[1]:
                return False
        return True

    def merge(self, slot: str, out: torch.Tensor, selection: torch.Tensor | None, n_tokens: int) -> torch.Tensor:
        """Full call (or a whole-length ``out``): store ``out``. Pruned call: put ``out`` (the
        selected tokens) into the stored full tensor. Returns the full tensor."""
        if selection is None or out.shape[1] == n_tokens:
            setattr(self, slot, out)
            return out
        full = cat_core.merge_tokens(out, getattr(self, slot), selection)
        setattr(self, slot, full)
        return full

    def recompute(self, slot: str, fn, x: torch.Tensor, selection: torch.Tensor | None) -> torch.Tensor:
        """``fn`` (a token-wise layer) on the selected tokens of ``x`` when the slot is ready for
        them, else on every token; merged into / stored as the slot's full tensor."""
        sel = selection if self.ready(x, selection, (slot,)) else None
        return self.merge(slot, fn(x if sel is None else cat_core.gather_tokens(x, sel)), sel, x.shape[1])


@dataclass
class GridRun:
    """CAT on one token grid of the run (area/regional conds run on crops of the latent)."""

    policy: CATState  # reference prediction, clusters, staleness, the current selection
    selections: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> the tokens it recomputes
    levels: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)  # step -> {coarser level's tokens: carried selection}
    previous: dict[tuple, torch.Tensor] = field(default_factory=dict)  # chunk -> its last prediction
    has_cond: bool = False  # a cond row has been seen on this grid (else the uncond rows drive)
    grid: TokenGrid | None = None  # every token the blocks see (the policy's grid lacks the fixed frames)
    fixed: torch.Tensor | None = None  # tokens of the frames the sampler keeps fixed: always computed
    free: torch.Tensor | None = None  # the policy's tokens, as indices of ``grid`` (None: all of them)

    def to_blocks(self, selection: torch.Tensor) -> torch.Tensor:
        """A policy selection as the sorted tokens the blocks compute (fixed frames added)."""
        if self.free is None:
            return selection
        return torch.sort(torch.cat([self.fixed, self.free[selection]])).values


@dataclass
class CATRun:
    """Everything CAT keeps for one sampling run."""

    grids: dict[TokenGrid, GridRun] = field(default_factory=dict)
    blocks: dict[tuple, BlockCache] = field(default_factory=dict)  # (chunk, block key) -> its cache
    fixed_frames: dict[tuple, tuple[int, ...]] = field(default_factory=dict)  # (grid, mask shape) -> fixed frames


@dataclass(frozen=True)
class CATCall:
    """The model call being executed, as the blocks see it."""

    uid: str
    state: RunState
    chunk: tuple
    selection: torch.Tensor | None  # [S] sorted token indices; None on full steps
    n_tokens: int  # tokens of the selection's grid (image tokens on DiTs)
    levels: dict[int, torch.Tensor | None]  # UNet: tokens of each coarser eligible level -> its selection
    keep_attn2: bool = False  # an attn2 replace patch (IPAdapter style) expects every query
    # why a block could not place the selection (tokens the latent does not account for): the
    # rest of the call then runs whole and the step wrapper keeps this call's raw prediction
    unplaced: list = field(default_factory=list, compare=False)
    memo: dict = field(default_factory=dict, compare=False)  # what blocks of this call share (computed once)

    def cannot_place(self, why: str) -> None:
        if why not in self.unplaced:
            self.unplaced.append(why)

    def level(self, n_tokens: int) -> tuple[bool, torch.Tensor | None]:
        """(eligible, selection) for a token sequence of this call: the selection's own grid, or
        a coarser UNet level it was carried to; (False, None) for anything else."""
        if n_tokens == self.n_tokens:
            return True, self.selection
        if n_tokens in self.levels:
            return True, self.levels[n_tokens]
        return False, None

    def block_cache(self, key) -> BlockCache:
        """This chunk's cache of the block (or sub-layer) ``key``."""
        return self.state.data.blocks.setdefault((self.chunk, key), BlockCache())


CALL: CallSlot[CATCall] = CallSlot()


def call_of(uid: str) -> CATCall | None:
    """The CAT call of patch ``uid`` this thread is executing, if any."""
    call = CALL.current
    return call if call is not None and call.uid == uid else None


@dataclass(frozen=True)
class StepLayout:
    """How the step wrapper reads a family's latent as tokens."""

    token_factor: int = 1  # 4-D latents: latent pixels per token side (UNet level, DiT patch)
    patch: tuple[int, int, int] | None = None  # 5-D latents: (pt, ph, pw); None: 5-D calls pass through
    guide_frame_conds: tuple[str, ...] = ()  # conds that make the first latent frame a guide frame


def _fixed_frames(run: CATRun, kwargs: dict, layout: StepLayout, grid: TokenGrid) -> tuple[int, ...]:
    """Token frames the sampler keeps fixed: those whose denoise mask is 0 everywhere (read once
    per run and grid: the sampler's mask does not change during a run, and reading it is a host
    sync), and the guiding frame of the family's ``guide_frame_conds``."""
    if grid.t == 1 or layout.patch is None:
        return ()
    fixed: set[int] = set()
    mask = kwargs.get("denoise_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 5:
        key = (grid, tuple(mask.shape))
        if key not in run.fixed_frames:
            pt = layout.patch[0]
            per_frame = mask.detach().float().amax(dim=(0, 1, 3, 4)).tolist()  # one value per latent frame
            run.fixed_frames[key] = tuple(j for j in range(grid.t)
                                          if all(v <= 0 for v in per_frame[j * pt:(j + 1) * pt]))
        fixed.update(run.fixed_frames[key])
    if any(kwargs.get(name) is not None for name in layout.guide_frame_conds):
        fixed.add(0)
    return tuple(sorted(fixed))


def _grid_run(run: CATRun, grid: TokenGrid, fixed: tuple[int, ...], device,
              policy_factory: Callable[[TokenGrid], CATState]) -> GridRun | None:
    key = grid if not fixed else (grid, fixed)
    g = run.grids.get(key)
    if g is not None:
        return g
    if not fixed:
        g = GridRun(policy_factory(grid), grid=grid)
    else:
        free_frames = [j for j in range(grid.t) if j not in fixed]
        if not free_frames:
            return None
        per = grid.h * grid.w
        frame = torch.arange(grid.n, device=device) // per
        is_fixed = torch.zeros(grid.t, dtype=torch.bool, device=device)
        is_fixed[list(fixed)] = True
        g = GridRun(policy_factory(TokenGrid(grid.h, grid.w, len(free_frames))), grid=grid,
                    fixed=is_fixed[frame].nonzero().flatten(), free=(~is_fixed[frame]).nonzero().flatten())
    run.grids[key] = g
    return g


def install_cat_step(model, uid: str, policy_factory: Callable[[TokenGrid], CATState], warmup_steps: int,
                     token_factor: int, halvings: int, signal_before_merge: bool = True,
                     layout: StepLayout | None = None, prediction_space: str = "noise") -> None:
    """The APPLY_MODEL wrapper of CAT patch ``uid`` (``state.data``: a :class:`CATRun`).

    ``token_factor``: latent pixels per token side on the selection's grid; ``halvings``: how many
    coarser UNet levels also recompute a carried selection. ``signal_before_merge``: the next
    selection is made from the model's raw output (official), so an unselected token's change
    still shows where the model moved it (UNet conv blocks run every token); False makes it from
    the merged prediction, in which unselected tokens hold their previous value. ``layout``:
    how a video family's latent becomes tokens (None: 4-D latents only, ``token_factor``).
    ``prediction_space``: where the selection signal is measured and unselected tokens keep
    their previous value: "denoised" (APPLY_MODEL's estimate x̂₀) or "noise" (the model's own
    output, ε or velocity, recovered as ``(x − x̂₀) / σ``, as the official code works); the node
    validates it (``cat_node.cat_problem``).
    """
    W = wrapper_kinds()
    layout = layout or StepLayout(token_factor=token_factor)

    def apply_model_wrapper(executor, *args, **kwargs):
        to = transformer_options_of(args, kwargs)
        state = run_state(to, uid)
        x = latent_of(args, kwargs)
        if state is None or x is None or not (x.dim() == 4 or (x.dim() == 5 and layout.patch is not None)):
            return executor(*args, **kwargs)
        run: CATRun = state.data
        if x.dim() == 5:
            grid = video_token_grid(x.shape, layout.patch)
            g = _grid_run(run, grid, _fixed_frames(run, kwargs, layout, grid), x.device, policy_factory)
        else:
            grid = latent_token_grid(x.shape[-2], x.shape[-1], layout.token_factor)
            g = _grid_run(run, grid, (), x.device, policy_factory)
        if g is None:  # every frame is fixed: nothing to prune
            return executor(*args, **kwargs)
        chunk = chunk_key(to)
        role = cat_role(state.step, warmup_steps)
        selection = g.selections.get(state.step) if (role == CAT_PRUNED and state.active) else None
        # coarser levels: the selection carried down (None on full steps: run whole, fill the caches)
        levels = {n: None for n in coarser_token_counts(grid, halvings)}
        if selection is not None:
            levels.update(g.levels.get(state.step, {}))
        keep_attn2 = bool((to.get("patches_replace") or {}).get("attn2"))
        if keep_attn2 and selection is not None:
            state.skip("an attn2 replace patch (IPAdapter style) is present, so cross-attention ran on all tokens")
        call = CATCall(uid, state, chunk, selection, grid.n, levels, keep_attn2)
        with CALL.entered(call):
            out = executor(*args, **kwargs)
        if call.unplaced and selection is not None:
            for why in call.unplaced:
                state.skip(why)
            selection = None  # the blocks did not prune this call: keep its raw prediction
        _record(state, grid, selection)
        sigma = _row_sigmas(args, kwargs, x) if prediction_space == "noise" else None
        raw = out if sigma is None else (x - out) / sigma  # noise: the model's own output
        pred, prev = raw, g.previous.get(chunk)
        if selection is not None and prev is not None and prev.shape == raw.shape:
            pred = cat_core.merge_prediction(raw, prev, selection, grid)
            # noise space: the selected tokens keep APPLY_MODEL's own values (no round trip)
            out = pred if sigma is None else cat_core.merge_prediction(out, (x - prev * sigma).to(out.dtype),
                                                                       selection, grid)
            state.count(grid, grid.n - selection.numel())
        g.previous[chunk] = pred
        _select_next(state, g, role, raw if signal_before_merge else pred, to.get("cond_or_uncond"), grid, halvings)
        return out

    add_wrapper(model, W.APPLY_MODEL, uid, apply_model_wrapper)


def _row_sigmas(args, kwargs, x: torch.Tensor) -> torch.Tensor:
    """The call's sigma per batch row, shaped to broadcast over ``x`` (APPLY_MODEL's ``t``)."""
    t = args[1] if len(args) > 1 else kwargs["t"]
    return t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def _record(state: RunState, grid: TokenGrid, selection: torch.Tensor | None) -> None:
    state.record.step_kinds.setdefault(state.step, "pruned" if selection is not None else "full")
    if selection is not None and state.step not in state.record.token_maps:
        codes = torch.full((grid.n,), 2, dtype=torch.uint8, device=selection.device)
        codes[selection] = 0
        state.record.add_map(state.step, grid, codes)


def _select_next(state: RunState, g: GridRun, role: str, out: torch.Tensor, cond_or_uncond, grid: TokenGrid,
                 halvings: int) -> None:
    """The reference, or the selection of the next step, from this call's prediction.

    The cond rows drive the selection (official). A grid that never saw a cond row (an area crop
    only the uncond covers) uses its uncond rows instead.
    """
    rows = cond_rows(out.shape[0], cond_or_uncond)
    if rows:
        g.has_cond = True
    elif not g.has_cond:
        rows = list(range(out.shape[0]))
    if role == CAT_FULL or not rows:
        return
    policy = g.policy
    with state._lock:  # cond batches may run in threads (multi-GPU): one selection per step
        if state.step + 1 in g.selections or (role == CAT_REFERENCE and policy.reference is not None):
            return
        pred = cat_core.prediction_tokens(take_rows(out, rows), grid)
        if g.free is not None:  # the policy's grid: the frames the sampler denoises
            pred = pred.index_select(1, g.free)
        if role == CAT_REFERENCE:
            policy.set_reference(pred, row=None)
        elif policy.reference is not None:
            g.selections[state.step + 1] = g.to_blocks(policy.first_selection(pred, row=None) if role == CAT_CLUSTER
                                                       else policy.next_selection(pred, row=None))
            if halvings > 0:
                g.levels[state.step + 1] = {lv.n: sel for lv, sel in policy.coarser_selections(halvings)}


def install_cat(model, uid: str, policy_factory: Callable[[TokenGrid], CATState], warmup_steps: int,
                family: str, factor: int = 1, max_downsample: int | None = None, *, dit_kv_cache: bool = True,
                signal_before_merge: bool = True, prediction_space: str = "noise") -> None:
    """Install CAT for ``uid``: the step wrapper plus the block patches of ``family`` ("unet",
    or a :func:`.model_info.dit_family` name). ``factor``: the UNet level the selection is made on (its
    highest-resolution attention level); ``max_downsample``: the coarsest UNet level pruned with
    it (default: that level only). ``policy_factory(grid)`` makes a fresh per-run selection
    policy per token grid. ``prediction_space``: see :func:`install_cat_step`.
    ``dit_kv_cache``, ``signal_before_merge``: the official behaviour; False gives the pack's
    earlier shortcuts (see :mod:`.cat_dit`, :func:`install_cat_step`); ``dit_kv_cache`` only chooses on SD3 (Wan, Qwen-Image and LTX-Video always use the K/V
    cache, Flux, Chroma and HunyuanVideo the residual update)."""
    from .cat_dit import install_cat_dit
    from .cat_dit_kv import LAYOUTS, install_cat_dit_kv
    from .cat_unet import install_cat_unet
    from .model_info import dit_patch_size

    if family == "unet":
        layout = StepLayout(token_factor=factor)
    else:
        patch = dit_patch_size(model)
        video = family in LAYOUTS or family == "hunyuan_video"
        layout = StepLayout(token_factor=patch[1], patch=patch if video else None,
                            guide_frame_conds=("guiding_frame_index",) if family == "hunyuan_video" else ())
    max_downsample = max(max_downsample or factor, factor) if family == "unet" else factor
    install_cat_step(model, uid, policy_factory, warmup_steps, layout.token_factor,
                     halvings=max_downsample.bit_length() - factor.bit_length(),
                     signal_before_merge=signal_before_merge, layout=layout, prediction_space=prediction_space)
    if family == "unet":
        install_cat_unet(model, uid, max_downsample)
    elif family in LAYOUTS:
        install_cat_dit_kv(model, uid, family)
    else:
        install_cat_dit(model, uid, family, kv_cache=dit_kv_cache)
