"""Ablation-sweep benchmark: the clean run plus single-head zero ablations of the tiny UNet, batched by
run_conditions at several batch sizes vs one condition at a time, i.e. ``diffcirc bench sweep``
(options: ``diffcirc bench sweep --help``). Every batched run is checked against one at a time
before it is timed.

    python benchmarks/bench_sweep.py                # all 25 conditions x 8 images
    python benchmarks/bench_sweep.py --quick        # 9 conditions x 1 image
    python benchmarks/bench_sweep.py --conditions 9 25 --max-batch 8 40 200 --images 8
"""

import sys

from diffcirc.cli import main as diffcirc_main


def main(argv=None) -> int:
    return diffcirc_main(["bench", "sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
