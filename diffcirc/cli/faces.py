"""``diffcirc faces``: export procedural synthetic faces (PNG images, label PNGs, attributes CSV)."""

from __future__ import annotations

from ._checks import int_in, non_negative, positive, reports_input_errors, writable_folder


def register(subparsers):
    p = subparsers.add_parser("faces", help="export synthetic faces: images/, labels/ (part ids 0-7), attributes.csv")
    p.add_argument("--n", type=positive(int), default=100, help="number of faces (default: %(default)s)")
    # below 8 pixels a face has no room for its parts; the renderer supersamples, so memory grows as size^2
    p.add_argument("--size", type=int_in(8, 1024), default=64, help="side in pixels, 8 to 1024 (default: %(default)s)")
    p.add_argument("--seed", type=non_negative(int), default=0,
                   help="seed of the first face; face i uses seed + i (default: %(default)s)")
    p.add_argument("--out", type=writable_folder, required=True, help="output folder (checked to be writable first)")
    p.add_argument("--grayscale", action="store_true", help="luminance repeated to 3 channels")
    p.set_defaults(func=_run)
    return p


@reports_input_errors
def _run(args) -> int:
    from diffcirc.data import export_faces

    path = export_faces(args.out, n=args.n, size=args.size, seed=args.seed, grayscale=args.grayscale)
    print(f"wrote {args.n} faces to {args.out} ({path})")
    return 0
