"""The fused attention op against its float64 reference (and PyTorch's own attention)."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffcirc.ops import attention, extension, reference_attention

from helpers.attention_cases import DTYPES
from helpers.attention_cases import ALL_STATS, assert_out_close, assert_stats_close, full_case, rand

ISAS = ("avx512", "avx2", "scalar")


def _ext():
    ext = extension.load()
    assert ext is not None, "the extension must be built for these tests (make build)"
    return ext


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs a test once per CPU instruction-set path this machine supports."""
    ext = _ext()
    try:
        ext.set_cpu_isa(request.param)
    except ValueError:
        pytest.skip(f"this CPU lacks {request.param}")  # hardware limit, not a missing feature
    yield request.param
    ext.set_cpu_isa("avx512" if "avx512" in _supported() else "avx2" if "avx2" in _supported() else "scalar")


def _supported():
    ext = _ext()
    current = ext.cpu_isa()
    out = []
    for name in ISAS:
        try:
            ext.set_cpu_isa(name)
            out.append(name)
        except ValueError:
            pass
    ext.set_cpu_isa(current)
    return out


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("D", [32, 40, 64, 80, 128, 160, 512])
def test_head_dims_all_stats(dtype, D, isa):
    q, k, v, kw = full_case(2, 2, 97, 130, D, D, dtype)
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert r.out.dtype == dtype and r.out.shape == (2, 2, 97, D)
    assert (r.out.double() - ref.out).abs().max().item() <= (2e-5 if dtype == torch.float32 else 2e-2)
    assert_stats_close(r, ref, dtype, ALL_STATS)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("n", [1, 7, 97, 273, 1025])
def test_odd_lengths_against_plain_pytorch_error(dtype, n):
    q, k, v = rand(1, 3, n, 64, dtype=dtype), rand(1, 3, n, 64, dtype=dtype), rand(1, 3, n, 64, dtype=dtype)
    r = attention(q, k, v, stats=("entropy", "lse"))
    ref = reference_attention(q, k, v, stats=("entropy", "lse"))
    assert_out_close(r.out, ref, q, k, v, dtype)
    assert_stats_close(r, ref, dtype, ("entropy", "lse"))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cross_attention_77_keys(dtype, isa):
    q, k, v = rand(2, 4, 256, 40, dtype=dtype), rand(2, 4, 77, 40, dtype=dtype), rand(2, 4, 77, 48, dtype=dtype)
    mask = torch.arange(77)[None, :] < torch.tensor([[12], [77]])  # a short prompt and a full one
    r = attention(q, k, v, key_padding_mask=mask, stats=("entropy", "lse"))
    ref = reference_attention(q, k, v, key_padding_mask=mask, stats=("entropy", "lse"))
    assert r.out.shape == (2, 4, 256, 48)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert (r.out.double() - ref.out).abs().max().item() <= tol
    assert_stats_close(r, ref, dtype, ("entropy", "lse"))
    # the short prompt's entropy is bounded by ln(12): only 12 keys are visible
    assert r.entropy[0].max().item() <= math.log(12) + 1e-4


def test_scale_argument():
    q, k, v = rand(1, 2, 33, 16), rand(1, 2, 45, 16), rand(1, 2, 45, 16)
    r = attention(q, k, v, scale=0.37, stats=("entropy",))
    ref = reference_attention(q, k, v, scale=0.37, stats=("entropy",))
    assert torch.allclose(r.out.double(), ref.out, atol=2e-6)
    assert torch.allclose(r.entropy.double(), ref.entropy, atol=1e-5)


def test_matches_sdpa_and_lse_of_aten_flash():
    q, k, v = rand(2, 3, 300, 64), rand(2, 3, 700, 64), rand(2, 3, 700, 64)
    r = attention(q, k, v, stats=("lse",))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    assert torch.allclose(r.out, F.scaled_dot_product_attention(q, k, v), atol=2e-6)
    assert torch.allclose(r.out, out, atol=2e-6)
    assert torch.allclose(r.lse, lse, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_non_contiguous_inputs_without_copies(dtype):
    # diffusers hands (B, N, H, D) memory viewed as (B, H, N, D)
    B, N, H, D = 2, 130, 4, 40
    q = rand(B, N, H, D, dtype=dtype).transpose(1, 2)
    kv = rand(B, 90, 2 * H, D, dtype=dtype)  # k and v interleaved in one buffer
    k, v = kv[:, :, :H].transpose(1, 2), kv[:, :, H:].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    r = attention(q, k, v, stats=("entropy",))
    ref = reference_attention(q.contiguous(), k.contiguous(), v.contiguous(), stats=("entropy",))
    assert (r.out.double() - ref.out).abs().max().item() <= (2e-5 if dtype == torch.float32 else 2e-2)
    assert_stats_close(r, ref, dtype, ("entropy",))
    # a key broadcast over the batch (stride 0) and a strided head slice
    k0 = rand(1, H, 90, D, dtype=dtype).expand(B, H, 90, D)
    q2 = rand(B, H, N, 2 * D, dtype=dtype)[..., :D]
    r = attention(q2, k0, v)
    ref = reference_attention(q2, k0, v)
    assert (r.out.double() - ref.out).abs().max().item() <= (2e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fully_masked_rows(dtype, isa):
    q, k, v = rand(3, 2, 20, 32, dtype=dtype), rand(3, 2, 600, 32, dtype=dtype), rand(3, 2, 600, 32, dtype=dtype)
    mask = torch.rand(3, 600) > 0.5
    mask[1] = False  # batch element 1 sees no key at all
    mask[2] = False
    mask[2, 599] = True  # element 2 sees only the last key (in the second key block)
    r = attention(q, k, v, key_padding_mask=mask, stats=ALL_STATS, grid=((4, 5), (20, 30)),
                  labels=(torch.zeros(3, 20, dtype=torch.long), torch.zeros(3, 600, dtype=torch.long)))
    for t in (r.out, r.entropy, r.distance, r.label_mass):
        assert not torch.isnan(t).any()
    assert torch.all(r.out[1] == 0)
    assert torch.all(torch.isneginf(r.lse[1]))
    assert torch.all(r.entropy[1] == 0) and torch.all(r.distance[1] == 0) and torch.all(r.label_mass[1] == 0)
    # one visible key: out is that key's value, entropy 0, label mass 1
    assert torch.allclose(r.out[2].float(), v[2, :, 599:600].float().expand(2, 20, 32), atol=1e-2)
    assert torch.all(r.entropy[2] == 0) and torch.allclose(r.label_mass[2], torch.ones(2, 20))


def test_no_keys_at_all():
    q, k, v = rand(1, 2, 5, 16), rand(1, 2, 0, 16), rand(1, 2, 0, 8)
    r = attention(q, k, v, stats=("lse", "entropy"))
    assert r.out.shape == (1, 2, 5, 8) and torch.all(r.out == 0)
    assert torch.all(torch.isneginf(r.lse)) and torch.all(r.entropy == 0)


def test_empty_batch_and_queries():
    r = attention(rand(0, 2, 5, 16), rand(0, 2, 7, 16), rand(0, 2, 7, 16), stats=("entropy",))
    assert r.out.shape == (0, 2, 5, 16) and r.entropy.shape == (0, 2, 5)
    r = attention(rand(1, 2, 0, 16), rand(1, 2, 7, 16), rand(1, 2, 7, 16), stats=("entropy",))
    assert r.out.shape == (1, 2, 0, 16)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_head_scale_and_replacement(dtype):
    B, H, N, D = 3, 4, 50, 32
    q, k, v = rand(B, H, N, D, dtype=dtype), rand(B, H, N, D, dtype=dtype), rand(B, H, N, D, dtype=dtype)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    per_bh = torch.rand(B, H)
    per_bh[0, 1] = 0.0  # an ablated head
    for head_scale in (per_bh, torch.tensor([1.0, 0.0, 0.5, 2.0])):
        for rep in (None, torch.randn(B, H, N, D), torch.randn(1, H, 1, D)):
            r = attention(q, k, v, head_scale=head_scale, head_replacement=rep)
            ref = reference_attention(q, k, v, head_scale=head_scale, head_replacement=rep)
            assert (r.out.double() - ref.out).abs().max().item() <= tol
    r = attention(q, k, v, head_scale=per_bh)
    assert torch.all(r.out[0, 1] == 0)  # zero ablation is exact
    rep = torch.randn(B, H, N, D)
    r = attention(q, k, v, head_scale=torch.zeros(B, H), head_replacement=rep)
    assert torch.allclose(r.out.float(), rep.to(dtype).float(), atol=tol)  # s = 0: pure replacement
    # statistics describe the attention pattern, untouched by the output intervention
    a = attention(q, k, v, head_scale=per_bh, stats=("entropy",)).entropy
    b = attention(q, k, v, stats=("entropy",)).entropy
    assert torch.equal(a, b)


def test_statistics_on_constructed_patterns():
    # uniform attention (all logits equal): entropy = ln Nk, label mass = share of the label
    B, H, hq, wq, Nk = 1, 1, 4, 4, 64
    q = torch.zeros(B, H, hq * wq, 8)
    k, v = torch.randn(B, H, Nk, 8), torch.randn(B, H, Nk, 8)
    k_labels = (torch.arange(Nk) % 4)[None]
    r = attention(q, k, v, stats=ALL_STATS, grid=((hq, wq), (8, 8)),
                  labels=(torch.zeros(1, 16, dtype=torch.long), k_labels))
    assert torch.allclose(r.entropy, torch.full_like(r.entropy, math.log(Nk)), atol=1e-5)
    assert torch.allclose(r.label_mass, torch.full_like(r.label_mass, 0.25), atol=1e-6)
    # one-hot attention on the same grid position: distance 0, entropy 0
    n = 16
    eye = torch.eye(n)[None, None] * 60.0
    r = attention(eye, torch.eye(n)[None, None], torch.randn(1, 1, n, 4), scale=1.0,
                  stats=("entropy", "distance"), grid=((4, 4), (4, 4)))
    assert r.entropy.max().item() < 1e-6
    assert r.distance.max().item() < 1e-6


def test_isa_paths_agree(isa):
    q, k, v, kw = full_case(2, 3, 200, 700, 48, 40, torch.float32)
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert torch.allclose(r.out.double(), ref.out, atol=2e-5)
    assert_stats_close(r, ref, torch.float32, ALL_STATS)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_odd_head_dims(dtype):
    # odd D cannot use the pair-interleaved bf16 GEMM: it takes the widening path
    q, k, v, kw = full_case(2, 3, 33, 45, 7, 5, dtype)
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert (r.out.double() - ref.out).abs().max().item() <= (2e-5 if dtype == torch.float32 else 2e-2)
    assert_stats_close(r, ref, dtype, ALL_STATS)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_non_finite_inputs_give_nan_rows_not_silent_values(dtype, isa):
    # documented behaviour: a row with a NaN or +inf logit returns NaN (out and statistics), like
    # plain PyTorch attention; a -inf logit is a key of weight 0; every other row is unaffected
    q, k, v = rand(1, 2, 20, 16, dtype=dtype), rand(1, 2, 600, 16, dtype=dtype), rand(1, 2, 600, 16, dtype=dtype)
    q[0, 0, 3, 0] = float("nan")
    k[0, 1, 550, 0] = float("inf")  # in the second key block: logit +inf where q[..., 0] > 0, else -inf
    r = attention(q, k, v, stats=("lse", "entropy"))
    ref = reference_attention(q, k, v, stats=("lse", "entropy"))
    bad = torch.zeros(1, 2, 20, dtype=torch.bool)
    bad[0, 0, 3] = True
    bad[0, 1] = q[0, 1, :, 0] > 0
    assert torch.equal(torch.isnan(ref.out).any(-1), bad)  # the oracle agrees on which rows
    assert torch.isnan(r.out[bad]).all() and torch.isnan(r.entropy[bad]).all() and torch.isnan(r.lse[bad]).all()
    good = ~bad
    assert torch.isfinite(r.out[good]).all()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert (r.out[good].double() - ref.out[good]).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_masked_keys_never_poison(dtype, isa):
    # a masked key never influences its row, whatever its logit: NaN / +inf in masked k rows
    # (garbage in padding) leave the row finite, equal to the reference and bit-equal to the same
    # call with those rows zeroed, as with PyTorch's SDPA; an unmasked NaN key still poisons.
    # Nk = 603: the key blocks are 512 + 91 keys, so bad keys sit in the vector loop of both blocks
    # and in the scalar tail of the last one, for the 16- and the 8-lane kernels alike.
    B, H, Nq, Nk, D = 3, 2, 20, 603, 16
    q, k, v, kw = full_case(B, H, Nq, Nk, D, D, dtype)
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
    bad = torch.zeros(B, H, Nq, dtype=torch.bool)
    bad[0, 1] = True
    assert torch.equal(torch.isnan(ref.out).any(-1), bad)  # the oracle agrees on which rows
    assert torch.isnan(r.out[bad]).all() and torch.isnan(r.entropy[bad]).all()
    assert torch.isfinite(r.out[~bad]).all() and torch.isfinite(r.entropy[~bad]).all()
    assert torch.all(r.out[2] == 0) and torch.all(torch.isneginf(r.lse[2]))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert (r.out[~bad].double() - ref.out[~bad]).abs().max().item() <= tol
    assert_stats_close(r, ref, dtype, ALL_STATS)
    clean = k.clone()
    clean.masked_fill_(~mask[:, None, :, None], 0)
    r0 = attention(q, clean, v, **kw)
    for name in ("out", *ALL_STATS):
        torch.testing.assert_close(getattr(r, name), getattr(r0, name), rtol=0, atol=0, equal_nan=True, msg=name)
