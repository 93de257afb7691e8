"""The CUDA kernel of the fused attention op against the float64 reference, PyTorch and the CPU kernel.

Every test needs an NVIDIA GPU and a build with the CUDA kernels; without a GPU they are skipped
(the check happens in the ``cuda`` fixture, never at import time).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from diffcirc.ops import attention, extension, reference_attention

from helpers.attention_cases import DTYPES, cuda_available
from helpers.attention_cases import ALL_STATS, assert_out_close, assert_stats_close, full_case as _full_case, grid_for, rand as _rand


def rand(*shape, dtype=torch.float32, device="cuda"):
    return _rand(*shape, dtype=dtype, device=device)


def full_case(*args, device="cuda", **kwargs):
    return _full_case(*args, device=device, **kwargs)


pytestmark = pytest.mark.cuda


@pytest.fixture
def cuda():
    """The CUDA device; skips without a GPU, fails when the extension lacks its CUDA kernels."""
    if not cuda_available():
        pytest.skip("needs an NVIDIA GPU")
    ext = extension.load()
    assert ext is not None, "the extension must be built for these tests (make build)"
    assert ext.cuda_archs(), "diffcirc._C was built without CUDA kernels (needs nvcc and a CUDA build of torch)"
    return torch.device("cuda")


def tol_for(dtype):
    return 2e-5 if dtype == torch.float32 else 2e-2


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("D", [32, 40, 64, 80, 96, 128, 160, 192, 256, 512])
def test_head_dims_all_stats(cuda, dtype, D):
    q, k, v, kw = full_case(2, 2, 97, 130, D, D, dtype)
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert r.out.dtype == dtype and r.out.shape == (2, 2, 97, D) and r.out.is_cuda
    assert (r.out.double() - ref.out).abs().max().item() <= tol_for(dtype)
    assert_stats_close(r, ref, dtype, ALL_STATS)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("n", [1, 7, 97, 273, 1025])
def test_odd_lengths_against_plain_pytorch_error(cuda, dtype, n):
    q, k, v = rand(1, 3, n, 64, dtype=dtype), rand(1, 3, n, 64, dtype=dtype), rand(1, 3, n, 64, dtype=dtype)
    r = attention(q, k, v, stats=("entropy", "lse"))
    ref = reference_attention(q, k, v, stats=("entropy", "lse"))
    assert_out_close(r.out, ref, q, k, v, dtype)
    assert_stats_close(r, ref, dtype, ("entropy", "lse"))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("D, Dv", [(16, 200), (300, 8), (40, 48)])
def test_different_head_dims_for_keys_and_values(cuda, dtype, D, Dv):
    q, k, v, kw = full_case(1, 2, 70, 90, D, Dv, dtype)
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert r.out.shape == (1, 2, 70, Dv)
    assert (r.out.double() - ref.out).abs().max().item() <= tol_for(dtype)
    assert_stats_close(r, ref, dtype, ALL_STATS)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cross_attention_77_keys(cuda, dtype):
    q, k, v = rand(2, 4, 256, 40, dtype=dtype), rand(2, 4, 77, 40, dtype=dtype), rand(2, 4, 77, 48, dtype=dtype)
    mask = torch.arange(77, device=cuda)[None, :] < torch.tensor([[12], [77]], device=cuda)  # short and full prompt
    r = attention(q, k, v, key_padding_mask=mask, stats=("entropy", "lse"))
    ref = reference_attention(q, k, v, key_padding_mask=mask, stats=("entropy", "lse"))
    assert r.out.shape == (2, 4, 256, 48)
    assert (r.out.double() - ref.out).abs().max().item() <= tol_for(dtype)
    assert_stats_close(r, ref, dtype, ("entropy", "lse"))
    assert r.entropy[0].max().item() <= math.log(12) + 1e-4  # only 12 keys are visible


def test_scale_argument(cuda):
    q, k, v = rand(1, 2, 33, 16), rand(1, 2, 45, 16), rand(1, 2, 45, 16)
    r = attention(q, k, v, scale=0.37, stats=("entropy",))
    ref = reference_attention(q, k, v, scale=0.37, stats=("entropy",))
    assert torch.allclose(r.out.double(), ref.out, atol=4e-6)  # the CPU's 2e-6, widened for the GPU's fast exp
    assert torch.allclose(r.entropy.double(), ref.entropy, atol=1e-5)


def test_matches_sdpa_and_lse_of_aten_flash(cuda):
    q, k, v = rand(2, 3, 300, 64, dtype=torch.float16), rand(2, 3, 700, 64, dtype=torch.float16), \
        rand(2, 3, 700, 64, dtype=torch.float16)
    r = attention(q, k, v, stats=("lse",))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    assert (r.out.float() - F.scaled_dot_product_attention(q, k, v).float()).abs().max().item() <= 2e-3
    assert (r.out.float() - out.float()).abs().max().item() <= 2e-3
    assert torch.allclose(r.lse, lse[..., :300].float(), atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_non_contiguous_inputs_without_copies(cuda, dtype):
    # diffusers hands (B, N, H, D) memory viewed as (B, H, N, D)
    B, N, H, D = 2, 130, 4, 40
    q = rand(B, N, H, D, dtype=dtype).transpose(1, 2)
    kv = rand(B, 90, 2 * H, D, dtype=dtype)  # k and v interleaved in one buffer
    k, v = kv[:, :, :H].transpose(1, 2), kv[:, :, H:].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    r = attention(q, k, v, stats=("entropy",))
    ref = reference_attention(q.contiguous(), k.contiguous(), v.contiguous(), stats=("entropy",))
    assert (r.out.double() - ref.out).abs().max().item() <= tol_for(dtype)
    assert_stats_close(r, ref, dtype, ("entropy",))
    # a key broadcast over the batch (stride 0) and a strided head slice
    k0 = rand(1, H, 90, D, dtype=dtype).expand(B, H, 90, D)
    q2 = rand(B, H, N, 2 * D, dtype=dtype)[..., :D]
    r = attention(q2, k0, v)
    ref = reference_attention(q2, k0, v)
    assert (r.out.double() - ref.out).abs().max().item() <= tol_for(dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_unaligned_views(cuda, dtype):
    # views whose rows are not 16-byte aligned take the element-by-element copy path
    q = rand(2, 3, 70, 37, dtype=dtype)[..., 1:]     # misaligned pointer, D = 36
    k = rand(2, 3, 50, 37, dtype=dtype)[..., :36]    # row stride 37
    v = rand(2, 3, 50, 37, dtype=dtype)[..., 2:]     # Dv = 35, odd
    r = attention(q, k, v, stats=("entropy", "lse"))
    ref = reference_attention(q, k, v, stats=("entropy", "lse"))
    assert (r.out.double() - ref.out).abs().max().item() <= tol_for(dtype)
    assert_stats_close(r, ref, dtype, ("entropy", "lse"))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fully_masked_rows(cuda, dtype):
    q, k, v = rand(3, 2, 20, 32, dtype=dtype), rand(3, 2, 600, 32, dtype=dtype), rand(3, 2, 600, 32, dtype=dtype)
    mask = torch.rand(3, 600, device=cuda) > 0.5
    mask[1] = False  # batch element 1 sees no key at all
    mask[2] = False
    mask[2, 599] = True  # element 2 sees only the last key (in the last key tile)
    labels = (torch.zeros(3, 20, dtype=torch.long, device=cuda), torch.zeros(3, 600, dtype=torch.long, device=cuda))
    r = attention(q, k, v, key_padding_mask=mask, stats=ALL_STATS, grid=((4, 5), (20, 30)), labels=labels)
    for t in (r.out, r.entropy, r.distance, r.label_mass):
        assert not torch.isnan(t).any()
    assert torch.all(r.out[1] == 0)
    assert torch.all(torch.isneginf(r.lse[1]))
    assert torch.all(r.entropy[1] == 0) and torch.all(r.distance[1] == 0) and torch.all(r.label_mass[1] == 0)
    # one visible key: out is that key's value, entropy 0 (up to the fast log of 1), label mass 1
    assert torch.allclose(r.out[2].float(), v[2, :, 599:600].float().expand(2, 20, 32), atol=1e-2)
    assert r.entropy[2].abs().max().item() <= 1e-6 and torch.allclose(r.label_mass[2], torch.ones_like(r.label_mass[2]))


def _to(x, device):
    """x (a tensor, a tuple of them, or anything else) on device."""
    if isinstance(x, tuple):
        return tuple(_to(y, device) for y in x)
    return x.to(device) if torch.is_tensor(x) else x


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_non_finite_inputs_give_nan_rows_not_silent_values(cuda, dtype):
    # the CPU kernel's rule (tests/test_ops_attention.py): a row that meets a NaN or +inf logit of an
    # unmasked key is NaN in out and every statistic; a -inf logit is a key of weight 0; every other
    # row is unaffected
    B, H, Nq, Nk, D = 2, 2, 20, 600, 16
    q, k, v = rand(B, H, Nq, D, dtype=dtype), rand(B, H, Nk, D, dtype=dtype), rand(B, H, Nk, D, dtype=dtype)
    q[0, 0, 3, 0] = float("nan")
    k[0, 1, 550, 0] = float("inf")  # a later key tile: logit +inf where q[..., 0] > 0, else -inf
    k[1, 0, Nk - 1, 5] = float("nan")  # the last key, in a partial key tile: every row of the head
    kw = dict(stats=ALL_STATS, grid=(grid_for(Nq), grid_for(Nk)),
              labels=(torch.randint(0, 5, (B, Nq), device=cuda), torch.randint(0, 5, (B, Nk), device=cuda)))
    r = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    bad = torch.zeros(B, H, Nq, dtype=torch.bool, device=cuda)
    bad[0, 0, 3] = True
    bad[0, 1] = q[0, 1, :, 0] > 0
    bad[1, 0] = True
    assert torch.equal(torch.isnan(ref.out).any(-1), bad)  # the oracle agrees on which rows
    for name in ("out", *ALL_STATS):
        got = getattr(r, name)
        assert torch.isnan(got[bad]).all(), name
        assert torch.isfinite(got[~bad]).all(), name
    assert (r.out[~bad].double() - ref.out[~bad]).abs().max().item() <= tol_for(dtype)
    assert_stats_close(r, ref, dtype, ALL_STATS)

    # The same rows as the CPU kernel, also under a mask: a NaN or +inf logit of a masked key never
    # poisons (the row stays finite and equals the reference, as with PyTorch's SDPA) while an
    # unmasked NaN key still does; a row whose every logit is -inf (weight-0 keys only: like a
    # fully masked row, not NaN); and through head_scale (0 included) and a replacement, which
    # must not hide the NaN.
    k[1, 1, 100, 0] = float("nan")  # masked, in the first key tile
    k[1, 1, Nk - 2] = float("inf")  # masked, in the last (partial) key tile: logits +-inf or NaN
    mask = torch.rand(B, Nk, device=cuda) > 0.3
    mask[:, 0] = True
    mask[1, 100] = False
    mask[1, Nk - 2] = False
    mask[1, Nk - 1] = True  # k[1, 0, Nk - 1] holds a NaN: head 0 of element 1 stays poisoned
    q[0, 0, 7] = 0
    q[0, 0, 7, 0] = float("inf")
    k[0, 0, :, 0] = -(k[0, 0, :, 0].abs() + 0.5)  # q[0, 0, 7] . k_j = -inf for every key j
    head_scale = torch.tensor([[0.0, 0.5], [0.0, 1.0]], device=cuda)
    kw.update(key_padding_mask=mask, head_scale=head_scale, head_replacement=rand(1, H, Nq, D))
    on_gpu = attention(q, k, v, **kw)
    on_cpu = attention(_to(q, "cpu"), _to(k, "cpu"), _to(v, "cpu"), **{n: _to(x, "cpu") for n, x in kw.items()})
    assert torch.isnan(on_gpu.out[1, 0]).all() and torch.isnan(on_gpu.out[0, 0, 3]).all()
    assert torch.isneginf(on_gpu.lse[0, 0, 7]) and on_gpu.entropy[0, 0, 7] == 0
    ref = reference_attention(q, k, v, **kw)
    for name in ("out", *ALL_STATS):
        assert torch.isfinite(getattr(on_gpu, name)[1, 1]).all(), name
    assert (on_gpu.out[1, 1].double() - ref.out[1, 1]).abs().max().item() <= tol_for(dtype)
    for name in ALL_STATS:
        assert torch.allclose(getattr(on_gpu, name)[1, 1].double(), getattr(ref, name)[1, 1],
                              atol=2e-4 if dtype == torch.float32 else 1e-3, rtol=1e-4), name
    out_tol, stat_tol = (2e-5, 2e-4) if dtype == torch.float32 else (2e-2, 1e-3)
    for name, tol in (("out", out_tol), *((s, stat_tol) for s in ALL_STATS)):
        a, b = getattr(on_gpu, name).cpu(), getattr(on_cpu, name)
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        fin = torch.isfinite(b)
        assert torch.allclose(a[fin].double(), b[fin].double(), atol=tol, rtol=1e-4), name


def test_no_keys_at_all(cuda):
    q, k, v = rand(1, 2, 5, 16), rand(1, 2, 0, 16), rand(1, 2, 0, 8)
    r = attention(q, k, v, stats=("lse", "entropy"))
    assert r.out.shape == (1, 2, 5, 8) and torch.all(r.out == 0)
    assert torch.all(torch.isneginf(r.lse)) and torch.all(r.entropy == 0)


def test_empty_batch_and_queries(cuda):
    r = attention(rand(0, 2, 5, 16), rand(0, 2, 7, 16), rand(0, 2, 7, 16), stats=("entropy",))
    assert r.out.shape == (0, 2, 5, 16) and r.entropy.shape == (0, 2, 5)
    r = attention(rand(1, 2, 0, 16), rand(1, 2, 7, 16), rand(1, 2, 7, 16), stats=("entropy",))
    assert r.out.shape == (1, 2, 0, 16)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_head_scale_and_replacement(cuda, dtype):
    B, H, N, D = 3, 4, 50, 32
    q, k, v = rand(B, H, N, D, dtype=dtype), rand(B, H, N, D, dtype=dtype), rand(B, H, N, D, dtype=dtype)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    per_bh = torch.rand(B, H, device=cuda)
    per_bh[0, 1] = 0.0  # an ablated head
    for head_scale in (per_bh, torch.tensor([1.0, 0.0, 0.5, 2.0], device=cuda)):
        for rep in (None, rand(B, H, N, D), rand(1, H, 1, D)):
            r = attention(q, k, v, head_scale=head_scale, head_replacement=rep)
            ref = reference_attention(q, k, v, head_scale=head_scale, head_replacement=rep)
            assert (r.out.double() - ref.out).abs().max().item() <= tol
    r = attention(q, k, v, head_scale=per_bh)
    assert torch.all(r.out[0, 1] == 0)  # zero ablation is exact
    rep = rand(B, H, N, D)
    r = attention(q, k, v, head_scale=torch.zeros(B, H, device=cuda), head_replacement=rep)
    assert torch.allclose(r.out.float(), rep.to(dtype).float(), atol=tol)  # s = 0: pure replacement
    a = attention(q, k, v, head_scale=per_bh, stats=("entropy",)).entropy
    b = attention(q, k, v, stats=("entropy",)).entropy
    assert torch.equal(a, b)  # statistics describe the pattern, untouched by the intervention


def test_statistics_on_constructed_patterns(cuda):
    B, H, hq, wq, Nk = 1, 1, 4, 4, 64
    q = torch.zeros(B, H, hq * wq, 8, device=cuda)
    k, v = rand(B, H, Nk, 8), rand(B, H, Nk, 8)
    k_labels = (torch.arange(Nk, device=cuda) % 4)[None]
    r = attention(q, k, v, stats=ALL_STATS, grid=((hq, wq), (8, 8)),
                  labels=(torch.zeros(1, 16, dtype=torch.long, device=cuda), k_labels))
    assert torch.allclose(r.entropy, torch.full_like(r.entropy, math.log(Nk)), atol=1e-5)
    assert torch.allclose(r.label_mass, torch.full_like(r.label_mass, 0.25), atol=1e-6)
    n = 16
    eye = torch.eye(n, device=cuda)[None, None]
    r = attention(eye * 60.0, eye, rand(1, 1, n, 4), scale=1.0, stats=("entropy", "distance"), grid=((4, 4), (4, 4)))
    assert r.entropy.max().item() < 1e-6
    assert r.distance.max().item() < 1e-6


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cuda_agrees_with_cpu_kernel(cuda, dtype):
    q, k, v, kw = full_case(2, 3, 200, 700, 48, 40, dtype, device="cpu")
    head_scale, rep = torch.rand(2, 3), torch.randn(1, 3, 200, 40)
    kw.update(head_scale=head_scale, head_replacement=rep)
    on_cpu = attention(q, k, v, **kw)
    def to_gpu(x):
        if isinstance(x, tuple):
            return tuple(to_gpu(y) for y in x)
        return x.to(cuda) if torch.is_tensor(x) else x

    on_gpu = attention(to_gpu(q), to_gpu(k), to_gpu(v), **{name: to_gpu(value) for name, value in kw.items()})
    out_tol, stat_tol = (2e-5, 2e-4) if dtype == torch.float32 else (2e-2, 1e-3)
    assert (on_gpu.out.cpu().double() - on_cpu.out.double()).abs().max().item() <= out_tol
    for name in ALL_STATS:
        a, b = getattr(on_gpu, name).cpu(), getattr(on_cpu, name)
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        assert torch.allclose(a, b, atol=stat_tol, rtol=1e-4), (name, (a - b).abs().max().item())


def test_many_heads_and_batches_in_one_grid(cuda):
    # more (batch, head) pairs than a 2-D grid's y-dimension holds (65535)
    q, k, v = rand(300, 256, 3, 32, dtype=torch.float16), rand(300, 256, 5, 32, dtype=torch.float16), \
        rand(300, 256, 5, 32, dtype=torch.float16)
    r = attention(q, k, v, stats=("lse",))
    ref = reference_attention(q, k, v, stats=("lse",))
    assert (r.out.double() - ref.out).abs().max().item() <= 2e-2
    assert torch.allclose(r.lse.double(), ref.lse, atol=1e-3)


def test_runs_on_the_current_stream(cuda):
    q, k, v = rand(2, 2, 300, 64, dtype=torch.float16), rand(2, 2, 300, 64, dtype=torch.float16), \
        rand(2, 2, 300, 64, dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        r = attention(q, k, v, stats=("entropy",))
    torch.cuda.current_stream().wait_stream(side)
    ref = reference_attention(q, k, v, stats=("entropy",))
    assert (r.out.double() - ref.out).abs().max().item() <= 2e-2
    assert torch.allclose(r.entropy.double(), ref.entropy, atol=1e-3)


def test_inputs_on_another_device_are_rejected(cuda):
    q, k, v = rand(1, 2, 8, 16), rand(1, 2, 9, 16), rand(1, 2, 9, 16)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, v, key_padding_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises((ValueError, RuntimeError), match="key_padding_mask"):
        torch.ops.diffcirc.attention(q, k, v, 0.25, torch.ones(1, 9, dtype=torch.bool), None, None, [], None, None,
                                     False, False, False)


def test_second_gpu_uses_its_own_device(cuda):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda", 1)
    q, k, v = (rand(1, 2, 50, 64, dtype=torch.float16, device=dev) for _ in range(3))
    r = attention(q, k, v, stats=("lse",))
    assert r.out.device == dev and r.lse.device == dev
    ref = reference_attention(q, k, v)
    assert (r.out.double() - ref.out).abs().max().item() <= 2e-2


def test_no_quadratic_buffer(cuda):
    # N = 8192: one (N, N) float32 matrix per head would be 256 MiB; the op needs only its outputs
    B, H, N, D = 1, 2, 8192, 64
    q, k, v = (rand(B, H, N, D, dtype=torch.float16) for _ in range(3))
    labels = (torch.randint(0, 4, (B, N), dtype=torch.int32, device=cuda),) * 2
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


def _grad_inputs(dtype=torch.float32, B=2, H=3, Nq=40, Nk=530, D=24, Dv=16):
    return tuple(rand(B, H, n, d, dtype=dtype).requires_grad_() for n, d in ((Nq, D), (Nk, D), (Nk, Dv)))


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_gradients_match_reference_autograd(cuda, with_mask):
    q, k, v = _grad_inputs()
    head_scale = torch.rand(2, 3, device=cuda, requires_grad=True)
    rep = torch.randn(1, 3, 40, 16, device=cuda, requires_grad=True)
    mask = None
    if with_mask:
        mask = torch.rand(2, 530, device=cuda) > 0.4
        mask[1] = False  # fully masked rows must give zero, finite gradients
    kw = dict(key_padding_mask=mask, head_scale=head_scale, head_replacement=rep)
    grad_out = torch.randn(2, 3, 40, 16, device=cuda)
    got = torch.autograd.grad(attention(q, k, v, **kw).out, (q, k, v, head_scale, rep), grad_out)
    want = torch.autograd.grad(reference_attention(q, k, v, **kw).out, (q, k, v, head_scale, rep), grad_out.double())
    for name, g, w in zip(("q", "k", "v", "head_scale", "head_replacement"), got, want):
        assert g.shape == w.shape and g.dtype == torch.float32 and g.is_cuda, name
        assert torch.isfinite(g).all(), name
        w = w.double()
        assert torch.allclose(g.double(), w, atol=2e-4, rtol=1e-4), (name, (g.double() - w).abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_gradients_are_close(cuda, dtype):
    q, k, v = _grad_inputs(dtype, Nk=200)
    g = torch.randn(2, 3, 40, 16, device=cuda).to(dtype)
    got = torch.autograd.grad(attention(q, k, v).out, (q, k, v), g)
    want = torch.autograd.grad(reference_attention(q, k, v).out, (q, k, v), g.double())
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert (a.double() - b).abs().max().item() <= 0.03 * b.abs().max().item() + 1e-3


def test_opcheck(cuda):
    q, k, v = (t.detach() for t in _grad_inputs(Nq=9, Nk=13, D=8, Dv=4))
    mask = torch.rand(2, 13, device=cuda) > 0.3
    labels = [torch.randint(0, 3, (2, n), dtype=torch.int32, device=cuda) for n in (9, 13)]
    args = (q, k, v, 0.5, mask, torch.rand(2, 3, device=cuda), torch.randn(2, 3, 9, 4, device=cuda), [3, 3, 1, 13],
            labels[0], labels[1], True, True, True)
    torch.library.opcheck(torch.ops.diffcirc.attention.default, args)
    q.requires_grad_()
    torch.library.opcheck(torch.ops.diffcirc.attention.default,
                          (q, k, v, 0.5, None, None, None, [], None, None, False, False, False))


def test_torch_compile_fullgraph(cuda):
    def f(q, k, v):
        r = attention(q, k, v, stats=("entropy",))
        return r.out * 2, r.entropy

    q, k, v = (t.detach() for t in _grad_inputs(Nk=64))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ent = compiled(q, k, v)
    want_out, want_ent = f(q, k, v)
    assert torch.allclose(out, want_out) and torch.allclose(ent, want_ent)
