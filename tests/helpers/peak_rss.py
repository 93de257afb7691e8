"""Run as a script: the ablation phase of the driver under memory budgets, one after the other in
this process, printing one JSON line per budget, {"peak_extra": bytes, "passes": [batch of each
UNet forward]}.

    python tests/helpers/peak_rss.py MODEL_DIR IMAGES OUT_DIR MAX_MEMORY_BYTES [MAX_MEMORY_BYTES ...]

peak_extra is the resident-set high-water mark during the phase minus the resident set before it
(Linux: the mark is reset through /proc/self/clear_refs, so model loading does not count). The
first budget runs in a fresh process; a later one may reuse memory the allocator kept from the
runs before it, which can only lower its measured peak (start with the budget whose peak must stay
low, end with the ones whose peak must be high).
"""

import json
import sys
from pathlib import Path

import torch

from diffcirc.analysis.config import AnalysisConfig
from diffcirc.analysis.phases import Experiment
from diffcirc.bench.measure import status_bytes


def ablation_peak(model: str, images: int, max_memory: int, out: str) -> dict:
    """The ablation phase on ``images`` images per dataset, every zero-ablation in as few passes as
    max_memory allows (max_batch unbounded)."""
    config = AnalysisConfig(out=out, model=model, synthetic=images, natural="lfw", natural_n=images,
                            timesteps=[600], ablation_timesteps=[600], ablation_images=images, ablation_modes=("zero",),
                            max_batch=1 << 20, max_memory=max_memory)
    exp = Experiment(config)
    passes = []
    exp.unet.register_forward_pre_hook(lambda module, args: passes.append(int(args[0].shape[0])))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    before = status_bytes("VmRSS")
    exp.ablations()
    return {"peak_extra": status_bytes("VmHWM") - before, "passes": passes}


def main(model: str, images: int, out: str, budgets: list[int]) -> None:
    torch.set_num_threads(1)
    for max_memory in budgets:
        print(json.dumps(ablation_peak(model, images, max_memory, str(Path(out) / str(max_memory)))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], [int(b) for b in sys.argv[4:]])
