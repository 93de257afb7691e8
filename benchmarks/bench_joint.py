"""Joint-attention benchmark: one Flux-like joint layer (4096 image + 512 text tokens, D = 128) read as
per-token heatmaps over the 512 text tokens, i.e. ``diffcirc bench joint`` (options: ``diffcirc bench
joint --help``). SDPA vs fused vs fused + key-group mass vs the materialising map: ms and peak extra
memory in one run, each implementation checked against the float64 reference first.

    python benchmarks/bench_joint.py                    # 4 heads, bf16, on the CPU
    python benchmarks/bench_joint.py --heads 24         # Flux's full layer
    python benchmarks/bench_joint.py --device cuda --heads 24
"""

import sys

from diffcirc.cli import main as diffcirc_main


def main(argv=None) -> int:
    return diffcirc_main(["bench", "joint", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
