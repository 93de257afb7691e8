"""Fused counterparts of the transformer models' attention processors, step for step, on the fused op.

=============================  ==============================  ===================================
counterpart                    reproduces                      used by
=============================  ==============================  ===================================
``FusedJointAttnProcessor``    ``JointAttnProcessor2_0``       SD3 / SD3.5 (MMDiT), dual attention
``FusedAuraFlowAttnProcessor`` ``AuraFlowAttnProcessor2_0``    AuraFlow
``FusedFluxAttnProcessor``     ``FluxAttnProcessor``           Flux (``FluxAttention``)
``FusedSanaAttnProcessor``     ``SanaAttnProcessor2_0``        Sana's cross-attention
=============================  ==============================  ===================================

Each runs the same projections, norms, RoPE, concatenation, split and output projections as the
processor it replaces, in the same order, and hands q, k, v to ``run_attention`` instead of SDPA.
A joint layer (image and text tokens in one softmax) tells the controller where its image tokens
are (``AttentionCall.image_span``): SD3 puts them first, Flux and AuraFlow after the text. In the
single-stream blocks of Flux and AuraFlow the text was joined to the image tokens before the
module, so the span is left to the controller.

Used alone each is a drop-in processor (``transformer.set_attn_processor(FusedJointAttnProcessor())``).
Each class's ``layer_kind(attn)`` says what its layers are: "joint", "self" or "cross".
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.embeddings import apply_rotary_emb

from .masks import key_padding_mask_from_attention_mask
from .processor import Controller, run_attention


def _split_heads(x: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D), a view."""
    return x.view(batch, -1, heads, head_dim).transpose(1, 2)


def _norm_qk(q_norm, k_norm, query: torch.Tensor, key: torch.Tensor):
    """query and key through a layer's optional q / k norms (None: unchanged)."""
    return (query if q_norm is None else q_norm(query)), (key if k_norm is None else k_norm(key))


def _join(first: tuple, second: tuple, dim: int) -> tuple:
    """(q, k, v) of two token sets concatenated along the token dim, ``first``'s tokens first."""
    return tuple(torch.cat([a, b], dim=dim) for a, b in zip(first, second))


class _Counterpart:
    def __init__(self, layer: Optional[str] = None, controller: Optional[Controller] = None):
        self.layer = layer
        self.controller = controller

    @classmethod
    def for_layer(cls, layer: str, controller: Controller, replaced) -> "_Counterpart":
        return cls(layer, controller)


class FusedJointAttnProcessor(_Counterpart):
    """``JointAttnProcessor2_0``: image tokens, then (with context) the context tokens in one softmax.

    Like the processor it follows, it ignores ``attention_mask``. Without encoder_hidden_states
    (SD3.5's dual-attention ``attn2``) it is plain self-attention over the image tokens.
    """

    @staticmethod
    def layer_kind(attn) -> str:
        return "joint" if getattr(attn, "add_q_proj", None) is not None else "self"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, *args, **kwargs):
        """hidden_states: (B, N_img, C); encoder_hidden_states: (B, N_txt, C_ctx) or None.

        Returns (B, N_img, C) or, with context, ((B, N_img, C), (B, N_txt, C) or the unprojected
        context outputs when ``attn.context_pre_only``), like ``JointAttnProcessor2_0``.
        """
        batch, n_image = hidden_states.shape[:2]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (_split_heads(t, batch, attn.heads, head_dim) for t in (query, key, value))
        query, key = _norm_qk(attn.norm_q, attn.norm_k, query, key)

        joint = encoder_hidden_states is not None
        if joint:
            c_query, c_key, c_value = (_split_heads(proj(encoder_hidden_states), batch, attn.heads, head_dim)
                                       for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            c_query, c_key = _norm_qk(attn.norm_added_q, attn.norm_added_k, c_query, c_key)
            query, key, value = _join((query, key, value), (c_query, c_key, c_value), dim=2)

        out = run_attention(self.layer, self.controller, query, key, value, None, None,
                            kind="joint" if joint else "self", image_span=(0, n_image) if joint else None)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        if joint:
            hidden_states, encoder_hidden_states = hidden_states[:, :n_image], hidden_states[:, n_image:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return (hidden_states, encoder_hidden_states) if joint else hidden_states


class FusedAuraFlowAttnProcessor(_Counterpart):
    """``AuraFlowAttnProcessor2_0``: context tokens (registers and text), then image tokens, scaled by attn.scale.

    Without encoder_hidden_states (AuraFlow's single-stream blocks) the sequence is the context
    and image tokens joined by the block, so the layer is joint with the span left to the controller.
    """

    @staticmethod
    def layer_kind(attn) -> str:
        return "joint"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 *args, **kwargs):
        """hidden_states: (B, N, C); encoder_hidden_states: (B, N_ctx, C) or None. Output as the processor's."""
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        joint = encoder_hidden_states is not None
        if joint:
            c_query, c_key, c_value = (proj(encoder_hidden_states)
                                       for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        head_dim = key.shape[-1] // attn.heads
        # (B, N, H, D): AuraFlow normalises and joins in this layout
        query, key, value = (t.view(batch, -1, attn.heads, head_dim) for t in (query, key, value))
        query, key = _norm_qk(attn.norm_q, attn.norm_k, query, key)
        n_context = 0
        if joint:
            n_context = encoder_hidden_states.shape[1]
            c_query, c_key, c_value = (t.view(batch, -1, attn.heads, head_dim) for t in (c_query, c_key, c_value))
            c_query, c_key = _norm_qk(attn.norm_added_q, attn.norm_added_k, c_query, c_key)
            query, key, value = _join((c_query, c_key, c_value), (query, key, value), dim=1)

        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        out = run_attention(self.layer, self.controller, query, key, value, attn.scale, None, kind="joint",
                            image_span=(n_context, query.shape[2]) if joint else None)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        if joint:
            hidden_states, encoder_hidden_states = hidden_states[:, n_context:], hidden_states[:, :n_context]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if joint:
            return hidden_states, attn.to_add_out(encoder_hidden_states)
        return hidden_states


def _flux_projections(attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor]):
    """q, k, v (B, N, H*D) and the context's (or None), from separate or fused projection weights."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        context = None
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            context = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return (query, key, value), context
    context = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        context = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                   attn.add_v_proj(encoder_hidden_states))
    return (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)), context


def _flux_padding_mask(attention_mask: torch.Tensor, batch: int, heads: int, n_keys: int, layer) -> torch.Tensor:
    """Bool (B, Nk) from a mask SDPA broadcasts against (B, H, Nq, Nk): 4-D, per-key masks only."""
    if attention_mask.dim() != 4:
        raise ValueError(f"layer {layer!r}: attention_mask must be 4-D (B|1, H|1, 1|Nq, Nk) as SDPA broadcasts it, "
                         f"got shape {tuple(attention_mask.shape)}; diffcirc supports per-key padding masks only")
    expanded = attention_mask.expand(batch, heads, attention_mask.shape[2], n_keys)
    return key_padding_mask_from_attention_mask(expanded, batch, heads, n_keys, layer)


class FusedFluxAttnProcessor(_Counterpart):
    """``FluxAttnProcessor`` on ``FluxAttention``: text tokens, then image tokens, RoPE on both, SDPA's scale.

    Double-stream blocks pass the text as encoder_hidden_states; single-stream blocks pass the
    text and image tokens already joined (no output projection inside the module), so their
    image span is left to the controller. Attention backends other than the native one
    (``_attention_backend``) are not followed: the op computes exact attention.
    """

    @staticmethod
    def layer_kind(attn) -> str:
        return "joint"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None):
        """hidden_states: (B, N, C); encoder_hidden_states: (B, N_txt, C) or None; image_rotary_emb:
        (cos, sin) each (N_txt + N_img, D). Output as ``FluxAttnProcessor``'s."""
        (query, key, value), context = _flux_projections(attn, hidden_states, encoder_hidden_states)
        # (B, N, H, D), heads from the fixed head_dim as the processor does
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            c_query, c_key, c_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in context)
            c_query, c_key = attn.norm_added_q(c_query), attn.norm_added_k(c_key)
            query, key, value = _join((c_query, c_key, c_value), (query, key, value), dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        batch, n_tokens, heads = query.shape[:3]
        padding = None
        if attention_mask is not None:
            padding = _flux_padding_mask(attention_mask, batch, heads, key.shape[1], self.layer)
        n_text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else None
        out = run_attention(self.layer, self.controller, query.transpose(1, 2), key.transpose(1, 2),
                            value.transpose(1, 2), None, padding, kind="joint",
                            image_span=None if n_text is None else (n_text, n_tokens))
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [n_text, hidden_states.shape[1] - n_text], dim=1)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states


class FusedSanaAttnProcessor(_Counterpart):
    """``SanaAttnProcessor2_0`` (Sana's cross-attention): q/k norms before the head split, padding masks."""

    @staticmethod
    def layer_kind(attn) -> str:
        return "cross" if attn.is_cross_attention else "self"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden_states: (B, N, C); encoder_hidden_states: (B, N_txt, C_ctx) or None -> (B, N, C)."""
        batch, sequence_length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        padding = None
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            padding = key_padding_mask_from_attention_mask(attention_mask, batch, attn.heads, sequence_length,
                                                           self.layer)
        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        key, value = attn.to_k(context), attn.to_v(context)
        query, key = _norm_qk(attn.norm_q, attn.norm_k, query, key)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (_split_heads(t, batch, attn.heads, head_dim) for t in (query, key, value))

        out = run_attention(self.layer, self.controller, query, key, value, None, padding,
                            kind="cross" if is_cross else "self")
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states / attn.rescale_output_factor
