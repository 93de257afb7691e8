"""Timers and peak memory, on the CPU (wall clock, resident memory) and on CUDA (events, the
allocator's peak). Never queries the GPU at import time."""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time

import torch


def time_call(fn, arg, repeats: int, warmup: int = 1) -> list:
    """Seconds per call of fn(arg) (wall clock), after warmup untimed calls."""
    for _ in range(warmup):
        fn(arg)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return times


def cuda_time_call(fn, arg, repeats: int, warmup: int = 1) -> list:
    """Seconds per call of fn(arg) on the current stream, from CUDA events around each of repeats
    back-to-back calls, after warmup untimed calls (and lazy initialisation) and a synchronize.

    The timed calls and their events are all queued before the one synchronize that ends them, and
    one more untimed call is queued first, so the host launches each call while the GPU still runs
    the one before: launch overhead overlaps, and a sample is the GPU's time for the call, as
    FlashAttention's benchmarks measure. (A call that waits for the GPU itself, .item() say, still
    times its host part.)"""
    for _ in range(warmup):
        fn(arg)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    fn(arg)  # keeps the GPU busy while the first timed call is queued
    for start, end in events:
        start.record()
        fn(arg)
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1e-3 for start, end in events]


def summarize(times) -> dict:
    """Median and spread, in milliseconds, of per-call times given in seconds."""
    return {"ms": statistics.median(times) * 1e3, "ms_min": min(times) * 1e3, "ms_max": max(times) * 1e3}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap():
    # Returns freed heap pages to the OS so that the next call's RSS growth is its own.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_extra_memory(fn, *args) -> int:
    """Peak resident-memory growth during one call of fn(*args) (bytes), sampled every 0.5 ms."""
    _trim_heap()
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0005)

    t = threading.Thread(target=sample)
    t.start()
    try:
        result = fn(*args)
        peak = max(peak, _rss_bytes())
    finally:
        done.set()
        t.join()
    del result
    return max(0, peak - base)


def high_water_growth(fn):
    """Resident-set growth to its high-water mark during fn() (bytes), or None (without fn run)
    where /proc/self/clear_refs cannot reset the mark (not Linux, or not allowed)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the high-water mark VmHWM := the current resident set
    except OSError:
        return None
    _trim_heap()  # freed heap pages go back to the OS: the growth below is fn's own
    before = status_bytes("VmRSS")
    fn()
    return max(status_bytes("VmHWM") - before, 0)


def status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def cuda_peak_extra_memory(fn, *args) -> int:
    """Peak bytes allocated on the GPU during one call of fn(*args) beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn(*args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return max(0, peak)


def measurers(device) -> tuple:
    """(time_call, peak extra memory) for a device ("cpu", "cuda" or a torch.device): the CUDA
    event timer and allocator peak on cuda, the wall clock and resident-memory peak elsewhere."""
    if getattr(device, "type", device) == "cuda":
        return cuda_time_call, cuda_peak_extra_memory
    return time_call, peak_extra_memory


def measure(fn, device, warmup: int, repeats: int) -> dict:
    """ms, ms_min, ms_max (summarize) of repeats calls of fn() after warmup untimed ones, and
    peak_extra_bytes, the peak extra memory of one more call (both from measurers(device))."""
    time_call, peak = measurers(device)
    times = time_call(lambda _: fn(), None, repeats, warmup=warmup)
    return {**summarize(times), "peak_extra_bytes": peak(fn)}
