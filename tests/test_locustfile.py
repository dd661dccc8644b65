"""The load test's chat check against a stub OpenAI server: a server that refuses chat (HTTP 400, as vLLM does
for a model without a chat template) gets completions only with one warning under the default ``mixed``, and
stops the test under ``chat``; a server that answers chat gets both. The same for serve_compare.py, with the
stub in place of ``vllm serve``. The real-vLLM case is in tests/test_serve_compare.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bawa_vllm.serving import chat_refusal

from .conftest import REPO

pytest.importorskip("locust")

REFUSAL = "As of transformers v4.44, default chat template is no longer allowed"


class StubOpenAI(BaseHTTPRequestHandler):
    """``/v1/models``, streamed ``/v1/completions`` and ``/v1/chat/completions`` (or a 400 for chat)."""

    chat_ok = True
    chat_requests = 0

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(200, json.dumps({"object": "list", "data": [{"id": "stub"}]}).encode())

    def do_POST(self) -> None:
        json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path == "/v1/chat/completions"
        if chat:
            type(self).chat_requests += 1
            if not self.chat_ok:
                error = {"error": {"message": REFUSAL, "type": "BadRequestError", "code": 400}}
                return self._send(400, json.dumps(error).encode())
        piece = {"delta": {"content": "x"}} if chat else {"text": "x"}
        events = [{"choices": [piece]} for _ in range(3)] + [{"choices": [], "usage": {"completion_tokens": 3}}]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        self._send(200, body.encode(), "text/event-stream")


@contextmanager
def serve_stub(chat_ok: bool) -> Iterator[tuple[str, type[StubOpenAI]]]:
    handler = type("Stub", (StubOpenAI,), {"chat_ok": chat_ok, "chat_requests": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(params=[False, True], ids=["no-chat-template", "chat-template"])
def stub(request) -> Iterator[tuple[str, type[StubOpenAI]]]:
    with serve_stub(request.param) as served:
        yield served


def run_locust(url: str, tmp_path: Path, endpoint: str | None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    records = tmp_path / "records.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAWA_BENCH_")}
    env.update(BAWA_BENCH_RECORDS=str(records), BAWA_BENCH_PROMPT_TOKENS="8", BAWA_BENCH_MAX_TOKENS="3")
    if endpoint:
        env["BAWA_BENCH_ENDPOINT"] = endpoint
    proc = subprocess.run([sys.executable, "-m", "locust", "-f", str(REPO / "benchmarks/locustfile.py"), "--headless",
                           "--host", url, "-u", "2", "-r", "2", "-t", "3s", "--only-summary"],
                          env=env, capture_output=True, text=True, timeout=120)
    rows = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
    return proc, rows


def test_default_mixed(stub, tmp_path):
    url, handler = stub
    proc, rows = run_locust(url, tmp_path, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rows and not [r for r in rows if r["error"]]
    warnings = [line for line in proc.stderr.splitlines() if "refuses chat requests" in line]
    if handler.chat_ok:
        assert {r["endpoint"] for r in rows} == {"completions", "chat"} and not warnings
    else:  # one warning line that names the cause and the setting, and not one chat request after the check
        assert {r["endpoint"] for r in rows} == {"completions"}
        assert len(warnings) == 1 and REFUSAL in warnings[0] and "BAWA_BENCH_ENDPOINT=completions" in warnings[0]
        assert handler.chat_requests == 1


def test_chat_only(stub, tmp_path):
    url, handler = stub
    proc, rows = run_locust(url, tmp_path, "chat")
    if handler.chat_ok:
        assert proc.returncode == 0 and rows and {r["endpoint"] for r in rows} == {"chat"}
        assert not [r for r in rows if r["error"]]
    else:
        assert proc.returncode == 1 and not rows and handler.chat_requests == 1
        assert "set BAWA_BENCH_ENDPOINT=completions" in proc.stderr


def test_chat_refusal_only_on_400(stub):
    url, handler = stub
    assert chat_refusal(url) == (None if handler.chat_ok else f"HTTP 400: {REFUSAL}")
    assert chat_refusal("http://127.0.0.1:9") is None  # unreachable: left for the load test to count


@pytest.mark.parametrize(("dense_chat", "sparse_chat", "endpoint", "failed"), [
    (False, False, "mixed", None),  # a base model on both sides: completions for both, one warning
    (True, False, "mixed", "sparse refuses chat requests"),  # not the same load on both sides: a failure
    (False, False, "chat", "dense refuses chat requests"),
])
def test_serve_compare_chat_check(tmp_path, monkeypatch, capsys, dense_chat, sparse_chat, endpoint, failed):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import serve_compare

    with serve_stub(dense_chat) as (dense_url, _), serve_stub(sparse_chat) as (sparse_url, _):
        urls = {"dense-model": dense_url, "sparse-model": sparse_url}

        class StubServer:  # in place of `vllm serve MODEL`
            def __init__(self, model, log_path, *args, **kwargs):
                self.url = urls[model]
                Path(log_path).write_text("")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

        monkeypatch.setattr(serve_compare, "VllmServer", StubServer)
        rc = serve_compare.main(["--dense", "dense-model", "--sparse", "sparse-model", "--concurrency", "2",
                                 "--duration", "2", "--prompt-tokens", "8", "--max-tokens", "3",
                                 "--endpoint", endpoint, "--out", str(tmp_path)])
    report = json.loads((tmp_path / "serve_compare.json").read_text())
    table = (tmp_path / "serve_compare.md").read_text()
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    if failed is None:
        assert rc == 0 and len(warnings) == 1 and "measuring completions only, for both models" in warnings[0]
        for side in ("dense", "sparse"):
            assert report[side]["endpoints"] == ["completions"] and report[side]["levels"][0]["errors"] == 0
        assert f"- dense measured on: completions (chat refused: HTTP 400: {REFUSAL}" in table
        assert "- sparse measured on: completions\n" in table
    else:
        assert rc == 1 and not warnings
        side = failed.split()[0]
        assert report[side]["failed"].startswith(failed) and "rerun with --endpoint completions" in table
        assert report[side]["levels"] == [] and f"- {side} measured on: nothing" in table
