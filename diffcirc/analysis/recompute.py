"""One row of a finished run recomputed alone, from the configuration and seeds the folder records.

    result = recompute_ablation("runs/demo", row=17)
    result.stored, result.recomputed      # {"loss_clean": ..., "loss_ablated": ...} each

Every input of an ablation row is fixed by the folder: the model and data by ``meta.json``'s
configuration, the image's noise by (seed, dataset, image, timestep) (``config.noise_for``), the
reference of a mean ablation by the row's own ablation batch. The row is rerun on its image alone,
outside the batched, stage-reused passes that wrote it, so agreement checks those passes as well as
the seeds. Floating-point sums in another batch size differ in their last bits: the comparison is
relative, at ``RTOL[dtype]`` of the run's denoiser (float32 rows agree to about 2e-7 on the CPU,
well inside 1e-5, while single-head effects on small models are 1e-4 and more).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch

from ..errors import InputError
from ..processor import Mean, Zero, mean_head_outputs
from .config import AnalysisConfig
from .phases import Experiment

# losses of one image alone vs the same image inside a batch of conditions, by the denoiser's dtype
RTOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}
TABLES = ("ablations",)


class RecomputeError(InputError):
    """A folder, table or row that cannot be recomputed (missing, out of range, unknown mode)."""


class Recomputed(NamedTuple):
    """A row as stored and as recomputed: {column: value} of its recomputed columns each."""

    table: str
    row: int
    key: dict          # the row's identifying columns
    stored: dict
    recomputed: dict
    rtol: float        # the relative difference within which they agree

    @property
    def max_relative_difference(self) -> float:
        return max(abs(self.recomputed[k] - v) / max(abs(v), 1e-30) for k, v in self.stored.items())

    @property
    def agrees(self) -> bool:
        return self.max_relative_difference <= self.rtol


def config_of(folder) -> AnalysisConfig:
    """The configuration a run folder was made with (meta.json), its out set to the folder."""
    meta_path = Path(folder) / "meta.json"
    try:
        given = json.loads(meta_path.read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise RecomputeError(f"{folder}: no finished run's meta.json to recompute from ({e})") from None
    known = {f.name for f in fields(AnalysisConfig)}
    settings = {k: tuple(v) if k == "ablation_modes" else v for k, v in given.items() if k in known}
    return AnalysisConfig(**{**settings, "out": str(folder)})


def stored_row(folder, table: str, row: int) -> pd.Series:
    """Row ``row`` (0-based) of ``folder/table.parquet``; ``RecomputeError`` for a table that
    cannot be recomputed, a missing file or a row out of range."""
    folder = Path(folder)
    if table not in TABLES:
        raise RecomputeError(f"--table {table!r}: rows of {', '.join(TABLES)} can be recomputed")
    path = folder / f"{table}.parquet"
    if not path.is_file():
        raise RecomputeError(f"{folder} has no {table}.parquet")
    frame = pd.read_parquet(path)
    if not 0 <= row < len(frame):
        raise RecomputeError(f"--row {row}: {table}.parquet has rows 0 to {len(frame) - 1}")
    return frame.iloc[row]


def recompute_ablation(folder, row: int, experiment: Experiment | None = None) -> Recomputed:
    """Row ``row`` (0-based) of ``folder/ablations.parquet`` rerun on its image alone: the clean
    loss and the loss with the row's head zero- or mean-ablated (the mean over the row's ablation
    batch at its timestep, as the run computed it). experiment: an already loaded ``Experiment``
    of the folder's configuration (to recompute several rows without reloading the model)."""
    folder = Path(folder)
    r = stored_row(folder, "ablations", row)
    if r["mode"] not in ("zero", "mean"):
        raise RecomputeError(f"row {row}: unknown ablation mode {r['mode']!r}")
    exp = experiment or Experiment(config_of(folder))
    t, layer, head = int(r["timestep"]), str(r["layer"]), int(r["head"])
    ids, _, _, x_t, target = exp.ablation_batch(str(r["dataset"]), t)
    if int(r["image"]) not in ids:
        raise RecomputeError(f"row {row}: image {int(r['image'])} is not in the {r['dataset']} ablation batch")
    b = ids.index(int(r["image"]))

    def forward(x):
        return exp.forward(exp.unet, x, t)

    with torch.no_grad():
        if r["mode"] == "zero":
            ablation = Zero(layer, head)
        else:
            ablation = Mean(layer, head, means=mean_head_outputs(exp.session, forward, [x_t]))
        one, want = x_t[b:b + 1], target[b:b + 1].float()
        clean = forward(one)
        with exp.session.intervene([ablation]):
            ablated = forward(one)
    recomputed = {"loss_clean": float((clean - want).square().mean()),
                  "loss_ablated": float((ablated - want).square().mean())}
    key = {k: (r[k].item() if hasattr(r[k], "item") else r[k]) for k in ("dataset", "timestep", "layer", "head", "mode",
                                                                         "image")}
    return Recomputed("ablations", row, key, {k: float(r[k]) for k in recomputed}, recomputed, RTOL[exp.c.dtype])


__all__ = ["RTOL", "TABLES", "RecomputeError", "Recomputed", "config_of", "recompute_ablation", "stored_row"]
