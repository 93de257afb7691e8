"""--max-memory holds: a sweep whose unchunked passes would need ~1 GB runs under a 384 MiB budget,
with the peak resident memory of the phase measured in a fresh process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffcirc.models import build_scheduler, build_unet

BUDGET = 384 * 2**20
SCRIPT = Path(__file__).parents[1] / "helpers" / "peak_rss.py"

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")


def ablate(model_dir, max_memory, out) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(model_dir), str(max_memory), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ablation_sweep_stays_under_max_memory(tmp_path):
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-unet"
    build_unet(32).save_pretrained(model_dir)
    build_scheduler().save_pretrained(model_dir)
    unchunked = ablate(model_dir, 1 << 50, tmp_path / "unchunked")
    chunked = ablate(model_dir, BUDGET, tmp_path / "chunked")
    # without a budget: clean + 24 heads x 16 images in one pass, past the budget (the test can fail)
    assert max(unchunked["passes"]) == 24 * 16 and unchunked["peak_extra"] > BUDGET, unchunked
    # with it: smaller passes, and the measured peak stays under the budget
    assert max(chunked["passes"]) < 24 * 16
    assert chunked["peak_extra"] < BUDGET, chunked
