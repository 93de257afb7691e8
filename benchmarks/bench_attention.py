"""Op-level benchmark: diffcirc's fused attention vs PyTorch SDPA vs the materialising path, i.e.
``diffcirc bench op`` (options: ``diffcirc bench op --help``).

For every case (batch, heads, N, head dim, dtype) and implementation it checks the output against
the float64 reference first, then times it (median of repeats after a warm-up) and measures the
peak extra memory of one call; writes results.json (with the machine, torch version, CPU ISA path
and commit), results.csv and plots into --out.

    python benchmarks/bench_attention.py                       # the full CPU table
    python benchmarks/bench_attention.py --quick               # one small case per dtype
    python benchmarks/bench_attention.py --shapes 4096x64 --dtype f32 --out runs/bench/mine
    python benchmarks/bench_attention.py --device cuda          # GPU: fused vs SDPA flash/efficient,
                                                                # xformers and flash-attn where installed
"""

import sys

from diffcirc.cli import main as diffcirc_main


def main(argv=None) -> int:
    return diffcirc_main(["bench", "op", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
