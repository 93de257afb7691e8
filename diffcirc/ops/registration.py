"""torch.compile and autograd support for the compiled op ``torch.ops.diffcirc.attention``.

Schema (defined in ``csrc/attention.cpp``):
    attention(q, k, v, scale, key_padding_mask?, head_scale?, head_replacement?, grid[],
              q_labels?, k_labels?, entropy, distance, label_mass, key_groups?=None, n_groups=0,
              sum_group_heads=False)
        -> (out (B, H, Nq, Dv), laid out as (B, Nq, H, Dv), lse (B, H, Nq), entropy, distance, label_mass,
            key_group_mass (B, H, Nq, n_groups), or (B, 1, Nq, n_groups) with sum_group_heads,
            computed when key_groups is given)
A statistic that was not asked for comes back as an empty (0,) float32 tensor.
"""

from __future__ import annotations

import torch

from .backward import attention_backward

_OP = "diffcirc::attention"


@torch.library.register_fake(_OP)
def _attention_fake(q, k, v, scale, key_padding_mask, head_scale, head_replacement, grid, q_labels, k_labels,
                    entropy, distance, label_mass, key_groups=None, n_groups=0, sum_group_heads=False):
    B, H, Nq, _ = q.shape
    out = q.new_empty((B, Nq, H, v.shape[3])).transpose(1, 2)  # the kernels' (B, Nq, H, Dv) layout
    stat = lambda on: q.new_empty((B, H, Nq) if on else (0,), dtype=torch.float32)  # noqa: E731
    heads = 1 if sum_group_heads else H
    group_mass = q.new_empty((B, heads, Nq, n_groups) if key_groups is not None else (0,), dtype=torch.float32)
    return out, stat(True), stat(entropy), stat(distance), stat(label_mass), group_mass


def _setup_context(ctx, inputs, output):
    q, k, v, scale, key_padding_mask, head_scale, head_replacement = inputs[:7]
    ctx.scale = scale
    # the statistics describe the attention pattern and are not differentiable: they come back
    # without requires_grad (a backward through one raises instead of giving a silent 0, and
    # recording one keeps no graph alive)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(q, k, v, key_padding_mask, head_scale, head_replacement, output[1])


def _backward(ctx, grad_out, *_grad_stats):
    q, k, v, key_padding_mask, head_scale, head_replacement, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3] + (ctx.needs_input_grad[5], ctx.needs_input_grad[6])
    dq, dk, dv, ds, dr = attention_backward(grad_out, q, k, v, ctx.scale, key_padding_mask, head_scale,
                                            head_replacement, lse, needs)
    return dq, dk, dv, None, None, ds, dr, None, None, None, None, None, None, None, None, None


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
