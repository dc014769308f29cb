"""What ``import longattn`` pulls in: not torch._dynamo (~2 s of a 2-core
machine's start-up, paid by every user, torchrun rank and subprocess test),
which only torch.compile and the custom ops' first traced use need. A
decorator such as ``@torch.compiler.disable`` at module level imports it."""

from __future__ import annotations

import os
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_longattn_does_not_import_dynamo():
    script = "import sys, longattn, longattn.sparse, longattn.parallel; print('torch._dynamo' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False", "import longattn imported torch._dynamo"
