"""The UNet benchmark behind ``diffcirc bench unet``: one diffusers forward pass per case with each
implementation of :mod:`diffcirc.bench.processors`, each checked against AttnProcessor2_0 before it
is timed (and the recorded entropies against the materialising hook's).

Cases: an SD-like Transformer2DModel block (width 320 / 640, 8 heads, D = 40 / 80,
cross-attention to 77 text tokens) at a 64x64 latent (N = 4096), and the paper-like tiny UNet2DModel
(32x32 input, 3 attention layers x 8 heads x 32 channels at 8x8)."""

from __future__ import annotations

import warnings

import torch

from diffcirc.bench import gate, measure, processors, workloads
from diffcirc.bench.configs import UnetConfig


def cases(cfg: UnetConfig, device) -> list:
    """(name, build() -> (model, forward, batch), image size) for the SD blocks and the tiny UNet."""
    out = [(f"sd-block w{w} D{w // 8} {cfg.latent}x{cfg.latent}",
            lambda w=w: workloads.sd_block(w, cfg.latent, cfg.sd_batch, device), cfg.latent) for w in cfg.widths]
    out.append((f"tiny-unet 32x32 b{cfg.unet_batch}", lambda: workloads.tiny_unet(cfg.unet_batch, device), 32))
    return out


def bench_case(case: str, model, forward, labels, cfg: UnetConfig, device) -> list:
    """Rows of one case, one per implementation of cfg.impl in that order: each forward checked
    against sdpa's (a wrong one, or one run before sdpa, raises gate.IncorrectImplementation before
    it is timed), then measured; vs_sdpa is the time ratio to sdpa."""
    rows, reference, entropy = [], None, {}
    for name in cfg.impl:
        state: dict = {}
        with processors.implementation(name, model, labels, state), torch.no_grad():
            out = forward()
            if reference is None and name == "sdpa":
                reference = out
            err = (out - reference).abs().max().item() if reference is not None else float("nan")
            # a nan error (no sdpa reference yet, or a nan output) passes no comparison: refused too
            if not err <= cfg.tolerance:
                raise gate.IncorrectImplementation(
                    f"{case} / {name}: output differs from AttnProcessor2_0 by {err:.3g}"
                    + (" (no sdpa reference before it)" if reference is None else ""))
            measured = measure.measure(forward, device, cfg.warmup, cfg.repeats)
        recorded = processors.mean_entropy(state)
        if recorded is not None:
            entropy[name] = recorded
        rows.append({"case": case, "implementation": name, **measured, "max_abs_err_vs_sdpa": err})
    _check_entropy(case, entropy)
    base = next((r["ms"] for r in rows if r["implementation"] == "sdpa"), None)
    for r in rows:
        r["vs_sdpa"] = r["ms"] / base if base else None
    return rows


def _check_entropy(case: str, entropy: dict, tol: float = 1e-4):
    """The fused recorder and the materialising hook must agree on every head's mean entropy."""
    reference = entropy.get("materialising")
    for name, means in entropy.items():
        if reference is None or name == "materialising":
            continue
        if means.keys() != reference.keys():
            raise gate.IncorrectImplementation(f"{case}: {name} recorded other layers than the materialising hook")
        worst = max(abs(means[k] - reference[k]) for k in means)
        if worst > tol:
            raise gate.IncorrectImplementation(
                f"{case}: {name} mean entropy differs from the materialising hook by {worst:.3g}")


HEADER = f"{'case':28} {'implementation':16} {'ms':>9} {'vs sdpa':>8} {'peak MiB':>9} {'err':>8}"


def format_row(r: dict) -> str:
    """One line of the table (HEADER)."""
    return (f"{r['case']:28} {r['implementation']:16} {r['ms']:>9.2f} {r['vs_sdpa']:>7.2f}x "
            f"{r['peak_extra_bytes'] / 2**20:>9.1f} {r['max_abs_err_vs_sdpa']:>8.1e}")


def run_unet(cfg: UnetConfig, device, log=print) -> list:
    """Rows of every case x implementation (see bench_case); logs each row once its case is done."""
    rows = []
    with warnings.catch_warnings():
        # diffusers deprecates the output class its own Transformer2DModel returns, once per forward
        warnings.filterwarnings("ignore", message=".*Transformer2DModelOutput.*", category=FutureWarning)
        for case, build, size in cases(cfg, device):
            model, forward, batch = build()
            case_rows = bench_case(case, model, forward, workloads.label_map(batch, size, device), cfg, device)
            for r in case_rows:
                log(format_row(r))
            rows += case_rows
    return rows
