"""web/'s own test suite (node's test runner driving Debian chromium through playwright-core):
the page, the driver's server and session mode, and parity on the tiny bundle, wasm and WebGPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import browser_tools_or_skip

WEB = Path(__file__).resolve().parents[2] / "web"


def test_web_node_suite():
    browser_tools_or_skip()
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["npm", "test"], cwd=WEB, capture_output=True, text=True, env=env, timeout=1500)
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("# pass", "# fail", "# tests"))]
    assert proc.returncode == 0, "\n".join([*summary, proc.stdout[-4000:], proc.stderr[-2000:]])
    assert any(line.startswith("# pass") and int(line.split()[-1]) > 0 for line in summary), summary
