"""One row of a finished run recomputed alone, from the configuration and seeds the folder records.

    result = recompute_ablation("runs/demo", row=17)
    result.stored, result.recomputed      # {"loss_clean": ..., "loss_ablated": ...} each
    recompute("runs/demo", "circuit_eval", row=3)   # any table of TABLES

Every input of a row is fixed by the folder: the model and data by ``meta.json``'s configuration,
the image's noise by (seed, dataset, image, timestep) (``config.noise_for``). An ``ablations`` row's
mean ablation takes its reference from the row's own ablation batch. A ``circuit_eval`` row removes
the heads outside its dataset's circuit (``circuit.parquet``) or, for condition "random", the rep-th
random set of as many heads (from the seed and the dataset), zeroed or replaced by their means over
the dataset's selection split at the row's timestep, as ``Experiment.circuit_evaluation`` does. A
``role_ablations`` row zero-ablates its role's heads or its layer-matched random set, the roles
assigned again from the folder's trace and feature tables, and scores the row's error.
The row is rerun on its image alone, outside the batched, stage-reused passes that wrote it, so
agreement checks those passes as well as the seeds. Floating-point sums in another batch size differ
in their last bits: the comparison is relative, at ``RTOL[dtype]`` of the run's denoiser (float32
rows agree to about 2e-7 on the CPU, well inside 1e-5, while single-head effects on small models are
1e-4 and more).
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
from .config import DATASETS, AnalysisConfig
from .phases import Experiment

# losses of one image alone vs the same image inside a batch of conditions, by the denoiser's dtype
RTOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}
TABLES = ("ablations", "circuit_eval", "role_ablations")
SPLITS = ("selection", "heldout")  # circuit_eval's split column, by circuit_splits' index
ROLE_INPUTS = ("aggregates", "layers")  # the tables roles are assigned from (and features_maps where written)


class RecomputeError(InputError):
    """A folder, table or row that cannot be recomputed (missing, out of range, unknown mode or
    condition, a circuit_eval row without its circuit.parquet)."""


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


def check_row(folder, table: str, row: int) -> pd.Series:
    """Row ``row`` of ``folder/table.parquet`` once everything that can be checked before the model
    loads is (``stored_row``; for circuit_eval also its dataset, split, condition and mode, and the
    folder's circuit.parquet); ``RecomputeError`` otherwise."""
    r = stored_row(folder, table, row)
    if table == "ablations" and r["mode"] not in ("zero", "mean"):
        raise RecomputeError(f"row {row}: unknown ablation mode {r['mode']!r}")
    if table == "circuit_eval":
        if r["dataset"] not in DATASETS or r["split"] not in SPLITS or r["condition"] not in ("circuit", "random"):
            raise RecomputeError(f"row {row}: dataset {r['dataset']!r}, split {r['split']!r}, condition "
                                 f"{r['condition']!r}: not a row the circuit evaluation writes")
        # the reference means are those of the run's circuit_ablation: another mode was never computed
        run_mode = config_of(folder).circuit_ablation
        if r["mode"] != run_mode:
            raise RecomputeError(f"row {row}: mode {r['mode']!r} is not the run's circuit ablation {run_mode!r}")
        if not (Path(folder) / "circuit.parquet").is_file():
            raise RecomputeError(f"{folder} has no circuit.parquet: circuit_eval rows need the circuit they evaluate")
    if table == "role_ablations":
        if r["dataset"] not in DATASETS or r["control"] not in ("role", "random"):
            raise RecomputeError(f"row {row}: dataset {r['dataset']!r}, control {r['control']!r}: not a row the role "
                                 "ablations write")
        missing = [name for name in ROLE_INPUTS if not (Path(folder) / f"{name}.parquet").is_file()]
        if missing:
            raise RecomputeError(f"{folder} has no {', '.join(f'{m}.parquet' for m in missing)}: role_ablations rows "
                                 "need the tables their roles are assigned from")
    return r


def _predictions_alone(exp: Experiment, x_t, t: int, interventions: list) -> tuple:
    """(clean, ablated): the model's predictions (1, C, H, W) for one image's x_t (1, C, H, W), clean
    and with these interventions, in one pass each."""
    with torch.no_grad():
        clean = exp.forward(exp.unet, x_t, t)
        with exp.session.intervene(interventions):
            return clean, exp.forward(exp.unet, x_t, t)


def _losses_alone(exp: Experiment, x_t, target, t: int, interventions: list) -> dict:
    """{loss_clean, loss_ablated}: the MSE of one image's prediction (x_t (1, C, H, W)) against its
    target, clean and with these interventions (``_predictions_alone``)."""
    want = target.float()
    clean, ablated = _predictions_alone(exp, x_t, t, interventions)
    return {"loss_clean": float((clean - want).square().mean()),
            "loss_ablated": float((ablated - want).square().mean())}


def _result(table: str, row: int, r: pd.Series, columns: tuple, recomputed: dict, exp: Experiment) -> Recomputed:
    """The ``Recomputed`` of stored row r: its key columns, and its columns of ``recomputed``."""
    key = {k: (r[k].item() if hasattr(r[k], "item") else r[k]) for k in columns}
    return Recomputed(table, row, key, {k: float(r[k]) for k in recomputed}, recomputed, RTOL[exp.c.dtype])


def recompute_ablation(folder, row: int, experiment: Experiment | None = None) -> Recomputed:
    """Row ``row`` (0-based) of ``folder/ablations.parquet`` rerun on its image alone: the clean
    loss and the loss with the row's head zero- or mean-ablated (the mean over the row's ablation
    batch at its timestep, as the run computed it). experiment: an already loaded ``Experiment``
    of the folder's configuration (to recompute several rows without reloading the model)."""
    folder = Path(folder)
    r = check_row(folder, "ablations", row)
    exp = experiment or Experiment(config_of(folder))
    t, layer, head = int(r["timestep"]), str(r["layer"]), int(r["head"])
    ids, _, _, x_t, target = exp.ablation_batch(str(r["dataset"]), t)
    if int(r["image"]) not in ids:
        raise RecomputeError(f"row {row}: image {int(r['image'])} is not in the {r['dataset']} ablation batch")
    b = ids.index(int(r["image"]))
    if r["mode"] == "zero":
        ablation = Zero(layer, head)
    else:
        with torch.no_grad():
            ablation = Mean(layer, head, means=mean_head_outputs(exp.session, lambda x: exp.forward(exp.unet, x, t),
                                                                 [x_t]))
    recomputed = _losses_alone(exp, x_t[b:b + 1], target[b:b + 1], t, [ablation])
    return _result("ablations", row, r, ("dataset", "timestep", "layer", "head", "mode", "image"), recomputed, exp)


def recompute_circuit_eval(folder, row: int, experiment: Experiment | None = None) -> Recomputed:
    """Row ``row`` (0-based) of ``folder/circuit_eval.parquet`` rerun on its image alone: the clean
    loss and the loss with the row's head set removed (the heads outside its dataset's circuit in
    ``circuit.parquet``, or the rep-th random set of as many), zeroed or mean-ablated with the
    selection split's means at the row's timestep, through the conditions
    ``Experiment.circuit_eval_conditions`` builds for the run. experiment: as for
    ``recompute_ablation``."""
    folder = Path(folder)
    r = check_row(folder, "circuit_eval", row)
    exp = experiment or Experiment(config_of(folder))
    name, split, t, image = str(r["dataset"]), SPLITS.index(r["split"]), int(r["timestep"]), int(r["image"])
    splits = exp.circuit_splits()
    if image not in splits[name][split]:
        raise RecomputeError(f"row {row}: image {image} is not in the {name} {r['split']} split")
    removed, randoms = exp.circuit_removed_sets(pd.read_parquet(folder / "circuit.parquet"))
    if int(r["n_removed"]) != len(removed[name]):
        raise RecomputeError(f"row {row}: n_removed {int(r['n_removed'])}, but circuit.parquet's {name} circuit "
                             f"removes {len(removed[name])} heads")
    conditions, tags = exp.circuit_eval_conditions(name, split, t, removed[name], randoms[name], splits)
    tag = (str(r["condition"]), int(r["rep"]))
    if tag not in tags:
        raise RecomputeError(f"row {row}: no {tag[0]} set {tag[1]} on the {r['split']} split (the run evaluated "
                             f"{len(randoms[name])} random sets, on the held-out split only)")
    d = exp.data[name]
    x_t, target = exp.noisy(d, [image], d.x0[[image]], t)
    recomputed = _losses_alone(exp, x_t, target, t, conditions[tags.index(tag)])
    return _result("circuit_eval", row, r, ("dataset", "split", "timestep", "condition", "mode", "rep", "image"),
                   recomputed, exp)


def recompute_role_ablation(folder, row: int, experiment: Experiment | None = None) -> Recomputed:
    """Row ``row`` (0-based) of ``folder/role_ablations.parquet`` rerun on its image alone: the
    row's error of the clean prediction and of the prediction with the row's role heads, or its
    rep-th layer-matched random set, zero-ablated (``Experiment.role_conditions``, roles assigned
    from the folder's trace and feature tables as the run assigned them), scored by
    ``Experiment.condition_errors``. experiment: as for ``recompute_ablation``."""
    folder = Path(folder)
    r = check_row(folder, "role_ablations", row)
    exp = experiment or Experiment(config_of(folder))
    inputs = [*ROLE_INPUTS, *(["features_maps"] if (folder / "features_maps.parquet").is_file() else [])]
    exp.tables.update({name: pd.read_parquet(folder / f"{name}.parquet") for name in inputs})
    conditions, tags = exp.role_conditions()
    tag = (str(r["role"]), str(r["control"]), int(r["rep"]))
    if tag not in tags:
        raise RecomputeError(f"row {row}: role {tag[0]!r}, control {tag[1]!r}, rep {tag[2]}: not a condition of the "
                             "run's role assignment")
    t, image = int(r["timestep"]), int(r["image"])
    ids, x0, labels, x_t, target = exp.ablation_batch(str(r["dataset"]), t)
    if image not in ids:
        raise RecomputeError(f"row {row}: image {image} is not in the {r['dataset']} ablation batch")
    one = slice(ids.index(image), ids.index(image) + 1)
    predictions = torch.stack(_predictions_alone(exp, x_t[one], t, conditions[tags.index(tag)]))  # (2, 1, C, H, W)
    errors = exp.condition_errors(x_t[one], predictions, target[one], x0[one], labels[one], t)
    if r["error_name"] not in errors:
        raise RecomputeError(f"row {row}: unknown error {r['error_name']!r} (the run scores {', '.join(errors)})")
    e = errors[r["error_name"]]  # (2, 1): clean, ablated
    recomputed = {"err_clean": float(e[0, 0]), "err_ablated": float(e[1, 0])}
    return _result("role_ablations", row, r, ("dataset", "timestep", "role", "control", "rep", "image", "error_name"),
                   recomputed, exp)


RECOMPUTE = {"ablations": recompute_ablation, "circuit_eval": recompute_circuit_eval,
             "role_ablations": recompute_role_ablation}


def recompute(folder, table: str, row: int, experiment: Experiment | None = None) -> Recomputed:
    """Row ``row`` of ``folder/table.parquet`` recomputed (``recompute_ablation``,
    ``recompute_circuit_eval``); ``RecomputeError`` for a table of none of them."""
    if table not in RECOMPUTE:
        stored_row(folder, table, row)  # raises, naming the tables that can be recomputed
    return RECOMPUTE[table](folder, row, experiment=experiment)


__all__ = ["RTOL", "SPLITS", "TABLES", "RecomputeError", "Recomputed", "check_row", "config_of", "recompute",
           "recompute_ablation", "recompute_circuit_eval", "recompute_role_ablation", "stored_row"]
