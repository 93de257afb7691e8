"""End-to-end benchmark: one diffusers forward pass with diffcirc's processor vs diffusers' own.

Implementations per case (each checked against AttnProcessor2_0 before timing):
  sdpa             diffusers' AttnProcessor2_0 (the baseline)
  fused            FusedAttnProcessor, no statistics
  fused+entropy    inside session.trace(Recorder(stats=("entropy",)))
  fused+all        entropy, distance, label_mass (with a label map)
  materialising    a hook computing the same entropy from attn.get_attention_scores (DAAM-style)
Cases: an SD-like Transformer2DModel block (width 320 / 640, 8 heads, D = 40 / 80, cross-attention
to 77 text tokens) at a 64x64 latent (N = 4096), and the paper-like tiny UNet2DModel (32x32 input,
3 attention layers x 8 heads x 256 channels at 8x8). Then a sweep of every single-head zero
ablation of the tiny UNet (plus the clean run): batched by run_conditions (at several batch sizes)
vs one condition at a time.

    python benchmarks/bench_unet.py                 # full sizes
    python benchmarks/bench_unet.py --quick         # small sizes, for development
    python benchmarks/bench_unet.py --conditions 9 25 --max-batch 8 40 200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from contextlib import contextmanager

import torch
from diffusers import Transformer2DModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffcirc.bench.harness import machine_info, measurers, summarize  # noqa: E402
from diffcirc.cli._checks import non_negative, positive  # noqa: E402
from diffcirc.ops import extension  # noqa: E402
from diffcirc.processor import FusedAttnProcessor, Recorder, Session, Zero, run_conditions  # noqa: E402

IMPLEMENTATIONS = ("sdpa", "fused", "fused+entropy", "fused+all", "materialising")


# ---------------------------------------------------------------------------------------------
# models and inputs

def sd_block(width: int, latent: int, batch: int, device):
    """Transformer2DModel like one SD 1.x block: 8 heads of width / 8, cross-attention to 77 x 768."""
    torch.manual_seed(0)
    model = Transformer2DModel(num_attention_heads=8, attention_head_dim=width // 8, in_channels=width,
                               norm_num_groups=32, cross_attention_dim=768, num_layers=1).eval().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, width, latent, latent, generator=g).to(device)
    enc = torch.randn(batch, 77, 768, generator=g).to(device)
    return model, (lambda: model(x, encoder_hidden_states=enc).sample), batch


def tiny_unet(batch: int, device):
    """UNet2DModel, 32x32 input; attention at 8x8: 2 in the last down block + 1 in the mid block, 8 x 32."""
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                        block_out_channels=(64, 128, 256), down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=32,
                        norm_num_groups=32).eval().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    t = torch.full((batch,), 500, device=device)
    return model, (lambda: model(x, t).sample), batch


def label_map(batch: int, size: int, device):
    """A centred square "face" (1) on background (0), at image resolution."""
    labels = torch.zeros(batch, size, size, dtype=torch.long, device=device)
    labels[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return labels


# ---------------------------------------------------------------------------------------------
# implementations: context managers under which the model's forward runs

def set_processors(model, factory):
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            m.set_processor(factory(name))


class MaterialisingEntropy:
    """diffusers' classic attention with probabilities from attn.get_attention_scores, from which it
    computes per-query entropy and keeps per-head running sums (what DAAM-style hooks do).

    sums[name] = [sum over queries (H,) float64, number of queries per head]."""

    def __init__(self, name: str, sums: dict):
        self.name, self.sums = name, sums

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*H, Nq, Nk): the N x N buffer
        entropy = -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(-1)
        entropy = entropy.view(batch, attn.heads, -1)
        slot = self.sums.setdefault(self.name, [0.0, 0])
        slot[0] = slot[0] + entropy.double().sum(dim=(0, 2))
        slot[1] += entropy.shape[0] * entropy.shape[2]
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def implementation(name: str, model, labels, state: dict):
    """Installs one implementation for the duration of the block; state collects what it recorded."""
    if name == "sdpa":
        set_processors(model, lambda n: AttnProcessor2_0())
        yield
    elif name == "fused":
        set_processors(model, lambda n: FusedAttnProcessor())
        yield
    elif name == "materialising":
        sums = state.setdefault("sums", {})
        set_processors(model, lambda n: MaterialisingEntropy(n, sums))
        yield
    else:
        stats = ("entropy",) if name == "fused+entropy" else ("entropy", "distance", "label_mass")
        recorder = state.setdefault("recorder", Recorder(stats=stats))
        set_processors(model, lambda n: AttnProcessor2_0())
        with Session(model).trace(recorder, labels=labels if "label_mass" in stats else None):
            yield
    set_processors(model, lambda n: AttnProcessor2_0())


# ---------------------------------------------------------------------------------------------
# measurement

def measure(fn, device, warmup: int, repeats: int) -> dict:
    """ms, ms_min, ms_max (harness.summarize) of repeats calls of fn() after warmup untimed ones,
    and the peak extra memory of one more call (harness.measurers: CUDA events and the allocator's
    peak on cuda, the wall clock and resident memory on the CPU)."""
    time_call, peak = measurers(device)
    times = time_call(lambda _: fn(), None, repeats, warmup=warmup)
    return {**summarize(times), "peak_extra_bytes": peak(fn)}


def bench_case(case: str, model, forward, labels, args, device) -> list:
    rows, reference, entropy = [], None, {}
    for name in args.impl:
        state: dict = {}
        with implementation(name, model, labels, state), torch.no_grad():
            out = forward()
            if reference is None and name == "sdpa":
                reference = out
            err = (out - reference).abs().max().item() if reference is not None else float("nan")
            # checked before timing: a wrong implementation is never timed; nan (no sdpa reference
            # yet, or a nan output) is refused too
            if not err <= args.tolerance:
                raise AssertionError(f"{case} / {name}: output differs from AttnProcessor2_0 by {err:.3g}"
                                     + (" (no sdpa reference before it)" if reference is None else ""))
            measured = measure(forward, device, args.warmup, args.repeats)
        if "recorder" in state:
            f = state["recorder"].to_frame()
            f = f[f.stat == "entropy"]
            entropy[name] = {(layer, head): m for layer, head, m in zip(f["layer"], f["head"], f["mean"])}
        if "sums" in state:
            entropy[name] = {(layer, head): (s / n)[head].item() for layer, (s, n) in state["sums"].items()
                             for head in range(len(s))}
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
        assert means.keys() == reference.keys(), f"{case}: {name} recorded other layers than the materialising hook"
        worst = max(abs(means[k] - reference[k]) for k in means)
        if worst > tol:
            raise AssertionError(f"{case}: {name} mean entropy differs from the materialising hook by {worst:.3g}")


SWEEP_HEADER = (f"{'conditions':>10} {'images':>6} {'implementation':14} {'max_batch':>9} {'passes':>6} {'ms':>9} "
                f"{'images/s':>9} {'speed-up':>8} {'peak MiB':>9} {'err':>8}")


def format_sweep_row(r: dict) -> str:
    """One line of the sweep table (SWEEP_HEADER); speed-up is throughput over one at a time."""
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


def sweep(args, device, log=print) -> list:
    """Rows of the ablation sweep of the tiny UNet on args.sweep_images images: for each count in
    args.conditions (default: all), the conditions one at a time, then batched by run_conditions
    with each of args.max_batch elements per pass (default: default_max_batches). Logs each row."""
    model, _, _ = tiny_unet(1, device)
    session = Session(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(args.sweep_images, 3, 32, 32, generator=g).to(device)
    t = torch.full((args.sweep_images,), 500, device=device)
    forward = lambda xt: model(*xt).sample  # noqa: E731
    # every option is validated before the first (long) measurement
    lists = [ablation_conditions(session, count) for count in args.conditions or [None]]
    too_small = [mb for mb in args.max_batch or [] if mb < args.sweep_images]
    if too_small:
        raise ValueError(f"max_batch {too_small} below the {args.sweep_images} images of one condition")
    rows = []
    for conditions in lists:
        max_batches = args.max_batch or default_max_batches(len(conditions), args.sweep_images)
        rows += sweep_case(session, forward, (x, t), conditions, max_batches, args, device, log)
    return rows


def sweep_case(session, forward, inputs, conditions, max_batches, args, device, log=print) -> list:
    """Rows for one list of C conditions on inputs (x (B, 3, 32, 32), t (B,)): one at a time, then
    batched at each max_batch. Each is checked before it is timed: every condition against one at
    a time, and the clean one against the model's own processors (no session installed)."""
    images = inputs[0].shape[0]

    def one_at_a_time():  # -> (C, B, 3, 32, 32)
        outs = []
        for cond in conditions:
            with session.intervene(cond):
                outs.append(forward(inputs))
        return torch.stack(outs)

    runs = [("one at a time", None, len(conditions), one_at_a_time)]
    for mb in max_batches:
        passes = math.ceil(len(conditions) / (mb // images))  # sweep() refuses mb < images
        batched = lambda mb=mb: run_conditions(session, forward, inputs, conditions, max_batch=mb)  # noqa: E731
        runs.append(("batched", mb, passes, batched))
    rows = []
    with torch.no_grad():
        reference, clean = one_at_a_time(), forward(inputs)
        for name, mb, passes, fn in runs:
            out = reference if fn is one_at_a_time else fn()
            err = max((out[0] - clean).abs().max().item(), (out - reference).abs().max().item())
            if not err <= args.tolerance:  # checked before timing: a wrong (or nan) run is never timed
                raise AssertionError(f"sweep {len(conditions)} conditions / {name} (max_batch {mb}): differs from "
                                     f"one condition at a time or the model's own clean forward by {err:.3g}")
            row = {"case": "tiny-unet sweep", "implementation": name, "conditions": len(conditions), "images": images,
                   "max_batch": mb, "passes": passes, **measure(fn, device, args.warmup, args.sweep_repeats),
                   "max_abs_err": err}
            row["images_per_s"] = len(conditions) * images / (row["ms"] / 1e3)
            row["speedup_vs_one_at_a_time"] = (rows[0] if rows else row)["ms"] / row["ms"]  # rows[0]: one at a time
            rows.append(row)
            log(format_sweep_row(row))
    return rows


FULL = {"latent": 64, "unet_batch": 16, "sweep_images": 8, "repeats": 5, "sweep_repeats": 3}
QUICK = {"latent": 16, "unet_batch": 2, "sweep_images": 1, "repeats": 2, "sweep_repeats": 1, "conditions": [9]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--latent", type=positive(int),
                   help=f"SD-block latent side, N = latent^2 (default {FULL['latent']}, --quick {QUICK['latent']})")
    p.add_argument("--widths", type=positive(int), nargs="+", default=[320, 640], help="SD-block widths (8 heads each)")
    p.add_argument("--sd-batch", type=positive(int), default=1)
    p.add_argument("--unet-batch", type=positive(int),
                   help=f"default {FULL['unet_batch']}, --quick {QUICK['unet_batch']}")
    p.add_argument("--sweep-images", type=positive(int),
                   help=f"default {FULL['sweep_images']}, --quick {QUICK['sweep_images']}")
    p.add_argument("--conditions", type=positive(int), nargs="+",
                   help="sweep: numbers of conditions, the clean run + the first single-head ablations "
                        f"(default: all, --quick {QUICK['conditions'][0]})")
    p.add_argument("--max-batch", type=positive(int), nargs="+",
                   help="sweep: batch elements per batched pass (default: images x 1, 5 and all conditions)")
    p.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    p.add_argument("--warmup", type=non_negative(int), default=1)
    p.add_argument("--repeats", type=positive(int), help=f"default {FULL['repeats']}, --quick {QUICK['repeats']}")
    p.add_argument("--sweep-repeats", type=positive(int),
                   help=f"default {FULL['sweep_repeats']}, --quick {QUICK['sweep_repeats']}")
    p.add_argument("--threads", type=positive(int), default=2)
    p.add_argument("--tolerance", type=non_negative(float), default=1e-3,
                   help="max abs output error vs AttnProcessor2_0")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--quick", action="store_true", help="16x16 latent, small batches, 2 repeats, 9 sweep conditions")
    p.add_argument("--json", help="write the results here")
    return p


def finish_args(args):
    """Fills the sizes left unset from QUICK (with --quick) or FULL and puts the sdpa baseline
    first in args.impl, added if missing: every other implementation is checked against its output,
    so it must run before them (in place); returns args."""
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.impl = ["sdpa", *[name for name in args.impl if name != "sdpa"]]
    return args


def setup(args):
    """Threads and warning filters for a run; returns the torch device."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*Transformer2DModelOutput.*", category=FutureWarning)
    return torch.device(args.device)


def cases(args, device) -> list:
    """(name, build() -> (model, forward, batch), image size) for the SD blocks and the tiny UNet."""
    out = [(f"sd-block w{w} D{w // 8} {args.latent}x{args.latent}", lambda w=w: sd_block(w, args.latent, args.sd_batch, device),
            args.latent) for w in args.widths]
    out.append((f"tiny-unet 32x32 b{args.unet_batch}", lambda: tiny_unet(args.unet_batch, device), 32))
    return out


FORWARD_HEADER = f"{'case':28} {'implementation':16} {'ms':>9} {'vs sdpa':>8} {'peak MiB':>9} {'err':>8}"


def forward_rows(args, device, log=print) -> list:
    """Rows of every case x implementation (see bench_case); logs each row."""
    rows = []
    for case, build, size in cases(args, device):
        model, forward, batch = build()
        for r in bench_case(case, model, forward, label_map(batch, size, device), args, device):
            rows.append(r)
            log(f"{case:28} {r['implementation']:16} {r['ms']:>9.2f} {r['vs_sdpa']:>7.2f}x "
                f"{r['peak_extra_bytes'] / 2**20:>9.1f} {r['max_abs_err_vs_sdpa']:>8.1e}")
    return rows


def main(argv=None) -> int:
    args = finish_args(build_parser().parse_args(argv))
    device = setup(args)
    ext = extension.load()
    path = f"compiled extension diffcirc._C ({ext.cpu_isa()})" if ext is not None else \
        "float64 reference (diffcirc._C not built): fused timings are NOT representative"
    print(f"op path: {path}; threads: {torch.get_num_threads()}; device: {device}")
    print(FORWARD_HEADER)
    print("-" * len(FORWARD_HEADER))
    log = lambda line: print(line, flush=True)  # noqa: E731
    rows = forward_rows(args, device, log)
    sweep_rows = None
    if not args.no_sweep:
        print(f"\nsweep: the clean run + single-head zero ablations, {args.sweep_images} image(s) each; speed-up is "
              "throughput over one condition at a time")
        print(SWEEP_HEADER)
        print("-" * len(SWEEP_HEADER))
        sweep_rows = sweep(args, device, log)

    if args.json:
        meta = {**machine_info(), "op_path": "extension" if ext is not None else "reference", "device": str(device),
                "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows, "sweep": sweep_rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
