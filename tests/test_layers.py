"""The layers of docs/architecture.md, read from the imports themselves (AST, lazy imports included).

Lowest first: toolchain.core < toolchain.pipeline < toolchain.quality < toolchain.report <
{exporters, runtimes} < toolchain.training < toolchain.stages < toolchain.cli. A module imports its own
layer or lower ones; exporters and runtimes never import each other; a stage reaches exporters and
runtimes only through the registry (names in a table, never an import); no two modules import each
other, directly or round a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("toolchain", "exporters", "runtimes")
# module prefix -> rank; the longest matching prefix wins ("toolchain" alone: the version, ground floor)
LAYERS = {
    "toolchain": 0, "toolchain.core": 0, "toolchain.pipeline": 1, "toolchain.quality": 2, "toolchain.report": 3,
    "exporters": 4, "runtimes": 4, "toolchain.training": 5, "toolchain.pruning": 5, "toolchain.stages": 6,
    "toolchain.cli": 7,
}
SIBLINGS = {"exporters": "runtimes", "runtimes": "exporters"}  # same rank, never importing each other


def layer(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return prefix
    raise KeyError(module)


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """Every import in ``path`` at any depth (function-level imports count): (module, names imported from it)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, [a.name for a in node.names]))
    return [(m, names) for m, names in out if m.split(".")[0] in PACKAGES]


def project_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}

    def known(mod: str) -> str:
        while mod and mod not in modules:
            mod = mod.rpartition(".")[0]
        return mod

    graph = {}
    for mod, path in modules.items():
        targets = set()
        for imp, names in imports_of(path):
            subs = [f"{imp}.{n}" for n in names if f"{imp}.{n}" in modules]  # `from pkg import submodule`
            targets |= set(subs)
            if len(subs) < len(names) or not names:  # a name defined in ``imp`` itself
                targets.add(known(imp))
        graph[mod] = targets - {mod, ""}
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for src, targets in sorted(graph.items()):
        ls = layer(src)
        for dst in sorted(targets):
            ld = layer(dst)
            if LAYERS[ld] > LAYERS[ls]:
                out.append(f"{src} ({ls}) imports {dst} ({ld}), a higher layer")
            elif SIBLINGS.get(ls.split(".")[0]) == ld.split(".")[0]:
                out.append(f"{src} imports {dst}: exporters and runtimes never import each other")
            elif ls == "toolchain.stages" and ld.split(".")[0] in ("exporters", "runtimes"):
                out.append(f"{src} imports {dst}: a stage reaches exporters and runtimes through the registry")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    for mod in project_graph():
        assert layer(mod) in LAYERS, mod


def test_no_import_breaks_the_layers():
    assert violations(project_graph()) == []


def test_no_two_modules_import_each_other():
    assert cycles(project_graph()) == []


@pytest.mark.parametrize("src, dst, why", [
    # each of the imports the architecture issue found, as it would be written today
    ("runtimes.browser_runtime", "exporters.webgpu.config", "never import each other"),
    ("runtimes.webllm_runtime", "exporters.webllm.vendor", "never import each other"),
    ("exporters.webllm", "runtimes.base", "never import each other"),
    ("toolchain.stages.imatrix", "exporters.gguf.quantize", "through the registry"),
    ("toolchain.stages.reference", "runtimes.torch_runtime", "through the registry"),
    ("toolchain.core.errors", "toolchain.pipeline.recipe", "a higher layer"),
    ("toolchain.report.render", "toolchain.stages.report", "a higher layer"),
    ("exporters.onnx.build", "toolchain.stages.calibrate", "a higher layer"),
])
def test_the_checker_catches_what_the_issue_found(src, dst, why):
    graph = {src: {dst}, dst: set()}
    assert any(why in v for v in violations(graph)), violations(graph)


def test_the_checker_catches_a_circle():
    graph = {"toolchain.cli": {"toolchain.cli.chat"}, "toolchain.cli.chat": {"toolchain.cli"},
             "toolchain.report.render": {"exporters.webllm.report"}, "exporters.webllm.report": set()}
    assert cycles(graph) == [["toolchain.cli", "toolchain.cli.chat"]]
    assert violations(graph) == ["toolchain.report.render (toolchain.report) imports exporters.webllm.report "
                                 "(exporters), a higher layer"]
