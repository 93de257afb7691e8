"""Images as a latent model sees them: encoded by the pipeline's VAE, once, and cached on disk.

``encode_images`` takes the posterior mean (no sampling: the same image always gives the same
latent) and normalises it as the pipelines' image-to-image paths do:

    z = (mean - shift_factor) * scaling_factor                       SD, SDXL (shift 0), SD3, Flux
    z = (mean - latents_mean) * scaling_factor / latents_std         VAEs whose config has both

``LatentCache`` keeps each image's latent in a safetensors file named by what it depends on:
the VAE (its config and a digest of its weights), the image tensor's
bytes (so the resolution, the crop and the file's contents are all in it) and the image's
source. A changed model, size or dataset therefore never reads a stale file, and an interrupted
encoding (or a rerun over a larger set) encodes only the images without a file, in batches.
Files are written atomically. Decoding is never needed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..files import atomic_path
from ..memory import items_that_fit, pass_bytes

LATENTS = "latents"  # the tensor name in a cache file


def _vae_config(vae) -> dict:
    return dict(vae.config)


def encode_images(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, S, S) in [-1, 1] -> normalised latents (B, C, S/f, S/f) float32 on the CPU."""
    config = _vae_config(vae)
    param = next(vae.parameters())
    with torch.no_grad():
        mean = vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist.mean.float()
    scale = float(config.get("scaling_factor") or 1.0)
    latents_mean, latents_std = config.get("latents_mean"), config.get("latents_std")
    if latents_mean is not None and latents_std is not None:
        view = (1, -1, 1, 1)
        mu = torch.tensor(latents_mean, dtype=mean.dtype, device=mean.device).view(view)
        sd = torch.tensor(latents_std, dtype=mean.dtype, device=mean.device).view(view)
        return ((mean - mu) * scale / sd).cpu()
    shift = float(config.get("shift_factor") or 0.0)
    return ((mean - shift) * scale).cpu()


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes of every tensor): the VAE's
    identity, whatever folder it came from (hashing SD's 84M-parameter VAE takes about a second)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


class LatentCache:
    """Latents of image batches under ``root``, keyed as the module docstring says.

    vae: the loaded VAE (its config and weights are the model's part of the key); batch_size:
    images per VAE pass at most; max_bytes: the memory one pass may use (None: no bound): the
    first image is encoded alone and measured (``memory.pass_bytes``), the rest in batches that fit.
    """

    def __init__(self, root, vae: torch.nn.Module, batch_size: int = 8, max_bytes: Optional[int] = None):
        self.root = Path(root)
        self.vae = vae
        self.batch_size = int(batch_size)
        self.max_bytes = max_bytes
        self.model_key = _digest(_vae_config(vae), weights_digest(vae))
        self.encoded = 0  # images run through the VAE by this object (the rest came from the cache)
        self.passes: list = []  # images per VAE pass, in order

    def path(self, image: torch.Tensor, source: str) -> Path:
        """The cache file of one image (3, S, S) with this source."""
        data = image.detach().to(torch.float32).cpu().contiguous()
        key = _digest(self.model_key, list(data.shape), data.numpy().tobytes(), source)
        return self.root / key[:2] / f"{key}.safetensors"

    @staticmethod
    def _read(path: Path) -> Optional[torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            return None
        try:
            return load_file(str(path))[LATENTS]
        except (OSError, SafetensorError, KeyError):
            return None  # damaged or foreign: encoded again and replaced

    def latents(self, images: torch.Tensor, sources: Sequence[str]) -> torch.Tensor:
        """(N, C, h, w) float32 latents of images (N, 3, S, S) in [-1, 1]: each image's from its
        cache file, the others encoded in batches of at most ``batch_size`` (fewer where ``max_bytes``
        holds fewer) and written to theirs."""
        from safetensors.torch import save_file

        if len(sources) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(sources)} sources")
        paths = [self.path(image, source) for image, source in zip(images, sources)]
        found = [self._read(p) for p in paths]
        todo = [i for i, z in enumerate(found) if z is None]
        per_pass = self.batch_size if self.max_bytes is None else 1  # the first pass measures one image
        start = 0
        while start < len(todo):
            batch = todo[start:start + per_pass]
            if start == 0 and self.max_bytes is not None:
                device = next(self.vae.parameters()).device
                encoded, cost = pass_bytes(lambda: encode_images(self.vae, images[batch]), device)
                per_pass = items_that_fit(cost, self.max_bytes, cap=self.batch_size)
            else:
                encoded = encode_images(self.vae, images[batch])
            start += len(batch)
            self.encoded += len(batch)
            self.passes.append(len(batch))
            for i, latent in zip(batch, encoded):
                # its own storage, not a view of the batch (safetensors saves contiguous tensors only)
                found[i] = latent.clone(memory_format=torch.contiguous_format)
                with atomic_path(paths[i]) as tmp:
                    save_file({LATENTS: found[i]}, tmp, metadata={"source": str(sources[i])})
        return torch.stack(found)
