"""A small ONNX graph builder: named nodes, numpy initializers, cached constants, external data.

It knows nothing about models. Values are referred to by name (``str``); every ``op`` call returns
the name(s) of its output(s), so graph code reads like the math it builds::

    g = GraphBuilder("demo", opset=17)
    x = g.input("x", TensorProto.FLOAT, ["batch", 4])
    w = g.initializer("w", np.ones((4, 2), np.float32))
    g.output(g.op("MatMul", [x, w], name="y"), TensorProto.FLOAT, ["batch", 2])
    g.save(Path("demo.onnx"), "demo.onnx_data")

Large initializers are streamed straight from numpy into one external-data file at save time,
so the in-memory proto never holds a second copy of the weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Dim = int | str | None
# onnxruntime registers these in the ONNX domain although ONNX defines no such op
ORT_ONNX_DOMAIN_OPS = {"SimplifiedLayerNormalization"}


class GraphBuilder:
    # initializers at least this large go to the external-data file, at offsets aligned so
    # runtimes can memory-map them
    EXTERNAL_THRESHOLD = 1024
    ALIGNMENT = 4096

    def __init__(self, name: str, opset: int):
        self.name = name
        self.opset = int(opset)
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self.metadata: dict[str, str] = {}
        self._used: set[str] = set()
        self._counters: dict[str, int] = {}
        self._constants: dict[tuple, str] = {}
        self.domains: dict[str, int] = {}  # custom operator domains used -> opset version

    # -- names --------------------------------------------------------------------------------
    def unique(self, base: str) -> str:
        """``base`` if unused, else ``base_1``, ``base_2``, ...; the name is then reserved."""
        name = base
        while name in self._used:
            self._counters[base] = self._counters.get(base, 0) + 1
            name = f"{base}_{self._counters[base]}"
        self._used.add(name)
        return name

    def _claim(self, name: str) -> str:
        if name in self._used:
            raise ValueError(f"graph value name {name!r} is used twice")
        self._used.add(name)
        return name

    # -- graph interface ----------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        self.inputs.append(helper.make_tensor_value_info(self._claim(name), elem_type, list(shape)))
        return name

    def output(self, value: str, elem_type: int, shape: Sequence[Dim], name: str | None = None) -> str:
        """Declare ``value`` as a graph output, renaming it through Identity when ``name`` differs."""
        if name is not None and name != value:
            value = self.op("Identity", [value], outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(value, elem_type, list(shape)))
        return value

    def initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers[self._claim(name)] = np.asarray(array)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A constant initializer, shared by every use of the same dtype, shape and values."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.unique("const")  # reserves the name
            self.initializers[name] = array
            self._constants[key] = name
        return self._constants[key]

    def op(self, op_type: str, inputs: Sequence[str | None], name: str | None = None,
           outputs: Sequence[str] | int = 1, domain: str = "", **attrs) -> str | list[str]:
        """Add a node; return its output name (or list of names when it has several).

        ``name`` is a readable prefix ("layers.0/attn/q") for the node and its outputs; ``outputs``
        is a count of generated names or the exact output names (``""`` skips an optional output).
        ``None`` inputs are omitted optional inputs. A ``domain`` other than ONNX's (onnxruntime's
        ``com.microsoft``) is declared in the model's opset imports.
        """
        base = name or op_type
        if isinstance(outputs, int):
            out_names = [self.unique(base if outputs == 1 else f"{base}:{i}") for i in range(outputs)]
        else:
            out_names = [self._claim(o) if o else "" for o in outputs]
        node_name = self.unique(f"node/{base}")
        ins = ["" if i is None else i for i in inputs]
        if domain:
            self.domains.setdefault(domain, 1)
        self.nodes.append(helper.make_node(op_type, ins, out_names, name=node_name, domain=domain or None, **attrs))
        return out_names[0] if len(out_names) == 1 else out_names

    def uses_custom_ops(self) -> bool:
        """True when the graph needs onnxruntime's own kernels (not checkable by onnx.checker)."""
        return bool(self.domains) or any(n.op_type in ORT_ONNX_DOMAIN_OPS for n in self.nodes)

    # -- opset-dependent helpers --------------------------------------------------------------
    def reduce_mean(self, x: str, axes: Sequence[int], keepdims: bool = True, name: str | None = None) -> str:
        """ReduceMean: axes is an attribute up to opset 17 and an input from opset 18."""
        return self.reduce("ReduceMean", x, axes, keepdims, name)

    def reduce(self, op: str, x: str, axes: Sequence[int], keepdims: bool = True, name: str | None = None) -> str:
        """Reduce* ops: axes is an attribute up to opset 17 and an input from opset 18."""
        if self.opset >= 18:
            return self.op(op, [x, self.const(list(axes))], name=name, keepdims=int(keepdims))
        return self.op(op, [x], name=name, axes=list(axes), keepdims=int(keepdims))

    # -- output -------------------------------------------------------------------------------
    def _tensor(self, name: str, array: np.ndarray, data_file, location: str) -> TensorProto:
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        if array.nbytes < self.EXTERNAL_THRESHOLD:
            return numpy_helper.from_array(array, name)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                             dims=list(array.shape))
        pad = -data_file.tell() % self.ALIGNMENT
        data_file.write(b"\0" * pad)
        offset = data_file.tell()
        data_file.write(memoryview(array).cast("B"))
        # written by hand: onnx's set_external_data insists on raw_data, the copy we avoid
        for key, value in (("location", location), ("offset", offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        tensor.data_location = TensorProto.EXTERNAL
        return tensor

    def save(self, path: Path, data_location: str, producer: str = "edgesmith") -> onnx.ModelProto:
        """Write ``path`` and its weights to ``data_location`` (a file name beside ``path``).

        Returns the model proto (initializers point at the external file).
        """
        path = Path(path)
        with open(path.parent / data_location, "wb") as data_file:
            tensors = [self._tensor(n, a, data_file, data_location) for n, a in self.initializers.items()]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, tensors)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets + [helper.make_opsetid(d, v) for d, v in self.domains.items()],
                                  producer_name=producer)
        # the lowest IR version this opset allows, so older runtimes (onnxruntime-web) read it
        model.ir_version = helper.find_min_ir_version_for(opsets)
        helper.set_model_props(model, self.metadata)
        path.write_bytes(model.SerializeToString())
        return model
