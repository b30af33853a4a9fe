#!/usr/bin/env python
"""Start, drive and stop a real ComfyUI server (the path users take) from Python.

Used by the end-to-end tests, the demo and the benchmark. Only the standard library is
used on the client side, so this file can be imported from any Python.

    from comfy_server import ComfyServer
    with ComfyServer() as srv:                     # free port, --cpu, output to a log file
        pid = srv.queue(api_prompt)                # POST /prompt  (validation errors raise)
        entry = srv.wait(pid, timeout=300)         # poll /history (execution errors raise)
        paths = srv.images(entry)                  # files written by SaveImage & co.
        srv.timings(entry)                         # execution start/end from status messages

CLI:
    python scripts/comfy_server.py [--port N] [--run WORKFLOW.json ...] [-- extra ComfyUI args]
Without --run the server stays up until Ctrl-C; with --run each workflow (UI or API
format) is queued, waited for, and its images and timings are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMFY_DIR = ROOT / ".comfyui"
DEFAULT_PYTHON = ROOT / ".venv" / "bin" / "python"


class ComfyServerError(RuntimeError):
    """Server failed to start, rejected a prompt, or a prompt failed while executing."""


class PromptExecutionError(ComfyServerError):
    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


def _die_with_parent() -> None:
    """preexec_fn: have the kernel SIGTERM the server when the process that started it
    dies (Linux prctl PR_SET_PDEATHSIG), so a killed test run leaves no server behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux/glibc: stop() still cleans up normally
        pass


def free_port() -> int:
    # Ask the OS for an unused port. There is a small window before ComfyUI binds it;
    # start() notices if the process dies (e.g. "address in use") and reports the log.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Context manager around ``python main.py --cpu --listen 127.0.0.1 --port N``.

    Every server gets its own run directory (log file, SQLite database, temp folder) so
    several servers - e.g. a test run next to a benchmark - do not share state. Images go
    to ``output_dir`` if given, else to ComfyUI's default ``<comfy_dir>/output``.
    """

    def __init__(
        self,
        port: int | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
        comfy_dir: Path | str = DEFAULT_COMFY_DIR,
        python: Path | str | None = None,
        output_dir: Path | str | None = None,
        startup_timeout: float = 180.0,
        keep_run_dir: bool = False,
        env: dict | None = None,
    ):
        self.port = port
        self.extra_args = list(extra_args)
        self.comfy_dir = Path(comfy_dir).resolve()
        if python is None:
            python = DEFAULT_PYTHON if DEFAULT_PYTHON.exists() else Path(sys.executable)
        self.python = str(python)
        self.output_dir = Path(output_dir).resolve() if output_dir else self.comfy_dir / "output"
        self.startup_timeout = startup_timeout
        self.keep_run_dir = keep_run_dir
        self.env = env
        self.run_dir: Path | None = None
        self.log_path: Path | None = None
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self.client_id = uuid.uuid4().hex

    # ---- lifecycle ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def temp_dir(self) -> Path:
        # ComfyUI appends "temp" to --temp-directory.
        return self.run_dir / "temp"

    def command(self) -> list[str]:
        return [
            self.python, str(self.comfy_dir / "main.py"),
            "--cpu",
            "--listen", "127.0.0.1",
            "--port", str(self.port),
            "--disable-auto-launch",
            # API nodes call paid cloud services; nothing here may reach the network.
            "--disable-api-nodes",
            "--output-directory", str(self.output_dir),
            "--temp-directory", str(self.run_dir),
            "--database-url", f"sqlite:///{self.run_dir / 'comfyui.db'}",
            *self.extra_args,
        ]

    def start(self) -> "ComfyServer":
        if self.proc is not None:
            raise ComfyServerError("server already started")
        if not (self.comfy_dir / "main.py").is_file():
            raise ComfyServerError(f"ComfyUI not found at {self.comfy_dir}; run `bash scripts/setup_env.sh`.")
        if self.port is None:
            self.port = free_port()
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"comfy_server_{self.port}_"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.run_dir / "comfyui.log"
        self._log_file = open(self.log_path, "wb")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=str(self.comfy_dir),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            # Own process group: stop() can signal the server and anything it spawned
            # without touching the caller's group.
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(failed=True)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ComfyServerError(f"ComfyUI exited with code {code} during startup.\n{self.log_tail()}")
            try:
                # /object_info answers only once all node packs (including ours) are loaded.
                self._request("GET", "/object_info", timeout=10)
                return
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            if time.monotonic() > deadline:
                raise ComfyServerError(
                    f"ComfyUI did not answer /object_info within {self.startup_timeout:.0f}s.\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def stop(self, failed: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.run_dir is not None and not (failed or self.keep_run_dir):
            # The log is only worth keeping when something went wrong.
            shutil.rmtree(self.run_dir, ignore_errors=True)

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group created by start_new_session (pgid == pid)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(failed=exc_type is not None)

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return f"--- last {min(lines, len(text))} lines of {self.log_path} ---\n" + "\n".join(text[-lines:])

    # ---- HTTP --------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def object_info(self, node_class: str | None = None) -> dict:
        if node_class:
            return self._request("GET", "/object_info/" + urllib.parse.quote(node_class))
        return self._request("GET", "/object_info")

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        """Queue an API-format prompt; returns its prompt_id. Raises ComfyServerError with
        ComfyUI's validation message (and per-node errors) if the prompt is rejected."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        try:
            reply = self._request("POST", "/prompt", body)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                parsed = json.loads(detail)
                msg = parsed.get("error", {}).get("message", "") + " " + parsed.get("error", {}).get("details", "")
                node_errors = parsed.get("node_errors", {})
                detail = f"{msg.strip()}; node errors: {json.dumps(node_errors)}"
            except (ValueError, AttributeError):
                pass
            raise ComfyServerError(f"ComfyUI rejected the prompt (HTTP {e.code}): {detail}") from None
        return reply["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        reply = self._request("GET", "/history/" + urllib.parse.quote(prompt_id))
        return reply.get(prompt_id) if reply else None

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.25) -> dict:
        """Block until the prompt finished; return its /history entry. Raises
        PromptExecutionError with ComfyUI's exception message and node if it failed."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status", {})
                if status.get("status_str") == "error" or (status and not status.get("completed", True)):
                    raise PromptExecutionError(self._error_message(entry), self._error_details(entry))
                if status.get("completed", True):
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited (code {self.proc.returncode}) while running "
                                       f"prompt {prompt_id}.\n{self.log_tail()}")
            if time.monotonic() > deadline:
                try:
                    self._request("POST", "/interrupt", {})
                except Exception:  # noqa: BLE001 - best effort before reporting the timeout
                    pass
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f}s.\n{self.log_tail(30)}")
            time.sleep(poll)

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """queue() + wait()."""
        return self.wait(self.queue(prompt), timeout=timeout)

    @staticmethod
    def _error_details(entry: dict) -> dict:
        for kind, data in entry.get("status", {}).get("messages", []):
            if kind in ("execution_error", "execution_interrupted"):
                return dict(data, kind=kind)
        return {}

    @classmethod
    def _error_message(cls, entry: dict) -> str:
        d = cls._error_details(entry)
        if not d:
            return "prompt failed (no error message in history)"
        if d["kind"] == "execution_interrupted":
            return f"prompt interrupted at node {d.get('node_id')} ({d.get('node_type')})"
        tb = "".join(d.get("traceback") or [])
        return (f"node {d.get('node_id')} ({d.get('node_type')}) raised {d.get('exception_type')}: "
                f"{d.get('exception_message', '').strip()}\n{tb}")

    # ---- results -----------------------------------------------------------------------
    def images(self, entry: dict) -> list[Path]:
        """Files listed under ``images`` in the outputs of a history entry (SaveImage writes
        type "output", PreviewImage type "temp"), as local paths."""
        roots = {"output": self.output_dir, "temp": self.temp_dir,
                 "input": self.comfy_dir / "input"}
        paths = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                root = roots.get(img.get("type", "output"), self.output_dir)
                paths.append(root / img.get("subfolder", "") / img["filename"])
        return paths

    @staticmethod
    def timings(entry: dict) -> dict:
        """Server-side timing of one prompt from its status messages (timestamps in ms):
        {"start": s, "end": s, "seconds": end - start, "cached_nodes": [...]}."""
        out = {"start": None, "end": None, "seconds": None, "cached_nodes": []}
        for kind, data in entry.get("status", {}).get("messages", []):
            if kind == "execution_start":
                out["start"] = data.get("timestamp", 0) / 1000.0
            elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                out["end"] = data.get("timestamp", 0) / 1000.0
            elif kind == "execution_cached":
                out["cached_nodes"] = list(data.get("nodes", []))
        if out["start"] is not None and out["end"] is not None:
            out["seconds"] = out["end"] - out["start"]
        return out

    def free_memory(self) -> None:
        """Ask ComfyUI to unload models and drop its caches (POST /free)."""
        self._request("POST", "/free", {"unload_models": True, "free_memory": True})


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description="Start a CPU ComfyUI server; optionally run workflows on it.")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--comfy-dir", default=str(DEFAULT_COMFY_DIR))
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--run", nargs="*", default=None, metavar="WORKFLOW",
                    help="UI- or API-format workflow JSON files to run; exit afterwards")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)

    with ComfyServer(port=args.port, extra_args=extra, comfy_dir=args.comfy_dir,
                     output_dir=args.output_dir) as srv:
        print(f"[comfy_server] ComfyUI at {srv.url} (log {srv.log_path})", flush=True)
        if args.run is None:
            try:
                while srv.proc.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
            return 0
        from workflow_convert import to_api

        info = srv.object_info()
        for wf_path in args.run:
            prompt = to_api(json.loads(Path(wf_path).read_text()), info)
            entry = srv.run(prompt, timeout=args.timeout)
            print(json.dumps({"workflow": wf_path, "images": [str(p) for p in srv.images(entry)],
                              "timings": srv.timings(entry)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
