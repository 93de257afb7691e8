"""What an analysis run depends on: ``AnalysisConfig`` (every default of the study, written once)
and the seeds derived from ``config.seed``.

    config = AnalysisConfig(natural="celeba:data/celeba", out="runs/celeba")
    config.synthetic_spec            # "synthetic": colour faces beside colour CelebA
    config = config.with_timesteps(pipe.default_timesteps)   # None: the model's own grid

Noise is seeded per (seed, dataset, image, timestep), so any table row can be recomputed alone,
on any process and in any batch.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Callable

import numpy as np
import torch

from ..errors import InputError

DTYPES = ("float32", "bfloat16", "float16")
DATASETS = ("synthetic", "natural")  # in this order: a dataset's index seeds its noise
CONTROL_SEED_OFFSET = 1_000_003      # the random-weights control's seed is seed + this, never a model's own seed
# fields that say where and how to run, not what is computed: a folder resumes whatever their values
# (the VAE's batches among them: latents are cached per image whatever batch encoded them)
NOT_FINGERPRINTED = ("out", "wait", "vae_batch_size")
CIRCUIT_ABLATIONS = ("zero", "mean")  # mean: each removed head's mean output per position over the selection split
DEFAULT_TIMESTEP_COUNT = 10  # trace timesteps when none are given: quantiles of the model's training grid


def synthetic_spec_for(natural: str) -> str:
    """The synthetic faces that match a natural dataset: colour beside CelebA, grayscale otherwise
    (LFW and the photo crops are grayscale)."""
    return "synthetic" if natural.startswith("celeba") else "synthetic-gray"


@dataclass
class AnalysisConfig:
    """Everything a run depends on; written to meta.json so a folder says how it was made. The
    ``diffcirc analyze`` options read their defaults from these fields."""

    out: str = "runs/analysis"
    model: str = "bundled"                # bundled | a pixel UNet folder | a diffusers pipeline folder | a hub id
    prompt: str = ""                      # encoded once by the pipeline's text encoders ("": unconditional)
    prompt_embeds: str | None = None      # a safetensors file of prompt_embeds (and pooled_prompt_embeds) instead
    max_sequence_length: int | None = None  # T5 tokens of SD3 / Flux prompts; None: the pipelines' 256 / 512
    size: int | None = None               # image resolution in pixels; None: the model's own
    synthetic: int = 64                   # held-out synthetic faces
    synthetic_spec: str | None = None     # None: synthetic_spec_for(natural)
    natural: str = "lfw"                  # lfw | photos | celeba:PATH | folder:PATH
    natural_n: int | None = None          # default: every held-out image (LFW: 20)
    timesteps: list | None = None         # None: DEFAULT_TIMESTEP_COUNT quantiles of the model's training timesteps
    ablation_timesteps: list | None = None  # default: every third trace timestep
    ablation_modes: tuple = ("zero", "mean")
    ablation_images: int = 32             # per dataset, the first ones
    circuit_threshold: float = 10.0       # percent degradation the pruned circuit may cost
    circuit_timestep: int | None = None   # default: the middle ablation timestep
    circuit_heldout_fraction: float = 0.5  # share of the ablation images held out from the circuit's selection
    circuit_random_sets: int = 29         # random head sets of the circuit's removed-set size (p floor 1/30)
    circuit_resamples: int = 2            # bootstrap resamples of the selection split, each searched again
    circuit_ablation: str = "zero"        # how the circuit's removed heads are ablated: zero | mean (CIRCUIT_ABLATIONS)
    role_control_reps: int = 999          # layer-matched random head sets per role, at most (every one when fewer
                                          # exist); the rank p's floor is 1 / (sets + 1)
    ig_steps: int = 8                     # integrated-gradient steps of the attribution over the gates (0: none)
    sample_maps: int = 4                  # images per dataset whose per-query maps are kept
    random_control: bool = True
    controls: tuple = ("framing", "spectrum", "seen")  # matched-stimulus control sets traced (``controls``)
    control_n: int | None = None          # images per control set, at most (and by default) the synthetic set's
    batch_size: int = 64
    vae_batch_size: int = 8               # images per VAE encoder pass (latent models; at full resolution)
    max_batch: int = 64                   # batch elements per forward pass of batched conditions (on a CPU larger passes gain nothing)
    max_memory: int | None = None         # bytes one forward pass (trace, conditions, VAE) may use; None: half of what is free
    bins: int = 64
    seed: int = 0
    bootstrap: int = 2000
    device: str = "cpu"
    dtype: str = "float32"                # of the denoiser and text encoders (one of DTYPES); the VAE stays float32
    wait: bool = False                    # out held by another run: wait for it (True) or refuse at once

    def __post_init__(self):
        if self.circuit_ablation not in CIRCUIT_ABLATIONS:
            raise ValueError(f"circuit_ablation must be one of {CIRCUIT_ABLATIONS}, got {self.circuit_ablation!r}")
        if self.synthetic_spec is None:
            self.synthetic_spec = synthetic_spec_for(self.natural)

    @staticmethod
    def defaults() -> dict:
        """{field: its default} before any resolution (synthetic_spec and timesteps None)."""
        return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(AnalysisConfig)}

    def settings(self) -> dict:
        """The fields the results depend on: the fingerprint a folder is resumed under."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_FINGERPRINTED}

    def with_timesteps(self, default_grid: Callable[[int], list]) -> "AnalysisConfig":
        """This configuration with its trace timesteps set: as given, else
        ``default_grid(DEFAULT_TIMESTEP_COUNT)``, the model's own (``Pipeline.default_timesteps`` at
        the run's image size: 50, 150, ..., 950 on a DDPM schedule, the shifted σ grid's quantiles
        on a flow-matching one)."""
        if self.timesteps is not None:
            return self
        return replace(self, timesteps=[int(t) for t in default_grid(DEFAULT_TIMESTEP_COUNT)])

    def resolved_ablation_timesteps(self) -> list[int]:
        if self.timesteps is None:
            raise ValueError("the trace timesteps are not resolved yet: call with_timesteps first")
        return list(self.ablation_timesteps) if self.ablation_timesteps else list(self.timesteps[1::3]) or list(self.timesteps)

    def resolved_circuit_timestep(self) -> int:
        steps = self.resolved_ablation_timesteps()
        return int(self.circuit_timestep) if self.circuit_timestep is not None else steps[len(steps) // 2]


class TimestepError(InputError):
    """A timestep of the configuration that the model's scheduler does not have."""


def check_timesteps(config: AnalysisConfig, check) -> None:
    """Raise ``TimestepError`` unless every trace, ablation and circuit timestep of ``config``
    passes ``check`` (the noising's: it raises ValueError for a timestep outside its scheduler)."""
    named = [("--timesteps", config.timesteps), ("--ablation-timesteps", config.resolved_ablation_timesteps()),
             ("circuit_timestep", [config.resolved_circuit_timestep()])]  # an ablation timestep unless set
    for option, values in named:
        for t in values:
            try:
                check(t)
            except ValueError as e:
                raise TimestepError(f"{option}: {e}") from None


def noise_for(seed: int, dataset: int, images, t: int, shape) -> torch.Tensor:
    """Gaussian noise (B, *shape) with image i's noise fixed by (seed, dataset, image id, t)."""
    out = []
    for i in images:
        state = np.random.SeedSequence([seed, dataset, int(i), int(t)]).generate_state(2)
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out)


__all__ = ["AnalysisConfig", "CIRCUIT_ABLATIONS", "DATASETS", "DEFAULT_TIMESTEP_COUNT", "DTYPES", "TimestepError",
           "check_timesteps", "noise_for", "synthetic_spec_for"]
