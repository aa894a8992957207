"""`edgesmith serve BUNDLE`: an OpenAI-compatible HTTP server on a GGUF (+ LoRA adapter GGUF).

    POST /v1/chat/completions   {"messages": [...], "max_tokens": 64, "stream": false, ...}
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", ...}

Standard library only (``http.server``), bound to 127.0.0.1 unless ``--host`` says otherwise.
Requests are validated field by field; a bad one gets 400 and an OpenAI-shaped error naming the
field (``{"error": {"message", "type", "param", "code"}}``). Streaming replies are Server-Sent
Events, one ``data: {chunk}`` per piece, ending with ``data: [DONE]``. One llama.cpp context
serves every request, so generations run one at a time (the model's lock); other requests wait.
Sampling defaults to greedy (temperature 0): small models answer reproducibly that way.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_TOKENS = 256
MAX_BODY_BYTES = 4 * 2**20
ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # OpenAI's limit on stop sequences


class RequestError(Exception):
    """A request the client must fix: HTTP status, message, and the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{key}' must be a number, got {value!r}", key)
    if value > hi or value < lo or (lo_open and value == lo):
        raise RequestError(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}", key)
    return float(value)


def _content(message: Any, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text parts are supported
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"'messages[{i}].content[{j}]' must be a text part "
                                   f"{{\"type\": \"text\", \"text\": ...}}", f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"'messages[{i}].content' must be a string, got {content!r}", f"messages[{i}].content")


def parse_request(body: Any, default_max_tokens: int = DEFAULT_MAX_TOKENS, n_ctx: int | None = None) -> dict:
    """Validate a chat completion request; the keyword arguments for ``ChatModel.complete``."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if messages is None:
        raise RequestError("'messages' is required: a list of {\"role\", \"content\"} objects", "messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"'messages[{i}]' must be an object, got {m!r}", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise RequestError(f"'messages[{i}].role' must be one of {', '.join(ROLES)}, got {m.get('role')!r}",
                               f"messages[{i}].role")
        clean.append({"role": m["role"], "content": _content(m, i)})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max_tokens))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(f"'{key}' must be a positive integer, got {max_tokens!r}", key)
    if n_ctx is not None and max_tokens > n_ctx:
        raise RequestError(f"'{key}' must be at most the context size {n_ctx}, got {max_tokens}", key)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {stream!r}", "stream")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= MAX_STOP
                                 and all(isinstance(s, str) and s for s in stop)):
        raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings, "
                           f"got {body.get('stop')!r}", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, got {seed!r}", "seed")
    if body.get("n", 1) != 1:
        raise RequestError(f"'n' must be 1 (one choice per request), got {body.get('n')!r}", "n")
    if "model" in body and not isinstance(body["model"], str):
        raise RequestError(f"'model' must be a string, got {body['model']!r}", "model")
    return {
        "messages": clean, "max_tokens": max_tokens, "stream": stream, "stop": stop, "seed": seed,
        "temperature": _number(body, "temperature", 0.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
    }


class Handler(BaseHTTPRequestHandler):
    server: "ChatServer"
    server_version = "edgesmith"

    def log_message(self, fmt: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: RequestError) -> None:
        self._json(err.status, err.body())

    def do_GET(self) -> None:
        model = self.server.model
        if self.path == "/health":
            self._json(200, {"status": "ok", "model": model.name})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": model.name, "object": "model",
                                                          "created": self.server.started, "owned_by": "edgesmith"}]})
        else:
            self._error(RequestError(f"no route GET {self.path} (try /v1/models or /health)", status=404,
                                     kind="not_found_error"))

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._error(RequestError(f"no route POST {self.path} (try /v1/chat/completions)", status=404,
                                     kind="not_found_error"))
            return
        try:
            request = parse_request(self._read_json(), self.server.max_tokens, self.server.model.n_ctx)
        except RequestError as err:
            self._error(err)
            return
        with self.server.model.lock:  # one generation at a time on the one llama.cpp context
            try:
                if request.pop("stream"):
                    self._stream(request)
                else:
                    result = self._complete(request, stream=False)
                    result["model"] = self.server.model.name
                    self._json(200, result)
            except RequestError as err:
                self._error(err)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away; the generator is closed by _stream
            except Exception as exc:  # an internal failure still answers JSON
                self._error(RequestError(f"generation failed: {type(exc).__name__}: {exc}", status=500,
                                         kind="server_error"))

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise RequestError("Content-Length must be an integer") from None
        if length > MAX_BODY_BYTES:
            raise RequestError(f"request body of {length} bytes exceeds {MAX_BODY_BYTES}", status=413)
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw:
            raise RequestError("the request body is empty: send a JSON object with 'messages'", "messages")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}") from None

    def _complete(self, request: dict, stream: bool) -> Any:
        messages, max_tokens = request.pop("messages"), request.pop("max_tokens")
        try:
            return self.server.model.complete(messages, max_tokens, stream=stream, **request)
        except ValueError as exc:  # llama-cpp-python: prompt exceeds the context window, template errors
            raise RequestError(str(exc), "messages", code="context_length_exceeded"
                               if "context" in str(exc) else None) from None

    def _stream(self, request: dict) -> None:
        chunks = self._complete(request, stream=True)
        try:
            try:  # the first chunk tokenises the prompt: its errors still become a 400
                first = next(chunks)
            except StopIteration:
                first = None
            except ValueError as exc:
                raise RequestError(str(exc), "messages", code="context_length_exceeded"
                                   if "context" in str(exc) else None) from None
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                if first is not None:
                    self._event(first)
                    for chunk in chunks:
                        self._event(chunk)
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception as exc:  # headers are out: report the failure as an event
                err = RequestError(f"generation failed: {type(exc).__name__}: {exc}", kind="server_error")
                self.wfile.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        finally:
            chunks.close()

    def _event(self, chunk: dict) -> None:
        chunk["model"] = self.server.model.name
        self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.flush()


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, model, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 max_tokens: int = DEFAULT_MAX_TOKENS, verbose: bool = False):
        self.model, self.max_tokens, self.verbose = model, max_tokens, verbose
        self.started = int(time.time())
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a GGUF bundle over an OpenAI-compatible HTTP API",
                              description="Serve a GGUF bundle (a .gguf, or a directory holding one) with "
                              "llama.cpp over an OpenAI-compatible API: POST /v1/chat/completions (stream or "
                              "not), GET /v1/models, GET /health.")
    p.add_argument("bundle", help="a .gguf file or a directory holding one model .gguf")
    p.add_argument("--adapter", metavar="ADAPTER.gguf", help="a LoRA adapter GGUF applied over the model")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for llama.cpp (default 2)")
    p.add_argument("--ctx", type=int, default=2048, help="context size in tokens (default 2048)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"reply length when a request sets none (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> int:
    from runtimes.llamacpp_runtime import ChatModel

    model = ChatModel(args.bundle, lora_path=args.adapter, threads=args.threads, n_ctx=args.ctx)
    server = ChatServer(model, args.host, args.port, max_tokens=args.max_tokens, verbose=args.verbose)
    print(f"serving {model.name} on {server.url}/v1 (POST /v1/chat/completions); Ctrl-C stops", flush=True)
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops as cleanly as Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
        model.close()
    return 0
