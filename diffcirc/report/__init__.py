"""Reports from saved results: ``render(out_dir)`` writes report.html (self-contained) and
report.md (+ figures/*.png); ``print_summary(summary)`` prints the key numbers for the CLI.
Nothing here loads a model: everything comes from the tables the driver saved and
``summary.json`` (``diffcirc.analysis.summary.summarise``)."""

from .document import render
from .terminal import print_summary

__all__ = ["render", "print_summary"]
