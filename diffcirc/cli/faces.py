"""``diffcirc faces``: export procedural synthetic faces (PNG images, label PNGs, attributes CSV)."""

from __future__ import annotations


def register(subparsers):
    p = subparsers.add_parser("faces", help="export synthetic faces: images/, labels/ (part ids 0-7), attributes.csv")
    p.add_argument("--n", type=int, default=100, help="number of faces (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first face; face i uses seed + i (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--grayscale", action="store_true", help="luminance repeated to 3 channels")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from diffcirc.data import export_faces

    path = export_faces(args.out, n=args.n, size=args.size, seed=args.seed, grayscale=args.grayscale)
    print(f"wrote {args.n} faces to {args.out} ({path})")
    return 0
