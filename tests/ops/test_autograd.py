"""Gradients, torch.library.opcheck and torch.compile for the compiled op."""

import pytest
import torch

from diffcirc.ops import attention, reference_attention


def _inputs(B=2, H=3, Nq=40, Nk=530, D=24, Dv=16):
    q = torch.randn(B, H, Nq, D, requires_grad=True)
    k = torch.randn(B, H, Nk, D, requires_grad=True)
    v = torch.randn(B, H, Nk, Dv, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_gradients_match_reference_autograd(with_mask):
    q, k, v = _inputs()
    head_scale = torch.rand(2, 3, requires_grad=True)
    rep = torch.randn(1, 3, 40, 16, requires_grad=True)
    mask = None
    if with_mask:
        mask = torch.rand(2, 530) > 0.4
        mask[1] = False  # fully masked rows must give zero, finite gradients
    kw = dict(key_padding_mask=mask, head_scale=head_scale, head_replacement=rep)
    grad_out = torch.randn(2, 3, 40, 16)
    got = torch.autograd.grad(attention(q, k, v, **kw).out, (q, k, v, head_scale, rep), grad_out)
    want = torch.autograd.grad(reference_attention(q, k, v, **kw).out, (q, k, v, head_scale, rep),
                               grad_out.double())
    for name, g, w in zip(("q", "k", "v", "head_scale", "head_replacement"), got, want):
        assert g.shape == w.shape and g.dtype == torch.float32, name
        assert torch.isfinite(g).all(), name
        w = w.double()
        assert torch.allclose(g.double(), w, atol=2e-4, rtol=1e-4), (name, (g.double() - w).abs().max().item())


def test_nan_in_masked_keys_leaves_gradients_finite():
    # garbage in padded key rows reaches neither the forward nor the backward
    q, k, v = _inputs(Nk=70)
    mask = torch.ones(2, 70, dtype=torch.bool)
    mask[:, 60:] = False
    bad = k.detach().clone()
    bad[:, :, 60:] = float("nan")
    bad.requires_grad_(True)
    grad_out = torch.randn(2, 3, 40, 16)
    got = torch.autograd.grad(attention(q, bad, v, key_padding_mask=mask).out, (q, bad), grad_out)
    want = torch.autograd.grad(attention(q, k, v, key_padding_mask=mask).out, (q, k), grad_out)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1][:, :, :60], want[1][:, :, :60])
    assert torch.all(got[1][:, :, 60:] == 0)


def test_attribution_gradient_of_head_scale_at_one():
    # d loss / d head_scale at 1 ranks heads in one backward pass (attribution patching)
    q, k, v = _inputs(B=1, H=4, Nq=16, Nk=16, D=8, Dv=8)
    s = torch.ones(4, requires_grad=True)
    loss = attention(q, k, v, head_scale=s).out.square().sum()
    (g,) = torch.autograd.grad(loss, s)
    out = attention(q.detach(), k.detach(), v.detach()).out
    assert torch.allclose(g, 2 * out.square().sum(dim=(0, 2, 3)), rtol=1e-4)


def test_bf16_gradients_are_close():
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in _inputs(Nk=200))
    g = torch.randn(2, 3, 40, 16).bfloat16()
    got = torch.autograd.grad(attention(q, k, v).out, (q, k, v), g)
    want = torch.autograd.grad(reference_attention(q, k, v).out, (q, k, v), g.double())
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        assert (a.double() - b).abs().max().item() <= 0.03 * b.abs().max().item() + 1e-3


def test_opcheck():
    q, k, v = (t.detach() for t in _inputs(Nq=9, Nk=13, D=8, Dv=4))
    mask = torch.rand(2, 13) > 0.3
    args = (q, k, v, 0.5, mask, torch.rand(2, 3), torch.randn(2, 3, 9, 4), [3, 3, 1, 13],
            torch.randint(0, 3, (2, 9), dtype=torch.int32), torch.randint(0, 3, (2, 13), dtype=torch.int32),
            True, True, True)
    torch.library.opcheck(torch.ops.diffcirc.attention.default, args)
    q.requires_grad_()
    torch.library.opcheck(torch.ops.diffcirc.attention.default, (q, k, v, 0.5, None, None, None, [], None, None,
                                                                 False, False, False))


def test_torch_compile_fullgraph():
    def f(q, k, v):
        r = attention(q, k, v, stats=("entropy",))
        return r.out * 2, r.entropy

    q, k, v = (t.detach() for t in _inputs(Nk=64))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ent = compiled(q, k, v)
    want_out, want_ent = f(q, k, v)
    assert torch.allclose(out, want_out) and torch.allclose(ent, want_ent)
