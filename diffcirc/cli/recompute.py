"""``diffcirc recompute DIR --row K``: rerun one row of a finished run from its seeds and print it
as stored beside as recomputed (exit 0 when they agree, 1 when they do not)."""

from __future__ import annotations

from ._checks import non_negative, reports_input_errors


def register(subparsers):
    p = subparsers.add_parser("recompute", help="rerun one row of a run's table and compare it with the stored one",
                              description=__doc__.splitlines()[0])
    p.add_argument("folder", help="output folder of `diffcirc analyze`")
    p.add_argument("--table", default="ablations", help="the table (default %(default)s, the only one so far: "
                                                         "role and circuit rows are not yet recomputable)")
    p.add_argument("--row", type=non_negative(int), nargs="+", required=True,
                   help="0-based row numbers of the table (several: the model is loaded once)")
    p.set_defaults(func=run)
    return p


@reports_input_errors
def run(args) -> int:
    from ..analysis.phases import Experiment
    from ..analysis.recompute import config_of, recompute_ablation, stored_row

    config = config_of(args.folder)
    for row in args.row:  # every row checked before the model loads
        stored_row(args.folder, args.table, row)
    exp = Experiment(config)
    disagree = 0
    for row in args.row:
        r = recompute_ablation(args.folder, row, experiment=exp)
        key = ", ".join(f"{k} {v}" for k, v in r.key.items())
        print(f"{r.table} row {row}: {key}")
        for name, stored in r.stored.items():
            print(f"  {name:<13} stored {stored:.9g}  recomputed {r.recomputed[name]:.9g}")
        verdict = "agrees" if r.agrees else "DIFFERS"
        print(f"  {verdict}: largest relative difference {r.max_relative_difference:.2e} (tolerance {r.rtol:g})")
        disagree += not r.agrees
    return 1 if disagree else 0
