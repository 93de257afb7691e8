"""What the UNet and sweep benchmarks run: their configurations, with the defaults and the
--quick sizes written once, and the names of the UNet implementations. Importable without
diffusers, so that the CLI builds its parsers (and their help) from them cheaply."""

from __future__ import annotations

import dataclasses

from diffcirc.bench.gate import MODEL_TOLERANCE

# the implementations of diffcirc.bench.processors, sdpa (the reference of the others) first
UNET_IMPLEMENTATIONS = ("sdpa", "fused", "fused+entropy", "fused+all", "materialising")


@dataclasses.dataclass(frozen=True)
class UnetConfig:
    """latent: the SD blocks' latent side (N = latent^2); widths: their widths (8 heads each);
    sd_batch, unet_batch: images per forward; impl: implementations in the order they run (the
    others are checked against sdpa's output, so sdpa must come first); warmup, repeats: untimed
    and timed forwards per case; tolerance: max abs output error vs AttnProcessor2_0."""

    latent: int = 64
    widths: tuple = (320, 640)
    sd_batch: int = 1
    unet_batch: int = 16
    impl: tuple = UNET_IMPLEMENTATIONS
    warmup: int = 1
    repeats: int = 5
    tolerance: float = MODEL_TOLERANCE


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """images: images per condition; conditions: numbers of conditions to run (None: all, the clean
    run + one per head); max_batch: batch elements per batched pass (None: images x 1, 5 and all
    conditions); warmup, repeats: untimed and timed runs per row; tolerance: max abs output error vs
    one condition at a time and the model's own clean forward."""

    images: int = 8
    conditions: tuple | None = None
    max_batch: tuple | None = None
    warmup: int = 1
    repeats: int = 3
    tolerance: float = MODEL_TOLERANCE


UNET_QUICK = {"latent": 16, "unet_batch": 2, "repeats": 2}
SWEEP_QUICK = {"images": 1, "repeats": 1, "conditions": (9,)}


def _values(quick_values: dict, quick: bool, given: dict) -> dict:
    """given (None: unset) over quick_values (when quick); sequences as tuples (the configs are frozen)."""
    values = {**(quick_values if quick else {}), **{k: v for k, v in given.items() if v is not None}}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def unet_config(quick: bool = False, **given) -> UnetConfig:
    """UnetConfig from the given values (None: unset) over UNET_QUICK (when quick) and the defaults,
    with the sdpa baseline first in impl, added if missing."""
    values = _values(UNET_QUICK, quick, given)
    values["impl"] = ("sdpa", *[name for name in values.get("impl", UNET_IMPLEMENTATIONS) if name != "sdpa"])
    return UnetConfig(**values)


def sweep_config(quick: bool = False, **given) -> SweepConfig:
    """SweepConfig from the given values (None: unset) over SWEEP_QUICK (when quick) and the defaults."""
    return SweepConfig(**_values(SWEEP_QUICK, quick, given))
