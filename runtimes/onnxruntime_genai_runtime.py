"""onnxruntime-genai running a genai folder (``exporters.onnx.genai.write_genai_folder``).

This is the loop a mobile app runs: ``og.Model`` + ``og.Generator``, genai owning the KV cache,
the attention mask and the position ids. The runtime feeds tokens with ``append_tokens`` and
reads the graph's raw ``logits`` output (``get_output("logits")``, before any logits processing
or search) rather than letting genai pick tokens, so the shared greedy loop, benchmark and
quality code in ``base.Runtime`` measure it exactly as every other runtime.

- Threads: ``threads`` is applied with ``og.Config.overlay`` as the decoder's
  ``session_options.intra_op_num_threads`` (``inter_op_num_threads`` 1, as the onnxruntime
  runtime), without touching the folder's genai_config.json.
- State: a genai generator is stateful and cannot branch, so every ``prefill`` creates a new
  generator and ``decode`` appends one token to the generator its state holds. A state that was
  already decoded from is refused rather than silently continuing a different sequence.
- ``prefill(all_logits=True)``: after ``append_tokens`` the logits output holds every prompt
  position (``[1, n, vocab]``) for graphs that compute them all (edgesmith's, and genai's own
  builder's); a graph that returns only the last position is fed token by token instead.
- ``max_new_tokens`` (runtime option, default 512): how many tokens decode may add after a prefill.
  Each generator's ``max_length`` is prompt + this, capped at the folder's context length, as an
  app sizes it: for ``past_present_share_buffer`` (GroupQueryAttention) graphs genai preallocates
  the KV cache to ``max_length``, and sizing it to the full context (8192 for SmolLM2) was measured
  to add ~65 ms to every prefill.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .base import Runtime

GENAI_CONFIG = "genai_config.json"
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass
class GenaiState:
    """A generator, how many tokens it held when this state was returned, and its capacity."""

    generator: Any
    length: int
    max_length: int


class OnnxGenaiRuntime(Runtime):
    name = "onnxruntime-genai"

    def load(self) -> None:
        import onnxruntime_genai as og

        path = self.artifact_dir / GENAI_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {self.artifact_dir} is not an onnxruntime-genai folder "
                                    f"(fix: run exporters.onnx.genai.write_genai_folder on the ONNX export)")
        self.context_length = int(json.loads(path.read_text())["model"]["context_length"])
        max_new = self.options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0:
            raise ValueError(f"onnxruntime-genai runtime option `max_new_tokens` must be a positive integer, "
                             f"got {max_new!r} (fix: the most tokens one generation may add, e.g. 512)")
        self.max_new_tokens = max_new
        config = og.Config(str(self.artifact_dir))
        self.overlay = {"model": {"decoder": {"session_options": {
            "intra_op_num_threads": self.threads, "inter_op_num_threads": 1}}}}
        config.overlay(json.dumps(self.overlay))
        self.og, self.model = og, og.Model(config)

    def _generator(self, prompt_len: int) -> tuple[Any, int]:
        params = self.og.GeneratorParams(self.model)
        max_length = min(self.context_length, prompt_len + self.max_new_tokens)
        params.set_search_options(max_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params), max_length

    def _logits(self, generator) -> np.ndarray:
        """The graph's raw logits of the last run, ``[positions, vocab]`` float32."""
        out = np.asarray(generator.get_output("logits"))
        return out.reshape(-1, out.shape[-1]).astype(np.float32, copy=False)

    def prefill(self, ids: Sequence[int], all_logits: bool = False) -> tuple[np.ndarray, GenaiState]:
        if not hasattr(self, "model"):
            self.load()
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("prefill needs at least one token")
        if len(ids) > self.context_length:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the folder's context_length "
                             f"{self.context_length} (fix: a shorter prompt, or a genai folder written with a "
                             f"larger context_length)")
        generator, max_length = self._generator(len(ids))
        generator.append_tokens(ids)
        logits = self._logits(generator)
        if all_logits and logits.shape[0] != len(ids):
            # the graph returned only the last position: run the prompt one token at a time instead
            (generator, _), rows = self._generator(len(ids)), []
            for token in ids:
                generator.append_tokens([token])
                rows.append(self._logits(generator)[-1])
            logits = np.stack(rows)
        return (logits if all_logits else logits[-1:]), GenaiState(generator, len(ids), max_length)

    def decode(self, state: GenaiState, token: int) -> tuple[np.ndarray, GenaiState]:
        generator = state.generator
        if generator.token_count() != state.length:
            raise RuntimeError("this state was already decoded from: an onnxruntime-genai generator cannot "
                               "branch (fix: prefill again to start another continuation)")
        if state.length >= state.max_length:
            raise ValueError(f"decode past this generator's max_length {state.max_length} (prompt + "
                             f"max_new_tokens {self.max_new_tokens}, at most context_length {self.context_length}) "
                             f"(fix: a larger `max_new_tokens` runtime option)")
        generator.append_tokens([int(token)])
        return self._logits(generator)[-1:], GenaiState(generator, state.length + 1, state.max_length)
