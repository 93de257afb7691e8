"""The UNet benchmark behind ``diffcirc bench unet``: runs ``benchmarks/bench_unet.py``'s cases (the
module itself, imported from the source checkout) and returns its rows."""

from __future__ import annotations

import importlib.util
import os
import sys

BENCH_UNET = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "benchmarks", "bench_unet.py")


def load_bench_unet():
    """benchmarks/bench_unet.py as a module (needs diffusers and a source checkout)."""
    if not os.path.exists(BENCH_UNET):
        raise FileNotFoundError(f"{BENCH_UNET} not found: `diffcirc bench unet` runs from a source checkout")
    if "bench_unet" in sys.modules:
        return sys.modules["bench_unet"]
    spec = importlib.util.spec_from_file_location("bench_unet", BENCH_UNET)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_unet"] = module
    spec.loader.exec_module(module)
    return module


def run_unet(argv: list, log=print):
    """Runs the bench_unet cases (argv: bench_unet's own options); returns (rows, sweep or None, args)."""
    import warnings

    import torch

    mod = load_bench_unet()
    args = mod.finish_args(mod.build_parser().parse_args(argv))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message=".*Transformer2DModelOutput.*", category=FutureWarning)
    rows = []
    log(f"{'case':28} {'implementation':16} {'ms':>9} {'vs sdpa':>8} {'peak MiB':>9} {'err':>8}")
    for case, build, size in mod.cases(args, device):
        model, forward, batch = build()
        for r in mod.bench_case(case, model, forward, mod.label_map(batch, size, device), args, device):
            rows.append(r)
            log(f"{case:28} {r['implementation']:16} {r['ms']:>9.2f} {r['vs_sdpa']:>7.2f}x "
                f"{r['peak_extra_bytes'] / 2**20:>9.1f} {r['max_abs_err_vs_sdpa']:>8.1e}")
    sweep = None if args.no_sweep else mod.sweep(args, device)
    if sweep:
        log(f"sweep: batched {sweep['batched_ms']:.1f} ms vs one at a time {sweep['one_at_a_time_ms']:.1f} ms "
            f"({sweep['throughput_ratio']:.2f}x)")
    return rows, sweep, args
