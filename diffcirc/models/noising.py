"""Noise and training targets as a pipeline's scheduler defines them, with timesteps in its units.

Two families, chosen by ``noising_for(scheduler)``:

``DDPMNoising`` (DDPM, DDIM, PNDM, Euler, DPM-Solver, ...: every scheduler with ``alphas_cumprod``;
the sampler does not change how the model was trained), integer t in [0, T) with ā = alphas_cumprod[t]:

    x_t = √ā x0 + √(1 − ā) ε
    target: ε (epsilon) | √ā ε − √(1 − ā) x0 (v_prediction) | x0 (sample)

``FlowMatching`` (``FlowMatchEulerDiscreteScheduler``: SD3, Flux), σ = t / T as the scheduler's
timesteps are σ·T:

    x_t = (1 − σ) x0 + σ ε,   target: ε − x0

The scheduler's σ grid and shift set the default timesteps: ``default_timesteps(n)`` takes n
evenly spaced quantiles of the timesteps the model was trained on (the training scripts draw
an index of the scheduler's grid uniformly), shifted as the scheduler shifts them (for dynamic
shifting, Flux, by the image's token count, as the pipeline computes ``mu``).

Coefficients are computed in float64 and applied in the tensors' dtype. Tensors are (B, C, H, W);
t is one timestep for the whole batch.
"""

from __future__ import annotations

import copy
import math

import torch

from .load import ModelLoadError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW = "flow"  # the prediction type of flow matching: the velocity ε − x0


def bin_centres(n: int, total: int) -> list[float]:
    """The centres of n equal bins of [0, total): 50, 150, ..., 950 for n = 10, total = 1000."""
    return [(i + 0.5) * total / n for i in range(n)]


class DDPMNoising:
    """Variance-preserving noising from ``alphas_cumprod`` (T,) and the model's prediction type."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(f"the scheduler's prediction_type is {prediction_type!r}; diffcirc handles "
                                 f"{', '.join(PREDICTION_TYPES)} (and flow matching)")
        self.alphas_cumprod = alphas_cumprod.detach().double().cpu()
        self.prediction_type = prediction_type
        self.num_train_timesteps = len(self.alphas_cumprod)

    def check(self, t) -> int:
        """t as an int, if it is an integer timestep in [0, T); else ValueError."""
        if float(t) != int(t) or not 0 <= int(t) < self.num_train_timesteps:
            raise ValueError(f"timestep {t} is not an integer in [0, {self.num_train_timesteps}), the range of "
                             "this scheduler's timesteps")
        return int(t)

    def _coefficients(self, t, like: torch.Tensor):
        a = self.alphas_cumprod[self.check(t)]
        return (a.sqrt().to(like.dtype).to(like.device), (1 - a).sqrt().to(like.dtype).to(like.device))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        signal, noise = self._coefficients(t, x0)
        return signal * x0 + noise * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """What the model is trained to output for x_t = add_noise(x0, eps, t)."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        signal, noise = self._coefficients(t, x0)
        return signal * eps - noise * x0

    def x0_from_prediction(self, x_t: torch.Tensor, prediction: torch.Tensor, t) -> torch.Tensor:
        """The clean sample the model's output implies."""
        if self.prediction_type == "sample":
            return prediction
        signal, noise = self._coefficients(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - noise * prediction) / signal
        return signal * x_t - noise * prediction  # v: x0 = √ā x_t − √(1 − ā) v

    def default_timesteps(self, n: int, image_tokens: int | None = None) -> list[int]:
        """n integer timesteps at the centres of n equal bins of [0, T) (training draws t uniformly)."""
        return [int(c) for c in bin_centres(n, self.num_train_timesteps)]

    def describe(self, t) -> dict:
        """The noise level of timestep t, for tables."""
        return {"alpha_cumprod": float(self.alphas_cumprod[self.check(t)])}


class FlowMatching:
    """Rectified-flow noising of a ``FlowMatchEulerDiscreteScheduler``: σ = t / T."""

    prediction_type = FLOW

    def __init__(self, scheduler):
        self.scheduler = copy.deepcopy(scheduler)  # default_timesteps reads its grid; nothing changes the caller's
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def check(self, t) -> float:
        """t as a float, if it lies in [0, T]; else ValueError."""
        if not 0 <= float(t) <= self.num_train_timesteps:
            raise ValueError(f"timestep {t} is outside [0, {self.num_train_timesteps}], the range of this "
                             "flow-matching scheduler's timesteps (sigma = t / T)")
        return float(t)

    def sigma(self, t) -> float:
        return self.check(t) / self.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        s = self.sigma(t)
        return (1.0 - s) * x0 + s * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        self.check(t)
        return eps - x0

    def x0_from_prediction(self, x_t: torch.Tensor, prediction: torch.Tensor, t) -> torch.Tensor:
        return x_t - self.sigma(t) * prediction  # x_t = x0 + σ (ε − x0)

    def shift_mu(self, image_tokens: int) -> float:
        """The dynamic shift ``mu`` the Flux pipeline computes for ``image_tokens`` packed latent tokens
        (``calculate_shift``: linear in the token count between the config's base and max)."""
        c = self.scheduler.config
        base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        base, top = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        slope = (top - base) / (max_len - base_len)
        return image_tokens * slope + base - slope * base_len

    def training_sigmas(self, image_tokens: int | None = None) -> torch.Tensor:
        """(T,) the σ grid the model was trained on, descending: the scheduler's, shifted by its
        static shift (already in it) or, with dynamic shifting, by ``shift_mu(image_tokens)``."""
        sigmas = self.scheduler.sigmas.double()
        if self.scheduler.config.get("use_dynamic_shifting", False):
            if image_tokens is None:
                raise ValueError("this scheduler shifts its timesteps by the image's token count: pass image_tokens")
            mu = self.shift_mu(image_tokens)
            sigmas = torch.tensor([self.scheduler.time_shift(mu, 1.0, float(s)) for s in sigmas], dtype=torch.float64)
        return sigmas

    def default_timesteps(self, n: int, image_tokens: int | None = None) -> list[int]:
        """n integer timesteps (rounded σ·T) at evenly spaced quantiles of the training grid,
        from low noise to high."""
        sigmas = self.training_sigmas(image_tokens).flip(0)  # ascending
        picks = [sigmas[min(int(c), len(sigmas) - 1)] for c in bin_centres(n, len(sigmas))]
        return [int(round(float(s) * self.num_train_timesteps)) for s in picks]

    def describe(self, t) -> dict:
        return {"sigma": self.sigma(t)}


def noising_for(scheduler):
    """The noising of a loaded diffusers scheduler: ``FlowMatching`` for flow-matching schedulers,
    ``DDPMNoising`` for any with ``alphas_cumprod``; anything else is a ``ModelLoadError``."""
    name = type(scheduler).__name__
    if name.startswith("FlowMatch"):
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ModelLoadError(f"the pipeline's scheduler is {name}; diffcirc noises flow-matching models as "
                                 "FlowMatchEulerDiscreteScheduler defines it")
        return FlowMatching(scheduler)
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(alphas, torch.Tensor) or alphas.dim() != 1 or not math.isfinite(float(alphas.sum())):
        raise ModelLoadError(f"the pipeline's scheduler {name} has no alphas_cumprod (a DDPM noise schedule) and is "
                             "not flow matching: diffcirc cannot noise images as the model was trained")
    return DDPMNoising(alphas, scheduler.config.get("prediction_type", "epsilon"))
