"""The tolerance rule stays kept: every tier in tests/tolerances.py has a reason and positive bounds,
every tier is used, and no test passes a bare number as a tolerance (atol=, rtol=, approx's rel=/abs=)."""
from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest

from tests import tolerances
from tests.tolerances import Tier

TESTS = Path(__file__).resolve().parent
KEYWORDS = {"atol", "rtol", "rel", "abs"}  # numpy's assert_allclose / isclose, pytest.approx


def tiers() -> dict[str, Tier]:
    """Every tier by the name a test would use: ``NAME`` or ``NAME[key]`` for a table of tiers."""
    found = {}
    for name, value in vars(tolerances).items():
        if isinstance(value, Tier):
            found[name] = value
        elif isinstance(value, dict) and value and all(isinstance(v, Tier) for v in value.values()):
            found.update({f"{name}[{key!r}]": tier for key, tier in value.items()})
    return found


def test_the_table_is_not_empty():
    assert tiers(), "tests/tolerances.py defines no Tier"


@pytest.mark.parametrize("name", sorted(tiers()))
def test_every_tier_has_a_reason_and_positive_bounds(name):
    tier = tiers()[name]
    assert isinstance(tier.why, str) and len(tier.why.split()) >= 5, f"{name}: say what was measured and why"
    bounds = tier.bounds()
    assert bounds, f"{name} sets no bound"
    for field, value in bounds.items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (name, field, value)
        assert math.isfinite(value) and value > 0, f"{name}.{field} = {value}: bounds are positive"
    for field in ("top1",):
        if field in bounds:
            assert bounds[field] <= 1, f"{name}.{field} is a fraction"
    if "lo" in bounds and "hi" in bounds:
        assert bounds["lo"] <= bounds["hi"], name


def test_every_tier_is_used_by_a_test():
    own = ("tolerances.py", "test_tolerances.py")
    sources = "\n".join(p.read_text() for p in TESTS.rglob("*.py") if p.name not in own)

    def used(name: str) -> bool:
        return re.search(rf"\b{name}\b", sources) is not None

    tables = {name: value for name, value in vars(tolerances).items() if isinstance(value, dict)}
    unused = sorted(name for name, tier in vars(tolerances).items() if isinstance(tier, Tier) and not used(name)
                    and not any(used(t) and any(v is tier for v in table.values()) for t, table in tables.items()))
    unused += sorted(name for name, table in tables.items()
                     if not used(name) and all(isinstance(v, Tier) for v in table.values()))
    assert not unused, f"tiers no test uses (remove them or use them): {unused}"


def _bare_number(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    if isinstance(node, ast.BinOp):  # 1e-3 * 2, 2 ** -10
        return _bare_number(node.left) and _bare_number(node.right)
    return isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value != 0


def literal_tolerances(source: str, label: str) -> list[str]:
    """``label:line keyword=value`` for every call that passes a non-zero number literal as a tolerance
    (0, as in ``rtol=0``, switches a term off and is allowed)."""
    hits = []
    for node in ast.walk(ast.parse(source, filename=label)):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg in KEYWORDS and _bare_number(kw.value):
                    hits.append((node.lineno, f"{label}:{node.lineno} {kw.arg}={ast.unparse(kw.value)}"))
    return [hit for _, hit in sorted(hits)]


def test_no_test_passes_a_bare_number_as_a_tolerance():
    hits = [hit for p in sorted(TESTS.rglob("*.py")) if p.name != "tolerances.py"
            for hit in literal_tolerances(p.read_text(), str(p.relative_to(TESTS.parent)))]
    assert not hits, "tolerances live in tests/tolerances.py with a reason each:\n" + "\n".join(hits)


def test_the_scan_finds_what_it_must():
    probe = ("np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)\nx == pytest.approx(y, rel=-2e-3)\n"
             "np.isclose(a, b, atol=TIER.atol, rtol=TIER.rtol)\nnp.allclose(a, b, rtol=1e-3 * 2)\n")
    assert literal_tolerances(probe, "probe") == ["probe:1 atol=0.0001", "probe:2 rel=-0.002", "probe:4 rtol=0.001 * 2"]
