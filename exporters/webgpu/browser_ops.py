"""What onnxruntime-web (1.22, the build transformers.js 3.8.1 pins) refuses, checked on a graph
before it goes into a bundle.

onnxruntime-web does not say why a session fails: it throws a bare number (a pointer to a C++
exception whose text it does not export), and after one failed session transformers.js fails
every later inference in the page. So the bundle exporter refuses these graphs itself, with the
reason and the fix. Every row was measured in headless chromium on the wasm backend (web/test).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx

MS = "com.microsoft"


@dataclass(frozen=True)
class Refusal:
    domain: str
    op: str
    applies: Callable[[dict], bool]  # on the node's attributes
    reason: str
    fix: str


REFUSED = [
    Refusal(MS, "MatMulNBits", lambda a: a.get("bits", 4) != 4,
            "onnxruntime-web 1.22 has MatMulNBits kernels for bits=4 only; bits=8 aborts session creation",
            "lm_head: int4 or float (the onnx exporter's int8 head is for native onnxruntime)"),
    Refusal(MS, "GatherBlockQuantized", lambda a: True,
            "onnxruntime-web 1.22 aborts session creation on GatherBlockQuantized (block-quantised embedding)",
            "leave the embedding in float (quantize_embedding is not offered for bundles)"),
    Refusal(MS, "MatMulIntegerToFloat", lambda a: True,
            "static int8 activations are not a transformers.js dtype and were never run in onnxruntime-web",
            "use q4 or fp32"),
]
# Contrib ops seen to run in onnxruntime-web 1.22 on wasm and on WebGPU (SwiftShader), with
# greedy output equal to native onnxruntime's (web/test, tests/runtimes/test_browser_runtime.py).
VERIFIED_CONTRIB = {"GroupQueryAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
                    "MatMulNBits"}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def browser_problems(model: onnx.ModelProto) -> list[str]:
    """One line per refused node kind (with its count, reason and fix); empty when the graph is fine."""
    found: dict[tuple[str, str], int] = {}
    for node in model.graph.node:
        domain = node.domain or "ai.onnx"
        for r in REFUSED:
            if r.domain == domain and r.op == node.op_type and r.applies(_attrs(node)):
                found[(r.op, r.reason)] = found.get((r.op, r.reason), 0) + 1
    fixes = {(r.op, r.reason): r.fix for r in REFUSED}
    return [f"{count} {op} node(s): {reason} (fix: {fixes[(op, reason)]})" for (op, reason), count in found.items()]


def unverified_contrib_ops(model: onnx.ModelProto) -> list[str]:
    """Contrib ops the graph uses that were never run in onnxruntime-web (a warning, not a refusal)."""
    return sorted({n.op_type for n in model.graph.node if n.domain == MS} - VERIFIED_CONTRIB)
