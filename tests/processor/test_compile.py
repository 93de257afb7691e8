"""torch.compile over models on the fused processors: the second call does not recompile, and
``fullgraph=True`` traces through key padding masks, forward and backward equal to eager.

The backend is aot_eager: it runs Dynamo (graph breaks, guards, recompiles) and AOTAutograd (the
op's fake impl and autograd) like inductor, without inductor's code generation, which takes
minutes for a UNet on two cores.
"""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from helpers import tiny_models as tm
from diffcirc.ops import extension
from diffcirc.processor import FusedAttnProcessor

BACKEND = "aot_eager"
TOL = 1e-5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def first_load(monkeypatch):
    """The extension not yet loaded, as in a fresh process whose first op call is compiled."""
    monkeypatch.setattr(extension, "_module", extension._NOT_TRIED)


def _fused(model):
    tm.set_processors(model, lambda name: FusedAttnProcessor())
    return model


def test_second_call_of_a_compiled_unet_does_not_recompile(first_load):
    model = _fused(tm.cond_unet())
    x, t, enc, mask = tm.cond_inputs(2)
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        compiled(x, t, enc, encoder_attention_mask=mask)
        got = compiled(x.flip(0), t, enc.flip(0), encoder_attention_mask=mask).sample
    assert extension.available()  # loaded by the compiled call, for real
    with torch.no_grad():
        want = model(x.flip(0), t, enc.flip(0), encoder_attention_mask=mask).sample
        unmasked = model(x.flip(0), t, enc.flip(0)).sample
    assert (got - want).abs().max() <= TOL
    assert (unmasked - want).abs().max() > 1e-3  # the mask reached the compiled layers


def test_fullgraph_with_a_key_padding_mask_matches_eager_forward_and_backward():
    model = _fused(tm.transformer2d())
    g = torch.Generator().manual_seed(3)
    x, enc = torch.randn(2, 32, 6, 5, generator=g), torch.randn(2, 5, 24, generator=g)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    weights = torch.randn(2, 32, 6, 5, generator=g)
    to_k = model.transformer_blocks[0].attn2.to_k.weight  # reaches the output only through unmasked keys

    def run(forward):
        model.zero_grad(set_to_none=True)
        xs, es = x.clone().requires_grad_(), enc.clone().requires_grad_()
        # return_dict=False: the output dataclass of Transformer2DModel warns a deprecation, itself a graph break
        out = forward(xs, encoder_hidden_states=es, encoder_attention_mask=mask, return_dict=False)[0]
        (out * weights).sum().backward()
        return out.detach(), xs.grad, es.grad, to_k.grad.clone()

    want = run(model)
    got = run(torch.compile(model, backend=BACKEND, fullgraph=True))
    for name, a, b in zip(("out", "d x", "d encoder_hidden_states", "d to_k"), got, want):
        assert (a - b).abs().max() <= TOL * max(1.0, b.abs().max().item()), name
    assert torch.all(want[2][0, 3:] == 0) and want[2][1, 3:].abs().max() > 0  # masked text tokens get no gradient


@pytest.mark.parametrize("case", ["soft_bias", "causal"])
def test_masks_the_op_cannot_express_are_refused_inside_a_compiled_graph(case):
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    attn.set_processor(FusedAttnProcessor("blocks.0.attn"))
    x = torch.randn(2, 5, 16)
    if case == "soft_bias":
        mask, message = torch.zeros(2, 1, 5), "soft additive bias"
        mask[:, :, 2] = -1.5
    else:
        mask, message = torch.full((5, 5), -10000.0).triu(1).expand(2, 5, 5), "causal"
    compiled = torch.compile(attn, backend=BACKEND, fullgraph=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match=f"layer 'blocks.0.attn'.*{message}"):
        compiled(x, attention_mask=mask)



@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformer_counterparts_compile_fullgraph_without_recompiling(family):
    from helpers import tiny_transformers as tt
    from diffcirc.processor import FusedFluxAttnProcessor, FusedJointAttnProcessor

    built = tt.sd3(dual_attention=True) if family == "sd3" else tt.flux()
    model = built.model
    fused = FusedJointAttnProcessor if family == "sd3" else FusedFluxAttnProcessor
    first, second = built.inputs(1), built.inputs(2)
    with torch.no_grad():
        want = model(**second).sample
        tm.set_processors(model, lambda name: fused())
        compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(**first)
            got = compiled(**second).sample
    assert ((got - want).abs().max() / want.abs().max()).item() <= TOL
