"""The ablation-sweep benchmark behind ``diffcirc bench sweep``: the clean run plus single-head zero
ablations of a model (the bundled UNet by default; an SD 1.5-architecture UNet2DConditionModel at a
32x32 latent, ``sd15``), one condition at a time vs batched by run_conditions in full passes vs
batched and resumed from the clean pass at the first stage each condition changes (reuse), at
several batch sizes; every run is checked against one at a time before it is timed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from diffcirc.bench import gate, measure, workloads
from diffcirc.bench.configs import SweepConfig
from diffcirc.processor import Session, Zero, run_conditions

HEADER = (f"{'conditions':>10} {'images':>6} {'implementation':15} {'max_batch':>9} {'passes':>6} {'ms':>9} "
          f"{'images/s':>9} {'speed-up':>8} {'cpu s':>7} {'peak MiB':>9} {'err':>8}")
IMPLEMENTATIONS = ("one at a time", "batched", "batched + reuse")
DEFAULT_MODELS = ("bundled",)


@dataclass
class SweepModel:
    """A model of the sweep: its case name, the module, inputs(images, device, seed) and
    forward(inputs) -> the output tensor (images, ...)."""

    case: str
    model: torch.nn.Module
    inputs: Callable
    forward: Callable


def bundled_model(device) -> SweepModel:
    """The study's bundled UNet2DModel (3 attention layers x 8 heads at 8x8) on 32x32 images at t = 500."""
    from diffcirc.models import load

    model, _ = load("bundled", device=str(device))
    return SweepModel("bundled-unet sweep", model, workloads.tiny_unet_inputs, lambda xt: model(*xt).sample)


def sd15_model(device, latent: int = 32) -> SweepModel:
    """Stable Diffusion 1.5's UNet2DConditionModel architecture (its default config: 16 transformer
    blocks, 32 attention layers x 8 heads), seeded random weights, at a latent x latent latent and
    77 random text tokens of 768, t = 500."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768).eval().to(device)

    def inputs(images: int, device, seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        x, enc = torch.randn(images, 4, latent, latent, generator=g), torch.randn(images, 77, 768, generator=g)
        return x.to(device), enc.to(device)

    return SweepModel(f"sd15-unet-{latent} sweep", model, inputs,
                      lambda xe: model(xe[0], 500, encoder_hidden_states=xe[1]).sample)


def tiny_unet(device) -> SweepModel:
    """The random-weights tiny UNet of the UNet benchmark (attention in the last down block and the mid block)."""
    model = workloads.tiny_unet_model(device)
    return SweepModel("tiny-unet sweep", model, workloads.tiny_unet_inputs, lambda xt: model(*xt).sample)


MODELS = {"bundled": bundled_model, "sd15": sd15_model, "tiny-unet": tiny_unet}


def format_row(r: dict) -> str:
    """One line of the table (HEADER); speed-up is throughput over one at a time; cpu s (the
    process's CPU time) only for rows timed in one run."""
    max_batch = "-" if r["max_batch"] is None else r["max_batch"]
    cpu = "-" if r.get("cpu_ms") is None else f"{r['cpu_ms'] / 1e3:.1f}"
    return (f"{r['conditions']:>10} {r['images']:>6} {r['implementation']:15} {max_batch:>9} {r['passes']:>6} "
            f"{r['ms']:>9.1f} {r['images_per_s']:>9.1f} {r['speedup_vs_one_at_a_time']:>7.2f}x {cpu:>7} "
            f"{r['peak_extra_bytes'] / 2**20:>9.1f} {r['max_abs_err']:>8.1e}")


def ablation_conditions(session, count: int | None = None, heads_per_layer: int | None = None) -> list:
    """The clean run ([]) then the first count - 1 single-head zero ablations (default: all) of
    every head, or of the first heads_per_layer heads of each layer (a sample spread over the
    layers as all heads are)."""
    heads = [(layer, h) for layer, h in session.heads() if heads_per_layer is None or h < heads_per_layer]
    conditions = [[]] + [[Zero(layer, h)] for layer, h in heads]
    count = len(conditions) if count is None else count
    if not 1 <= count <= len(conditions):
        raise ValueError(f"{count} conditions: this model has 1 to {len(conditions)} (the clean run + one per head)")
    return conditions[:count]


def default_max_batches(count: int, images: int) -> list:
    """Elements per batched pass: one condition (the batching machinery alone), 5 and all count."""
    return sorted({images * k for k in (1, 5, count) if k <= count})


def run_sweep(cfg: SweepConfig, device, log=print, models=DEFAULT_MODELS, heads_per_layer: int | None = None) -> list:
    """Rows of the ablation sweep of each of models (names of MODELS) on cfg.images images: for each
    count in cfg.conditions, the conditions (``ablation_conditions``) one at a time, then batched in
    full passes and batched with reuse, each with each of cfg.max_batch elements per pass. Raises
    ValueError, before anything is measured, for a model name it does not know, a count a model
    does not have or a max_batch below one condition's images. Logs each row."""
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        raise ValueError(f"unknown sweep models {unknown}; known: {', '.join(MODELS)}")
    too_small = [mb for mb in cfg.max_batch or () if mb < cfg.images]
    if too_small:
        raise ValueError(f"max_batch {too_small} below the {cfg.images} images of one condition")
    built = [MODELS[name](device) for name in models]
    sessions = [Session(m.model) for m in built]
    lists = [[ablation_conditions(s, count, heads_per_layer) for count in cfg.conditions or [None]] for s in sessions]
    rows = []
    for m, session, per_count in zip(built, sessions, lists):
        inputs = m.inputs(cfg.images, device, seed=2)
        for conditions in per_count:
            max_batches = cfg.max_batch or default_max_batches(len(conditions), cfg.images)
            rows += sweep_case(session, m.forward, inputs, conditions, max_batches, cfg, device, log, case=m.case)
    return rows


def sweep_case(session, forward, inputs, conditions, max_batches, cfg: SweepConfig, device, log=print,
               case: str = "bundled-unet sweep") -> list:
    """Rows for one list of C conditions on inputs (a tuple whose first tensor is (B, ...)): one at
    a time, then batched in full passes and batched with reuse at each max_batch (each >= B). Each
    is checked before it is timed: every condition against one at a time, and the clean one against
    the model's own processors (no session installed); a wrong (or nan) run raises
    gate.IncorrectImplementation. passes counts forward_fn calls (reuse's clean pass included).
    With cfg.warmup 0 and cfg.repeats 1 each row comes from one run: the checked run is the timed
    one and its peak memory is read as it runs (for models too slow to run each row thrice)."""
    images = inputs[0].shape[0]
    calls = [0]

    def counted(batch):
        calls[0] += 1
        return forward(batch)

    def one_at_a_time():  # -> (C, B, ...)
        outs = []
        for cond in conditions:
            with session.intervene(cond):
                outs.append(counted(inputs))
        return torch.stack(outs)

    runs = [("one at a time", None, one_at_a_time)]
    for reuse, name in ((False, "batched"), (True, "batched + reuse")):
        for mb in max_batches:
            runs.append((name, mb, lambda mb=mb, reuse=reuse: run_conditions(session, counted, inputs, conditions,
                                                                           max_batch=mb, reuse=reuse)))
    once = cfg.warmup == 0 and cfg.repeats == 1
    rows = []
    with torch.no_grad():
        if once:
            reference, timing = _run_once(one_at_a_time, device)
        else:
            reference = one_at_a_time()
        clean = forward(inputs)
        scale = max(reference.abs().max().item(), 1.0)
        for name, mb, fn in runs:
            calls[0] = 0
            if fn is not one_at_a_time:
                out, timing = _run_once(fn, device) if once else (fn(), None)
            else:
                out = reference
            passes = len(conditions) if fn is one_at_a_time else calls[0]
            err = max((out[0] - clean).abs().max().item(), (out - reference).abs().max().item())
            if not err <= cfg.tolerance * scale:  # a wrong (or nan) run is never reported (nor, repeated, timed)
                raise gate.IncorrectImplementation(
                    f"sweep {len(conditions)} conditions / {name} (max_batch {mb}): differs from one condition "
                    f"at a time or the model's own clean forward by {err:.3g} (outputs up to {scale:.3g})")
            row = {"case": case, "implementation": name, "conditions": len(conditions), "images": images,
                   "max_batch": mb, "passes": passes,
                   **(timing if once else measure.measure(fn, device, cfg.warmup, cfg.repeats)), "max_abs_err": err}
            row["images_per_s"] = len(conditions) * images / (row["ms"] / 1e3)
            row["speedup_vs_one_at_a_time"] = (rows[0] if rows else row)["ms"] / row["ms"]  # rows[0]: one at a time
            rows.append(row)
            log(format_row(row))
    return rows


def _run_once(fn, device) -> tuple:
    """(fn()'s output, {ms, ms_min, ms_max, cpu_ms, peak_extra_bytes}) of one call, timed and its
    peak memory read as it runs. cpu_ms is this process's CPU time (all threads): with one thread
    it counts only the time the process ran, so on a machine shared with other jobs it moves far
    less than the wall clock (with more, threads waiting at a barrier spin and count). On Linux the
    CPU peak is the kernel's resident-set high-water mark (reset first): no sampling thread adds to
    cpu_ms."""
    cuda = getattr(device, "type", device) == "cuda"
    kept = {}

    def timed():
        if cuda:
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        kept["out"] = fn()
        if cuda:
            torch.cuda.synchronize()
        kept["s"], kept["cpu_s"] = time.perf_counter() - start, time.process_time() - cpu

    peak = measure.high_water_growth(timed) if not cuda else None
    if peak is None:
        peak = measure.measurers(device)[1](timed)
    return kept["out"], {**measure.summarize([kept["s"]]), "cpu_ms": kept["cpu_s"] * 1e3, "peak_extra_bytes": peak}
