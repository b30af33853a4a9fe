#!/usr/bin/env python
"""Convert a UI-format workflow (what users save from / drag into ComfyUI) into the API
prompt format that ``POST /prompt`` accepts, using a live server's ``/object_info``.

Why not keep hand-written API copies of the shipped workflows: the UI files are what users
load, so converting them through the server's own node definitions tests exactly the
files we ship, and breaks loudly when a node's inputs change.

How the frontend (comfyui-frontend-package 1.32.x) stores a node, and how it is mapped:
  * ``widgets_values`` lists the values of the node's *widgets* in creation order: the
    widget-type inputs (INT, FLOAT, STRING, BOOLEAN, COMBO / list-of-choices) of the
    definition, required then optional, in ``input_order``; inputs with ``forceInput``
    are sockets, not widgets. A widget that was converted to a socket keeps its value.
  * Extra, non-input widgets sit right after some inputs and are skipped:
      - INT inputs with ``control_after_generate`` - or, when that option is absent,
        named ``seed`` / ``noise_seed`` (the frontend's own default) - are followed by
        the control value ("fixed", "increment", "decrement", "randomize"),
      - COMBO inputs with ``control_after_generate`` are followed by the control value
        and a filter-list string,
      - COMBO inputs with an upload option (``image_upload`` ...) get an upload button
        whose value is stored after all others (trailing values are ignored).
    A control value is only skipped if it is actually there (a valid control string), so
    workflows written by tools that omit it convert as well. Widgets past the end of
    ``widgets_values`` (a file saved before the input existed) get the frontend's initial
    value (``frontend_default``), as the frontend itself sends them.
  * ``links`` are ``[id, from_node, from_slot, to_node, to_slot, type]`` (or the newer
    object form); a linked input becomes ``[str(from_node), from_slot]``.
  * Frontend-only nodes are not sent: Note / MarkdownNote are dropped, Reroute links are
    followed to their producer, a PrimitiveNode's value is written into the inputs it
    feeds. Muted nodes (mode 2) are dropped with their links; bypassed nodes (mode 4)
    pass each output through from their first input of the same type, as the frontend does.
Subgraphs and legacy group nodes are not supported (a clear error is raised).

Importable: ``to_api(ui, object_info) -> prompt``, ``load(path)``, ``widget_inputs(definition)``.
CLI: ``python scripts/workflow_convert.py WORKFLOW.json [--url http://127.0.0.1:8188 | --object-info FILE] [-o OUT]``
(without --url / --object-info a temporary CPU server is started for its /object_info).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import urllib.request
from pathlib import Path

# Nodes that exist only in the editor.
NOTE_TYPES = {"Note", "MarkdownNote"}
FRONTEND_ONLY = NOTE_TYPES | {"Reroute", "PrimitiveNode"}
# Input types the frontend renders as widgets (a list as type means a legacy COMBO).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize", "increment-wrap"}
SEED_NAMES = {"seed", "noise_seed"}
MODE_MUTED, MODE_BYPASS = 2, 4


class WorkflowConversionError(ValueError):
    pass


def _spec_parts(spec) -> tuple[object, dict]:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    return kind, opts


def _is_combo(kind) -> bool:
    return isinstance(kind, list) or kind == "COMBO"


def widget_inputs(definition: dict) -> list[tuple[str, dict]]:
    """``(name, options)`` of the inputs the frontend shows as widgets, in widget order."""
    inputs = definition.get("input", {})
    order = definition.get("input_order") or {k: list(v) for k, v in inputs.items()}
    out = []
    for section in ("required", "optional"):
        specs = inputs.get(section, {})
        for name in order.get(section, []):
            if name not in specs:
                continue
            kind, opts = _spec_parts(specs[name])
            if (_is_combo(kind) or kind in WIDGET_TYPES) and not opts.get("forceInput"):
                out.append((name, opts))
    return out


def _control_widgets_after(name: str, kind, opts: dict) -> int:
    """How many non-input widgets the frontend adds right after this widget."""
    if _is_combo(kind):
        return 2 if opts.get("control_after_generate") else 0  # control + filter list
    if kind == "INT":
        cag = opts.get("control_after_generate")
        if cag is None:
            cag = name in SEED_NAMES
        return 1 if cag else 0
    return 0


def _input_kinds(definition: dict) -> dict:
    kinds = {}
    for section in ("required", "optional"):
        for name, spec in definition.get("input", {}).get(section, {}).items():
            kinds[name] = _spec_parts(spec)[0]
    return kinds


def frontend_default(kind, opts: dict):
    """The value a freshly created widget holds in the frontend (1.32.x): the input's
    ``default``; else a combo's first option, 0 for INT/FLOAT, False, or "" (None: none)."""
    if _is_combo(kind):
        if opts.get("default"):  # the frontend tests truthiness here
            return opts["default"]
        options = kind if isinstance(kind, list) else opts.get("options") or []
        return options[0] if options else None
    if opts.get("default") is not None:
        return opts["default"]
    return {"INT": 0, "FLOAT": 0, "BOOLEAN": False, "STRING": ""}.get(kind)


def map_widget_values(definition: dict, values) -> dict:
    """Map a node's ``widgets_values`` onto its widget inputs (see module docstring)."""
    if isinstance(values, dict):  # some node packs store widgets by name
        names = {n for n, _ in widget_inputs(definition)}
        return {k: v for k, v in values.items() if k in names}
    values = list(values or [])
    kinds = _input_kinds(definition)
    out, i = {}, 0
    for name, opts in widget_inputs(definition):
        if i >= len(values):
            # A file saved before this input existed: the frontend keeps the widget's
            # initial value and sends it, so the prompt gets the same value.
            default = frontend_default(kinds[name], opts)
            if default is not None:
                out[name] = default
            continue
        out[name] = values[i]
        i += 1
        extra = _control_widgets_after(name, kinds[name], opts)
        if extra and i < len(values) and values[i] in CONTROL_VALUES:
            i += extra
    return out


def is_api_format(data: dict) -> bool:
    return isinstance(data, dict) and "nodes" not in data and bool(data) and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())


def _links_by_id(ui: dict) -> dict:
    links = {}
    for link in ui.get("links", []) or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link.get("type"))
        else:
            links[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
    return links


def to_api(ui: dict, object_info: dict) -> dict:
    """Return the API prompt ``{node_id: {"class_type", "inputs", "_meta"}}`` for a
    UI-format workflow. API-format input is returned unchanged (as a copy)."""
    if is_api_format(ui):
        return copy.deepcopy(ui)
    if "nodes" not in ui:
        raise WorkflowConversionError("not a ComfyUI workflow: no 'nodes' list")
    subgraphs = {sg.get("id") for sg in (ui.get("definitions") or {}).get("subgraphs", [])}
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = _links_by_id(ui)

    def output_type(node, slot):
        outs = node.get("outputs") or []
        return outs[slot].get("type") if slot < len(outs) else None

    _UNSET = object()

    def resolve(link_id, seen=()):
        """Follow a link to what the API prompt needs: ["node", slot], a literal value
        (PrimitiveNode), or _UNSET (source muted / nothing to pass through)."""
        if link_id is None or link_id not in links:
            return _UNSET
        src_id, src_slot, _, _, ltype = links[link_id]
        if (src_id, src_slot) in seen:
            raise WorkflowConversionError(f"link cycle through node {src_id}")
        seen = seen + ((src_id, src_slot),)
        src = nodes.get(src_id)
        if src is None:
            raise WorkflowConversionError(f"link {link_id} comes from missing node {src_id}")
        if src["type"] == "Reroute":
            return resolve((src.get("inputs") or [{}])[0].get("link"), seen)
        if src["type"] == "PrimitiveNode":
            vals = src.get("widgets_values") or []
            return vals[0] if vals else _UNSET
        mode = src.get("mode", 0)
        if mode == MODE_MUTED:
            return _UNSET
        if mode == MODE_BYPASS:
            want = output_type(src, src_slot) or ltype
            candidates = [inp for inp in (src.get("inputs") or []) if inp.get("link") is not None]
            same_slot = [inp for j, inp in enumerate(src.get("inputs") or []) if j == src_slot and inp in candidates]
            for inp in same_slot + candidates:
                if want is None or inp.get("type") == want or want == "*":
                    return resolve(inp["link"], seen)
            return _UNSET
        return [str(src_id), src_slot]

    prompt = {}
    for node in ui["nodes"]:
        ntype = node.get("type")
        if ntype in FRONTEND_ONLY or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        if ntype in subgraphs:
            raise WorkflowConversionError(f"node {node['id']} is a subgraph; subgraphs are not supported")
        definition = object_info.get(ntype)
        if definition is None:
            hint = " (legacy group node?)" if str(ntype).startswith("workflow>") else ""
            raise WorkflowConversionError(f"node {node['id']}: type {ntype!r} is not installed on this server{hint}")
        inputs = map_widget_values(definition, node.get("widgets_values"))
        known = set(_input_kinds(definition))
        for slot in node.get("inputs") or []:
            if slot.get("link") is None or slot.get("name") not in known:
                continue
            value = resolve(slot["link"])
            if value is _UNSET:
                if "widget" not in slot:  # a socket fed by a muted node: leave it out
                    inputs.pop(slot["name"], None)
                continue
            inputs[slot["name"]] = value
        prompt[str(node["id"])] = {
            "class_type": ntype,
            "inputs": inputs,
            "_meta": {"title": node.get("title") or definition.get("display_name") or ntype},
        }
    return prompt


def load(path) -> dict:
    return json.loads(Path(path).read_text())


def fetch_object_info(url: str) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=120) as r:
        return json.loads(r.read())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="UI-format ComfyUI workflow -> API prompt")
    ap.add_argument("workflow")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--url", help="running ComfyUI server to read /object_info from")
    src.add_argument("--object-info", help="saved /object_info JSON")
    ap.add_argument("-o", "--output", help="write the prompt here instead of stdout")
    args = ap.parse_args(argv)

    if args.object_info:
        info = load(args.object_info)
    elif args.url:
        info = fetch_object_info(args.url)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from comfy_server import ComfyServer

        with ComfyServer() as server:
            info = server.object_info()
    text = json.dumps(to_api(load(args.workflow), info), indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
