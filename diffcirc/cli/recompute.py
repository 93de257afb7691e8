"""``diffcirc recompute DIR --table T --row K``: rerun rows of a finished run from its seeds.

Rows of its ablations, circuit_eval or role_ablations table, each printed as stored beside as
recomputed (exit 0 when they agree, 1 when one differs, 2 when a row cannot be recomputed)."""

from __future__ import annotations

from ._checks import non_negative, reports_input_errors

EXIT_DIFFERS = 1
EXIT_CANNOT_RECOMPUTE = 2  # not 1: a script must tell a row that differs from a request that was refused


def register(subparsers):
    p = subparsers.add_parser("recompute", help="rerun rows of a run's table and compare them with the stored ones",
                              description=__doc__.splitlines()[0])
    p.add_argument("folder", help="output folder of `diffcirc analyze`")
    # the tables of analysis.recompute.TABLES, named here rather than imported: that module loads
    # the model stack, which no other command's parser pays for (another table is refused, exit 2)
    p.add_argument("--table", default="ablations", help="the table: ablations (the default), circuit_eval or "
                                                        "role_ablations")
    p.add_argument("--row", type=non_negative(int), nargs="+", required=True,
                   help="0-based row numbers of the table (several: the model is loaded once)")
    p.set_defaults(func=run)
    return p


@reports_input_errors(exit_code=EXIT_CANNOT_RECOMPUTE)
def run(args) -> int:
    from ..analysis.phases import Experiment
    from ..analysis.recompute import check_row, config_of, recompute

    config = config_of(args.folder)
    for row in args.row:  # every row checked before the model loads
        check_row(args.folder, args.table, row)
    exp = Experiment(config)
    disagree = 0
    for row in args.row:
        r = recompute(args.folder, args.table, row, experiment=exp)
        key = ", ".join(f"{k} {v}" for k, v in r.key.items())
        print(f"{r.table} row {row}: {key}")
        for name, stored in r.stored.items():
            print(f"  {name:<13} stored {stored:.9g}  recomputed {r.recomputed[name]:.9g}")
        verdict = "agrees" if r.agrees else "DIFFERS"
        print(f"  {verdict}: largest relative difference {r.max_relative_difference:.2e} (tolerance {r.rtol:g})")
        disagree += not r.agrees
    return EXIT_DIFFERS if disagree else 0
