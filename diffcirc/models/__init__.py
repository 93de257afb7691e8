"""UNets for diffcirc: the paper-like DDPM UNet (``build_unet``), loading (``load``), random-weight
controls (``random_like``), sampling and training."""

from .load import BUNDLED, CorruptWeightsError, ModelLoadError, WeightsMismatchError, load
from .sampling import sample, save_grid
from .unet import SCHEDULER_CONFIG, build_scheduler, build_unet, random_like

__all__ = ["BUNDLED", "SCHEDULER_CONFIG", "CorruptWeightsError", "ModelLoadError", "WeightsMismatchError",
           "build_scheduler", "build_unet", "load", "random_like", "sample", "save_grid"]
