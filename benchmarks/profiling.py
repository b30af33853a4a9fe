"""``bench.py --profile VARIANT``: where one model call's time goes, selection overhead included.

torch.profiler over the model call(s) of one sampler step of VARIANT and of the unpatched
model (for CAT: its first pruned step, of a warm-up-0 run), with the regions labelled by
``Labels``: every transformer block and its attn1/attn2/ff (by token-grid level), or on an
MMDiT every joint block and its image/text streams' linears and the joint attention kernel;
and the functions of ``wrapped_functions`` -- the token selection and gather/scatter of SiTo,
CAT and ComfyUI's ToMe, wrapped in place by their public names. A name that is gone raises
(getattr) when the profile starts, so a rename in the pack fails the profile instead of quietly
dropping its label.
"""
from __future__ import annotations

import logging
import os
import time

import device
import pack
from measure import cpu_wait_seconds
from models import Testbed, build_model, make_testbed, model_family
from variants import Variant, cat_probe, cat_probe_steps, family_problem, parse_variant, patch

# The label prefixes of the regions the profile reports (module hooks and wrapped functions).
REGION_PREFIXES = ("block", "attn1", "attn2", "ff ", "select:", "gather:", "model call", "joint block", "img ",
                   "txt ", "attention core", "dit block")
MODEL_CALL = "model call (1 CFG step)"


def wrapped_functions(mmdit: bool) -> list[tuple[object, str, str]]:
    """(owner, public attribute, label) of every function the profile wraps in place, in the order wrapped.

    The pack's callers reach each of them through its owner (``sito.sito_plan``, a
    ``CATState`` method, ``cat.merge_prediction``, a ``PrunePlan`` method), so the wrapper is
    what runs. CAT's are only wrapped on an MMDiT (the model CAT's profile is read on).
    """
    rows = []
    if mmdit:
        rows += [(pack.CATState, name, f"select: CAT {name}")
                 for name in ("set_reference", "first_selection", "next_selection")]
        rows.append((pack.cat_core, "merge_prediction", "gather: CAT merge_prediction"))
    rows += [(pack.sito_core, "sito_plan", "select: sito_plan"),
             (pack.PrunePlan, "prune", "gather: PrunePlan.prune"),
             (pack.PrunePlan, "recover", "gather: PrunePlan.recover")]
    return rows


def _level(x) -> str:
    return f"{x.shape[1]} tokens" if x is not None and x.dim() == 3 else "?"


class Labels:
    """Temporarily labels regions for torch.profiler without touching the pack's files.

    Module hooks label every transformer block and its attn1/attn2/ff by token-grid level;
    the functions of ``wrapped_functions`` (SiTo's ``sito_plan``, ``PrunePlan.prune``/``recover``,
    on an MMDiT CAT's ``CATState`` selection and ``merge_prediction``) and ToMe's matching
    (``comfy_extras.nodes_tomesd.get_functions``) with its merge/unmerge are wrapped in place
    for the duration of the profile. On an MMDiT: every joint block, the image ("img") and text
    ("txt") streams' qkv / proj / mlp / adaLN linears and the joint attention kernel
    (``mmdit.optimized_attention``).
    """

    def __init__(self, dm):
        self.dm, self.handles, self.undo, self.open = dm, [], [], {}

    @staticmethod
    def wrap(fn, label):
        import torch

        def wrapped(*a, **k):
            with torch.profiler.record_function(label):
                return fn(*a, **k)
        wrapped.__wrapped__ = fn
        return wrapped

    def patch_attr(self, obj, name, label):
        orig = getattr(obj, name)
        setattr(obj, name, self.wrap(orig, label))
        self.undo.append((obj, name, orig))

    def hook(self, module, label_fn, arg: int = 0):
        import torch

        def pre(mod, args, kwargs):
            x = args[arg] if len(args) > arg else kwargs.get("x")
            rf = torch.profiler.record_function(label_fn(x))
            rf.__enter__()
            self.open.setdefault(id(mod), []).append(rf)

        def post(mod, args, kwargs, out):
            self.open[id(mod)].pop().__exit__(None, None, None)

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, with_kwargs=True))

    def _hook_modules(self) -> bool:
        """Hooks on the blocks; whether the model is an MMDiT (has joint blocks)."""
        mmdit = False
        for name, mod in self.dm.named_modules():
            if type(mod).__name__ == "BasicTransformerBlock":
                self.hook(mod, lambda x: f"block [{_level(x)}]")
                self.hook(mod.attn1, lambda x: f"attn1 module [{_level(x)}]")
                self.hook(mod.attn2, lambda x: f"attn2 module [{_level(x)}]")
                self.hook(mod.ff, lambda x: f"ff module [{_level(x)}]")
            elif type(mod).__name__ == "JointBlock":  # MMDiT: called as block(context, x, c=...)
                mmdit = True
                self.hook(mod, lambda x: f"joint block [{_level(x)} img]", arg=1)
                for stream, sub in (("img", mod.x_block), ("txt", mod.context_block)):
                    for part in ("attn.qkv", "attn.proj", "mlp", "adaLN_modulation"):
                        try:  # the last block's text stream is "pre_only": no proj, no mlp
                            m = sub.get_submodule(part)
                        except AttributeError:
                            continue
                        self.hook(m, lambda x, s=stream, q=part: f"{s} {q} [{_level(x)}]")
        return mmdit

    def _label_joint_attention(self) -> None:
        import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
        orig_attn = mmdit.optimized_attention

        def joint_attention(q, k, v, *a, **kw):
            import torch
            with torch.profiler.record_function(f"attention core [{q.shape[1]} q x {k.shape[1]} kv]"):
                return orig_attn(q, k, v, *a, **kw)
        mmdit.optimized_attention = joint_attention
        self.undo.append((mmdit, "optimized_attention", orig_attn))

    def _label_tome(self) -> None:
        import comfy_extras.nodes_tomesd as tome
        orig_get = tome.get_functions

        def get_functions(x, ratio, original_shape):
            with __import__("torch").profiler.record_function("select: tome matching"):
                m, u = orig_get(x, ratio, original_shape)
            return self.wrap(m, "gather: tome merge"), self.wrap(u, "gather: tome unmerge")
        tome.get_functions = get_functions
        self.undo.append((tome, "get_functions", orig_get))

    def __enter__(self):
        mmdit = self._hook_modules()
        if mmdit:
            self._label_joint_attention()
        for owner, name, label in wrapped_functions(mmdit):
            self.patch_attr(owner, name, label)
        self._label_tome()
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for obj, name, orig in reversed(self.undo):
            setattr(obj, name, orig)
        return False


class LastStepProfile:
    """Profiles exactly the model call(s) of step ``steps`` of a sampler run (apply_model with every
    wrapper, so CAT's selection and latent merge are in; CFG normally batches cond and uncond into one
    call): installed on ``bm.apply_model`` for the duration of a ``with``."""

    def __init__(self, bm, steps: int, cuda: bool = False):
        import torch
        self.bm, self.steps, self.cuda = bm, steps, cuda
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        self.prof = torch.profiler.profile(activities=activities)
        self.sigmas, self.wall, self.calls, self.batch, self.wait0, self.wait = [], 0.0, 0, [], None, 0.0

    def apply_model(self, *a, **k):
        import torch
        t = a[1] if len(a) > 1 else k.get("t")
        key = round(float(t.flatten()[0]), 6)
        if key not in self.sigmas:
            self.sigmas.append(key)
        if len(self.sigmas) != self.steps:
            return self.orig(*a, **k)
        if self.calls == 0:
            self.wait0 = cpu_wait_seconds()
            self.prof.start()
        with torch.profiler.record_function(MODEL_CALL):
            if self.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = self.orig(*a, **k)
            if self.cuda:
                torch.cuda.synchronize()
            self.wall += time.perf_counter() - t0
        self.calls += 1
        self.batch.append(int(a[0].shape[0]))
        return result

    def __enter__(self):
        self.orig = self.bm.apply_model
        self.bm.apply_model = self.apply_model
        return self

    def __exit__(self, *exc):
        del self.bm.apply_model
        if self.calls:
            self.prof.stop()
        now = cpu_wait_seconds()  # seconds the threads waited for a CPU since the first profiled call
        self.wait = now - (now if self.wait0 is None else self.wait0)
        return False

    def summary(self, what: str) -> dict:
        """The JSON entry: what was profiled, its model calls, the labelled regions and the top aten ops."""
        ev = self.prof.key_averages()
        labels = {e.key: (e.cpu_time_total / 1e3, e.count) for e in ev if e.key.startswith(REGION_PREFIXES)}
        ops = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in ev if e.key.startswith("aten::")),
                     key=lambda r: -r[1])[:15]
        out = {"profiled": what, "model_calls": self.calls, "batch": self.batch, "wall_seconds": self.wall,
               "cpu_wait_seconds": self.wait, "regions_ms": labels, "top_ops_self_ms": ops}
        if self.cuda:  # GPU time of the labelled regions and the GPU's busiest kernels
            def gpu_ms(e, own=False):
                name = "self_device_time_total" if own else "device_time_total"
                return getattr(e, name, getattr(e, name.replace("device", "cuda"), 0.0)) / 1e3
            out["regions_gpu_ms"] = {e.key: gpu_ms(e) for e in ev if e.key.startswith(REGION_PREFIXES)}
            out["top_kernels_gpu_ms"] = sorted(((e.key, gpu_ms(e, own=True), e.count) for e in ev
                                                if gpu_ms(e, own=True) > 0), key=lambda r: -r[1])[:15]
        return out


def profiled_model(base, v: Variant, seed: int) -> tuple[object, int, str]:
    """The model to profile for ``v``, how many steps to run it and which step's call is profiled."""
    if v.method != "cat":
        return patch(base, v, seed), 1, "one step"
    # CAT's full steps cost what unpatched ones do; profile its first pruned step instead
    # (warmup 0: reference, clustering, then pruned).
    steps = cat_probe_steps()
    model = cat_probe(base, v, seed)
    dit = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for key, fn in list(dit.items()):  # the clone's own dict: label the block replacement as a whole
        dit[key] = Labels.wrap(fn, "dit block replace (CAT: joint block + gather/scatter)")
    return model, steps, f"its first pruned step (step {steps} of a warmup-0 run)"


def profile_variant(bed: Testbed, v: Variant) -> dict:
    """The profile of one variant: a warm-up run, then the profiled run."""
    model, steps, what = profiled_model(bed.base, v, bed.args.seed)
    bed.sample(model, steps)  # warm-up
    bm = bed.base.model
    with LastStepProfile(bm, steps, cuda=device.is_cuda(bed.args)) as step:
        with Labels(bm.diffusion_model):
            bed.sample(model, steps)
    return step.summary(what)


def print_profile(spec: str, entry: dict) -> None:
    wall, wait, labels = entry["wall_seconds"], entry["cpu_wait_seconds"], entry["regions_ms"]
    print(f"\n== {spec}: {entry['profiled']}, {entry['model_calls']} CFG model call(s) of batch {entry['batch']}, "
          f"{wall:.2f} s wall (threads waited {wait:.1f} s for a CPU) ==")
    total = labels.get(MODEL_CALL, (wall * 1e3, 1))[0]
    for key in sorted(labels, key=lambda k: (not k.startswith("model"), -labels[k][0])):
        ms, n = labels[key]
        print(f"  {key:52s} {ms:10.1f} ms  {100 * ms / total:5.1f} %  ({n} calls)")
    print("  top aten ops by self time:")
    for key, ms, n in entry["top_ops_self_ms"]:
        print(f"    {key:50s} {ms:10.1f} ms  {100 * ms / total:5.1f} %  ({n} calls)")


def run_profile(args) -> dict:
    """``--profile``: the unpatched model and ``args.profile``, each profiled and printed; the JSON."""
    pack.bootstrap(args.comfyui, device.comfy_args(args))
    import torch

    torch.set_num_threads(max(1, args.threads or len(os.sched_getaffinity(0))))
    logging.getLogger(pack.PACK_ALIAS).setLevel(logging.WARNING)
    base, _ = build_model(args)
    problem = family_problem([parse_variant(args.profile, args.dato_schedule)], model_family(base))
    if problem:
        raise SystemExit(problem)
    bed = make_testbed(args, base, {})

    out = {}
    specs = ["unpatched"] + ([args.profile] if args.profile != "unpatched" else [])
    for spec in specs:
        out[spec] = profile_variant(bed, parse_variant(spec, args.dato_schedule))
        print_profile(spec, out[spec])
    return out
