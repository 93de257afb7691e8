"""What one forward pass costs in memory, how much is free, and how many items fit a budget: the
one measure that ``--max-memory`` bounds the condition passes, the trace's batches and the VAE's
batches by.

    out, cost = pass_bytes(lambda: model(x[:1]), x.device)     # bytes of a one-item pass
    per_pass = items_that_fit(cost, max_bytes, cap=64)          # 1 <= per_pass <= 64
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch


def _output_bytes(obj) -> int:
    """Bytes of the tensors in a module's output: tensors, and sequences, mappings and dataclasses
    of them, nested (diffusers' output classes are dataclasses and mappings)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and not isinstance(obj, dict):
        return sum(_output_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(_output_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_output_bytes(v) for v in obj)
    return 0


def pass_bytes(run: Callable, device) -> tuple:
    """(run's output, the bytes its pass used): on CUDA the allocator's peak above what was
    allocated before; elsewhere, where no allocator peak can be read, the bytes of every module
    output of the pass counted as if all stayed alive at once, an upper bound of its peak. At least 1."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = run()
        torch.cuda.synchronize(device)
        return out, max(torch.cuda.max_memory_allocated(device) - base, 1)
    total = [0]

    def count(module, args, output):
        total[0] += _output_bytes(output)

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        out = run()
    finally:
        handle.remove()
    return out, max(total[0], 1)


def free_memory_bytes(device: str) -> int:
    """Memory free for this process now: the CUDA device's free memory, else the host's MemAvailable."""
    if str(device).startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62  # unknown: no bound beyond max_batch


def items_that_fit(cost: int, max_bytes: Optional[int], cap: int) -> int:
    """How many items of ``cost`` bytes each one pass may hold under ``max_bytes`` (None: no bound),
    at most ``cap`` and at least 1 (a single item over the budget still runs, alone)."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    if max_bytes is None:
        return int(cap)
    return max(1, min(int(cap), int(max_bytes) // max(int(cost), 1)))


__all__ = ["free_memory_bytes", "items_that_fit", "pass_bytes"]
