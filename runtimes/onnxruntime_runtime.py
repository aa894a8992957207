"""onnxruntime (CPU execution provider) running an exported decoder with a KV-cache loop.

It reads the graph contract the ONNX exporter writes (and optimum / transformers.js use):
``input_ids``, ``attention_mask``, optional ``position_ids`` and ``past_key_values.{i}.key|value``
in; ``logits`` and ``present.{i}.key|value`` out. The cache layout is read from the session's
input shapes, falling back to the bundle's config.json where a dimension is symbolic.

Graphs built on GroupQueryAttention (the exporter's fused graph) run with a shared KV buffer,
as onnxruntime-genai does: one preallocated ``[1, kv_heads, capacity, head_dim]`` array per
past input is bound (IOBinding) as both that input and the matching present output, so the
kernel appends the new keys in place instead of copying the whole cache into a fresh present
tensor every step, and logits are written straight into a numpy array. A state is then
single-use: decoding advances it in place (decoding the same state twice is refused).
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
    """The cache after a run: one present array per ``past_key_values`` input, and its length.

    With a shared buffer (GroupQueryAttention graphs) the arrays are ``capacity`` long and only
    the first ``length`` positions hold the cache."""

    presents: list[np.ndarray]
    length: int
    shared: bool = False
    spent: bool = False  # a shared state that a later decode has advanced


INITIAL_CAPACITY = 256


def uses_group_query_attention(path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type == "GroupQueryAttention" for n in model.graph.node)


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def load(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = self.model_path()
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
        self.logits_dtype = ORT_FLOAT_TYPES.get(self.session.get_outputs()[0].type, np.float32)
        _, kv_heads, _, head_dim = first.shape
        if not (isinstance(kv_heads, int) and isinstance(head_dim, int)):
            kv_heads, head_dim = self._kv_layout_from_config()
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.shared_kv = uses_group_query_attention(path) and not self.options.get("no_shared_kv", False)
        self.vocab = self.session.get_outputs()[0].shape[-1]

    def model_path(self):
        """``model.onnx``, or the ``model_file`` option (relative to the artifact: a browser bundle's
        ``models/<id>/onnx/model_q4.onnx``, so native and browser runtimes measure the same file)."""
        return self.artifact_dir / self.options.get("model_file", MODEL_FILE)

    def artifact_files(self):
        if "model_file" not in self.options:
            return self.artifact_dir
        path = self.model_path()  # the graph and its external data, not the rest of a bundle
        return [path, *sorted(path.parent.glob(path.name + "_data*"))]

    def _kv_layout_from_config(self) -> tuple[int, int]:
        path = self.model_path()
        folder = next((d for d in (path.parent, path.parent.parent) if (d / "config.json").is_file()), path.parent)
        config = json.loads((folder / "config.json").read_text())
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

    def _run_shared(self, ids: np.ndarray, state: KVState) -> tuple[np.ndarray, KVState]:
        """Run ``ids`` on top of ``state`` with the cache bound in place (GroupQueryAttention graphs)."""
        import onnxruntime as ort

        start, n = state.length, ids.shape[1]
        total = start + n
        buffers = state.presents
        if total > buffers[0].shape[2]:  # grow: double the capacity, keep what is cached
            capacity = max(2 * buffers[0].shape[2], total)
            grown = [np.zeros((1, self.kv_heads, capacity, self.head_dim), dtype=self.kv_dtype) for _ in buffers]
            for new, old in zip(grown, buffers):
                new[:, :, :start] = old[:, :, :start]
            buffers = grown
        cached = getattr(self, "_binding", None)
        if cached is None or cached[0] is not buffers or cached[2] is not self.session:  # once per set of buffers
            binding = self.session.io_binding()
            for past, present, array in zip(self.past_names, self.present_names, buffers):
                value = ort.OrtValue.ortvalue_from_numpy(array)
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            self._binding = cached = (buffers, binding, self.session)
        binding = cached[1]
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        logits = np.empty((1, n, self.vocab), dtype=self.logits_dtype)
        binding.bind_output("logits", "cpu", 0, self.logits_dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        state.spent = True
        return logits[0], KVState(buffers, total, shared=True)

    def prefill(self, ids: Sequence[int], all_logits: bool = False) -> tuple[np.ndarray, KVState]:
        if not hasattr(self, "session"):
            self.load()
        tokens = np.asarray(ids, dtype=np.int64)[None, :]
        if tokens.shape[1] == 0:
            raise ValueError("prefill needs at least one token")
        if self.shared_kv:
            capacity = max(INITIAL_CAPACITY, 1 << (tokens.shape[1] + 64 - 1).bit_length())
            buffers = [np.zeros((1, self.kv_heads, capacity, self.head_dim), dtype=self.kv_dtype)
                       for _ in self.past_names]
            logits, state = self._run_shared(tokens, KVState(buffers, 0, shared=True))
            logits = logits if all_logits else logits[-1:]
            return logits.astype(np.float32, copy=False), state
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        logits, state = self._run(tokens, 0, [empty] * len(self.past_names))
        logits = logits if all_logits else logits[-1:]
        return logits.astype(np.float32, copy=False), state

    def decode(self, state: KVState, token: int) -> tuple[np.ndarray, KVState]:
        if state.shared:
            if state.spent:
                raise ValueError("this KV state was already advanced by a decode (shared buffers are updated "
                                 "in place): continue from the state that decode returned")
            logits, new_state = self._run_shared(np.array([[token]], dtype=np.int64), state)
            return logits.astype(np.float32, copy=False), new_state
        logits, new_state = self._run(np.array([[token]], dtype=np.int64), state.length, state.presents)
        return logits.astype(np.float32, copy=False), new_state
