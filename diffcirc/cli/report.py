"""``diffcirc report DIR``: re-render summary.json and the report from saved tables, without the model."""

from __future__ import annotations

from pathlib import Path

from ._checks import reports_input_errors, writable_folder


def register(subparsers):
    p = subparsers.add_parser("report", help="rebuild summary.json, report.html and report.md from a run folder",
                              description=__doc__.splitlines()[0])
    p.add_argument("folder", type=writable_folder, help="output folder of `diffcirc analyze` (rewritten in place)")
    p.set_defaults(func=run)
    return p


def write_report(folder, **settings) -> int:
    """summary.json, report.html and report.md of an analysis folder, and the key numbers on the
    terminal. settings: ``summarise``'s n_resamples and seed (its defaults where missing)."""
    from ..analysis.summary import summarise
    from ..report import print_summary, render

    summary = summarise(folder, **settings)
    render(folder, summary=summary)
    print_summary(summary)
    print(f"\nreport: {Path(folder) / 'report.html'}  (also report.md, summary.json, tables *.parquet)")
    return 0


def summary_settings(meta: dict) -> dict:
    """The bootstrap size and seed a run was made with (meta.json's config), as ``summarise``
    arguments: a rebuilt summary equals the one ``diffcirc analyze`` wrote."""
    config = meta.get("config") or {}
    return {arg: config[key] for arg, key in (("n_resamples", "bootstrap"), ("seed", "seed")) if key in config}


@reports_input_errors
def run(args) -> int:
    from ..analysis.summary import read_meta

    folder = Path(args.folder)
    meta = read_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"{folder} is not a diffcirc analysis folder (no meta.json)")
    return write_report(folder, **summary_settings(meta))
