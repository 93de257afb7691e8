"""The op implementations the op benchmark compares, each fn(case) -> (out (B, H, N, Dv), entropy
(B, H, N) or None): diffcirc's fused kernel (with and without statistics), PyTorch SDPA (on the GPU
pinned to its flash and memory-efficient backends), the materialising path of hook-based tools, and
xformers / flash-attn where they import; which of them a run takes, and which failures skip one."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from diffcirc.bench.gate import IncorrectImplementation
from diffcirc.ops import STAT_NAMES as ALL_STATS
from diffcirc.ops import attention


def fused(stats: tuple):
    """diffcirc's fused attention computing stats (entropy reported when among them)."""
    def run(c):
        r = attention(c["q"], c["k"], c["v"], stats=stats, grid=c["grid"], labels=c["labels"])
        return r.out, r.entropy
    return run


def sdpa(c):
    return F.scaled_dot_product_attention(c["q"], c["k"], c["v"]), None


def materialising(c):
    """What hook-based tools do: the full (N, N) probabilities, then entropy from them."""
    q, k, v = c["q"], c["k"], c["v"]
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)
    return torch.matmul(p, v), entropy


def sdpa_backend(name: str):
    """SDPA pinned to one backend ("FLASH_ATTENTION" or "EFFICIENT_ATTENTION") on the GPU."""
    def run(c):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, name)):
            return F.scaled_dot_product_attention(c["q"], c["k"], c["v"]), None
    return run


FUSED = {"fused": fused(()), "fused+entropy": fused(("entropy",)), "fused+all stats": fused(ALL_STATS)}
IMPLEMENTATIONS = {**FUSED, "sdpa": sdpa, "materialising": materialising}
CUDA_IMPLEMENTATIONS = {**FUSED, "sdpa-flash": sdpa_backend("FLASH_ATTENTION"),
                        "sdpa-efficient": sdpa_backend("EFFICIENT_ATTENTION"), "materialising": materialising}

# Optional GPU baselines: name -> (module, function). Both libraries take (B, N, H, D) tensors
# where diffcirc and SDPA take (B, H, N, D).
OPTIONAL_BASELINES = {
    "xformers": ("xformers.ops", "memory_efficient_attention"),
    "flash-attn": ("flash_attn", "flash_attn_func"),
}
BASELINES = ("sdpa", "sdpa-flash", "sdpa-efficient", "materialising", *OPTIONAL_BASELINES)
ALL_NAMES = tuple(dict.fromkeys([*IMPLEMENTATIONS, *CUDA_IMPLEMENTATIONS, *OPTIONAL_BASELINES]))


def skip_reason(name: str, error: BaseException) -> str | None:
    """Why implementation ``name`` is skipped for a case after raising ``error``, or None when the
    error must propagate.

    A wrong result (IncorrectImplementation) is never skipped: it is refused. Running out of memory
    skips any implementation. The optional libraries (xformers, flash-attn) refuse dtypes, head
    dims and shapes with whatever exception they like (ValueError, TypeError, AssertionError, ...),
    so any Exception skips them; torch's own baselines are skipped only for a RuntimeError
    (NotImplementedError included); anything else, and any failure of diffcirc's own kernels, is a bug.
    """
    if isinstance(error, IncorrectImplementation) or not isinstance(error, Exception):
        return None
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "out of memory"
    if name in OPTIONAL_BASELINES or (name in BASELINES and isinstance(error, RuntimeError)):
        return f"failed: {(str(error) or type(error).__name__).splitlines()[0][:100]}"
    return None


def _bnhd(c):
    """q, k, v of a case as contiguous (B, N, H, D), made once per case and kept in it, so that the
    transposition is not timed (a caller of these libraries holds that layout already)."""
    if "bnhd" not in c:
        c["bnhd"] = tuple(c[t].transpose(1, 2).contiguous() for t in ("q", "k", "v"))
    return c["bnhd"]


def bnhd_baseline(kernel):
    """An implementation from kernel(q, k, v) -> out, all (B, N, H, D) with the default scale
    D^-0.5; its output is handed back as a (B, H, N, D) view."""
    def run(c):
        q, k, v = _bnhd(c)
        return kernel(q, k, v).transpose(1, 2), None
    return run


def _missing_reason(module: str, error: ImportError) -> str:
    # A ModuleNotFoundError for the package itself means absent; anything else (a missing
    # dependency, an ABI mismatch) is a broken install and says why.
    name = getattr(error, "name", None) or ""
    if isinstance(error, ModuleNotFoundError) and (module == name or module.startswith(name + ".")):
        return "not installed"
    return f"import failed: {(str(error) or type(error).__name__).splitlines()[0]}"


def optional_baselines(device: str) -> tuple:
    """(found, status): found maps name -> implementation for each optional baseline importable
    on this device (GPU libraries: cuda only); status maps every optional name to "available
    (version)", "not installed", "import failed: ..." or "cuda only"."""
    found, status = {}, {}
    for name, (module, attr) in OPTIONAL_BASELINES.items():
        if device != "cuda":
            status[name] = "cuda only"
            continue
        try:
            kernel = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            status[name] = _missing_reason(module, e)
            continue
        except AttributeError:
            status[name] = f"import failed: {module} has no {attr}"
            continue
        version = getattr(importlib.import_module(module.split(".")[0]), "__version__", "unknown version")
        found[name] = bnhd_baseline(kernel)
        status[name] = f"available ({version})"
    return found, status


def op_implementations(device: str) -> tuple:
    """(known, missing, status) for the op benchmark on device: known maps name -> implementation
    (IMPLEMENTATIONS on cpu; CUDA_IMPLEMENTATIONS plus the optional baselines that import on cuda),
    missing maps each optional baseline not in known to why, status is optional_baselines' status."""
    found, status = optional_baselines(device)
    known = {**CUDA_IMPLEMENTATIONS, **found} if device == "cuda" else dict(IMPLEMENTATIONS)
    missing = {name: why for name, why in status.items() if name not in found}
    return known, missing, status


def choose(device: str, names=None) -> tuple:
    """(chosen, unavailable, status) for a run on device: chosen maps each of names (default: every
    implementation known on device) to its implementation; unavailable maps the optional baselines
    that did not import to why, so that a default run on cuda lists them as skipped in every case
    (a run that names its implementations lists only those); status is optional_baselines' status.
    Raises ValueError for a name not available on device, saying why where it is an optional one."""
    known, missing, status = op_implementations(device)
    unknown = [name for name in names or () if name not in known]
    if unknown:
        why = "".join(f"; {name}: {status[name]}" for name in unknown if name in status)
        raise ValueError(f"implementation(s) {' '.join(unknown)} not available on {device}{why}; "
                         f"choose from {' '.join(known)}")
    chosen = {name: known[name] for name in names or known}
    return chosen, (missing if device == "cuda" and not names else {}), status
