"""The UNet benchmarks behind ``diffcirc bench unet`` and ``diffcirc bench sweep``: run the functions
of ``benchmarks/bench_unet.py`` (the module itself, imported from the source checkout) and return
their rows."""

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


def _prepare(argv: list):
    """(bench_unet module, its finished args, torch device) from bench_unet's own options."""
    mod = load_bench_unet()
    args = mod.finish_args(mod.build_parser().parse_args(argv))
    return mod, args, mod.setup(args)


def run_unet(argv: list, log=print):
    """Runs the forward-pass cases (argv: bench_unet's own options); returns (rows, args)."""
    mod, args, device = _prepare(argv)
    log(mod.FORWARD_HEADER)
    return mod.forward_rows(args, device, log), args


def run_sweep(argv: list, log=print):
    """Runs the batched ablation sweep (argv: bench_unet's own options); returns (rows, args).
    Raises ValueError for a number of conditions or a max_batch the model cannot take."""
    mod, args, device = _prepare(argv)
    log(mod.SWEEP_HEADER)
    return mod.sweep(args, device, log), args
