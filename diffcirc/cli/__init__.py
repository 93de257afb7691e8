"""The ``diffcirc`` command. Each sub-command is a module in this package exposing

    register(subparsers) -> argparse.ArgumentParser   (sets ``func`` on the parser via set_defaults)

and is discovered automatically, so adding a command never edits this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffcirc",
        description="Mechanistic interpretability of diffusion models with fused attention statistics "
                    "and head interventions. `diffcirc COMMAND --help` for each command.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
