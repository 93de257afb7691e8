"""Models for diffcirc: the paper-like DDPM UNet (``build_unet``), loading (``load``), random-weight
controls (``random_like``), sampling and training; and diffusers pipelines as the study's models
(``load_pipeline``: denoiser, scheduler noising, VAE latents, prompt conditioning)."""

from .load import BUNDLED, CorruptWeightsError, ModelLoadError, WeightsMismatchError, load
from .sampling import sample, save_grid
from .unet import SCHEDULER_CONFIG, build_scheduler, build_unet, random_like
from .denoiser import Conditioning, Denoiser
from .latents import LatentCache, encode_images
from .noising import DDPMNoising, FlowMatching, noising_for
from .pipeline import Pipeline, load_pipeline

__all__ = ["BUNDLED", "SCHEDULER_CONFIG", "CorruptWeightsError", "ModelLoadError", "WeightsMismatchError",
           "build_scheduler", "build_unet", "load", "random_like", "sample", "save_grid",
           "Conditioning", "DDPMNoising", "Denoiser", "FlowMatching", "LatentCache", "Pipeline", "encode_images",
           "load_pipeline", "noising_for"]
