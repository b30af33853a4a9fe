"""Every shipped workflow, loaded into the real ComfyUI frontend in headless Chromium.

The embedded ComfyUI 0.3.75 server serves its frontend (comfyui-frontend-package 1.32.9);
Debian's chromium, driven by selenium through Debian's chromedriver, opens it and loads
each ``workflows/*.json`` the way a user's drag-and-drop or "Open" does
(``app.handleFile(File)`` -> ``app.loadGraphData``). Then, per workflow:

  * no missing node types: every type is in ``LiteGraph.registered_node_types``, no node
    was replaced by an error placeholder, the frontend reported none to the extensions'
    ``afterConfigureGraph`` hook, and no dialog (the "missing nodes" one or any other) opened;
  * widgets: each node has exactly as many value-carrying widgets as the file has
    ``widgets_values``, every widget holds the file's value, combo values are among the
    offered options (the generated checkpoints are listed under the workflows' file names),
    numbers are within min/max, and the widgets the frontend sends to the server are, in
    order, the ones ``scripts/workflow_convert.py`` assumes;
  * links: the graph has exactly the file's links, and no node covers another once the
    frontend has sized the nodes to their widgets;
  * nothing went wrong on the way: no console error, page error, unhandled rejection,
    failed request or warning/error toast while loading;
  * the frontend's own ``app.graphToPrompt()`` gives the same API prompt (nodes,
    class_types, inputs, titles) as ``workflow_convert.to_api`` with the server's
    ``/object_info``.

A screenshot of every loaded workflow (graph fitted to the 1600x900 window) goes to a
pytest temp folder; ``TPC_DOCS_SCREENSHOT=1`` also writes the SD1.5 SiTo one to
``docs/images/browser_sd15_sito.png`` (the README picture). Nothing is queued: this test
checks what users see when they open the files, ``test_workflows.py`` runs them.

Needs ``bash scripts/setup_browser.sh`` (``make test-slow`` runs it).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from comfy_server import ComfyServer
from make_checkpoint import make_checkpoint
from make_workflows import dit_model_files
from workflow_convert import FRONTEND_ONLY, load, to_api, widget_inputs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH, HEIGHT = 1600, 900
DOCS_SHOT = ROOT / "docs" / "images" / "browser_sd15_sito.png"
DOCS_SHOT_WORKFLOW = "sd15_sito"
# Same names and parameters as test_workflows.py, so the files are generated once.
CKPTS = {"sd15": "tpc_sd15_reduced.safetensors", "sdxl": "tpc_sdxl_reduced.safetensors"}

# The network is closed: flags that keep Chromium from waiting on refused connections,
# plus a host resolver that fails every name but this machine's at once.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-extensions", "--disable-default-apps",
    "--no-default-browser-check", "--mute-audio", "--hide-scrollbars",
    "--force-device-scale-factor=1", f"--window-size={WIDTH},{HEIGHT}",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]

# Installed before any page script runs: records console errors/warnings and page errors.
INIT_JS = r"""
(() => {
  const T = window.__tpc = {console: [], toasts: [], missing: [], hooked: false};
  const fmt = (a) => {
    try {
      if (a instanceof Error) return a.stack || String(a);
      if (a !== null && typeof a === 'object') return JSON.stringify(a).slice(0, 2000);
      return String(a);
    } catch (e) { return String(a); }
  };
  for (const level of ['error', 'warn']) {
    const orig = console[level].bind(console);
    console[level] = (...args) => {
      T.console.push({level, text: args.map(fmt).join(' ').slice(0, 4000)});
      return orig(...args);
    };
  }
  window.addEventListener('error', (e) =>
    T.console.push({level: 'pageerror', text: String(e.message) + ' at ' + e.filename + ':' + e.lineno}));
  window.addEventListener('unhandledrejection', (e) =>
    T.console.push({level: 'unhandledrejection', text: fmt(e.reason)}));
})();
"""

READY_JS = r"""
const a = window.app;
return !!(a && a.graph && a.canvas && window.LiteGraph && a.extensionManager
          && a.extensionManager.workflow && a.extensionManager.workflow.activeWorkflow
          && a.graph.nodes.length > 0);
"""

# The frontend's own reports, hooked once the app is up: the missing node types it hands
# to the extensions' afterConfigureGraph hook, and every toast it raises.
HOOK_JS = r"""
const T = window.__tpc;
if (!T.hooked) {
  app.registerExtension({
    name: 'tpc.browser-test.report',
    afterConfigureGraph(missing) {
      for (const m of missing || []) T.missing.push(typeof m === 'string' ? m : String(m && m.type));
    },
  });
  app.extensionManager.toast.$onAction(({name, args}) => {
    const m = args[0];
    if (name === 'addAlert') T.toasts.push({severity: 'warn', summary: 'Alert', detail: String(m)});
    else if (name === 'add') T.toasts.push({severity: String(m && m.severity), summary: String(m && m.summary),
                                            detail: String(m && m.detail)});
  });
  T.hooked = true;
}
return T.hooked;
"""

# arguments: file name, file text, callback. Loads the file as a user's drop does and
# returns (as JSON text) what the checks need.
LOAD_JS = r"""
const [fileName, text, done] = arguments;
const frames = (n) => new Promise((r) => { const f = () => (--n <= 0 ? r() : requestAnimationFrame(f)); requestAnimationFrame(f); });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
(async () => {
  const T = window.__tpc;
  // A clean screen: no dialog or toast left from before.
  for (const b of document.querySelectorAll('.global-dialog .p-dialog-close-button')) b.click();
  for (let i = 0; i < 50 && document.querySelector('.global-dialog'); i++) await sleep(100);
  app.extensionManager.toast.removeAll();
  await frames(2);
  T.console.length = 0; T.toasts.length = 0; T.missing.length = 0;

  const t0 = performance.now();
  await app.handleFile(new File([text], fileName, {type: 'application/json'}));
  const loadMs = performance.now() - t0;
  await frames(3);
  await sleep(500);  // dialogs and toasts are rendered on later ticks

  const g = app.graph;
  const opt = (w, k) => (w.options && w.options[k] !== undefined ? w.options[k] : null);
  const comboValues = (w) => {
    let v = w.options ? w.options.values : null;
    if (typeof v === 'function') { try { v = v(); } catch (e) { v = null; } }
    return Array.isArray(v) ? v : null;
  };
  const nodes = g.nodes.map((n) => ({
    id: n.id, type: n.type, comfyClass: n.comfyClass ?? null, title: n.title, mode: n.mode,
    has_errors: !!n.has_errors, rect: Array.from(n.boundingRect),
    registered: Object.prototype.hasOwnProperty.call(LiteGraph.registered_node_types, n.type),
    widgets: (n.widgets || []).map((w) => ({
      name: w.name, type: w.type, value: w.value === undefined ? null : w.value,
      serialize: w.serialize !== false,
      to_prompt: !!w.name && !(w.options && w.options.serialize === false),
      values: w.type === 'combo' ? comboValues(w) : null, min: opt(w, 'min'), max: opt(w, 'max'),
    })),
  }));
  const links = [...g.links.values()].map((l) => [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot, l.type]);
  const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  const dialogs = [...document.querySelectorAll('.global-dialog')].filter(visible).map((d) => ({
    key: d.getAttribute('aria-labelledby'), text: d.innerText.slice(0, 1500)}));
  const domToasts = [...document.querySelectorAll('.p-toast-message')].filter(visible).map((t) => ({
    cls: t.className, text: t.innerText.slice(0, 1500)}));
  const prompt = (await app.graphToPrompt()).output;
  return {loadMs, nodes, links, dialogs, domToasts, prompt, missing: [...T.missing],
          toasts: [...T.toasts], console: [...T.console],
          activeWorkflow: app.extensionManager.workflow.activeWorkflow?.path ?? null};
})().then((r) => done(JSON.stringify(r)),
          (e) => done(JSON.stringify({exception: String((e && e.stack) || e)})));
"""

# Zoom to fit, like the frontend's own fitView (DragAndScale.fitToBounds on the nodes'
# bounding box) but into the part of the window the menus leave free (top bars, left
# sidebar), then wait for the canvas to redraw.
FIT_JS = r"""
const done = arguments[arguments.length - 1];
const b = [Infinity, Infinity, -Infinity, -Infinity];
for (const n of app.graph.nodes) {
  const r = n.boundingRect;
  b[0] = Math.min(b[0], r[0]); b[1] = Math.min(b[1], r[1]);
  b[2] = Math.max(b[2], r[0] + r[2]); b[3] = Math.max(b[3], r[1] + r[3]);
}
const pad = 10, inset = {left: 70, top: 135, right: 20, bottom: 20};
const [bx, by, bw, bh] = [b[0] - pad, b[1] - pad, b[2] - b[0] + 2 * pad, b[3] - b[1] + 2 * pad];
const ds = app.canvas.ds, dpr = window.devicePixelRatio || 1;
const w = ds.element.width / dpr - inset.left - inset.right, h = ds.element.height / dpr - inset.top - inset.bottom;
const scale = Math.min(w / bw, h / bh, 1);
ds.scale = scale;  // screen = (graph + offset) * scale
ds.offset[0] = (inset.left + (w - bw * scale) / 2) / scale - bx;
ds.offset[1] = (inset.top + (h - bh * scale) / 2) / scale - by;
app.canvas.deselectAll?.();
app.canvas.setDirty(true, true);
requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(() => done(true), 300)));
"""


# ---- fixtures ---------------------------------------------------------------------------
def _checkpoint_names() -> dict[str, str]:
    """{checkpoint file name used by a shipped workflow: "sd15" | "sdxl"}."""
    names = {}
    for path in WORKFLOWS:
        arch = "sdxl" if path.stem.startswith("sdxl") else "sd15"
        for node in load(path)["nodes"]:
            if node["type"] == "CheckpointLoaderSimple" and node.get("widgets_values"):
                names[node["widgets_values"][0]] = arch
    return names


@pytest.fixture(scope="module")
def server(comfy_dir, tmp_path_factory):
    """The real server, with the workflows' checkpoint names listed (symlinks to the
    generated random-weight checkpoints) and a fresh user directory of a returning user
    (tutorial done, so the template browser does not open over the canvas)."""
    base = tmp_path_factory.mktemp("browser_server")
    generated = comfy_dir / "models" / "checkpoints"
    for arch, name in CKPTS.items():
        make_checkpoint(generated / name, arch=arch, reduced=True, seed=0)
    ckpt_dir = base / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    for name, arch in _checkpoint_names().items():
        if name not in dit_model_files().get("checkpoints", ()):
            (ckpt_dir / name).symlink_to(generated / CKPTS[arch])
    # the DiT workflows' model files (they cannot be generated here): empty placeholders, so
    # that their loaders' combos list them as a user's install would
    kinds = {"checkpoints"}
    for kind, names in dit_model_files().items():
        (base / "models" / kind).mkdir(parents=True, exist_ok=True)
        kinds.add(kind)
        for name in names:
            (base / "models" / kind / name).write_bytes(b"")
    (base / "extra_model_paths.yaml").write_text(
        f"tpc_browser_test:\n  base_path: {base / 'models'}\n" + "".join(f"  {k}: {k}\n" for k in sorted(kinds)))
    user_dir = base / "user"
    (user_dir / "default").mkdir(parents=True)
    (user_dir / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    args = ["--extra-model-paths-config", str(base / "extra_model_paths.yaml"), "--user-directory", str(user_dir)]
    with ComfyServer(extra_args=args, output_dir=base / "output") as s:
        yield s


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


@pytest.fixture(scope="module")
def browser(server):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium in .venv")
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run `bash scripts/setup_browser.sh` (make test-slow does)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download anything
    profile = tempfile.mkdtemp(prefix="tpc_chromium_profile_")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_log = Path(profile).with_suffix(".chromedriver.log")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, log_output=str(driver_log)), options=opts)
    try:
        driver.set_script_timeout(180)
        driver.set_page_load_timeout(180)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": INIT_JS})
        driver.get(server.url + "/")
        deadline = time.monotonic() + 180
        while not driver.execute_script(READY_JS):
            if time.monotonic() > deadline:
                log = driver.execute_script("return window.__tpc ? window.__tpc.console : null")
                pytest.fail(f"the ComfyUI frontend at {server.url} was not ready after 180 s; console: {log}")
            time.sleep(0.5)
        time.sleep(1.0)  # let the start-up finish (tab restore, template-from-URL check)
        assert driver.execute_script(HOOK_JS)
        browser_log(driver)  # drain the start-up entries
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        driver_log.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def shot_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("browser_screenshots")


# ---- helpers ----------------------------------------------------------------------------
def browser_log(driver) -> list[dict]:
    """Chromium's console log since the last call (includes failed requests)."""
    try:
        return driver.get_log("browser")
    except Exception:  # noqa: BLE001 - a driver without the log endpoint: the JS hooks still report
        return []


def load_in_browser(driver, name: str, workflow: dict) -> dict:
    browser_log(driver)
    state = json.loads(driver.execute_async_script(LOAD_JS, name, json.dumps(workflow)))
    state["browser_log"] = browser_log(driver)
    return state


def screenshot(driver, path: Path) -> Path:
    driver.execute_async_script(FIT_JS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(driver.get_screenshot_as_png())
    return path


def same(a, b) -> bool:
    """Equal, with floats compared to 1e-9 (JSON through JS turns 1.0 into 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


_URL = re.compile(r"https?://([^/\s'\"]+)")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def closed_network_noise(message: str) -> bool:
    """A request to a host other than this machine that was blocked or failed: the
    frontend looks node packs up in the online registry (api.comfy.org) when a graph is
    loaded, which ComfyUI's Content-Security-Policy (connect-src 'self') and the closed
    network refuse. Not a workflow problem; a failure on the local server still counts."""
    hosts = [h.split(":")[0] if not h.startswith("[") else h for h in _URL.findall(message)]
    external = [h for h in hosts if h not in _LOCAL_HOSTS]
    blocked = ("Content Security Policy" in message or "ERR_NAME_NOT_RESOLVED" in message
               or "ERR_CONNECTION_REFUSED" in message)
    return bool(external) and blocked and "Connecting to 'http://127.0.0.1" not in message


def _link_rows(links) -> set[tuple]:
    rows = set()
    for link in links:
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link.get("type")]
        rows.add(tuple(link[:6]))
    return rows


def problems_after_load(workflow: dict, state: dict, object_info: dict) -> list[str]:
    """Everything that went wrong loading ``workflow`` into the frontend (empty = fine)."""
    if "exception" in state:
        return [f"loading raised in the page: {state['exception']}"]
    out = []
    if state["missing"]:
        out.append(f"the frontend reports missing node types: {sorted(set(state['missing']))}")
    for d in state["dialogs"]:
        out.append(f"a dialog opened ({d['key']}): {d['text']!r}")
    for t in state["toasts"]:
        if t["severity"] in ("warn", "error"):
            out.append(f"{t['severity']} toast: {t['summary']}: {t['detail']}")
    for t in state["domToasts"]:
        if "p-toast-message-warn" in t["cls"] or "p-toast-message-error" in t["cls"]:
            out.append(f"toast on screen: {t['text']!r}")
    for c in state["console"]:
        if c["level"] != "warn":
            out.append(f"console {c['level']}: {c['text']}")
    for entry in state["browser_log"]:
        if entry.get("level") == "SEVERE" and not closed_network_noise(entry.get("message", "")):
            out.append(f"browser log: {entry.get('message')}")

    graph_nodes = {n["id"]: n for n in state["nodes"]}
    file_nodes = {n["id"]: n for n in workflow["nodes"]}
    if graph_nodes.keys() != file_nodes.keys():
        out.append(f"node ids: file {sorted(file_nodes)}, graph {sorted(graph_nodes)}")
    for nid, fnode in file_nodes.items():
        gnode = graph_nodes.get(nid)
        where = f"node {nid} ({fnode['type']})"
        if gnode is None:
            continue
        if gnode["type"] != fnode["type"]:
            out.append(f"{where}: loaded as type {gnode['type']!r}")
        if not gnode["registered"] or gnode["has_errors"]:
            out.append(f"{where}: missing node (registered={gnode['registered']}, has_errors={gnode['has_errors']})")
            continue
        values = fnode.get("widgets_values")
        stored = [w for w in gnode["widgets"] if w["serialize"]]
        if isinstance(values, list):
            if len(stored) != len(values):
                out.append(f"{where}: {len(values)} widgets_values in the file, {len(stored)} value widgets in the "
                           f"frontend ({[w['name'] for w in stored]}); the frontend assigns them by position, so "
                           f"the file is out of date with the node (regenerate: scripts/make_workflows.py)")
            for w, v in zip(stored, values):
                if not same(w["value"], v):
                    out.append(f"{where}: widget {w['name']} = {w['value']!r}, file has {v!r}")
        for w in gnode["widgets"]:
            if w["values"] and w["value"] not in w["values"]:
                out.append(f"{where}: combo {w['name']} = {w['value']!r} is not among its options {w['values'][:10]}")
            num = w["value"]
            if isinstance(num, (int, float)) and not isinstance(num, bool):
                if (w["min"] is not None and num < w["min"]) or (w["max"] is not None and num > w["max"]):
                    out.append(f"{where}: widget {w['name']} = {num} outside [{w['min']}, {w['max']}]")
        if fnode["type"] not in FRONTEND_ONLY and fnode["type"] in object_info:
            expected = [name for name, _ in widget_inputs(object_info[fnode["type"]])]
            sent = [w["name"] for w in gnode["widgets"] if w["to_prompt"]]
            if sent != expected:
                out.append(f"{where}: the frontend sends widgets {sent}, workflow_convert assumes {expected}")

    for i, a in enumerate(state["nodes"]):
        for b in state["nodes"][i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["rect"], b["rect"]
            if min(ax + aw, bx + bw) - max(ax, bx) > 4 and min(ay + ah, by + bh) - max(ay, by) > 4:
                out.append(f"nodes {a['id']} ({a['type']}) and {b['id']} ({b['type']}) overlap on the canvas once "
                           f"the frontend has sized them: {a['rect']} / {b['rect']} (layout: scripts/make_workflows.py)")

    if _link_rows(state["links"]) != _link_rows(workflow.get("links") or []):
        out.append(f"links differ: file {sorted(_link_rows(workflow.get('links') or []))}, "
                   f"graph {sorted(_link_rows(state['links']))}")

    try:
        ours = to_api(workflow, object_info)
    except Exception as exc:  # noqa: BLE001 - reported as a problem like the rest
        out.append(f"workflow_convert.to_api failed: {exc}")
        return out
    theirs = state["prompt"]
    if ours.keys() != theirs.keys():
        out.append(f"API prompt nodes: graphToPrompt {sorted(theirs)}, to_api {sorted(ours)}")
    for nid in sorted(ours.keys() & theirs.keys(), key=int):
        a, b = theirs[nid], ours[nid]
        if a["class_type"] != b["class_type"]:
            out.append(f"API node {nid}: class_type {a['class_type']!r} (frontend) vs {b['class_type']!r} (to_api)")
        if not same(a["inputs"], b["inputs"]):
            out.append(f"API node {nid} ({b['class_type']}): inputs differ:\n  frontend {a['inputs']}\n  to_api   {b['inputs']}")
        if a.get("_meta", {}).get("title") != b.get("_meta", {}).get("title"):
            out.append(f"API node {nid}: title {a.get('_meta')} (frontend) vs {b.get('_meta')} (to_api)")
    return out


# ---- tests ------------------------------------------------------------------------------
def test_workflows_are_found():
    assert WORKFLOWS, "no workflows/*.json"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_in_the_frontend(browser, object_info, shot_dir, path):
    workflow = load(path)
    state = load_in_browser(browser, path.name, workflow)
    shot = screenshot(browser, shot_dir / f"{path.stem}.png")
    if path.stem == DOCS_SHOT_WORKFLOW and os.environ.get("TPC_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS_SHOT)
    problems = problems_after_load(workflow, state, object_info)
    warnings = [c["text"] for c in state.get("console", []) if c["level"] == "warn"]
    assert not problems, (f"{path.name} in the ComfyUI frontend (screenshot {shot}):\n- " + "\n- ".join(problems)
                          + (f"\nconsole warnings: {warnings}" if warnings else ""))
    assert state["activeWorkflow"] and state["activeWorkflow"].endswith(path.name)
    assert any(n["type"] in ("SiToTokenPruning", "DaToPruneCache", "CATPruneCache") for n in state["nodes"])


def test_checks_catch_a_missing_node_and_a_bad_combo(browser, object_info, shot_dir):
    """The checks above are not vacuous: a workflow with an unknown node type and a combo
    value that is not offered must be reported, and the frontend's dialog must open."""
    workflow = copy.deepcopy(load(ROOT / "workflows" / "sd15_sito.json"))
    node = next(n for n in workflow["nodes"] if n["type"] == "SiToTokenPruning")
    node["type"] = "TPCNoSuchNode"
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    sampler["widgets_values"][4] = "no_such_sampler"
    state = load_in_browser(browser, "tpc_broken.json", workflow)
    screenshot(browser, shot_dir / "tpc_broken.png")
    text = "\n".join(problems_after_load(workflow, state, object_info))
    assert "TPCNoSuchNode" in text and "missing node types" in text
    assert "global-missing-nodes" in text, text  # the frontend's own dialog opened
    assert "no_such_sampler" in text and "is not among its options" in text
