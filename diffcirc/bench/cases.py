"""The op benchmark's inputs: dtypes by name and one random case per (batch, heads, N, head dim)."""

from __future__ import annotations

import torch

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def make_case(b: int, h: int, n: int, d: int, dtype: torch.dtype, seed: int = 0, device="cpu") -> dict:
    """q, k, v (b, h, n, d) of dtype, the token grids ((hq, wq), (hk, wk)) of a square image where n
    is a square number (else one row of n tokens) and labels (q_labels, k_labels), each (b, n) in [0, 8)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, device=device).to(dtype) for _ in range(3))
    side = int(n**0.5)
    grid = ((side, n // side), (side, n // side)) if side * (n // side) == n else ((1, n), (1, n))
    labels = tuple(torch.randint(0, 8, (b, n), generator=g, device=device) for _ in range(2))
    return {"q": q, "k": k, "v": v, "grid": grid, "labels": labels}
