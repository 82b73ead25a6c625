"""The quickstart example runs as a user runs it."""

import os
import subprocess
import sys

from conftest import ROOT


def test_quickstart_runs():
    script = os.path.join(ROOT, "examples", "python", "quickstart.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "1-step map" in out.stdout and "dopri5" in out.stdout
    assert "max difference" in out.stdout or "skipping the PyTorch step" in out.stdout
