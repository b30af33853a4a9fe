#!/usr/bin/env python3
"""Mutation check of the test suite (issue 19): break each method's defining step, or make a
node's patches pass-throughs, in a scratch git worktree of HEAD, run the fast tests there and
report which tests fail per mutation. A mutation no test notices is a hole in the suite.

    .venv/bin/python scripts/mutations.py                      # every mutation, its focus tests
    .venv/bin/python scripts/mutations.py --only sito_random_base --tests tests/pruning_core
    .venv/bin/python scripts/mutations.py --all                # the whole fast suite per mutation
    .venv/bin/python scripts/mutations.py --list

The working tree of this checkout is never touched: each mutation gets
``git worktree add --detach /tmp/mut-<name>-XXXX HEAD`` (so only committed code is tested),
is edited there, tested with this checkout's ``.venv`` and ``.comfyui`` (COMFYUI_DIR), and the
worktree is removed afterwards (``--keep`` keeps it). Exit status 1 when a mutation survives.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---- the pass-through mutation of one node: every patch it registers does nothing
# (attention patches return their inputs, object patches are the original forwards, DiT
# replace patches call the original block, DIFFUSION_MODEL/APPLY_MODEL wrappers call through).
# Its run lifecycle (OUTER_SAMPLE/CALC_COND_BATCH: run state and summary line) stays, so the node
# still logs a line per run: the tests have to measure the work, not read it.
_PATCHING_PASSTHROUGH = '''

_PASSTHROUGH = False  # MUTATION: set while a mutated node is being applied


def _mut_passthrough(slot, fn, model, where):
    if slot == "object":
        return model.get_model_object(where[0])
    if slot == "dit":
        return lambda args, extra: extra["original_block"](args)
    if slot in ("attn1", "attn2"):
        return lambda n, context, value, extra: (n, context, value)
    return lambda n, extra: n


def _mut_wrapper(kind, fn):
    W = wrapper_kinds()
    if _PASSTHROUGH and kind in (W.DIFFUSION_MODEL, W.APPLY_MODEL):
        return lambda executor, *args, **kwargs: executor(*args, **kwargs)  # noqa: E731
    return fn
'''

_PATCHING = "nodes/hooks/patching.py"


def _passthrough_node(method: str) -> list[tuple]:
    apply = f"apply_{method}"
    node = f"nodes/{method}_node.py"
    wrapper = f'''

def {apply}(model, **kwargs):  # MUTATION: every patch of this node is a pass-through
    hooks.patching._PASSTHROUGH = True
    try:
        return _mut_{apply}(model, **kwargs)
    finally:
        hooks.patching._PASSTHROUGH = False
'''
    return [
        (_PATCHING, "\n\ndef eager(fn):", _PATCHING_PASSTHROUGH + "\n\ndef eager(fn):"),
        (_PATCHING, '    fn = eager(fn)\n    if slot == "object":',
         '    if _PASSTHROUGH:\n        fn = _mut_passthrough(slot, fn, model, where)\n    fn = eager(fn)\n    if slot == "object":'),
        (_PATCHING, '    model.add_wrapper_with_key(kind, f"{KEY_PREFIX}.{uid}", fn)',
         '    model.add_wrapper_with_key(kind, f"{KEY_PREFIX}.{uid}", _mut_wrapper(kind, fn))'),
        (node, f"def {apply}(model, **options):", f"def _mut_{apply}(model, **options):"),
        (node, f"\n\nclass ", wrapper + "\n\nclass ", "first"),
        (node, f"return io.NodeOutput({apply}(", f"return io.NodeOutput({apply}(", "check"),
    ]


_RANDOM_SELECTION = ("torch.sort(torch.randperm(g.numel(), generator=torch.Generator().manual_seed("
                     "17 + self.steps_selected))[:self.n_select].to(g.device)).values  # MUTATION: random tokens")

# name -> (what it breaks, edits, focus tests). An edit is (file, old, new[, mode]): old must occur
# exactly once (mode "all": at least once, every occurrence; "first": the first of several;
# "check": only asserts that old is there).
MUTATIONS = {
    "dato_ignores_dynamics": (
        "DaTo: base tokens random per window on every call (the dynamics map is ignored)",
        [("pruning_core/dato.py", "    if dynamics is None or dynamics.shape[0] != b:",
          "    if True:  # MUTATION: ignore the dynamics")],
        ["tests/pruning_core", "tests/nodes/test_dato_node.py"]),
    "sito_random_base": (
        "SiTo: base tokens random per window instead of the argmax of the similarity score",
        [("pruning_core/sito.py", "    base = select_base_tokens(score, grid, cfg.sy, cfg.sx)\n",
          "    from .selection import random_base_tokens  # MUTATION\n"
          "    base = random_base_tokens(x.shape[0], grid, cfg.sy, cfg.sx, generator, x.device)  # MUTATION\n")],
        ["tests/pruning_core", "tests/nodes/test_sito_node.py"]),
    "cat_random_selection": (
        "CAT: each step recomputes a random set of S tokens instead of its cluster/staleness selection",
        [("pruning_core/cat.py", "        self.selection = first_selection(g, self.labels, position, self.n_select)",
          "        self.selection = " + _RANDOM_SELECTION),
         ("pruning_core/cat.py", "        self.selection = later_selection(g, self.freq, self.labels, position, self.n_select,\n"
                                 "                                         self.config.cluster_share)",
          "        self.selection = " + _RANDOM_SELECTION)],
        ["tests/pruning_core", "tests/nodes/test_cat_node.py"]),
    "sito_passthrough": ("SiTo node: every patch a pass-through (its run lifecycle and log line stay)",
                         _passthrough_node("sito"), ["tests/nodes/test_sito_node.py", "tests/nodes/test_compat_matrix.py"]),
    "dato_passthrough": ("DaTo node: every patch a pass-through (its run lifecycle and log line stay)",
                         _passthrough_node("dato"), ["tests/nodes/test_dato_node.py", "tests/nodes/test_compat_matrix.py"]),
    "cat_passthrough": ("CAT node: every patch a pass-through (its run lifecycle and log line stay)",
                        _passthrough_node("cat"), ["tests/nodes/test_cat_node.py", "tests/nodes/test_compat_matrix.py"]),
}


def apply_edits(tree: Path, edits) -> None:
    for edit in edits:
        rel, old, new = edit[:3]
        mode = edit[3] if len(edit) > 3 else "once"
        path = tree / rel
        text = path.read_text()
        n = text.count(old)
        if mode == "check":
            if n < 1:
                raise SystemExit(f"mutation anchor not found in {rel}: {old!r}")
            continue
        if (mode == "once" and n != 1) or (mode != "once" and n < 1):
            raise SystemExit(f"mutation anchor found {n} times in {rel} (mode {mode}): {old!r}; update scripts/mutations.py")
        if mode == "first":
            text = text.replace(old, new, 1)
        else:
            text = text.replace(old, new)
        path.write_text(text)


def failures(junit: Path) -> tuple[int, list[str]]:
    if not junit.exists():
        return 0, []
    root = ET.parse(junit).getroot()
    total, failed = 0, []
    for case in root.iter("testcase"):
        if case.find("skipped") is not None:
            continue
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return total, failed


def run_one(name: str, tests: list[str], marker: str, keep: bool, python: str) -> dict:
    what, edits, _ = MUTATIONS[name]
    tree = Path(tempfile.mkdtemp(prefix=f"mut-{name}-", dir="/tmp"))
    tree.rmdir()
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), "HEAD"], check=True)
    try:
        apply_edits(tree, edits)
        diff = subprocess.run(["git", "-C", str(tree), "diff", "--stat"], capture_output=True, text=True).stdout
        junit = tree / "mutation-junit.xml"
        env = {**os.environ, "COMFYUI_DIR": os.environ.get("COMFYUI_DIR", str(ROOT / ".comfyui"))}
        t0 = time.time()
        proc = subprocess.run([python, "-m", "pytest", *tests, "-m", marker, "-q", "-p", "no:cacheprovider",
                               f"--junitxml={junit}"], cwd=tree, env=env, capture_output=True, text=True)
        total, failed = failures(junit)
        if total == 0:  # collection error etc.: show why
            sys.stdout.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        return {"name": name, "what": what, "tests": tests, "total": total, "failed": failed,
                "seconds": time.time() - t0, "diff": diff, "rc": proc.returncode}
    finally:
        if keep:
            print(f"  (kept {tree})")
        else:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=list(MUTATIONS), help="run only this mutation (repeatable)")
    ap.add_argument("--tests", nargs="+", help="test paths for every mutation (default: each mutation's focus)")
    ap.add_argument("--all", action="store_true", help="the whole fast suite (tests/) for every mutation")
    ap.add_argument("-m", dest="marker", default="not slow", help='pytest -m expression (default "not slow")')
    ap.add_argument("--keep", action="store_true", help="keep the scratch worktrees")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for name, (what, _, focus) in MUTATIONS.items():
            print(f"{name}: {what}\n    focus: {' '.join(focus)}")
        return 0
    python = str(ROOT / ".venv" / "bin" / "python")
    survivors = []
    for name in args.only or list(MUTATIONS):
        tests = ["tests"] if args.all else (args.tests or MUTATIONS[name][2])
        print(f"== {name}: {MUTATIONS[name][0]}\n   tests: {' '.join(tests)}", flush=True)
        r = run_one(name, tests, args.marker, args.keep, python)
        print(f"   {len(r['failed'])} of {r['total']} tests failed ({r['seconds']:.0f} s)", flush=True)
        for t in r["failed"]:
            print(f"     FAILED {t}")
        if not r["failed"]:
            survivors.append(name)
            print("   SURVIVED: no test noticed this mutation", flush=True)
    print(f"\n{len(survivors)} surviving mutation(s){': ' + ', '.join(survivors) if survivors else ''}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
