"""``diffcirc info``: what was built (same as ``python -m diffcirc.info``)."""


def register(subparsers):
    p = subparsers.add_parser("info", help="show the build: torch, extension, CPU ISA, CUDA archs")
    p.set_defaults(func=lambda args: __import__("diffcirc.info", fromlist=["main"]).main())
    return p
