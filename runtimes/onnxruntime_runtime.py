"""onnxruntime (CPU execution provider) running an exported decoder with a KV-cache loop.

It reads the graph contract the ONNX exporter writes (and optimum / transformers.js use):
``input_ids``, ``attention_mask``, optional ``position_ids`` and ``past_key_values.{i}.key|value``
in; ``logits`` and ``present.{i}.key|value`` out. The cache layout is read from the session's
input shapes, falling back to the bundle's config.json where a dimension is symbolic.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import Runtime

MODEL_FILE = "model.onnx"
PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
# ONNX type string of a session input -> numpy dtype of the arrays we feed it
ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class KVState:
    """The cache after a run: one present array per ``past_key_values`` input, and its length."""

    presents: list[np.ndarray]
    length: int


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def load(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = self.artifact_dir / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {self.artifact_dir} an ONNX export?")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

        inputs = {i.name: i for i in self.session.get_inputs()}
        past = sorted((int(m[1]), m[2] == "value", name) for name in inputs if (m := PAST.match(name)))
        self.past_names = [name for _, _, name in past]
        self.present_names = [name.replace("past_key_values.", "present.") for name in self.past_names]
        self.output_names = ["logits", *self.present_names]
        self.has_position_ids = "position_ids" in inputs
        if not self.past_names:
            raise ValueError(f"{path} has no past_key_values.* inputs: this runtime needs a decoder "
                             f"exported with a KV cache")
        self.num_layers = len(self.past_names) // 2
        first = inputs[self.past_names[0]]
        self.kv_dtype = ORT_FLOAT_TYPES.get(first.type, np.float32)
        _, kv_heads, _, head_dim = first.shape
        if not (isinstance(kv_heads, int) and isinstance(head_dim, int)):
            kv_heads, head_dim = self._kv_layout_from_config()
        self.kv_heads, self.head_dim = kv_heads, head_dim

    def _kv_layout_from_config(self) -> tuple[int, int]:
        config = json.loads((self.artifact_dir / "config.json").read_text())
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads", heads)
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return int(kv_heads), int(head_dim)

    def _run(self, ids: np.ndarray, start: int, past: Sequence[np.ndarray]) -> tuple[np.ndarray, KVState]:
        """Run ``ids`` (``[1, n]``) at absolute positions ``start..start+n-1`` on top of ``past``."""
        total = start + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), dtype=np.int64)}
        if self.has_position_ids:
            feeds["position_ids"] = np.arange(start, total, dtype=np.int64)[None, :]
        feeds.update(zip(self.past_names, past))
        logits, *presents = self.session.run(self.output_names, feeds)
        return logits[0], KVState(presents, total)

    def prefill(self, ids: Sequence[int], all_logits: bool = False) -> tuple[np.ndarray, KVState]:
        if not hasattr(self, "session"):
            self.load()
        tokens = np.asarray(ids, dtype=np.int64)[None, :]
        if tokens.shape[1] == 0:
            raise ValueError("prefill needs at least one token")
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        logits, state = self._run(tokens, 0, [empty] * len(self.past_names))
        logits = logits if all_logits else logits[-1:]
        return logits.astype(np.float32, copy=False), state

    def decode(self, state: KVState, token: int) -> tuple[np.ndarray, KVState]:
        logits, new_state = self._run(np.array([[token]], dtype=np.int64), state.length, state.presents)
        return logits.astype(np.float32, copy=False), new_state
