"""``FusedAttnProcessor``: diffusers' ``AttnProcessor2_0`` and ``AttnProcessor``, step for step, on the fused op,
and ``run_attention``, the op call with its controller hand-off that every fused counterpart shares.

Used alone it is a drop-in attention processor::

    unet.set_attn_processor(FusedAttnProcessor())

A ``Session`` installs one per layer with a *controller*, an object that is asked before each
call which statistics and interventions the op should apply (``before``) and is handed the
result (``after``). Without a controller the processor calls the op with exactly the arguments
SDPA gets, so it adds nothing to the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from diffusers.utils import deprecate

from ..ops import AttentionOutput, attention
from .masks import key_padding_mask_from_attention_mask


@dataclass
class AttentionCall:
    """One call of one attention layer, as a controller sees it before the op runs.

    spatial is the (h, w) feature map when the layer got a 4-D input, else None (3-D tokens).
    key_padding_mask: bool (B, Nk) or None; value: (B, H, Nk, Dv) (a view, do not modify).

    kind "joint": queries and keys are one sequence of image and text tokens (SD3, Flux, AuraFlow).
    image_span = (start, stop) are the image tokens' positions in it, the same for queries and
    keys; None when the sequence was joined before the attention module (single-stream blocks),
    where only the controller can tell (see ``Session``).
    """

    layer: str
    kind: str  # "self" | "cross" | "joint"
    spatial: Optional[tuple]
    batch: int
    heads: int
    n_queries: int
    n_keys: int
    key_padding_mask: Optional[torch.Tensor]
    value: torch.Tensor
    image_span: Optional[tuple] = None


@dataclass
class OpRequest:
    """Extra arguments of ``diffcirc.ops.attention`` a controller asks for (see the op's docstring).

    On a joint call, image_stats are computed by a second, statistics-only op call over the image
    tokens image_span (queries and keys), to which grid and labels then refer: distance and label
    mass are those of the softmax over image keys, as in a UNet's self-attention.
    """

    stats: tuple = ()
    grid: Optional[tuple] = None
    labels: Optional[tuple] = None
    head_scale: Optional[torch.Tensor] = None
    head_replacement: Optional[torch.Tensor] = None
    image_stats: tuple = ()
    image_span: Optional[tuple] = None
    key_groups: Optional[torch.Tensor] = None  # (B, Nk) int32 in [-1, n_groups), for "key_group_mass"
    n_groups: Optional[int] = None
    key_group_mass_heads: str = "each"  # "sum": (B, 1, Nq, G), summed over heads in the kernel


class Controller(Protocol):
    def before(self, call: AttentionCall) -> Optional[OpRequest]: ...

    def after(self, call: AttentionCall, result: AttentionOutput) -> None: ...


SCALE_RULES = ("auto", "head_dim", "attn")


def run_attention(layer: Optional[str], controller: Optional[Controller], query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, scale: Optional[float], key_padding_mask: Optional[torch.Tensor], *,
                  kind: str, spatial: Optional[tuple] = None, image_span: Optional[tuple] = None) -> torch.Tensor:
    """The head outputs (B, H, Nq, Dv) of the fused op on query (B, H, Nq, D), key, value (B, H, Nk, D|Dv).

    Without a controller, or when it asks for nothing, the op gets exactly the arguments SDPA
    would; otherwise the controller's statistics and interventions (``Controller``).
    """
    if controller is None:
        return attention(query, key, value, scale=scale, key_padding_mask=key_padding_mask).out
    call = AttentionCall(layer=layer, kind=kind, spatial=spatial, batch=query.shape[0], heads=query.shape[1],
                         n_queries=query.shape[2], n_keys=key.shape[2], key_padding_mask=key_padding_mask,
                         value=value, image_span=image_span)
    request = controller.before(call)
    if request is None:
        return attention(query, key, value, scale=scale, key_padding_mask=key_padding_mask).out
    groups = {} if request.key_groups is None else {"key_groups": request.key_groups, "n_groups": request.n_groups,
                                                    "key_group_mass_heads": request.key_group_mass_heads}
    result = attention(query, key, value, scale=scale, key_padding_mask=key_padding_mask,
                       head_scale=request.head_scale, head_replacement=request.head_replacement,
                       stats=request.stats, grid=None if request.image_stats else request.grid,
                       labels=None if request.image_stats else request.labels, **groups)
    if request.image_stats:
        # interventions change outputs, never probabilities, so the image-only call needs none
        s = slice(*request.image_span)
        image_mask = None if key_padding_mask is None else key_padding_mask[:, s]
        with torch.no_grad():
            image = attention(query[:, :, s].detach(), key[:, :, s].detach(), value[:, :, s].detach(), scale=scale,
                              key_padding_mask=image_mask, stats=request.image_stats, grid=request.grid,
                              labels=request.labels)
        result = result._replace(**{stat: getattr(image, stat) for stat in request.image_stats})
    controller.after(call, result)
    return result.out


class FusedAttnProcessor:
    """Drop-in replacement for ``AttnProcessor2_0`` computing attention with ``diffcirc.ops.attention``.

    Args:
        layer: module path of the ``Attention`` it serves (addresses controllers, names the layer
            in error messages).
        controller: see ``Controller``; None for plain attention.
        scale_rule: how q·k is scaled, so as to follow the processor it replaces. "head_dim":
            D ** -0.5 always, as ``AttnProcessor2_0`` (SDPA's default); "attn": ``attn.scale``, as
            ``AttnProcessor``; "auto" (the drop-in default): ``attn.scale`` on layers built with
            ``scale_qk=False`` (= 1; diffusers gives such layers ``AttnProcessor``), D ** -0.5 otherwise.

    Difference from ``AttnProcessor2_0``, outside what SDPA-based diffusers models use: attention
    masks must be per-key padding masks (see ``masks``; causal and other masks are refused).
    """

    def __init__(self, layer: Optional[str] = None, controller: Optional[Controller] = None,
                 scale_rule: str = "auto"):
        if scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {scale_rule!r}")
        self.layer = layer
        self.controller = controller
        self.scale_rule = scale_rule

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states: (B, C, h, w) or (B, N, C); encoder_hidden_states: (B, Nk, C_cross) or None.

        Returns the layer output in the input's layout, like ``AttnProcessor2_0``.
        """
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecate("scale", "1.0.0", "The `scale` argument is deprecated and will be ignored (as in AttnProcessor2_0).")

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        key_padding_mask = None
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            key_padding_mask = key_padding_mask_from_attention_mask(
                attention_mask, batch_size, attn.heads, sequence_length, self.layer)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        # (B, N, H*D) -> (B, H, N, D) views: the op reads any strides with a contiguous last dim.
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # None = D ** -0.5, what SDPA uses in AttnProcessor2_0 whatever attn.scale holds.
        head_dim_scale = self.scale_rule == "head_dim" or (self.scale_rule == "auto" and attn.scale_qk)
        scale = None if head_dim_scale else attn.scale

        out = run_attention(self.layer, self.controller, query, key, value, scale, key_padding_mask,
                            kind="cross" if is_cross else "self", spatial=(height, width) if input_ndim == 4 else None)

        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # linear proj, then dropout
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states
