"""FusedAttnProcessor reproduces diffusers' AttnProcessor2_0 (fp32, max abs diff <= 1e-5)."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from helpers import tiny_models as tm
from diffcirc.processor import FusedAttnProcessor
from diffcirc.processor import processor as processor_module
from diffcirc.processor.masks import key_padding_mask_from_attention_mask

TOL = 1e-5


def _compare(model, run):
    tm.reset_default(model)
    with torch.no_grad():
        expected = run()
        tm.set_processors(model, lambda name: FusedAttnProcessor())
        got = run()
    tm.reset_default(model)
    return (expected - got).abs().max().item(), expected


def test_unet2d_matches_sdpa_processor():
    model = tm.unet2d()
    x, t = tm.unet2d_inputs(2, hw=(16, 12))
    err, _ = _compare(model, lambda: model(x, t).sample)
    assert err <= TOL


def test_cond_unet_with_text_padding_mask_matches_sdpa_processor():
    model = tm.cond_unet()
    x, t, enc, mask = tm.cond_inputs(3)
    err, expected = _compare(model, lambda: model(x, t, enc, encoder_attention_mask=mask).sample)
    assert err <= TOL
    with torch.no_grad():
        unmasked = model(x, t, enc).sample
    assert (unmasked - expected).abs().max() > 1e-3  # the mask matters, so the comparison above tests it


def test_transformer2d_block_matches_sdpa_processor():
    model = tm.transformer2d()
    g = torch.Generator().manual_seed(3)
    x, enc = torch.randn(2, 32, 6, 5, generator=g), torch.randn(2, 5, 24, generator=g)
    err, _ = _compare(model, lambda: model(x, encoder_hidden_states=enc).sample)
    assert err <= TOL


@pytest.mark.parametrize("variant", ["cross_norms_residual", "spatial_norm", "self_3d_bias"])
def test_attention_options_match_sdpa_processor(variant):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    temb = None
    if variant == "cross_norms_residual":
        attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8, norm_num_groups=8,
                         cross_attention_norm="layer_norm", qk_norm="layer_norm", residual_connection=True,
                         rescale_output_factor=2.0, bias=True)
        x, enc = torch.randn(2, 32, 5, 3, generator=g), torch.randn(2, 6, 24, generator=g)
    elif variant == "spatial_norm":
        attn = Attention(query_dim=32, heads=2, dim_head=16, spatial_norm_dim=6, residual_connection=True)
        x, enc, temb = torch.randn(2, 32, 4, 4, generator=g), None, torch.randn(2, 6, 2, 2, generator=g)
    else:
        attn = Attention(query_dim=32, heads=4, dim_head=8, bias=True, out_bias=False)
        x, enc = torch.randn(2, 9, 32, generator=g), None
    attn.eval()
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        expected = attn(x, encoder_hidden_states=enc, temb=temb)
        attn.set_processor(FusedAttnProcessor())
        got = attn(x, encoder_hidden_states=enc, temb=temb)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= TOL


def test_scale_qk_false_follows_attn_scale_like_attn_processor():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, scale_qk=False).eval()
    assert isinstance(attn.processor, AttnProcessor)  # what diffusers picks for such layers
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = attn(x)
        attn.set_processor(FusedAttnProcessor())
        got = attn(x)
    assert (got - expected).abs().max() <= TOL


def test_hot_path_passes_views_and_nothing_else(monkeypatch):
    seen = []
    real = processor_module.attention

    def spy(q, k, v, **kwargs):
        seen.append((q, kwargs))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(processor_module, "attention", spy)
    attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
    attn.set_processor(FusedAttnProcessor())
    with torch.no_grad():
        attn(torch.randn(2, 7, 32))
    (q, kwargs), = seen
    assert q.shape == (2, 4, 7, 8) and not q.is_contiguous() and q.stride(-1) == 1  # a transposed view
    assert kwargs == {"scale": None, "key_padding_mask": None}


def test_additive_and_bool_masks_become_key_padding_masks():
    heads = 3
    additive = torch.tensor([[0.0, 0.0, -10000.0], [-10000.0, -10000.0, -10000.0], [0.0, -float("inf"), 0.0]])
    prepared = additive[:, None, None, :].expand(3, heads, 1, 3)
    kpm = key_padding_mask_from_attention_mask(prepared, 3, heads, 3)
    # an all-ignored additive row is a constant shift: softmax (and SDPA) attend to every key
    assert kpm.tolist() == [[True, True, False], [True, True, True], [True, False, True]]
    boolean = torch.tensor([[True, False, True]]).expand(1, 3)[:, None, None, :].expand(1, heads, 1, 3)
    assert key_padding_mask_from_attention_mask(boolean, 1, heads, 3).tolist() == [[True, False, True]]


def test_masks_the_op_cannot_express_raise():
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    attn.set_processor(FusedAttnProcessor())
    x = torch.randn(2, 5, 16)
    query_dependent = torch.zeros(2, 5, 5)
    query_dependent[:, 0, 1] = -10000.0
    with pytest.raises(ValueError, match="per-key padding masks"):
        attn(x, attention_mask=query_dependent)
    soft = torch.zeros(2, 1, 5)
    soft[:, :, 2] = -1.5
    with pytest.raises(ValueError, match="soft additive bias"):
        attn(x, attention_mask=soft)
    per_head = torch.zeros(4, 1, 5)  # (B * heads, 1, Nk): heads differ
    per_head[1, 0, 3] = -10000.0
    with pytest.raises(ValueError, match="differs between heads"):
        attn(x, attention_mask=per_head)


def test_key_padding_mask_matches_sdpa_on_attention_module():
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)[:, None, :]
    with torch.no_grad():
        expected = attn(x, attention_mask=mask)
        attn.set_processor(FusedAttnProcessor())
        got = attn(x, attention_mask=mask)
    assert (got - expected).abs().max() <= TOL
