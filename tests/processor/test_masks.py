"""diffusers attention masks -> the op's key padding mask: per-key masks in any of diffusers' layouts are
accepted, causal and other query-dependent masks refused by layer name (PriorTransformer's causal mask)."""

import pytest
import torch
from diffusers import PriorTransformer
from diffusers.models.attention_processor import Attention

from diffcirc.processor import FusedAttnProcessor, Recorder, Session
from diffcirc.processor.masks import HARD_MASK_GAP, key_padding_mask_from_attention_mask

TOL = 1e-5
PRIOR_LAYER = "transformer_blocks.0.attn1"


def _prior():
    torch.manual_seed(0)
    return PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=1, embedding_dim=8,
                            num_embeddings=3, additional_embeddings=4).eval()


def _prior_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(6)
    return dict(hidden_states=torch.randn(batch, 8, generator=g), timestep=torch.tensor([3, 5][:batch]),
                proj_embedding=torch.randn(batch, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 3, 8, generator=g))


def test_prior_transformers_causal_mask_is_refused_by_layer_name_at_the_first_forward():
    model = _prior()
    session = Session(model)  # AttnProcessor2_0 layers: accepted until a mask the op cannot express arrives
    padding = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with session.trace(Recorder(stats=("entropy",))), torch.no_grad():
        with pytest.raises(ValueError, match=f"layer '{PRIOR_LAYER}'.*causal and arbitrary masks are not supported"):
            model(**_prior_inputs(), attention_mask=padding)


def test_prior_transformer_without_a_mask_matches_its_default_processor():
    model = _prior()
    with torch.no_grad():
        want = model(**_prior_inputs()).predicted_image_embedding
        rec = Recorder(stats=("entropy",), bins=4)
        with Session(model).trace(rec):
            got = model(**_prior_inputs()).predicted_image_embedding
    assert (got - want).abs().max() <= TOL * want.abs().max()
    assert set(rec.to_frame().layer) == {PRIOR_LAYER}


def test_a_key_padding_mask_repeated_over_heads_and_queries_is_accepted():
    # (B * H, Nq, Nk) with every query row equal: a padding mask in a causal mask's layout
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 5, 16)
    keep = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    bias = torch.where(keep, 0.0, -10000.0)[:, None, :].expand(2, 5, 5).repeat_interleave(2, dim=0)
    with torch.no_grad():
        want = attn(x, attention_mask=bias)
        unmasked = attn(x)
        attn.set_processor(FusedAttnProcessor())
        got = attn(x, attention_mask=bias)
    assert (got - want).abs().max() <= TOL
    assert (unmasked - want).abs().max() > 1e-3  # the mask matters, so the comparison above tests it


def _prepared(rows: torch.Tensor, heads: int = 2, queries: int = 1) -> torch.Tensor:
    """(B, Nk) -> (B, heads, queries, Nk), the layout the processor hands to the conversion."""
    return rows[:, None, None, :].expand(rows.shape[0], heads, queries, rows.shape[1])


def test_causal_mask_message_names_the_layer_when_given():
    causal = torch.full((4, 4), -10000.0).triu(1).expand(1, 2, 4, 4)
    with pytest.raises(ValueError, match="^layer 'down.0.attn1': attention_mask of shape \\(1, 2, 4, 4\\) differs"):
        key_padding_mask_from_attention_mask(causal, 1, 2, 4, layer="down.0.attn1")
    with pytest.raises(ValueError, match="^attention_mask of shape .*a causal or other query-dependent mask"):
        key_padding_mask_from_attention_mask(causal, 1, 2, 4)


def test_hard_mask_gap_is_the_boundary_between_ignore_and_soft_bias():
    at_gap = torch.tensor([[0.0, -HARD_MASK_GAP, 0.0]])
    assert key_padding_mask_from_attention_mask(_prepared(at_gap), 1, 2, 3).tolist() == [[True, False, True]]
    inside = torch.tensor([[0.0, -(HARD_MASK_GAP - 1), 0.0]])
    with pytest.raises(ValueError, match="soft additive bias.*\\(-999.0 where the row maximum is 0.0\\)"):
        key_padding_mask_from_attention_mask(_prepared(inside), 1, 2, 3)


def test_the_gap_is_measured_from_each_rows_maximum():
    shifted = torch.tensor([[5.0, 5.0 - HARD_MASK_GAP, 5.0], [-3.0, -3.0, -3.0 - 2 * HARD_MASK_GAP]])
    assert key_padding_mask_from_attention_mask(_prepared(shifted), 2, 2, 3).tolist() == [
        [True, False, True], [True, True, False]]


def test_an_all_minus_inf_row_attends_nowhere():
    rows = torch.tensor([[-float("inf")] * 3, [0.0, -float("inf"), 0.0]])
    assert key_padding_mask_from_attention_mask(_prepared(rows), 2, 2, 3).tolist() == [
        [False, False, False], [True, False, True]]


def test_integer_masks_and_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match="must be bool or floating, got torch.int64"):
        key_padding_mask_from_attention_mask(_prepared(torch.ones(1, 3, dtype=torch.long)), 1, 2, 3)
    with pytest.raises(ValueError, match="expected shape \\(B, H, 1, Nk\\) = \\(1, 2, 1, 4\\), got \\(1, 2, 1, 3\\)"):
        key_padding_mask_from_attention_mask(_prepared(torch.zeros(1, 3)), 1, 2, 4)
