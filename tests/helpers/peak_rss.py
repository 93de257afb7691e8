"""Run as a script: the ablation phase of the driver under a memory budget, in a fresh process,
printing JSON {"peak_extra": bytes, "passes": [batch of each UNet forward]}.

    python tests/helpers/peak_rss.py MODEL_DIR MAX_MEMORY_BYTES IMAGES OUT_DIR

peak_extra is the resident-set high-water mark during the phase minus the resident set before it
(Linux: the mark is reset through /proc/self/clear_refs, so model loading does not count).
"""

import json
import sys

import torch

from diffcirc.analysis.config import AnalysisConfig
from diffcirc.analysis.phases import Experiment


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(model: str, max_memory: int, images: int, out: str) -> None:
    """The ablation phase on ``images`` images per dataset, every zero-ablation in as few passes as
    max_memory allows (max_batch unbounded)."""
    torch.set_num_threads(1)
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
    print(json.dumps({"peak_extra": status_bytes("VmHWM") - before, "passes": passes}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
