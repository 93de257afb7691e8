"""``diffcirc report DIR``: re-render summary.json and the report from saved tables, without the model."""

from ._checks import reports_input_errors, writable_folder


def register(subparsers):
    p = subparsers.add_parser("report", help="rebuild summary.json, report.html and report.md from a run folder",
                              description=__doc__.splitlines()[0])
    p.add_argument("folder", type=writable_folder, help="output folder of `diffcirc analyze` (rewritten in place)")
    p.set_defaults(func=run)
    return p


@reports_input_errors
def run(args) -> int:
    from pathlib import Path

    from ..analysis.summary import summarise
    from ..report import print_summary, render

    folder = Path(args.folder)
    if not (folder / "meta.json").exists():
        raise FileNotFoundError(f"{folder} is not a diffcirc analysis folder (no meta.json)")
    summary = summarise(folder)
    render(folder)
    print_summary(summary)
    print(f"\nreport: {folder / 'report.html'}")
    return 0
