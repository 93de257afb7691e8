"""Calls without masks or key groups, where the CPU kernel computes each row in one pass
against the max of the key blocks before (csrc/cpu/row_fast_avx512.h), against the float64 reference.

The logits are constructed per key block (k[..., 0] sets them, q[..., 0] = 1), so that a row's max
climbs past its reference by more than the kernel's gap (the block is redone against its own max),
climbs by less (p above 1 is kept), falls, or meets NaN, +inf and -inf logits in a later block. Runs on
every kernel path (the ``kernel`` fixture), the two-pass ones included: they must agree.
"""

import math

import pytest
import torch

from diffcirc.ops import attention, reference_attention

from helpers.attention_cases import ALL_STATS, DTYPES, assert_stats_close, grid_for, out_tol

KEY_BLOCK = 512  # the CPU kernel's keys per tile (attention_kernel.cpp)
# lse is computed on every call; entropy, distance and label mass are summed in the same pass
ONE_PASS_STATS = [("lse",), ("lse", "entropy"), ALL_STATS]
STAT_IDS = ["plain", "entropy", "all-stats"]


def stat_inputs(q, k, stats, seed=0):
    """The grid and labels that distance and label mass need, when stats asks for them."""
    if "distance" not in stats:
        return {}
    g = torch.Generator().manual_seed(seed)
    B, Nq, Nk = q.shape[0], q.shape[2], k.shape[2]
    labels = (torch.randint(0, 4, (B, Nq), generator=g), torch.randint(0, 4, (B, Nk), generator=g))
    return dict(grid=(grid_for(Nq), grid_for(Nk)), labels=tuple(t.to(q.device) for t in labels))


def block_case(offsets, dtype, device, tail=37, D=64, Nq=33, seed=0):
    """q, k, v whose logits in key block b are offsets[b] plus unit noise (the last block ``tail``
    keys long, a partial vector), at scale 1."""
    g = torch.Generator().manual_seed(seed)
    Nk = KEY_BLOCK * (len(offsets) - 1) + tail
    q = torch.randn(2, 2, Nq, D, generator=g) * 0.1
    q[..., 0] = 1.0
    k = torch.randn(2, 2, Nk, D, generator=g) * 0.1
    shift = torch.tensor(offsets, dtype=torch.float32).repeat_interleave(KEY_BLOCK)[:Nk]
    k[..., 0] = shift + torch.randn(2, 2, Nk, generator=g)
    v = torch.randn(2, 2, Nk, D, generator=g)
    return q.to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device)


def check_against_reference(q, k, v, dtype, stats):
    kw = stat_inputs(q, k, stats)
    r = attention(q, k, v, scale=1.0, stats=stats, **kw)
    ref = reference_attention(q, k, v, scale=1.0, stats=stats, **kw)
    err = (r.out.double() - ref.out).abs().max().item()
    assert err <= out_tol(dtype), err
    assert_stats_close(r, ref, dtype, stats)


@pytest.mark.parametrize("stats", ONE_PASS_STATS, ids=STAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("offsets", [
    [0.0, 20.0, 40.0, 60.0],   # every block climbs past the reference max by far more than the gap
    [0.0, 5.0, 7.0, 7.5],      # climbs by less than the gap: p above 1 kept, no rescale
    [0.0, 7.9, 15.8, 23.7],    # just under the gap at every block, far above the first max in the end
    [60.0, 40.0, 20.0, 0.0],   # falls: every block after the first is far below the reference
    [-90.0, 0.0, -200.0, 3.0],  # p below float32's normal range, then a first max that is left behind
    [0.0, 120.0, 0.0],         # a jump past float32's e^-104: the earlier blocks' weight (alpha) is exactly 0
    [-200.0, 0.0],             # and from a first block far below
], ids=["climb-far", "climb-within-gap", "climb-at-gap", "fall", "underflow", "alpha-underflows", "alpha-underflows-2"])
def test_rows_whose_max_moves_between_key_blocks(offsets, dtype, stats, kernel):
    q, k, v = block_case(offsets, dtype, kernel)
    check_against_reference(q, k, v, dtype, stats)


@pytest.mark.parametrize("stats", ONE_PASS_STATS, ids=STAT_IDS)
@pytest.mark.parametrize("cols", [1, 15, 16, 17, 77, 512, 513])
def test_key_counts_around_vector_and_block_sizes(cols, stats, kernel):
    # partial last vectors (16 lanes) and key blocks; logits of spread sqrt(40) at scale 1
    g = torch.Generator().manual_seed(cols)
    q = torch.randn(1, 3, 20, 40, generator=g).to(kernel)
    k, v = (torch.randn(1, 3, cols, 40, generator=g).to(kernel) for _ in range(2))
    check_against_reference(q, k, v, torch.float32, stats)


@pytest.mark.parametrize("stats", ONE_PASS_STATS, ids=STAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_non_finite_logits_in_later_blocks(dtype, stats, kernel):
    # unmasked NaN and +inf logits poison their row whichever block they sit in, the first or a later
    # one (where a row already has a reference max); -inf logits are keys of weight 0; a row whose
    # first block is all -inf starts its max at the next block
    q, k, v = block_case([0.0, 1.0, 2.0], dtype, "cpu")
    k[0, 0, 600, 0] = float("nan")           # second block: every row of head (0, 0)
    k[0, 1, 1030, 0] = float("inf")          # third block (partial): +inf for every row (q[..., 0] = 1)
    k[1, 0, 5, 0] = float("inf")             # first block
    k[1, 0, 7, 0] = float("nan")             # and a NaN beside it
    k[1, 1, :KEY_BLOCK, 0] = -float("inf")   # head (1, 1): the whole first block at logit -inf
    k[1, 1, 700:705, 0] = -float("inf")      # and some later keys
    q, k, v = q.to(kernel), k.to(kernel), v.to(kernel)
    kw = stat_inputs(q, k, stats)
    r = attention(q, k, v, scale=1.0, stats=stats, **kw)
    ref = reference_attention(q, k, v, scale=1.0, stats=stats, **kw)
    bad = torch.zeros(2, 2, dtype=torch.bool)
    bad[0, 0] = bad[0, 1] = bad[1, 0] = True
    assert torch.equal(torch.isnan(ref.out).all(-1).all(-1).cpu(), bad)  # the oracle agrees
    for name in ("out", *stats):
        got = getattr(r, name).cpu()
        assert torch.isnan(got[bad]).all(), name
        assert torch.isfinite(got[~bad]).all(), name
    err = (r.out[1, 1].double() - ref.out[1, 1]).abs().max().item()
    assert err <= out_tol(dtype), err
    for name in stats:
        torch.testing.assert_close(getattr(r, name)[1, 1].double(), getattr(ref, name)[1, 1], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("scale,logit", [(3e38, -0.5), (1.0, 3e37), (1.0, -2e9)],
                         ids=["scale-near-float-max", "logits-near-float-max", "logits-far-below-zero"])
def test_extreme_scales_and_logits(scale, logit, kernel):
    # equal logits of any magnitude give uniform attention: the mean of v, lse = logit * scale + ln Nk
    Nk = 600
    q = torch.ones(1, 2, 5, 1, device=kernel)
    k = torch.full((1, 2, Nk, 1), logit, device=kernel)
    v = torch.randn(1, 2, Nk, 8, generator=torch.Generator().manual_seed(0)).to(kernel)
    r = attention(q, k, v, scale=scale, stats=("lse", "entropy"))
    torch.testing.assert_close(r.out, v.mean(2, keepdim=True).expand(1, 2, 5, 8), atol=1e-5, rtol=1e-5)
    assert torch.allclose(r.entropy, torch.full_like(r.entropy, math.log(Nk)), atol=1e-4)
    want = logit * scale + math.log(Nk)
    assert torch.allclose(r.lse.double(), torch.full(r.lse.shape, want, dtype=torch.float64, device=kernel),
                          rtol=1e-6, atol=1e-4)
