"""Denoising quality: epsilon-prediction MSE of a UNet on held-out images at fixed timesteps.

    python -m diffcirc.models.evaluate --model bundled --data synthetic-gray,lfw --n 200
"""

from __future__ import annotations

import argparse
import json

import torch

TIMESTEPS = (100, 300, 500, 700, 900)


@torch.no_grad()
def eps_mse(unet, scheduler, images: torch.Tensor, timesteps=TIMESTEPS, seed: int = 0, batch_size: int = 50) -> dict[int, float]:
    """images: (N, C, S, S) in [-1, 1]. Returns {t: mean over images and pixels of (eps_hat - eps)^2}.

    The noise of image n at timestep t is fixed by ``seed`` (one generator, drawn in a fixed order),
    so two models evaluated with the same seed see the same noisy inputs.
    """
    g = torch.Generator().manual_seed(seed)
    alphas = scheduler.alphas_cumprod
    out = {}
    for t in timesteps:
        noise = torch.randn(images.shape, generator=g)
        a = alphas[t]
        total = 0.0
        for i in range(0, len(images), batch_size):
            x0, eps = images[i:i + batch_size], noise[i:i + batch_size]
            xt = (a.sqrt() * x0 + (1 - a).sqrt() * eps).to(unet.device, unet.dtype)
            tt = torch.full((len(x0),), t, dtype=torch.long, device=unet.device)
            pred = unet(xt, tt).sample.float().cpu()
            total += float(((pred - eps) ** 2).sum())
        out[int(t)] = total / images.numel()
    return out


def main(argv=None) -> int:
    from ..data import load_dataset
    from .load import load

    p = argparse.ArgumentParser(prog="python -m diffcirc.models.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--data", default="synthetic-gray,lfw", help="comma-separated dataset specs (held-out split)")
    p.add_argument("--n", type=int, default=200, help="images per dataset (LFW held-out has 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    unet, scheduler = load(args.model)
    size = unet.config.sample_size
    results = {}
    for spec in args.data.split(","):
        ds = load_dataset(spec, size=size, n=args.n, seed=args.seed, split="heldout")
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])
        per_t = eps_mse(unet, scheduler, images, seed=args.seed)
        results[spec] = {"n": len(ds), "per_t": per_t, "mean": sum(per_t.values()) / len(per_t)}
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
