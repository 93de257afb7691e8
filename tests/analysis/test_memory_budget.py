"""--max-memory holds: an ablation sweep whose unchunked passes need ~150 MiB (measured alone; each
pass resumes from the stored clean stages, 2 heads x 20 images) runs under a 128 MiB budget, with
the peak resident memory of the phase measured in a fresh process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.analysis_models import HEADS_PER_LAYER, save_analysis_unet

BUDGET = 128 * 2**20
IMAGES = 20  # per dataset: every held-out LFW image
SCRIPT = Path(__file__).parents[1] / "helpers" / "peak_rss.py"

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")


def ablate(model_dir, out, *budgets) -> list[dict]:
    """peak_rss.py's result for each budget, measured in that order in one fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(model_dir), str(IMAGES), str(out), *map(str, budgets)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.strip().splitlines()[-len(budgets):]]


def test_ablation_sweep_stays_under_max_memory(tmp_path):
    model_dir = save_analysis_unet(tmp_path / "tiny-unet")
    # the budgeted sweep first, in the fresh process: its peak is the one that must stay low; the
    # unbudgeted one after it can only measure less than it would alone, and must still exceed it
    chunked, unchunked = ablate(model_dir, tmp_path / "out", BUDGET, 1 << 50)
    # without a budget: each pass holds every image of the conditions that resume at one stage, past
    # what the budget allows
    assert max(unchunked["passes"]) == HEADS_PER_LAYER * IMAGES, unchunked
    # with it: smaller passes, and the measured peak stays under the budget
    assert max(chunked["passes"]) < max(unchunked["passes"]), chunked
    assert chunked["peak_extra"] < BUDGET, chunked
