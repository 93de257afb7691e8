"""Gradients, torch.library.opcheck and torch.compile for the compiled op, on every device."""

import pytest
import torch

from diffcirc.ops import attention, backward, reference_attention


def _inputs(B=2, H=3, Nq=40, Nk=530, D=24, Dv=16, dtype=torch.float32, device="cpu"):
    return tuple(torch.randn(B, H, n, d, device=device).to(dtype).requires_grad_()
                 for n, d in ((Nq, D), (Nk, D), (Nk, Dv)))


def _assert_gradients_match_reference(q, k, v, key_padding_mask, head_replacement_shape):
    """Gradients w.r.t. q, k, v, head_scale and head_replacement against the float64 reference's autograd."""
    B, H, Nq, Dv = *q.shape[:3], v.shape[3]
    head_scale = torch.rand(B, H, device=q.device, requires_grad=True)
    rep = torch.randn(head_replacement_shape, device=q.device, requires_grad=True)
    kw = dict(key_padding_mask=key_padding_mask, head_scale=head_scale, head_replacement=rep)
    grad_out = torch.randn(B, H, Nq, Dv, device=q.device)
    got = torch.autograd.grad(attention(q, k, v, **kw).out, (q, k, v, head_scale, rep), grad_out)
    want = torch.autograd.grad(reference_attention(q, k, v, **kw).out, (q, k, v, head_scale, rep),
                               grad_out.double())
    for name, g, w in zip(("q", "k", "v", "head_scale", "head_replacement"), got, want):
        assert g.shape == w.shape and g.dtype == torch.float32 and g.device == q.device, name
        assert torch.isfinite(g).all(), name
        w = w.double()
        assert torch.allclose(g.double(), w, atol=2e-4, rtol=1e-4), (name, (g.double() - w).abs().max().item())


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_gradients_match_reference_autograd(with_mask, device):
    q, k, v = _inputs(device=device)
    mask = None
    if with_mask:
        mask = torch.rand(2, 530, device=device) > 0.4
        mask[1] = False  # fully masked rows must give zero, finite gradients
    _assert_gradients_match_reference(q, k, v, mask, (1, 3, 40, 16))


@pytest.mark.parametrize("queries_per_chunk", [0, 7], ids=["budget-below-one-query", "7-queries"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_gradients_over_many_query_chunks(queries_per_chunk, with_mask, device, monkeypatch):
    # the backward rebuilds P one chunk of queries at a time; dk, dv and d head_scale sum over every
    # chunk, dq is written per chunk. Nq = 40 in chunks of 7 (five, and a last one of 5), or of 1
    # when the memory budget is below one query's (B, H, 1, Nk) buffer.
    B, H, Nk = 2, 3, 53
    monkeypatch.setattr(backward, "_CHUNK_ELEMENTS", max(1, queries_per_chunk * B * H * Nk))
    q, k, v = _inputs(B=B, H=H, Nk=Nk, device=device)
    mask = None
    if with_mask:
        mask = torch.rand(B, Nk, device=device) > 0.4
        mask[1] = False
    _assert_gradients_match_reference(q, k, v, mask, (B, H, 40, 16))
    _assert_gradients_match_reference(q, k, v, mask, (1, H, 1, 16))  # a replacement broadcast over queries


@pytest.mark.parametrize("wrt", ["q", "k", "v", "head_scale", "head_replacement"])
def test_gradient_of_one_input_alone(wrt, device):
    # the backward computes only the gradients autograd asks for: each input alone, the rest constants
    q, k, v = (t.detach() for t in _inputs(Nk=70, device=device))
    inputs = dict(q=q, k=k, v=v, head_scale=torch.rand(2, 3, device=device),
                  head_replacement=torch.randn(2, 3, 40, 16, device=device))
    inputs[wrt].requires_grad_()
    grad_out = torch.randn(2, 3, 40, 16, device=device)

    def grad(op, g):
        out = op(inputs["q"], inputs["k"], inputs["v"], head_scale=inputs["head_scale"],
                 head_replacement=inputs["head_replacement"]).out
        return torch.autograd.grad(out, inputs[wrt], g)[0]

    got, want = grad(attention, grad_out), grad(reference_attention, grad_out.double())
    assert got.shape == inputs[wrt].shape
    assert torch.allclose(got.double(), want.double(), atol=2e-4, rtol=1e-4), (got.double() - want).abs().max().item()


def test_nan_in_masked_keys_leaves_gradients_finite(device):
    # garbage in padded key rows reaches neither the forward nor the backward
    q, k, v = _inputs(Nk=70, device=device)
    mask = torch.ones(2, 70, dtype=torch.bool, device=device)
    mask[:, 60:] = False
    bad = k.detach().clone()
    bad[:, :, 60:] = float("nan")
    bad.requires_grad_(True)
    grad_out = torch.randn(2, 3, 40, 16, device=device)
    got = torch.autograd.grad(attention(q, bad, v, key_padding_mask=mask).out, (q, bad), grad_out)
    want = torch.autograd.grad(attention(q, k, v, key_padding_mask=mask).out, (q, k), grad_out)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1][:, :, :60], want[1][:, :, :60])
    assert torch.all(got[1][:, :, 60:] == 0)


def test_attribution_gradient_of_head_scale_at_one(device):
    # d loss / d head_scale at 1 ranks heads in one backward pass (attribution patching)
    q, k, v = _inputs(B=1, H=4, Nq=16, Nk=16, D=8, Dv=8, device=device)
    s = torch.ones(4, device=device, requires_grad=True)
    loss = attention(q, k, v, head_scale=s).out.square().sum()
    (g,) = torch.autograd.grad(loss, s)
    out = attention(q.detach(), k.detach(), v.detach()).out
    assert torch.allclose(g, 2 * out.square().sum(dim=(0, 2, 3)), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_gradients_are_close(dtype, device):
    q, k, v = _inputs(Nk=200, dtype=dtype, device=device)
    g = torch.randn(2, 3, 40, 16, device=device).to(dtype)
    got = torch.autograd.grad(attention(q, k, v).out, (q, k, v), g)
    want = torch.autograd.grad(reference_attention(q, k, v).out, (q, k, v), g.double())
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert (a.double() - b).abs().max().item() <= 0.03 * b.abs().max().item() + 1e-3


def test_opcheck(device):
    q, k, v = (t.detach() for t in _inputs(Nq=9, Nk=13, D=8, Dv=4, device=device))
    mask = torch.rand(2, 13, device=device) > 0.3
    labels = [torch.randint(0, 3, (2, n), dtype=torch.int32, device=device) for n in (9, 13)]
    args = (q, k, v, 0.5, mask, torch.rand(2, 3, device=device), torch.randn(2, 3, 9, 4, device=device), [3, 3, 1, 13],
            labels[0], labels[1], True, True, True)
    torch.library.opcheck(torch.ops.diffcirc.attention.default, args)
    q.requires_grad_()
    torch.library.opcheck(torch.ops.diffcirc.attention.default,
                          (q, k, v, 0.5, None, None, None, [], None, None, False, False, False))


def test_torch_compile_fullgraph(device):
    def f(q, k, v):
        r = attention(q, k, v, stats=("entropy",))
        return r.out * 2, r.entropy

    q, k, v = (t.detach() for t in _inputs(Nk=64, device=device))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ent = compiled(q, k, v)
    want_out, want_ent = f(q, k, v)
    assert torch.allclose(out, want_out) and torch.allclose(ent, want_ent)


def test_key_group_mass_leaves_gradients_alone(device):
    # the statistic is not differentiable; asking for it changes no gradient of out, bit for bit
    q, k, v = _inputs(device=device)
    mask = torch.rand(2, 530, device=device) > 0.3
    kg = torch.randint(-1, 6, (2, 530), device=device)
    grad_out = torch.randn(2, 3, 40, 16, device=device)
    r = attention(q, k, v, key_padding_mask=mask, stats=("key_group_mass",), key_groups=kg, n_groups=6)
    assert not r.key_group_mass.requires_grad
    got = torch.autograd.grad(r.out, (q, k, v), grad_out)
    want = torch.autograd.grad(attention(q, k, v, key_padding_mask=mask).out, (q, k, v), grad_out)
    for name, a, b in zip("qkv", got, want):
        assert torch.equal(a, b), name


def test_opcheck_with_key_groups(device):
    q, k, v = (t.detach() for t in _inputs(Nq=9, Nk=13, D=8, Dv=4, device=device))
    kg = torch.randint(-1, 5, (2, 13), dtype=torch.int32, device=device)
    args = (q, k, v, 0.5, torch.rand(2, 13, device=device) > 0.3, None, None, [], None, None, True, False, False, kg, 5)
    torch.library.opcheck(torch.ops.diffcirc.attention.default, args)
    torch.library.opcheck(torch.ops.diffcirc.attention.default, (*args, True))  # summed over heads: (B, 1, Nq, G)
    q.requires_grad_()
    torch.library.opcheck(torch.ops.diffcirc.attention.default, args)


def test_torch_compile_fullgraph_with_key_group_mass(device):
    def f(q, k, v, kg):
        r = attention(q, k, v, stats=("key_group_mass",), key_groups=kg, n_groups=5)
        return r.out * 2, r.key_group_mass

    q, k, v = (t.detach() for t in _inputs(Nk=64, device=device))
    kg = torch.randint(-1, 5, (2, 64), device=device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, mass = compiled(q, k, v, kg)
    want_out, want_mass = f(q, k, v, kg)
    assert mass.shape == (2, 3, 40, 5)
    assert torch.allclose(out, want_out) and torch.equal(mass, want_mass)
