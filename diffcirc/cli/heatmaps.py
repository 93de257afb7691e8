"""``diffcirc heatmaps``: DAAM-style per-token heatmaps of a text-conditioned pipeline on real images.

Each image is encoded by the pipeline's VAE (cached under OUT/latents), noised at each timestep
with the scheduler's own noising, and denoised once per timestep inside ``session.heatmaps``:
every cross- and joint-attention layer adds each image query's attention mass on each text token
(the fused op's key-group mass: no attention map is ever materialised), summed over heads,
layers and timesteps. Writes

    OUT/overlays/<image>/<token>_<text>.png   the normalised heatmap of each shown token on the image
    OUT/heatmaps.parquet                      image, source, token, token_text, row, col, value
                                              (value: mass per layer call, at the latent grid)
    OUT/tokens.parquet                        token, token_text, shown
    OUT/meta.json                             settings, model family, timesteps, counts

Resumable like ``analyze``: each image is a work unit (its overlays and its rows, written
atomically, recorded in OUT/manifest.json); a rerun with the same options skips the finished
images, and a folder of other options is refused.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import InputError
from ._checks import dataset_spec, device, model_name, non_negative, positive, reports_input_errors, writable_folder

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_TIMESTEPS = 3  # quantiles of the scheduler's training timesteps when --timesteps is not given
NOT_FINGERPRINTED = ("out", "wait", "batch_size", "vae_batch_size", "threads", "command", "func")


class HeatmapInputError(InputError):
    """Options that do not fit the model (a pixel model, a timestep outside its range, tokens it does not have)."""


def _timesteps(text):
    """'250,500 750' -> [250, 500, 750]: distinct integers >= 0 (each model's range is checked once it is loaded)."""
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"timesteps must be integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"timesteps must be integers >= 0, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"timesteps must be distinct, got {text!r}")
    return values


def _tokens(text):
    try:
        values = sorted({int(v) for v in text.replace(",", " ").split()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"tokens must be integer indices, got {text!r}") from None
    if not values or values[0] < 0:
        raise argparse.ArgumentTypeError(f"tokens must be indices >= 0, got {text!r}")
    return values


def register(subparsers):
    p = subparsers.add_parser("heatmaps", help="per-token heatmaps of a text-conditioned pipeline on images",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", type=model_name, required=True,
                   help="a diffusers pipeline folder (model_index.json) or a hub id in the local cache")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--prompt", default="", help="encoded once by the pipeline's text encoders (default: empty)")
    text.add_argument("--prompt-embeds", default=None,
                      help="a safetensors file with prompt_embeds (1, L, C) and, where the model takes it, "
                           "pooled_prompt_embeds (1, P), instead of --prompt")
    p.add_argument("--images", type=dataset_spec, required=True,
                   help="folder:PATH | celeba:PATH | lfw | photos | synthetic")
    p.add_argument("--n", type=positive(int), default=None,
                   help="number of images (default: every one; 1000 generated)")
    p.add_argument("--timesteps", type=_timesteps, default=None,
                   help=f"in the scheduler's units (default: {DEFAULT_TIMESTEPS} quantiles of its training timesteps)")
    p.add_argument("--size", type=positive(int), default=None, help="image resolution (default: the model's)")
    p.add_argument("--tokens", type=_tokens, default=None,
                   help="token indices to draw and tabulate (default: the prompt's own tokens; all with "
                        "--prompt-embeds)")
    p.add_argument("--max-sequence-length", type=positive(int), default=None,
                   help="T5 tokens of SD3 (default 256) and Flux (default 512)")
    p.add_argument("--guidance", type=non_negative(float), default=3.5,
                   help="Flux's guidance embedding, for models that have one (default %(default)s); no classifier-free "
                        "guidance is run")
    p.add_argument("--batch-size", type=positive(int), default=4, help="images per denoiser pass (default %(default)s)")
    p.add_argument("--vae-batch-size", type=positive(int), default=8, help="images per VAE pass (default %(default)s)")
    p.add_argument("--seed", type=non_negative(int), default=0, help="noise seed (default %(default)s)")
    p.add_argument("--device", type=device, default="cpu", help="default %(default)s")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="denoiser and text encoders (default %(default)s)")
    p.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=writable_folder, required=True, help="output folder (checked to be writable first)")
    p.add_argument("--wait", action="store_true", help="when another run holds --out, wait for it, then resume")
    p.set_defaults(func=run)
    return p


def settings_of(args) -> dict:
    """The options the results depend on: the fingerprint a folder is resumed under."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_FINGERPRINTED}


def _conditioning(pipe, args):
    if not pipe.is_latent:
        raise HeatmapInputError(f"{args.model!r} is an unconditional pixel model: it has no text tokens to map; "
                                "token heatmaps need a text-conditioned pipeline")
    if args.prompt_embeds:
        return pipe.read_embeds(args.prompt_embeds)
    return pipe.encode(args.prompt, args.max_sequence_length)


def _shown_tokens(conditioning, args) -> list:
    n = conditioning.n_tokens
    if args.tokens is None:
        return conditioning.shown_tokens()
    if args.tokens[-1] >= n:
        raise HeatmapInputError(f"--tokens {args.tokens[-1]} is out of range: the conditioning has {n} tokens")
    return list(args.tokens)


def _token_table(conditioning, shown):
    import pandas as pd

    texts = conditioning.tokens or [""] * conditioning.n_tokens
    return pd.DataFrame({"token": range(conditioning.n_tokens), "token_text": texts,
                         "shown": [i in set(shown) for i in range(conditioning.n_tokens)]})


@reports_input_errors
def run(args) -> int:
    from ..analysis.folder_lock import hold_folder

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with hold_folder(args.out, wait=args.wait):
        return _run(args)


def _run(args) -> int:
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from .. import __version__
    from ..analysis.config import noise_for
    from ..analysis.units import WorkUnits
    from ..data import load_dataset
    from ..files import write_json, write_table
    from ..models.latents import LatentCache
    from ..models.pipeline import load_pipeline
    from ..processor import Session, TokenHeatmaps

    start = time.time()
    out = Path(args.out)
    dtype = getattr(torch, args.dtype)
    pipe = load_pipeline(args.model, device=args.device, dtype=dtype, text=not args.prompt_embeds)
    conditioning = _conditioning(pipe, args)
    if pipe.vae is None:
        raise HeatmapInputError(f"{args.model!r} has no vae/ folder: images cannot be encoded to latents")
    size = pipe.check_size(args.size or pipe.image_size)
    try:
        timesteps = [int(pipe.noising.check(t)) for t in args.timesteps] if args.timesteps else \
            pipe.default_timesteps(DEFAULT_TIMESTEPS, size)
    except ValueError as e:
        raise HeatmapInputError(f"--timesteps: {e}") from None
    shown = _shown_tokens(conditioning, args)
    session = Session(pipe.model)
    if not any(layer.kind in ("cross", "joint") for layer in session.layers):
        raise HeatmapInputError(f"{args.model!r} has no cross- or joint-attention layers: nothing attends to text")
    denoiser = pipe.denoiser(conditioning, guidance=args.guidance)
    dataset = load_dataset(args.images, size=size, n=args.n, seed=args.seed)
    units = WorkUnits(out, {"settings": settings_of(args), "diffcirc": __version__})
    tokens = _token_table(conditioning, shown)
    write_table(tokens, out / "tokens.parquet")
    texts = dict(zip(tokens["token"], tokens["token_text"])) if conditioning.tokens else None
    cache = LatentCache(out / "latents", pipe.vae, args.vae_batch_size)

    ids = list(range(len(dataset)))
    todo = [i for i in ids if not units.done(_unit(i))]
    bar = tqdm(total=len(todo) * len(timesteps), desc="heatmaps", unit="pass")
    for chunk in (todo[k:k + args.batch_size] for k in range(0, len(todo), args.batch_size)):
        items = [dataset[i] for i in chunk]
        images = torch.stack([it["image"] for it in items]).float()
        sources = [it.get("source", "") for it in items]
        x0 = cache.latents(images, sources)
        maps = TokenHeatmaps(size=tuple(x0.shape[-2:]))
        for t in timesteps:
            x_t = pipe.noising.add_noise(x0, noise_for(args.seed, 0, chunk, t, x0.shape[1:]), t)
            maps.set_tags(image_ids=chunk)
            with torch.no_grad(), session.heatmaps(maps):
                denoiser.predict(x_t, t)
            bar.update(len(chunk))
        _save(out, units, maps, chunk, images, sources, shown, texts)
    bar.close()
    if todo or not units.done("heatmaps"):
        write_table(pd.concat([pd.read_parquet(out / _part(i)) for i in ids], ignore_index=True),
                    out / "heatmaps.parquet")
        units.finish("heatmaps", ["heatmaps.parquet", "tokens.parquet"], inputs=[_unit(i) for i in ids])
    side = size // pipe.vae_scale_factor
    write_json({"settings": settings_of(args), "family": pipe.family, "size": size, "latent_grid": [side, side],
                "timesteps": timesteps, "noise": [pipe.noising.describe(t) for t in timesteps],
                "images": len(ids), "resumed": len(ids) - len(todo), "latents_encoded": cache.encoded,
                "tokens": conditioning.n_tokens, "shown_tokens": shown, "wall_time_s": time.time() - start,
                "diffcirc": __version__}, out / "meta.json")
    print(f"heatmaps of {len(ids)} images ({len(ids) - len(todo)} from an earlier run) x {len(timesteps)} timesteps "
          f"{timesteps}: {out / 'heatmaps.parquet'}, overlays in {out / 'overlays'}")
    return 0


def _unit(image: int) -> str:
    return f"image-{image:06d}"


def _part(image: int) -> str:
    return f"parts/{_unit(image)}.parquet"


def _save(out: Path, units, maps, chunk: list, images, sources: list, shown: list, texts) -> None:
    """Each image of a finished batch: its overlays and its rows, then its unit in the manifest
    (a kill in between leaves the image unfinished, and a rerun redoes it)."""
    from ..files import write_table
    from ..report.heatmap_overlays import write_heatmap_overlays

    pictures = {i: (image + 1) / 2 for i, image in zip(chunk, images)}  # [-1, 1] -> [0, 1]
    written = write_heatmap_overlays(maps, pictures, out / "overlays", tokens=texts, which=shown)
    frame = maps.to_frame(tokens=shown)
    frame["token_text"] = frame["token"].map(texts) if texts else ""
    for i, source in zip(chunk, sources):
        rows = frame[frame["image"] == i].assign(source=source)
        write_table(rows[["image", "source", "token", "token_text", "row", "col", "value"]], out / _part(i))
        overlays = [str(Path(p).relative_to(out)) for p in written if Path(p).parent.name == str(i)]
        units.finish(_unit(i), overlays + [_part(i)])
