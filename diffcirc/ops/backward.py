"""Backward of the fused attention op, by recomputation in query chunks.

The forward keeps only lse; here P = exp(scale * q k^T - lse) is rebuilt one chunk of queries at a
time, so memory stays O(chunk * Nk) per (B, H) and never O(Nq * Nk). Works on any device.
"""

from __future__ import annotations


import torch

# Elements of one (B, H, chunk, Nk) float32 buffer: 2**24 * 4 B = 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


def attention_backward(grad_out, q, k, v, scale, key_padding_mask, head_scale, head_replacement, lse, needs):
    """Gradients of out = s * softmax(scale q k^T) v + (1 - s) * r.

    grad_out: (B, H, Nq, Dv); lse: (B, H, Nq) float32 from the forward (-inf on fully masked rows).
    needs: which of (q, k, v, head_scale, head_replacement) need a gradient.
    Returns a 5-tuple of gradients (None where not needed), in the inputs' dtypes.
    """
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    g = grad_out.float()
    kf, vf = k.float(), v.float()
    if key_padding_mask is not None:  # a masked key never reaches its rows, not even as NaN x 0 in dq
        kf = torch.where(key_padding_mask[:, None, :, None], kf, torch.zeros((), device=kf.device))
    s = head_scale.float()[:, :, None, None] if head_scale is not None else None
    d_o = g * s if s is not None else g  # gradient reaching the attention output O

    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if needs[0] else None
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device) if needs[1] else None
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device) if needs[2] else None
    ds = torch.zeros(B, H, dtype=torch.float32, device=q.device) if needs[3] else None

    keep = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
    chunk = max(1, min(Nq, _CHUNK_ELEMENTS // max(1, B * H * Nk)))
    for start in range(0, Nq, chunk):
        sl = slice(start, start + chunk)
        qc = q[:, :, sl].float()
        logits = torch.matmul(qc, kf.transpose(-1, -2)) * scale
        lse_c = lse[:, :, sl, None]
        finite = torch.isfinite(lse_c)
        p = torch.exp(logits - torch.where(finite, lse_c, torch.zeros_like(lse_c)))
        p = torch.where(finite, p, torch.zeros_like(p))
        if keep is not None:
            p = torch.where(keep, p, torch.zeros_like(p))
        o = torch.matmul(p, vf)  # (B, H, c, Dv): the attention output before interventions
        if ds is not None:
            r = head_replacement[:, :, sl].float() if head_replacement is not None else 0.0
            ds += (g[:, :, sl] * (o - r)).sum(dim=(-1, -2))
        doc = d_o[:, :, sl]
        if dv is not None:
            dv += torch.matmul(p.transpose(-1, -2), doc)
        if dq is not None or dk is not None:
            dp = torch.matmul(doc, vf.transpose(-1, -2))
            delta = (doc * o).sum(dim=-1, keepdim=True)
            dlogits = p * (dp - delta) * scale
            if dq is not None:
                dq[:, :, sl] = torch.matmul(dlogits, kf)
            if dk is not None:
                dk += torch.matmul(dlogits.transpose(-1, -2), qc)

    dr = None
    if needs[4]:
        dr = g * (1 - s) if s is not None else torch.zeros_like(g)
        dr = dr.to(head_replacement.dtype)
    cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
    return cast(dq, q), cast(dk, k), cast(dv, v), cast(ds, head_scale) if ds is not None else None, dr


