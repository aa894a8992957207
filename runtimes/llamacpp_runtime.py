"""llama.cpp (through llama-cpp-python) running a GGUF file, optionally with a LoRA adapter GGUF.

Two ways in:

- ``LlamaCppRuntime``: the runtime contract (load / prefill / decode on token ids) for the bench
  and quality stages. Tokens are fed through llama.cpp's public C API (``llama_batch`` +
  ``llama_decode``) so nothing adds a BOS, and each call asks for exactly the logits it needs:
  every position when ``all_logits`` (no ``logits_all=True`` context and its ``[n_ctx, vocab]``
  Python-side score buffer), otherwise the last one. Prompts longer than ``n_batch`` are fed in
  ``n_batch`` chunks; llama.cpp splits each chunk into ``n_ubatch`` micro-batches itself.
- ``ChatModel`` / ``chat_stream``: chat completions for ``edgesmith chat`` and ``edgesmith
  serve``, rendered by the GGUF's own ``tokenizer.chat_template`` and stopped at its EOS token
  (``<|im_end|>`` for ChatML models).

An adapter GGUF (``general.type = adapter``, ``adapter.type = lora``) is applied at load time
over the base with llama.cpp's ``llama_adapter_lora_init`` + ``llama_set_adapters_lora`` (not
llama-cpp-python's ``lora_path``, which ignores a rejected adapter), scaled by ``lora_scale`` x
alpha / rank.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from toolchain.core.errors import EdgesmithError

from .base import Runtime

GGUF_SUFFIX = ".gguf"
DEFAULT_CTX = 2048
DEFAULT_BATCH = 512
GGUF_TEMPLATE_FORMAT = "chat_template.default"  # llama-cpp-python's name for the GGUF's own template
# ggml.h's enum ggml_log_level (NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5); llama-cpp-python's
# _logger still documents an older numbering
GGML_LOG_WARN, GGML_LOG_ERROR = 3, 4
INSTALL_HINT = "pip install llama-cpp-python (a CPU wheel; see README)"


def find_gguf(path: str | Path, model_file: str | None = None) -> Path:
    """The model GGUF of a bundle: ``path`` itself, ``path/model_file``, or the one non-adapter .gguf."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise EdgesmithError(f"{path} does not exist (fix: pass a GGUF file or a directory holding one)")
    if model_file:
        target = path / model_file
        if not target.is_file():
            raise EdgesmithError(f"{target} not found (fix: model_file names a .gguf inside {path})")
        return target
    found = sorted(p for p in path.glob(f"*{GGUF_SUFFIX}") if p.is_file())
    if len(found) > 1:
        found = [p for p in found if _gguf_type(p) not in ("adapter", "imatrix")]
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise EdgesmithError(f"{path} must hold exactly one model .gguf, found {names} "
                             f"(fix: pass the .gguf path itself, or set model_file)")
    return found[0]


def _gguf_type(path: Path) -> str:
    """``general.type`` of a GGUF ('model', 'adapter', or '' when unset/unreadable)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).get_field("general.type")
        return field.contents() if field is not None else ""
    except Exception:  # an unreadable file is reported later by llama.cpp itself
        return ""


def open_llama(model_path: Path, *, threads: int, n_ctx: int = DEFAULT_CTX, n_batch: int = DEFAULT_BATCH,
               lora_path: str | Path | None = None, lora_scale: float = 1.0, flash_attn: bool = True):
    """A ``llama_cpp.Llama`` on ``model_path`` (+ LoRA adapter), quiet, with the GGUF chat template.

    Flash attention is on, as llama.cpp's own tools choose on CPU (``-fa auto``); llama-cpp-python
    defaults to off, a different attention kernel whose logits sit up to ~3 away. Either way a
    one-token decode and a batched prefill of the same position use different kernels (F16
    accumulation), so their logits differ by up to ~1.5 (KL ~1e-4, same argmax).
    """
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise EdgesmithError(f"the llama.cpp runtime needs llama-cpp-python, which is not importable "
                             f"({exc}) (fix: {INSTALL_HINT})") from None
    if lora_path is not None and not Path(lora_path).is_file():
        raise EdgesmithError(f"adapter {lora_path} not found (fix: pass a LoRA adapter .gguf)")
    try:
        llm = Llama(model_path=str(model_path), n_ctx=int(n_ctx), n_batch=int(n_batch), n_ubatch=int(n_batch),
                    n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False, flash_attn=flash_attn)
    except (ValueError, RuntimeError) as exc:
        raise EdgesmithError(f"llama.cpp could not load {model_path}: {exc}") from None
    if lora_path:
        try:
            apply_lora(llm, Path(lora_path), lora_scale)
        except EdgesmithError:
            llm.close()
            raise
    # llama-cpp-python swaps a template it recognises (e.g. plain ChatML) for a built-in formatter
    # that handles system messages differently; always render with the template the GGUF carries.
    if GGUF_TEMPLATE_FORMAT in llm._chat_handlers:
        llm.chat_format = GGUF_TEMPLATE_FORMAT
    return llm


def apply_lora(llm, path: Path, scale: float = 1.0) -> None:
    """Load a LoRA adapter GGUF onto ``llm``'s model and enable it on its context at ``scale``.

    Done here rather than through ``Llama(lora_path=...)``: llama-cpp-python 0.3.36 tests the
    returned pointer with ``is None``, so an adapter llama.cpp rejects (wrong architecture or
    shapes) is silently ignored and the base model runs alone. llama.cpp's reason is captured
    from its log. The model owns the adapter and frees it with itself.
    """
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    messages: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):
        if level in (GGML_LOG_WARN, GGML_LOG_ERROR):
            messages.append(text.decode("utf-8", "replace").strip())

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode())
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if not adapter:  # a NULL POINTER(c_void_p) is falsy but not None
        reason = "; ".join(m for m in messages if m) or "see llama.cpp's log"
        raise EdgesmithError(f"llama.cpp could not load adapter {path} over {llm.model_path}: {reason} "
                             f"(fix: pass a LoRA adapter GGUF exported for this base model)")
    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
    scales = (ctypes.c_float * 1)(float(scale))
    if llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, 1, scales):
        raise EdgesmithError(f"llama.cpp could not enable adapter {path} on the context")
    llm.lora_path, llm.lora_scale = str(path), float(scale)


@dataclass
class LlamaState:
    """The context's KV cache holds ``length`` tokens of prefill number ``epoch``."""

    epoch: int
    length: int


class LlamaCppRuntime(Runtime):
    name = "llama.cpp"

    def load(self) -> None:
        self.close()  # a second load replaces the first
        self.model_path = find_gguf(self.artifact_dir, self.options.get("model_file"))
        self.n_ctx = int(self.options.get("n_ctx", DEFAULT_CTX))
        self.n_batch = int(self.options.get("n_batch", DEFAULT_BATCH))
        self.llm = open_llama(self.model_path, threads=self.threads, n_ctx=self.n_ctx, n_batch=self.n_batch,
                              lora_path=self.options.get("lora_path"),
                              lora_scale=float(self.options.get("lora_scale", 1.0)),
                              flash_attn=bool(self.options.get("flash_attn", True)))
        import llama_cpp

        self._c = llama_cpp
        self.n_vocab = int(self.llm.n_vocab())
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._epoch = 0
        self._length = 0

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._c.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def artifact_files(self) -> Path:
        path = getattr(self, "model_path", None) or find_gguf(self.artifact_dir, self.options.get("model_file"))
        return path

    # -- primitives ---------------------------------------------------------------------------
    def prefill(self, ids: Sequence[int], all_logits: bool = False) -> tuple[np.ndarray, LlamaState]:
        if getattr(self, "llm", None) is None:
            self.load()
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("prefill needs at least one token")
        self._epoch += 1
        self._length = 0
        logits = self._eval(ids, all_logits)
        return logits, LlamaState(self._epoch, self._length)

    def decode(self, state: LlamaState, token: int) -> tuple[np.ndarray, LlamaState]:
        if state.epoch != self._epoch or self.llm.n_tokens:
            raise RuntimeError("stale llama.cpp state: the context's KV cache was replaced by a later prefill "
                               "(or a high-level Llama call); decode from the newest prefill's state")
        self._length = state.length  # rewinding within the same prefill drops the later cache cells
        logits = self._eval([int(token)], False)
        return logits, LlamaState(self._epoch, self._length)

    def _eval(self, tokens: list[int], all_logits: bool) -> np.ndarray:
        """Feed ``tokens`` at positions ``self._length..``; the logits of every token or the last."""
        c, ctx, start = self._c, self.llm.ctx, self._length
        if start + len(tokens) > self.n_ctx:
            raise ValueError(f"{start + len(tokens)} tokens exceed the llama.cpp context of {self.n_ctx} "
                             f"(fix: raise the runtime option n_ctx)")
        c.llama_memory_seq_rm(c.llama_get_memory(ctx), 0, start, -1)
        self.llm.n_tokens = 0  # tell the high-level Llama its token/KV bookkeeping is void
        batch, rows = self._batch, []
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            last = i + len(chunk) == len(tokens)
            batch.n_tokens = len(chunk)
            for j, tok in enumerate(chunk):
                batch.token[j] = tok
                batch.pos[j] = start + i + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = all_logits or (last and j == len(chunk) - 1)
            code = c.llama_decode(ctx, batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code} for {len(chunk)} tokens at position {start + i}")
            n_out = len(chunk) if all_logits else int(last)
            if n_out:
                out = np.ctypeslib.as_array(c.llama_get_logits(ctx), shape=(n_out * self.n_vocab,))
                rows.append(out.reshape(n_out, self.n_vocab).astype(np.float32, copy=True))
        self._length = start + len(tokens)
        return np.concatenate(rows) if len(rows) > 1 else rows[0]


# -- chat -------------------------------------------------------------------------------------
class ChatModel:
    """A GGUF (+ adapter) for chat, rendering prompts with the GGUF's chat template.

    One llama.cpp context serves one request at a time; ``lock`` serialises callers.
    Sampling defaults to greedy (temperature 0) so a small model answers reproducibly.
    """

    def __init__(self, model_path: str | Path, *, lora_path: str | Path | None = None, threads: int = 2,
                 n_ctx: int = DEFAULT_CTX, lora_scale: float = 1.0):
        self.path = find_gguf(model_path)
        self.lora_path = Path(lora_path) if lora_path else None
        self.llm = open_llama(self.path, threads=threads, n_ctx=n_ctx, lora_path=lora_path, lora_scale=lora_scale)
        self.n_ctx = n_ctx
        self.name = self.path.stem + (f"+{self.lora_path.stem}" if self.lora_path else "")
        self.lock = threading.Lock()

    @property
    def chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    def render(self, messages: list[dict]) -> str:
        """The prompt text the chat template makes of ``messages`` (with the generation prompt)."""
        handler = self.llm._chat_handlers.get(self.llm.chat_format)
        if handler is None:
            raise EdgesmithError(f"{self.path.name} has no tokenizer.chat_template")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        text = self.llm._model.token_get_text
        fmt = Jinja2ChatFormatter(self.chat_template, eos_token=text(eos) if eos != -1 else "",
                                  bos_token=text(bos) if bos != -1 else "")
        return fmt(messages=messages).prompt

    def complete(self, messages: list[dict], max_tokens: int, *, stream: bool = False, temperature: float = 0.0,
                 top_p: float = 1.0, stop: str | list[str] | None = None, seed: int | None = None,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> Any:
        """``Llama.create_chat_completion``: an OpenAI-shaped dict, or an iterator of chunks if ``stream``.

        Callers holding the result of a stream must hold ``lock`` until it is exhausted.
        """
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0,
                    "min_p": 0.0, "repeat_penalty": 1.0}
        return self.llm.create_chat_completion(
            messages=messages, max_tokens=max_tokens, stream=stream, stop=stop or [], seed=seed,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, **sampling)

    def stream(self, messages: list[dict], max_tokens: int, **sampling: Any) -> Iterator[str]:
        """The reply's text pieces as they are generated (holds ``lock`` while generating)."""
        with self.lock:
            for chunk in self.complete(messages, max_tokens, stream=True, **sampling):
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    yield piece

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


def chat_stream(model_path: str | Path, messages: list[dict], max_tokens: int, lora_path: str | Path | None = None,
                threads: int = 2) -> Iterator[str]:
    """One-shot helper: load ``model_path`` (+ adapter) and stream a reply to ``messages``."""
    model = ChatModel(model_path, lora_path=lora_path, threads=threads)
    try:
        yield from model.stream(messages, max_tokens)
    finally:
        model.close()
