"""The fused attention op against its float64 reference (and PyTorch's own attention), on every device.

One suite, run per device (the ``device`` fixture: "cpu", then "cuda", skipped without a GPU) or per
kernel path (the ``kernel`` fixture: the CPU kernel at each instruction set, then the CUDA kernel).
The tests at the end check what only the CUDA kernel has: launch limits, streams, device placement,
and agreement with the CPU kernel.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from diffcirc.ops import attention, reference_attention

from helpers.attention_cases import DTYPES
from helpers.attention_cases import ALL_STATS, assert_out_close, assert_stats_close, full_case, grid_for, out_tol, rand


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("D", [32, 40, 64, 80, 96, 128, 160, 192, 256, 512])
def test_head_dims_all_stats(dtype, D, kernel):
    q, k, v, kw = full_case(2, 2, 97, 130, D, D, dtype, device=kernel)
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert r.out.dtype == dtype and r.out.shape == (2, 2, 97, D) and r.out.device.type == kernel
    assert (r.out.double() - ref.out).abs().max().item() <= out_tol(dtype)
    assert_stats_close(r, ref, dtype, ALL_STATS)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("n", [1, 7, 97, 273, 1025])
def test_odd_lengths_against_plain_pytorch_error(dtype, n, device):
    q, k, v = (rand(1, 3, n, 64, dtype=dtype, device=device) for _ in range(3))
    r = attention(q, k, v, stats=("entropy", "lse"))
    ref = reference_attention(q, k, v, stats=("entropy", "lse"))
    assert_out_close(r.out, ref, q, k, v, dtype)
    assert_stats_close(r, ref, dtype, ("entropy", "lse"))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("D, Dv", [(16, 200), (300, 8), (40, 48)])
def test_different_head_dims_for_keys_and_values(dtype, D, Dv, device):
    q, k, v, kw = full_case(1, 2, 70, 90, D, Dv, dtype, device=device)
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert r.out.shape == (1, 2, 70, Dv)
    assert (r.out.double() - ref.out).abs().max().item() <= out_tol(dtype)
    assert_stats_close(r, ref, dtype, ALL_STATS)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_odd_head_dims(dtype, device):
    # odd D cannot use the pair-interleaved bf16 GEMM of the CPU kernel: it takes the widening path
    q, k, v, kw = full_case(2, 3, 33, 45, 7, 5, dtype, device=device)
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert (r.out.double() - ref.out).abs().max().item() <= out_tol(dtype)
    assert_stats_close(r, ref, dtype, ALL_STATS)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cross_attention_77_keys(dtype, kernel):
    q = rand(2, 4, 256, 40, dtype=dtype, device=kernel)
    k, v = rand(2, 4, 77, 40, dtype=dtype, device=kernel), rand(2, 4, 77, 48, dtype=dtype, device=kernel)
    mask = torch.arange(77, device=kernel)[None, :] < torch.tensor([[12], [77]], device=kernel)  # short and full prompt
    r = attention(q, k, v, key_padding_mask=mask, stats=("entropy", "lse"))
    ref = reference_attention(q, k, v, key_padding_mask=mask, stats=("entropy", "lse"))
    assert r.out.shape == (2, 4, 256, 48)
    assert (r.out.double() - ref.out).abs().max().item() <= out_tol(dtype)
    assert_stats_close(r, ref, dtype, ("entropy", "lse"))
    # the short prompt's entropy is bounded by ln(12): only 12 keys are visible
    assert r.entropy[0].max().item() <= math.log(12) + 1e-4


# the GPU's fast exp costs a few ulps more than the CPU's
SCALE_OUT_ATOL = {"cpu": 2e-6, "cuda": 4e-6}


def test_scale_argument(device):
    q, k, v = rand(1, 2, 33, 16, device=device), rand(1, 2, 45, 16, device=device), rand(1, 2, 45, 16, device=device)
    r = attention(q, k, v, scale=0.37, stats=("entropy",))
    ref = reference_attention(q, k, v, scale=0.37, stats=("entropy",))
    assert torch.allclose(r.out.double(), ref.out, atol=SCALE_OUT_ATOL[device])
    assert torch.allclose(r.entropy.double(), ref.entropy, atol=1e-5)


# ATen's flash attention on each device: (dtype, its out and lse, out atol, out rtol, lse atol). Its
# CUDA lse is padded past Nq.
ATEN_FLASH = {
    "cpu": (torch.float32, lambda q, k, v: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2],
            2e-6, 1e-5, 2e-5),
    "cuda": (torch.float16, lambda q, k, v: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2],
             2e-3, 0.0, 1e-3),
}


def test_matches_sdpa_and_lse_of_aten_flash(device):
    dtype, flash, atol, rtol, lse_atol = ATEN_FLASH[device]
    q, k, v = (rand(2, 3, n, 64, dtype=dtype, device=device) for n in (300, 700, 700))
    r = attention(q, k, v, stats=("lse",))
    out, lse = flash(q, k, v)
    assert torch.allclose(r.out.float(), F.scaled_dot_product_attention(q, k, v).float(), atol=atol, rtol=rtol)
    assert torch.allclose(r.out.float(), out.float(), atol=atol, rtol=rtol)
    assert torch.allclose(r.lse, lse[..., :300].float(), atol=lse_atol)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_non_contiguous_inputs_without_copies(dtype, device):
    # diffusers hands (B, N, H, D) memory viewed as (B, H, N, D)
    B, N, H, D = 2, 130, 4, 40
    q = rand(B, N, H, D, dtype=dtype, device=device).transpose(1, 2)
    kv = rand(B, 90, 2 * H, D, dtype=dtype, device=device)  # k and v interleaved in one buffer
    k, v = kv[:, :, :H].transpose(1, 2), kv[:, :, H:].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    r = attention(q, k, v, stats=("entropy",))
    ref = reference_attention(q.contiguous(), k.contiguous(), v.contiguous(), stats=("entropy",))
    assert (r.out.double() - ref.out).abs().max().item() <= out_tol(dtype)
    assert_stats_close(r, ref, dtype, ("entropy",))
    # a key broadcast over the batch (stride 0) and a strided head slice
    k0 = rand(1, H, 90, D, dtype=dtype, device=device).expand(B, H, 90, D)
    q2 = rand(B, H, N, 2 * D, dtype=dtype, device=device)[..., :D]
    r = attention(q2, k0, v)
    ref = reference_attention(q2, k0, v)
    assert (r.out.double() - ref.out).abs().max().item() <= out_tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_unaligned_views(dtype, device):
    # views whose rows are not 16-byte aligned (the CUDA kernel's element-by-element copy path)
    q = rand(2, 3, 70, 37, dtype=dtype, device=device)[..., 1:]     # misaligned pointer, D = 36
    k = rand(2, 3, 50, 37, dtype=dtype, device=device)[..., :36]    # row stride 37
    v = rand(2, 3, 50, 37, dtype=dtype, device=device)[..., 2:]     # Dv = 35, odd
    r = attention(q, k, v, stats=("entropy", "lse"))
    ref = reference_attention(q, k, v, stats=("entropy", "lse"))
    assert (r.out.double() - ref.out).abs().max().item() <= out_tol(dtype)
    assert_stats_close(r, ref, dtype, ("entropy", "lse"))


# entropy of a row with one visible key: exactly 0 on the CPU, the fast log of 1 on the GPU
ONE_KEY_ENTROPY_ATOL = {"cpu": 0.0, "cuda": 1e-6}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fully_masked_rows(dtype, kernel):
    q, k, v = (rand(3, 2, n, 32, dtype=dtype, device=kernel) for n in (20, 600, 600))
    mask = torch.rand(3, 600, device=kernel) > 0.5
    mask[1] = False  # batch element 1 sees no key at all
    mask[2] = False
    mask[2, 599] = True  # element 2 sees only the last key (in the last key block or tile)
    labels = (torch.zeros(3, 20, dtype=torch.long, device=kernel), torch.zeros(3, 600, dtype=torch.long, device=kernel))
    r = attention(q, k, v, key_padding_mask=mask, stats=ALL_STATS, grid=((4, 5), (20, 30)), labels=labels)
    for t in (r.out, r.entropy, r.distance, r.label_mass):
        assert not torch.isnan(t).any()
    assert torch.all(r.out[1] == 0)
    assert torch.all(torch.isneginf(r.lse[1]))
    assert torch.all(r.entropy[1] == 0) and torch.all(r.distance[1] == 0) and torch.all(r.label_mass[1] == 0)
    # one visible key: out is that key's value, entropy 0, label mass 1
    assert torch.allclose(r.out[2].float(), v[2, :, 599:600].float().expand(2, 20, 32), atol=1e-2)
    assert r.entropy[2].abs().max().item() <= ONE_KEY_ENTROPY_ATOL[kernel]
    assert torch.allclose(r.label_mass[2], torch.ones_like(r.label_mass[2]))


def non_finite_case(dtype, device):
    """q, k, v and keywords (every statistic) with NaN and +inf entries, and the rows they poison (B, H, Nq)."""
    B, H, Nq, Nk, D = 2, 2, 20, 600, 16
    q, k, v = rand(B, H, Nq, D, dtype=dtype, device=device), rand(B, H, Nk, D, dtype=dtype, device=device), \
        rand(B, H, Nk, D, dtype=dtype, device=device)
    q[0, 0, 3, 0] = float("nan")
    k[0, 1, 550, 0] = float("inf")  # a later key block: logit +inf where q[..., 0] > 0, else -inf
    k[1, 0, Nk - 1, 5] = float("nan")  # the last key, in a partial key block: every row of the head
    kw = dict(stats=ALL_STATS, grid=(grid_for(Nq), grid_for(Nk)),
              labels=(torch.randint(0, 5, (B, Nq), device=device), torch.randint(0, 5, (B, Nk), device=device)))
    bad = torch.zeros(B, H, Nq, dtype=torch.bool, device=device)
    bad[0, 0, 3] = True
    bad[0, 1] = q[0, 1, :, 0] > 0
    bad[1, 0] = True
    return q, k, v, kw, bad


def masked_non_finite_case(dtype, device):
    """non_finite_case plus NaN / +inf in masked keys, a row whose every logit is -inf (q[0, 0, 7]),
    head_scale (0 included) and a replacement."""
    q, k, v, kw, _ = non_finite_case(dtype, device)
    B, H, Nq, Nk, D = *q.shape[:3], k.shape[2], v.shape[3]
    k[1, 1, 100, 0] = float("nan")  # masked, in the first key block
    k[1, 1, Nk - 2] = float("inf")  # masked, in the last (partial) key block: logits +-inf or NaN
    mask = torch.rand(B, Nk, device=device) > 0.3
    mask[:, 0] = True
    mask[1, 100] = False
    mask[1, Nk - 2] = False
    mask[1, Nk - 1] = True  # k[1, 0, Nk - 1] holds a NaN: head 0 of element 1 stays poisoned
    q[0, 0, 7] = 0
    q[0, 0, 7, 0] = float("inf")
    k[0, 0, :, 0] = -(k[0, 0, :, 0].abs() + 0.5)  # q[0, 0, 7] . k_j = -inf for every key j
    head_scale = torch.tensor([[0.0, 0.5], [0.0, 1.0]], device=device)
    kw.update(key_padding_mask=mask, head_scale=head_scale, head_replacement=rand(1, H, Nq, D, device=device))
    return q, k, v, kw


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_non_finite_inputs_give_nan_rows_not_silent_values(dtype, kernel):
    # documented behaviour: a row that meets a NaN or +inf logit of an unmasked key is NaN in out and
    # every statistic, like plain PyTorch attention; a -inf logit is a key of weight 0; every other
    # row is unaffected
    q, k, v, kw, bad = non_finite_case(dtype, kernel)
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert torch.equal(torch.isnan(ref.out).any(-1), bad)  # the oracle agrees on which rows
    for name in ("out", *ALL_STATS):
        got = getattr(r, name)
        assert torch.isnan(got[bad]).all(), name
        assert torch.isfinite(got[~bad]).all(), name
    assert (r.out[~bad].double() - ref.out[~bad]).abs().max().item() <= out_tol(dtype)
    assert_stats_close(r, ref, dtype, ALL_STATS)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_masked_non_finite_keys_and_rows_of_minus_inf_logits(dtype, kernel):
    # a NaN or +inf logit of a masked key never poisons (the row stays finite and equals the
    # reference, as with PyTorch's SDPA) while an unmasked NaN key still does; a row whose every logit
    # is -inf (weight-0 keys only) is a fully masked row, not NaN; head_scale (0 included) and a
    # replacement must not hide the NaN
    q, k, v, kw = masked_non_finite_case(dtype, kernel)
    r = attention(q, k, v, **kw)
    assert torch.isnan(r.out[1, 0]).all() and torch.isnan(r.out[0, 0, 3]).all()
    assert torch.isneginf(r.lse[0, 0, 7]) and r.entropy[0, 0, 7] == 0
    ref = reference_attention(q, k, v, **kw)
    for name in ("out", *ALL_STATS):
        assert torch.isfinite(getattr(r, name)[1, 1]).all(), name
    assert (r.out[1, 1].double() - ref.out[1, 1]).abs().max().item() <= out_tol(dtype)
    for name in ALL_STATS:
        assert torch.allclose(getattr(r, name)[1, 1].double(), getattr(ref, name)[1, 1],
                              atol=2e-4 if dtype == torch.float32 else 1e-3, rtol=1e-4), name


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_masked_keys_never_poison(dtype, kernel):
    # a masked key never influences its row, whatever its logit: NaN / +inf in masked k rows
    # (garbage in padding) leave the row finite, equal to the reference and bit-equal to the same
    # call with those rows zeroed, as with PyTorch's SDPA; an unmasked NaN key still poisons.
    # Nk = 603: the CPU kernel's key blocks are 512 + 91 keys, so bad keys sit in the vector loop of
    # both blocks and in the scalar tail of the last one, for the 16- and the 8-lane kernels alike.
    B, H, Nq, Nk, D = 3, 2, 20, 603, 16
    q, k, v, kw = full_case(B, H, Nq, Nk, D, D, dtype, device=kernel)
    mask = kw["key_padding_mask"]
    mask[0, [5, 530, 601]] = False
    k[0, :, 5] = float("nan")  # a whole row
    k[0, :, 530] = float("inf")  # logits +inf, -inf or NaN (inf - inf), depending on q
    k[0, :, 601, 2] = float("inf")  # +inf where q[..., 2] > 0
    mask[1, 590:] = False  # a padded prompt: every key after the 590th is garbage
    k[1, :, 590:] = float("nan")
    k[1, 0, 600:, 0] = float("inf")
    mask[2] = False  # no key at all, every one garbage: the fully masked row rule still holds
    k[2] = float("nan")
    k[0, 1, 300, 1] = float("nan")  # an unmasked key
    mask[0, 300] = True
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    bad = torch.zeros(B, H, Nq, dtype=torch.bool, device=kernel)
    bad[0, 1] = True
    assert torch.equal(torch.isnan(ref.out).any(-1), bad)  # the oracle agrees on which rows
    assert torch.isnan(r.out[bad]).all() and torch.isnan(r.entropy[bad]).all()
    assert torch.isfinite(r.out[~bad]).all() and torch.isfinite(r.entropy[~bad]).all()
    assert torch.all(r.out[2] == 0) and torch.all(torch.isneginf(r.lse[2]))
    assert (r.out[~bad].double() - ref.out[~bad]).abs().max().item() <= out_tol(dtype)
    assert_stats_close(r, ref, dtype, ALL_STATS)
    clean = k.clone()
    clean.masked_fill_(~mask[:, None, :, None], 0)
    r0 = attention(q, clean, v, **kw)
    for name in ("out", *ALL_STATS):
        torch.testing.assert_close(getattr(r, name), getattr(r0, name), rtol=0, atol=0, equal_nan=True, msg=name)


def test_no_keys_at_all(device):
    q, k, v = rand(1, 2, 5, 16, device=device), rand(1, 2, 0, 16, device=device), rand(1, 2, 0, 8, device=device)
    r = attention(q, k, v, stats=("lse", "entropy"))
    assert r.out.shape == (1, 2, 5, 8) and torch.all(r.out == 0)
    assert torch.all(torch.isneginf(r.lse)) and torch.all(r.entropy == 0)


def test_empty_batch_and_queries(device):
    r = attention(*(rand(0, 2, n, 16, device=device) for n in (5, 7, 7)), stats=("entropy",))
    assert r.out.shape == (0, 2, 5, 16) and r.entropy.shape == (0, 2, 5)
    r = attention(*(rand(1, 2, n, 16, device=device) for n in (0, 7, 7)), stats=("entropy",))
    assert r.out.shape == (1, 2, 0, 16)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_head_scale_and_replacement(dtype, device):
    B, H, N, D = 3, 4, 50, 32
    q, k, v = (rand(B, H, N, D, dtype=dtype, device=device) for _ in range(3))
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    per_bh = torch.rand(B, H, device=device)
    per_bh[0, 1] = 0.0  # an ablated head
    for head_scale in (per_bh, torch.tensor([1.0, 0.0, 0.5, 2.0], device=device)):
        for rep in (None, rand(B, H, N, D, device=device), rand(1, H, 1, D, device=device)):
            r = attention(q, k, v, head_scale=head_scale, head_replacement=rep)
            ref = reference_attention(q, k, v, head_scale=head_scale, head_replacement=rep)
            assert (r.out.double() - ref.out).abs().max().item() <= tol
    r = attention(q, k, v, head_scale=per_bh)
    assert torch.all(r.out[0, 1] == 0)  # zero ablation is exact
    rep = rand(B, H, N, D, device=device)
    r = attention(q, k, v, head_scale=torch.zeros(B, H, device=device), head_replacement=rep)
    assert torch.allclose(r.out.float(), rep.to(dtype).float(), atol=tol)  # s = 0: pure replacement
    # statistics describe the attention pattern, untouched by the output intervention
    a = attention(q, k, v, head_scale=per_bh, stats=("entropy",)).entropy
    b = attention(q, k, v, stats=("entropy",)).entropy
    assert torch.equal(a, b)


def test_statistics_on_constructed_patterns(device):
    # uniform attention (all logits equal): entropy = ln Nk, label mass = share of the label
    B, H, hq, wq, Nk = 1, 1, 4, 4, 64
    q = torch.zeros(B, H, hq * wq, 8, device=device)
    k, v = rand(B, H, Nk, 8, device=device), rand(B, H, Nk, 8, device=device)
    k_labels = (torch.arange(Nk, device=device) % 4)[None]
    r = attention(q, k, v, stats=ALL_STATS, grid=((hq, wq), (8, 8)),
                  labels=(torch.zeros(1, 16, dtype=torch.long, device=device), k_labels))
    assert torch.allclose(r.entropy, torch.full_like(r.entropy, math.log(Nk)), atol=1e-5)
    assert torch.allclose(r.label_mass, torch.full_like(r.label_mass, 0.25), atol=1e-6)
    # one-hot attention on the same grid position: distance 0, entropy 0
    n = 16
    eye = torch.eye(n, device=device)[None, None]
    r = attention(eye * 60.0, eye, rand(1, 1, n, 4, device=device), scale=1.0,
                  stats=("entropy", "distance"), grid=((4, 4), (4, 4)))
    assert r.entropy.max().item() < 1e-6
    assert r.distance.max().item() < 1e-6


def test_every_kernel_path_agrees_with_reference(kernel):
    q, k, v, kw = full_case(2, 3, 200, 700, 48, 40, torch.float32, device=kernel)
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert torch.allclose(r.out.double(), ref.out, atol=2e-5)
    assert_stats_close(r, ref, torch.float32, ALL_STATS)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_tasks_split_over_several_threads_agree_with_reference(dtype, kernel, several_threads):
    # 2 x 3 heads x 3 query blocks of 128 rows = 18 tasks over 4 threads, two key blocks of 512 each
    q, k, v, kw = full_case(2, 3, 300, 700, 48, 40, dtype, device=kernel)
    r = attention(q, k, v, **kw)
    torch.set_num_threads(1)  # the oracle: on one thread, like the rest of these tests
    ref = reference_attention(q, k, v, **kw)
    assert (r.out.double() - ref.out).abs().max().item() <= out_tol(dtype)
    assert_stats_close(r, ref, dtype, ALL_STATS)


# ---- only the CUDA kernel ---------------------------------------------------------------------


# The CUDA forward kernel's variants (csrc/cuda/attention_params.h, select_variant), each chosen by
# what a call asks for, and its two kinds of key tile: full tiles without any per-score test and the
# checked ones (the last, partial tile; every tile under a key mask). The tile is 64 keys at head
# dims 32 and 64, 32 at 96 and 128: Nk = 256 is full tiles only, 300 ends in a partial tile, 40 is
# one partial tile. These run on every kernel path (the CPU ones as well).
VARIANT_CALLS = {
    "plain": dict(stats=("lse",)),
    "entropy": dict(stats=("lse", "entropy")),
    "masked": dict(stats=("lse",), masked=True),
    "full": dict(stats=("lse", "entropy"), masked=True),  # a mask with a statistic: the run-time variant
}


def _variant_kwargs(name, B, Nk, device):
    call = dict(VARIANT_CALLS[name])
    kw = dict(stats=call["stats"])
    if call.get("masked"):
        mask = torch.rand(B, Nk, device=device) > 0.3
        mask[:, 0] = True
        mask[-1, :] = False  # one batch element fully masked: out 0, lse -inf
        kw["key_padding_mask"] = mask
    return kw


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Nk", [256, 300, 40], ids=["full-tiles", "partial-last-tile", "one-partial-tile"])
@pytest.mark.parametrize("variant", VARIANT_CALLS)
def test_kernel_variants_and_key_tiles_match_the_reference(variant, Nk, D, dtype, kernel):
    q, k, v = (rand(2, 2, n, D, dtype=dtype, device=kernel) for n in (100, Nk, Nk))
    kw = _variant_kwargs(variant, 2, Nk, kernel)
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    if "key_padding_mask" in kw:  # (plain PyTorch, the yardstick of assert_out_close, takes no mask)
        assert torch.all(r.out[-1] == 0) and torch.all(torch.isneginf(r.lse[-1]))
        assert (r.out.double() - ref.out).abs().max().item() <= out_tol(dtype)
    else:
        assert_out_close(r.out, ref, q, k, v, dtype)
    assert_stats_close(r, ref, dtype, kw["stats"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("variant", ["plain", "entropy"])
def test_lean_variants_find_poison_from_tile_maxima_and_sums(dtype, variant, kernel):
    # non_finite_case without the statistics that need the run-time variant: a NaN query (its p, and
    # so its tile's sum, are NaN), a +inf key in a full tile (the tile max is +inf) and a NaN key in
    # the partial last tile; the poisoned rows are NaN in out and in every statistic asked for, the
    # others finite and equal to the reference
    q, k, v, _, bad = non_finite_case(dtype, kernel)
    kw = dict(stats=VARIANT_CALLS[variant]["stats"])
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert torch.equal(torch.isnan(ref.out).any(-1), bad)
    for name in ("out", *kw["stats"]):
        got = getattr(r, name)
        assert torch.isnan(got[bad]).all(), name
        assert torch.isfinite(got[~bad]).all(), name
    assert (r.out[~bad].double() - ref.out[~bad]).abs().max().item() <= out_tol(dtype)
    for name in kw["stats"]:
        assert torch.allclose(getattr(r, name)[~bad].double(), getattr(ref, name)[~bad], atol=1e-3, rtol=1e-4), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_masked_variant_never_poisons_from_masked_keys(dtype, kernel):
    # masked_non_finite_case with the mask and lse only (the masked variant): NaN and +inf keys under
    # the mask, in a full and in the partial tile, leave their rows finite; an unmasked NaN key still
    # poisons; a row whose every logit is -inf is a fully masked row
    q, k, v, kw = masked_non_finite_case(dtype, kernel)
    kw = dict(key_padding_mask=kw["key_padding_mask"], stats=("lse",))
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert torch.isnan(r.out[1, 0]).all() and torch.isnan(r.lse[1, 0]).all() and torch.isnan(r.out[0, 0, 3]).all()
    assert torch.isneginf(r.lse[0, 0, 7]) and torch.all(r.out[0, 0, 7] == 0)
    assert torch.isfinite(r.out[1, 1]).all() and torch.isfinite(r.lse[1, 1]).all()
    assert (r.out[1, 1].double() - ref.out[1, 1]).abs().max().item() <= out_tol(dtype)
    assert torch.allclose(r.lse[1, 1].double(), ref.lse[1, 1], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", ["negative-scale", "zero-scale", "unaligned-rows"])
def test_calls_outside_the_lean_variants_match_the_reference(case, dtype, kernel):
    # scale <= 0 (the max of the raw scores is not the max of the logits) and rows that are not
    # 16-byte aligned take the run-time variant, with lse alone asked for
    q, k, v = (rand(1, 2, n, 64, dtype=dtype, device=kernel) for n in (70, 300, 300))
    scale = {"negative-scale": -0.2, "zero-scale": 0.0}.get(case)
    if case == "unaligned-rows":  # views starting one element into rows of 65: 2-byte aligned only
        q, k, v = (F.pad(x, (1, 0))[..., 1:] for x in (q, k, v))
        assert q.data_ptr() % 16 != 0 and q.stride(2) == 65
    r = attention(q, k, v, scale=scale, stats=("lse",))
    ref = reference_attention(q, k, v, scale=scale, stats=("lse",))
    assert_out_close(r.out, ref, q, k, v, dtype, scale=scale)
    assert_stats_close(r, ref, dtype, ("lse",))


def _to(x, device):
    """x (a tensor, a tuple of them, or anything else) on device."""
    if isinstance(x, tuple):
        return tuple(_to(y, device) for y in x)
    return x.to(device) if torch.is_tensor(x) else x


def _assert_kernels_agree(on_gpu, on_cpu, dtype, out_rtol):
    """Same NaN and finite entries in out and every statistic; finite ones close (statistics: rtol 1e-4)."""
    out_atol, stat_atol = (2e-5, 2e-4) if dtype == torch.float32 else (2e-2, 1e-3)
    for name, atol, rtol in (("out", out_atol, out_rtol), *((s, stat_atol, 1e-4) for s in ALL_STATS)):
        a, b = getattr(on_gpu, name).cpu(), getattr(on_cpu, name)
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        fin = torch.isfinite(b)
        assert torch.allclose(a[fin].double(), b[fin].double(), atol=atol, rtol=rtol), (
            name, (a[fin].double() - b[fin].double()).abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cuda_agrees_with_cpu_kernel(cuda_device, dtype):
    q, k, v, kw = full_case(2, 3, 200, 700, 48, 40, dtype, device="cpu")
    kw.update(head_scale=torch.rand(2, 3), head_replacement=torch.randn(1, 3, 200, 40))
    on_cpu = attention(q, k, v, **kw)
    on_gpu = attention(_to(q, cuda_device), _to(k, cuda_device), _to(v, cuda_device),
                       **{name: _to(value, cuda_device) for name, value in kw.items()})
    _assert_kernels_agree(on_gpu, on_cpu, dtype, out_rtol=0.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cuda_agrees_with_cpu_kernel_on_non_finite_inputs(cuda_device, dtype):
    # the same NaN rows, finite rows and -inf rows on both kernels, masked garbage included
    q, k, v, kw = masked_non_finite_case(dtype, cuda_device)
    on_gpu = attention(q, k, v, **kw)
    on_cpu = attention(_to(q, "cpu"), _to(k, "cpu"), _to(v, "cpu"), **{n: _to(x, "cpu") for n, x in kw.items()})
    _assert_kernels_agree(on_gpu, on_cpu, dtype, out_rtol=1e-4)


@pytest.mark.cuda
def test_many_heads_and_batches_in_one_grid(cuda_device):
    # more (batch, head) pairs than a 2-D grid's y-dimension holds (65535)
    q, k, v = (rand(300, 256, n, 32, dtype=torch.float16, device=cuda_device) for n in (3, 5, 5))
    r = attention(q, k, v, stats=("lse",))
    ref = reference_attention(q, k, v, stats=("lse",))
    assert (r.out.double() - ref.out).abs().max().item() <= 2e-2
    assert torch.allclose(r.lse.double(), ref.lse, atol=1e-3)


@pytest.mark.cuda
def test_runs_on_the_current_stream(cuda_device):
    q, k, v = (rand(2, 2, 300, 64, dtype=torch.float16, device=cuda_device) for _ in range(3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        r = attention(q, k, v, stats=("entropy",))
    torch.cuda.current_stream().wait_stream(side)
    ref = reference_attention(q, k, v, stats=("entropy",))
    assert (r.out.double() - ref.out).abs().max().item() <= 2e-2
    assert torch.allclose(r.entropy.double(), ref.entropy, atol=1e-3)


@pytest.mark.cuda
def test_inputs_on_another_device_are_rejected(cuda_device):
    q, k, v = (rand(1, 2, n, 16, device=cuda_device) for n in (8, 9, 9))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, v, key_padding_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises((ValueError, RuntimeError), match="key_padding_mask"):
        torch.ops.diffcirc.attention(q, k, v, 0.25, torch.ones(1, 9, dtype=torch.bool), None, None, [], None, None,
                                     False, False, False)


@pytest.mark.cuda
def test_second_gpu_uses_its_own_device(cuda_device):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda", 1)
    q, k, v = (rand(1, 2, 50, 64, dtype=torch.float16, device=dev) for _ in range(3))
    r = attention(q, k, v, stats=("lse",))
    assert r.out.device == dev and r.lse.device == dev
    ref = reference_attention(q, k, v)
    assert (r.out.double() - ref.out).abs().max().item() <= 2e-2


@pytest.mark.cuda
def test_no_quadratic_buffer(cuda_device):
    # N = 8192: one (N, N) float32 matrix per head would be 256 MiB; the op needs only its outputs
    B, H, N, D = 1, 2, 8192, 64
    q, k, v = (rand(B, H, N, D, dtype=torch.float16, device=cuda_device) for _ in range(3))
    labels = (torch.randint(0, 4, (B, N), dtype=torch.int32, device=cuda_device),) * 2
    attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], stats=ALL_STATS, grid=((8, 8), (8, 8)),
              labels=(labels[0][:, :64], labels[1][:, :64]))  # warm-up outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    r = attention(q, k, v, stats=ALL_STATS, grid=((64, 128), (64, 128)), labels=labels)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    outputs = r.out.numel() * r.out.element_size() + 4 * B * H * N * 4
    assert peak <= outputs + (1 << 20), (peak, outputs)
