"""Joint-attention benchmark (diffcirc.bench.joint): one Flux-like joint layer (4096 image + 512 text
tokens, D = 128), per-token heatmaps over the 512 text tokens. SDPA vs fused vs fused + key-group
mass vs the materialising map: ms and peak extra memory in one run, each implementation checked
against the float64 reference first; writes results.json and results.csv into --out.

    python benchmarks/bench_joint.py                    # 4 heads, bf16, on the CPU
    python benchmarks/bench_joint.py --heads 24         # Flux's full layer
    python benchmarks/bench_joint.py --device cuda --heads 24
"""

import argparse
import os

import torch

from diffcirc.bench import joint
from diffcirc.bench.cases import DTYPES
from diffcirc.bench.machine import machine_info
from diffcirc.bench.results import write_results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=joint.HEADS, help=f"default {joint.HEADS} (Flux: {joint.FLUX_HEADS})")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--n-img", type=int, default=joint.N_IMG)
    p.add_argument("--n-txt", type=int, default=joint.N_TXT)
    p.add_argument("--d", type=int, default=joint.D)
    p.add_argument("--repeats", type=int, default=joint.REPEATS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--impl", nargs="+", choices=list(joint.IMPLEMENTATIONS), help="default: all")
    p.add_argument("--out", default=os.path.join("runs", "bench", "joint"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = joint.run_joint(h=a.heads, dtype=a.dtype, n_img=a.n_img, n_txt=a.n_txt, d=a.d, repeats=a.repeats,
                           names=a.impl, device=a.device)
    for line in joint.summary_lines(rows):
        print(line)
    for path in write_results(a.out, {**machine_info(), "args": vars(a)}, rows):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
