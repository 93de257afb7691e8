"""End-to-end benchmark: one diffusers forward pass with diffcirc's processor vs diffusers' own, i.e.
``diffcirc bench unet`` (options: ``diffcirc bench unet --help``).

Implementations per case, each checked against AttnProcessor2_0 before it is timed: sdpa
(AttnProcessor2_0), fused, fused+entropy, fused+all (statistics recorded by a Session) and
materialising (a DAAM-style hook on attn.get_attention_scores). Cases: SD-like transformer blocks
(width 320 / 640) at a 64x64 latent and the paper-like tiny UNet at 32x32.

    python benchmarks/bench_unet.py                 # full sizes
    python benchmarks/bench_unet.py --quick         # small sizes, for development
"""

import sys

from diffcirc.cli import main as diffcirc_main


def main(argv=None) -> int:
    return diffcirc_main(["bench", "unet", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
