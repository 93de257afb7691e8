"""Cases and closeness rules shared by the attention op's test modules (on every device)."""

import math

import torch

from diffcirc.bench.cases import DTYPES  # noqa: F401  name -> torch dtype ("f32", "bf16", "f16"): also the test ids
from diffcirc.ops import STAT_NAMES as ALL_STATS


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


def plain_pytorch(q, k, v, scale=None):
    """Attention computed naively in the inputs' own dtype: the error yardstick for f16/bf16."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1) @ v


def out_tol(dtype) -> float:
    """Largest |out - float64 reference| allowed for the kernels' outputs on random unit-normal inputs."""
    return 2e-5 if dtype == torch.float32 else 2e-2


def assert_out_close(out, ref, q, k, v, dtype, **kw):
    err = (out.double() - ref.out).abs().max().item()
    if dtype == torch.float32:
        assert err <= 2e-5, err
    else:
        # flash-attention's rule: at most twice the error of plain PyTorch in the same dtype
        base = (plain_pytorch(q, k, v, **kw).double() - ref.out).abs().max().item()
        assert err <= 2 * base + 1e-5, (err, base)


def assert_stats_close(result, ref, dtype, names):
    atol = 2e-4 if dtype == torch.float32 else 1e-3
    for name in names:
        got, want = getattr(result, name), getattr(ref, name)
        assert got is not None and got.dtype == torch.float32 and got.device == want.device
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite), name
        assert torch.allclose(got.double()[finite], want[finite], atol=atol, rtol=1e-4), (
            name, (got.double()[finite] - want[finite]).abs().max().item())


def grid_for(n):
    side = int(math.isqrt(n))
    return (side, n // side) if side * (n // side) == n else (1, n)


def full_case(B, H, Nq, Nk, D, Dv, dtype, device="cpu", masked=True):
    """q, k, v and keyword arguments exercising every statistic (and a padding mask)."""
    q, k, v = (rand(B, H, Nq, D, dtype=dtype, device=device), rand(B, H, Nk, D, dtype=dtype, device=device),
               rand(B, H, Nk, Dv, dtype=dtype, device=device))
    kw = dict(stats=ALL_STATS, grid=(grid_for(Nq), grid_for(Nk)),
              labels=(torch.randint(0, 5, (B, Nq), device=device), torch.randint(0, 5, (B, Nk), device=device)))
    if masked:
        mask = torch.rand(B, Nk, device=device) > 0.3
        mask[:, 0] = True
        kw["key_padding_mask"] = mask
    return q, k, v, kw
