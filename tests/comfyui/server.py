"""A real headless ComfyUI server for tests, on loopback, in a throwaway base directory.

Why a subprocess and not the in-process import: the server path is what users run -- custom node
discovery in ``<base>/custom_nodes``, V1/V3 registration, ``/object_info`` serialisation, prompt
validation and the execution queue -- and none of it is exercised by calling node classes directly.

``--base-directory`` covers models, input, output, temp, user and custom_nodes (ComfyUI 0.3.64
through 0.8.0 at least), so the checkout is never written to; ``--database-url sqlite:///:memory:`` keeps
the asset database off disk. Only the standard library is used (websocket-client is not a ComfyUI
requirement): completion is detected by polling ``/history/<id>``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["ComfyServer", "free_port", "start_server"]

HOST = "127.0.0.1"


def free_port() -> int:
    """A currently free loopback TCP port (the OS picks it; tiny race until the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class ComfyServer:
    """Client for a running server: ``post_prompt``, ``wait_history``, ``object_info``."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, base_directory: Path, log_path: Path):
        self.process = process
        self.port = port
        self.base_directory = base_directory
        self.log_path = log_path
        self.client_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        """The server's combined stdout/stderr so far (for assertions and failure messages)."""
        return self.log_path.read_text(errors="replace")

    def request(self, path: str, payload: Any = None, timeout: float = 30.0) -> Any:
        """GET (or POST JSON when ``payload`` is given) ``path``; returns the decoded JSON body."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """``/object_info`` (every node definition) or ``/object_info/<class>``."""
        return self.request("/object_info" + (f"/{node_class}" if node_class else ""))

    def post_prompt(self, api_prompt: Mapping[str, Any], extra_data: Mapping[str, Any] | None = None) -> str:
        """Queue an API-format prompt; returns its prompt_id. Validation errors raise with details."""
        body: dict[str, Any] = {"prompt": dict(api_prompt), "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = dict(extra_data)
        try:
            return str(self.request("/prompt", body)["prompt_id"])
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise RuntimeError(f"/prompt rejected the prompt ({e.code}): {detail}") from e

    def wait_history(self, prompt_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Poll ``/history/<id>`` until the prompt finished; returns its entry, raises on error/timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.process.returncode}):\n{self.log()[-4000:]}")
            entry = self.request(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status", {})
            if status.get("status_str") == "error":
                messages = json.dumps(status.get("messages"))[:4000]
                raise RuntimeError(f"prompt {prompt_id} failed: {messages}")
            if status.get("completed"):
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s:\n{self.log()[-4000:]}")


@contextmanager
def start_server(
    comfyui_path: str | os.PathLike[str],
    base_directory: str | os.PathLike[str],
    custom_nodes: Mapping[str, str | os.PathLike[str]] | None = None,
    extra_args: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 120.0,
) -> Iterator[ComfyServer]:
    """Start ``main.py --cpu`` on a free loopback port, wait until it answers, always shut it down.

    ``custom_nodes`` maps folder names to pack directories, symlinked into
    ``<base>/custom_nodes/<name>`` (how users install packs, and how ComfyUI names the module).
    Torch gets one thread unless OMP_NUM_THREADS is set: tests use tiny models, and extra threads
    only spin against other processes on a small CI machine.
    """
    base = Path(base_directory)
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    for name, path in (custom_nodes or {}).items():
        link = base / "custom_nodes" / name
        if not link.exists():
            link.symlink_to(Path(path).resolve(), target_is_directory=True)
    port = free_port()
    log_path = base / "comfyui.log"
    cmd = [
        sys.executable,
        "main.py",
        "--cpu",
        "--listen",
        HOST,
        "--port",
        str(port),
        "--base-directory",
        str(base),
        "--disable-auto-launch",
        "--database-url",
        "sqlite:///:memory:",
        *(extra_args or []),
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd,
            cwd=str(comfyui_path),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"OMP_NUM_THREADS": "1", **os.environ, **(env or {})},
        )
    server = ComfyServer(process, port, base, log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                code = process.returncode
                raise RuntimeError(f"ComfyUI exited during startup ({code}):\n{server.log()[-4000:]}")
            try:
                server.request("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                if time.monotonic() > deadline:
                    log = server.log()[-4000:]
                    raise TimeoutError(f"ComfyUI not ready after {startup_timeout}s:\n{log}") from e
                time.sleep(0.25)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
