"""Token grids of attention layers and region labels resampled onto them.

Token n of an (h, w) grid is the pixel (r, c) = divmod(n, w) of the feature map, the order in
which diffusers flattens (B, C, h, w) into (B, h*w, C).
"""

from __future__ import annotations

import math

import torch


def infer_grid(n_tokens: int, input_hw: tuple[int, int] | None, layer: str = "?") -> tuple[int, int]:
    """(h, w) of a layer that sees n_tokens tokens of a 2-D model whose input is input_hw = (H, W).

    The rule: UNet down-sampling convolutions (kernel 3, stride 2, padding 1) map a side s to
    ceil(s / 2), so a feature map k levels down is (ceil(H / 2^k), ceil(W / 2^k)). The grid is
    the one for which h * w = n_tokens. Their product strictly decreases with k until it reaches
    1, so at most one grid fits; when none does (another down-sampling scheme, a patched
    transformer, an unknown input size) this raises ValueError rather than guessing a
    factorisation of n_tokens.
    """
    if input_hw is None:
        raise ValueError(f"layer {layer}: cannot infer the token grid of {n_tokens} tokens: the model's input size is "
                         "unknown (run the model inside the session's context, or set model.config.sample_size)")
    height, width = (int(s) for s in input_hw)
    f = 1
    while True:
        h, w = math.ceil(height / f), math.ceil(width / f)
        if h * w == n_tokens:
            return h, w
        if h * w < n_tokens or (h == 1 and w == 1):
            break
        f *= 2
    raise ValueError(f"layer {layer}: cannot infer the token grid of {n_tokens} tokens from the model input "
                     f"{height}x{width}: no power-of-two down-sampling (ceil(H/2^k), ceil(W/2^k)) has {n_tokens} tokens")


def sample_size_hw(config) -> tuple[int, int] | None:
    """(H, W) from a diffusers config's sample_size (int or pair), or None."""
    size = getattr(config, "sample_size", None) if config is not None else None
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def tile_batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Repeats t (b, ...) along dim 0 to (batch, ...) when batch is a multiple of b.

    A forward pass often runs k copies of the same images (classifier-free guidance concatenates
    [uncond, cond]; ``run_conditions`` concatenates C blocks), element e being image e % b.
    """
    b = t.shape[0]
    if b == batch:
        return t
    if b == 0 or batch % b:
        raise ValueError(f"{what}: has {b} rows, but the forward pass has batch {batch} (need equal or a divisor)")
    return t.repeat(batch // b, *([1] * (t.dim() - 1)))


def labels_to_grid(label_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resampling of region labels onto a token grid.

    Args:
        label_map: (B, S_h, S_w) integer region ids at image resolution.
        grid: (h, w) token grid of the layer.

    Returns:
        (B, h * w) int64, token (r, c) taking the label of the pixel under its centre:
        label_map[:, floor((r + 0.5) * S_h / h), floor((c + 0.5) * S_w / w)]
        (the same as F.interpolate(mode="nearest-exact")).
    """
    if label_map.dim() != 3 or label_map.is_floating_point():
        raise ValueError(f"labels must be an integer tensor (B, S, S), got {label_map.dtype} {tuple(label_map.shape)}")
    h, w = grid
    sh, sw = label_map.shape[1:]
    rows = ((torch.arange(h, device=label_map.device, dtype=torch.float64) + 0.5) * (sh / h)).floor().long().clamp_(max=sh - 1)
    cols = ((torch.arange(w, device=label_map.device, dtype=torch.float64) + 0.5) * (sw / w)).floor().long().clamp_(max=sw - 1)
    return label_map[:, rows][:, :, cols].reshape(label_map.shape[0], h * w).long()
