"""Measure the work a sampling run really did, from the model's own calls (never from the
pack's summary line).

``WorkMeter(patcher)`` puts forward pre-hooks on the *modules* of the patcher's diffusion model
(shared by every clone of it, so the hooks see whatever patched clone is sampled):

* the diffusion model itself: one record per model call (it fires on every call, also when a
  patch answers the call from a cache without running the UNet);
* every ``attn1``: the query tokens and batch of the self-attention as it really ran, and the
  full token count of its level (``activations_shape`` of the block call);
* with ``keep_outputs``, the prediction each call returned (``calls[k]["out"]``);
* the first layer of every ResBlock (``in_layers[0]``): a skipped block never reaches it (the
  pack object-patches the block's ``forward``, not its children).

Derived measures:

* ``row_deficit()``: self-attention query rows not computed, summed over the run
  (``batch·(full − q)`` per call). Another pack that tiles tokens (HyperTile) keeps it at 0;
  one that merges them (ToMe) raises it in the reference run too, which is why callers compare
  with the meter of the same run without our node.
* ``shortened_calls()``: model calls with at least one shortened self-attention.
* ``cached_calls()``: model calls in which fewer ResBlocks computed than the model has
  (shallow steps; 0 = the whole call answered from a cache).
"""
from __future__ import annotations

from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock


class ModuleHooks:
    """Forward hooks on the modules of a patcher's diffusion model, for one ``with`` block.
    Subclasses put theirs in :meth:`install`."""

    def __init__(self, patcher):
        self.dm = patcher.model.diffusion_model
        self._handles = []

    def install(self) -> None:
        raise NotImplementedError

    def before(self, module, fn, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def after(self, module, fn) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


class WorkMeter(ModuleHooks):
    def __init__(self, patcher, keep_outputs: bool = False):
        super().__init__(patcher)
        self.keep_outputs = keep_outputs
        self.calls: list[dict] = []
        self.res_blocks = sum(1 for m in self.dm.modules() if isinstance(m, ResBlock))
        self.steps: int | None = None

    def install(self) -> None:
        self.before(self.dm, self._start, with_kwargs=True)
        if self.keep_outputs:
            self.after(self.dm, self._end)
        for name, mod in self.dm.named_modules():
            if isinstance(mod, ResBlock):
                self.before(mod.in_layers[0], self._res)
            elif name.endswith("attn1"):
                self.before(mod, self._attn1, with_kwargs=True)

    def _start(self, module, args, kwargs):
        to = kwargs.get("transformer_options") or {}
        sigmas = to.get("sigmas")
        self.calls.append({"sigma": None if sigmas is None else float(sigmas.reshape(-1)[0]),
                           "cond_or_uncond": list(to.get("cond_or_uncond") or []),
                           "attn1": [], "res": 0})

    def _end(self, module, args, out):
        self.calls[-1]["out"] = out.detach().clone()

    def _res(self, module, args):
        if self.calls:
            self.calls[-1]["res"] += 1

    def _attn1(self, module, args, kwargs):
        if not self.calls:
            return
        to = kwargs.get("transformer_options") or {}
        shape = to.get("activations_shape")
        full = int(shape[-2]) * int(shape[-1]) if shape else args[0].shape[1]
        batch = int(shape[0]) if shape else args[0].shape[0]
        self.calls[-1]["attn1"].append((args[0].shape[0], args[0].shape[1], batch, full))

    # ---- measures
    def row_deficit(self) -> int:
        return sum(bf * full - b * q for c in self.calls for b, q, bf, full in c["attn1"])

    def shortened_calls(self) -> list[int]:
        return [i for i, c in enumerate(self.calls) if any(q < full for _, q, _, full in c["attn1"])]

    def cached_calls(self) -> list[int]:
        return [i for i, c in enumerate(self.calls) if c["res"] < self.res_blocks]

    def summary(self) -> str:
        return (f"{len(self.calls)} calls, {len(self.shortened_calls())} with shortened self-attention "
                f"(row deficit {self.row_deficit()}), {len(self.cached_calls())} with skipped ResBlocks")
