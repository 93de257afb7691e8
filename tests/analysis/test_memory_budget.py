"""--max-memory holds: an ablation sweep whose unchunked passes would need ~250 MiB runs under a
128 MiB budget, with the peak resident memory of the phase measured in a fresh process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.analysis_models import HEADS_PER_LAYER, LAYERS, save_analysis_unet

BUDGET = 128 * 2**20
IMAGES = 20  # per dataset: every held-out LFW image
SCRIPT = Path(__file__).parents[1] / "helpers" / "peak_rss.py"

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")


def start_ablation(model_dir, max_memory, out) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[2]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(model_dir), str(max_memory), str(IMAGES), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_ablation_sweep_stays_under_max_memory(tmp_path):
    model_dir = save_analysis_unet(tmp_path / "tiny-unet")
    # two fresh processes side by side: each measures only its own resident set
    unchunked = start_ablation(model_dir, 1 << 50, tmp_path / "unchunked")
    chunked = start_ablation(model_dir, BUDGET, tmp_path / "chunked")
    unchunked, chunked = result_of(unchunked), result_of(chunked)
    heads = LAYERS * HEADS_PER_LAYER
    # without a budget: clean + every head x every image in one pass, past the budget (the test can fail)
    assert max(unchunked["passes"]) == heads * IMAGES and unchunked["peak_extra"] > BUDGET, unchunked
    # with it: smaller passes, and the measured peak stays under the budget
    assert max(chunked["passes"]) < heads * IMAGES
    assert chunked["peak_extra"] < BUDGET, chunked
