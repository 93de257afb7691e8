"""The joint-attention benchmark: one Flux-like joint layer, where text and image tokens attend
together (text first, as Flux concatenates them), read as DAAM-style per-token heatmaps: per query,
the attention mass on each text token.

It compares PyTorch SDPA (the attention diffusers' default processor runs), the fused kernel, the
fused kernel with key-group mass over every text token (each its own group, image keys in none),
summed over heads in the kernel as token heatmaps sum them, and the materialising map of
attention-map tools (the full probabilities, then their text-key columns summed over heads):
median ms and peak extra memory of one call each, every implementation checked against the float64
reference before it is timed (gate.IncorrectImplementation otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffcirc.bench import gate, measure
from diffcirc.bench.cases import DTYPES
from diffcirc.ops import attention, reference_attention

# Flux at 1024 x 1024: 64 x 64 latent patches and a 512-token T5 prompt, head dim 128, 24 heads.
N_IMG, N_TXT, D, FLUX_HEADS = 4096, 512, 128, 24
HEADS = 4  # default: what two CPU cores run in reasonable time (every head costs the same)
REPEATS = 3
DEFAULTS = {"h": HEADS, "n_img": N_IMG, "n_txt": N_TXT, "d": D, "repeats": REPEATS}
QUICK = {"h": 1, "n_img": 256, "n_txt": 64, "d": 64, "repeats": 1}  # seconds: a smoke run of every path
HEADER = f"{'implementation':22} {'ms':>13} {'vs sdpa':>13} {'peak extra':>19}  error vs float64"


def make_joint_case(b: int, h: int, n_img: int, n_txt: int, d: int, dtype: torch.dtype, seed: int = 0,
                    device="cpu") -> dict:
    """q, k, v (b, h, n_txt + n_img, d) of dtype; key_groups (b, n_txt + n_img): text token t is
    group t, image keys -1; n_groups = n_txt."""
    g = torch.Generator(device=device).manual_seed(seed)
    n = n_txt + n_img
    q, k, v = (torch.randn(b, h, n, d, generator=g, device=device).to(dtype) for _ in range(3))
    key_groups = torch.full((b, n), -1, dtype=torch.int32, device=device)
    key_groups[:, :n_txt] = torch.arange(n_txt, dtype=torch.int32, device=device)
    return {"q": q, "k": k, "v": v, "key_groups": key_groups, "n_groups": n_txt}


def sdpa(c):
    return F.scaled_dot_product_attention(c["q"], c["k"], c["v"]), None


def fused(c):
    return attention(c["q"], c["k"], c["v"]).out, None


def fused_key_group_mass(c):
    r = attention(c["q"], c["k"], c["v"], stats=("key_group_mass",), key_groups=c["key_groups"],
                  n_groups=c["n_groups"], key_group_mass_heads="sum")
    return r.out, r.key_group_mass


def materialising_map(c):
    """What attention-map tools do: the (N, N) probabilities in the inputs' dtype, their text-key
    columns summed over heads kept as the map."""
    q, k, v = c["q"], c["k"], c["v"]
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    return torch.matmul(p, v), p[..., :c["n_groups"]].float().sum(dim=1, keepdim=True)


# name -> fn(case) -> (out (B, H, N, D), text-token mass summed over heads (B, 1, N, n_txt) float32 or None)
IMPLEMENTATIONS = {"sdpa": sdpa, "fused": fused, "fused+key-group mass": fused_key_group_mass,
                   "materialising map": materialising_map}


def reference(case: dict):
    """float64 out of (b=0, h=0) and text-token mass of b=0 summed over heads (1, 1, N, n_txt),
    one head at a time (a head's (N, N) float64 probabilities are 170 MB at Flux's size)."""
    out, mass = None, 0
    for h in range(case["q"].shape[1]):
        q, k, v = (case[name][:1, h:h + 1] for name in ("q", "k", "v"))
        ref = reference_attention(q, k, v, stats=("key_group_mass",), key_groups=case["key_groups"][:1],
                                  n_groups=case["n_groups"])
        out = ref.out if out is None else out
        mass = mass + ref.key_group_mass
    return ref._replace(out=out, key_group_mass=mass)


def check(name: str, fn, case: dict, dtype: torch.dtype, ref) -> float:
    """Max abs error of fn(case)'s out and map on (b=0, h=0) against ref; IncorrectImplementation
    past the dtype's tolerance (gate.TOLERANCES)."""
    out, mass = fn(case)
    errors = [(out[:1, :1].double() - ref.out).abs().max()]
    if mass is not None:
        errors.append((mass[:1].double() - ref.key_group_mass).abs().max())
    err = torch.stack(errors).max().item()
    if not err <= gate.TOLERANCES[dtype]:
        raise gate.IncorrectImplementation(f"{name}: max error {err:.3g} against the float64 reference exceeds "
                                           f"{gate.TOLERANCES[dtype]}")
    return err


def run_joint(h: int = HEADS, dtype: str = "bf16", n_img: int = N_IMG, n_txt: int = N_TXT, d: int = D, b: int = 1,
              repeats: int = REPEATS, names=None, device="cpu", log=print) -> list:
    """One row per implementation (names: default all of IMPLEMENTATIONS, in that order): the case,
    ms (median), ms_min, ms_max, peak_extra_bytes, max_abs_err and vs_sdpa (ms / sdpa's ms)."""
    time_call, peak = measure.measurers(device)
    case = make_joint_case(b, h, n_img, n_txt, d, DTYPES[dtype], device=device)
    ref = reference(case)
    rows = []
    for name in names or IMPLEMENTATIONS:
        fn = IMPLEMENTATIONS[name]
        row = {"case": "joint", "dtype": dtype, "b": b, "h": h, "n": n_img + n_txt, "n_txt": n_txt, "d": d,
               "implementation": name, "max_abs_err": check(name, fn, case, DTYPES[dtype], ref)}
        row.update(measure.summarize(time_call(fn, case, repeats)), peak_extra_bytes=peak(fn, case))
        rows.append(row)
    base = next((r["ms"] for r in rows if r["implementation"] == "sdpa"), None)
    for r in rows:
        r["vs_sdpa"] = r["ms"] / base if base else None
        log(f"{r['implementation']:22} {r['ms']:>10.1f} ms {r['vs_sdpa'] or float('nan'):>7.3f}x sdpa "
            f"{r['peak_extra_bytes'] / 2**20:>10.1f} MiB peak  max err {r['max_abs_err']:.1e}")
    return rows


def summary_lines(rows: list) -> list:
    """What the issue's targets compare: fused and fused + key-group mass against SDPA and against each
    other, and the materialising map's peak memory over the fused map's."""
    by = {r["implementation"]: r for r in rows}
    lines = []
    if "fused" in by and "sdpa" in by:
        lines.append(f"fused / sdpa: {by['fused']['ms'] / by['sdpa']['ms']:.3f}x")
    kgm = by.get("fused+key-group mass")
    if kgm and "sdpa" in by:
        lines.append(f"fused + key-group mass / sdpa: {kgm['ms'] / by['sdpa']['ms']:.3f}x")
    if kgm and "fused" in by:
        lines.append(f"fused + key-group mass / fused: {kgm['ms'] / by['fused']['ms']:.3f}x")
    if kgm and "materialising map" in by:
        ratio = by["materialising map"]["peak_extra_bytes"] / max(1, kgm["peak_extra_bytes"])
        lines.append(f"materialising map / fused + key-group mass, peak memory: {ratio:.1f}x")
    return lines
