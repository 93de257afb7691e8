"""The ablation-sweep benchmark behind ``diffcirc bench sweep``: the clean run plus single-head zero
ablations of the tiny UNet, one condition at a time vs batched by run_conditions at several batch
sizes, every batched run checked against one at a time before it is timed."""

from __future__ import annotations

import math

import torch

from diffcirc.bench import gate, measure, workloads
from diffcirc.bench.configs import SweepConfig
from diffcirc.processor import Session, Zero, run_conditions

HEADER = (f"{'conditions':>10} {'images':>6} {'implementation':14} {'max_batch':>9} {'passes':>6} {'ms':>9} "
          f"{'images/s':>9} {'speed-up':>8} {'peak MiB':>9} {'err':>8}")


def format_row(r: dict) -> str:
    """One line of the table (HEADER); speed-up is throughput over one at a time."""
    max_batch = "-" if r["max_batch"] is None else r["max_batch"]
    return (f"{r['conditions']:>10} {r['images']:>6} {r['implementation']:14} {max_batch:>9} {r['passes']:>6} "
            f"{r['ms']:>9.1f} {r['images_per_s']:>9.1f} {r['speedup_vs_one_at_a_time']:>7.2f}x "
            f"{r['peak_extra_bytes'] / 2**20:>9.1f} {r['max_abs_err']:>8.1e}")


def ablation_conditions(session, count: int | None = None) -> list:
    """The clean run ([]) then the first count - 1 single-head zero ablations (default: all)."""
    conditions = [[]] + [[Zero(layer, h)] for layer, h in session.heads()]
    count = len(conditions) if count is None else count
    if not 1 <= count <= len(conditions):
        raise ValueError(f"{count} conditions: this model has 1 to {len(conditions)} (the clean run + one per head)")
    return conditions[:count]


def default_max_batches(count: int, images: int) -> list:
    """Elements per batched pass: one condition (the batching machinery alone), 5 and all count."""
    return sorted({images * k for k in (1, 5, count) if k <= count})


def run_sweep(cfg: SweepConfig, device, log=print) -> list:
    """Rows of the ablation sweep of the tiny UNet on cfg.images images: for each count in
    cfg.conditions, the conditions one at a time, then batched with each of cfg.max_batch elements
    per pass. Raises ValueError, before anything is measured, for a count the model does not have
    or a max_batch below one condition's images. Logs each row."""
    model = workloads.tiny_unet_model(device)
    session = Session(model)
    inputs = workloads.tiny_unet_inputs(cfg.images, device, seed=2)
    lists = [ablation_conditions(session, count) for count in cfg.conditions or [None]]
    too_small = [mb for mb in cfg.max_batch or () if mb < cfg.images]
    if too_small:
        raise ValueError(f"max_batch {too_small} below the {cfg.images} images of one condition")
    rows = []
    for conditions in lists:
        max_batches = cfg.max_batch or default_max_batches(len(conditions), cfg.images)
        rows += sweep_case(session, lambda xt: model(*xt).sample, inputs, conditions, max_batches, cfg, device, log)
    return rows


def sweep_case(session, forward, inputs, conditions, max_batches, cfg: SweepConfig, device, log=print) -> list:
    """Rows for one list of C conditions on inputs (x (B, 3, 32, 32), t (B,)): one at a time, then
    batched at each max_batch (each >= B). Each is checked before it is timed: every condition
    against one at a time, and the clean one against the model's own processors (no session
    installed); a wrong (or nan) run raises gate.IncorrectImplementation."""
    images = inputs[0].shape[0]

    def one_at_a_time():  # -> (C, B, 3, 32, 32)
        outs = []
        for cond in conditions:
            with session.intervene(cond):
                outs.append(forward(inputs))
        return torch.stack(outs)

    runs = [("one at a time", None, len(conditions), one_at_a_time)]
    for mb in max_batches:
        passes = math.ceil(len(conditions) / (mb // images))
        batched = lambda mb=mb: run_conditions(session, forward, inputs, conditions, max_batch=mb)  # noqa: E731
        runs.append(("batched", mb, passes, batched))
    rows = []
    with torch.no_grad():
        reference, clean = one_at_a_time(), forward(inputs)
        for name, mb, passes, fn in runs:
            out = reference if fn is one_at_a_time else fn()
            err = max((out[0] - clean).abs().max().item(), (out - reference).abs().max().item())
            if not err <= cfg.tolerance:  # checked before timing: a wrong (or nan) run is never timed
                raise gate.IncorrectImplementation(
                    f"sweep {len(conditions)} conditions / {name} (max_batch {mb}): differs from one condition "
                    f"at a time or the model's own clean forward by {err:.3g}")
            row = {"case": "tiny-unet sweep", "implementation": name, "conditions": len(conditions), "images": images,
                   "max_batch": mb, "passes": passes, **measure.measure(fn, device, cfg.warmup, cfg.repeats),
                   "max_abs_err": err}
            row["images_per_s"] = len(conditions) * images / (row["ms"] / 1e3)
            row["speedup_vs_one_at_a_time"] = (rows[0] if rows else row)["ms"] / row["ms"]  # rows[0]: one at a time
            rows.append(row)
            log(format_row(row))
    return rows
