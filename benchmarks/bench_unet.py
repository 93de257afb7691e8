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
ablation of the tiny UNet (plus the clean run): batched by run_conditions vs one condition at a time.

    python benchmarks/bench_unet.py                 # full sizes
    python benchmarks/bench_unet.py --quick         # small sizes, for development
    python benchmarks/bench_unet.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from contextlib import contextmanager

import torch
from diffusers import Transformer2DModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from diffcirc.bench.harness import machine_info, peak_extra_memory  # noqa: E402
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

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, warmup: int, repeats: int) -> list:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_bytes(fn, device) -> int:
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    return peak_extra_memory(fn)


def bench_case(case: str, model, forward, labels, args, device) -> list:
    rows, reference, entropy = [], None, {}
    for name in args.impl:
        state: dict = {}
        with implementation(name, model, labels, state), torch.no_grad():
            out = forward()
            if reference is None and name == "sdpa":
                reference = out
            err = (out - reference).abs().max().item() if reference is not None else float("nan")
            if err > args.tolerance:  # checked before timing: a wrong implementation is never timed
                raise AssertionError(f"{case} / {name}: output differs from AttnProcessor2_0 by {err:.3g}")
            times = median_ms(forward, device, args.warmup, args.repeats)
            mem = peak_bytes(forward, device)
        if "recorder" in state:
            f = state["recorder"].to_frame()
            f = f[f.stat == "entropy"]
            entropy[name] = {(layer, head): m for layer, head, m in zip(f["layer"], f["head"], f["mean"])}
        if "sums" in state:
            entropy[name] = {(layer, head): (s / n)[head].item() for layer, (s, n) in state["sums"].items()
                             for head in range(len(s))}
        rows.append({"case": case, "implementation": name, "ms": statistics.median(times), "ms_min": min(times),
                     "ms_max": max(times), "peak_extra_bytes": mem, "max_abs_err_vs_sdpa": err})
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


def sweep(args, device) -> dict:
    model, _, _ = tiny_unet(1, device)
    session = Session(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(args.sweep_images, 3, 32, 32, generator=g).to(device)
    t = torch.full((args.sweep_images,), 500, device=device)
    conditions = [[]] + [[Zero(layer, h)] for layer, h in session.heads()]
    forward = lambda xt: model(*xt).sample  # noqa: E731
    max_batch = args.max_batch or len(conditions) * args.sweep_images

    def batched():
        return run_conditions(session, forward, (x, t), conditions, max_batch=max_batch)

    def one_at_a_time():
        outs = []
        for cond in conditions:
            with session.intervene(cond):
                outs.append(forward((x, t)))
        return torch.stack(outs)

    with torch.no_grad():
        err = (batched() - one_at_a_time()).abs().max().item()
        if err > args.tolerance:
            raise AssertionError(f"sweep: batched conditions differ from one at a time by {err:.3g}")
        tb = median_ms(batched, device, args.warmup, args.sweep_repeats)
        ts = median_ms(one_at_a_time, device, args.warmup, args.sweep_repeats)
    n = len(conditions) * args.sweep_images
    result = {"conditions": len(conditions), "images": args.sweep_images, "max_batch": max_batch,
              "batched_ms": statistics.median(tb), "one_at_a_time_ms": statistics.median(ts), "max_abs_err": err}
    result["batched_images_per_s"] = n / (result["batched_ms"] / 1e3)
    result["one_at_a_time_images_per_s"] = n / (result["one_at_a_time_ms"] / 1e3)
    result["throughput_ratio"] = result["one_at_a_time_ms"] / result["batched_ms"]
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--latent", type=int, default=64, help="SD-block latent side (N = latent^2)")
    p.add_argument("--widths", type=int, nargs="+", default=[320, 640], help="SD-block widths (8 heads each)")
    p.add_argument("--sd-batch", type=int, default=1)
    p.add_argument("--unet-batch", type=int, default=16)
    p.add_argument("--sweep-images", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=None, help="sweep: max batch elements per pass (default: all)")
    p.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sweep-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1e-3, help="max abs output error vs AttnProcessor2_0")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--quick", action="store_true", help="16x16 latent, small batches, 2 repeats")
    p.add_argument("--json", help="write the results here")
    return p


def finish_args(args):
    """Applies --quick and always includes the sdpa baseline (in place); returns args."""
    if args.quick:
        args.latent, args.unet_batch, args.sweep_images, args.repeats, args.sweep_repeats = 16, 2, 1, 2, 1
    if "sdpa" not in args.impl:
        args.impl = ["sdpa", *args.impl]
    return args


def cases(args, device) -> list:
    """(name, build() -> (model, forward, batch), image size) for the SD blocks and the tiny UNet."""
    out = [(f"sd-block w{w} D{w // 8} {args.latent}x{args.latent}", lambda w=w: sd_block(w, args.latent, args.sd_batch, device),
            args.latent) for w in args.widths]
    out.append((f"tiny-unet 32x32 b{args.unet_batch}", lambda: tiny_unet(args.unet_batch, device), 32))
    return out


def main(argv=None) -> int:
    args = finish_args(build_parser().parse_args(argv))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message=".*Transformer2DModelOutput.*", category=FutureWarning)

    ext = extension.load()
    path = f"compiled extension diffcirc._C ({ext.cpu_isa()})" if ext is not None else \
        "float64 reference (diffcirc._C not built): fused timings are NOT representative"
    print(f"op path: {path}; threads: {torch.get_num_threads()}; device: {device}")

    header = f"{'case':28} {'implementation':16} {'ms':>9} {'vs sdpa':>8} {'peak MiB':>9} {'err':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for case, build, size in cases(args, device):
        model, forward, batch = build()
        for r in bench_case(case, model, forward, label_map(batch, size, device), args, device):
            rows.append(r)
            print(f"{case:28} {r['implementation']:16} {r['ms']:>9.2f} {r['vs_sdpa']:>7.2f}x "
                  f"{r['peak_extra_bytes'] / 2**20:>9.1f} {r['max_abs_err_vs_sdpa']:>8.1e}")
        sys.stdout.flush()

    sweep_result = None
    if not args.no_sweep:
        s = sweep_result = sweep(args, device)
        print(f"\nsweep: {s['conditions']} conditions (clean + every single-head zero ablation) x {s['images']} images")
        print(f"  batched (max_batch {s['max_batch']}): {s['batched_ms']:.1f} ms, {s['batched_images_per_s']:.1f} images/s")
        print(f"  one at a time:            {s['one_at_a_time_ms']:.1f} ms, {s['one_at_a_time_images_per_s']:.1f} images/s")
        print(f"  throughput ratio batched / one at a time: {s['throughput_ratio']:.2f}x (max abs err {s['max_abs_err']:.1e})")

    if args.json:
        meta = {**machine_info(), "op_path": "extension" if ext is not None else "reference", "device": str(device),
                "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows, "sweep": sweep_result}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
