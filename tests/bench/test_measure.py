"""diffcirc.bench.measure: timers and peak memory. No wall-clock limits: the timers are checked by
the number of calls they make and by a sleep that bounds each call from below."""

import time

import pytest
import torch

from diffcirc.bench import measure


def _counting():
    def fn(arg=None):
        fn.calls += 1
    fn.calls = 0
    return fn


def test_time_call_warms_up_then_times_each_repeat():
    fn = _counting()
    times = measure.time_call(fn, None, repeats=3, warmup=2)
    assert fn.calls == 5 and len(times) == 3
    slow = measure.time_call(lambda _: time.sleep(0.02), None, repeats=2, warmup=0)
    assert min(slow) >= 0.02  # seconds, and the sleep is inside every timed call


def test_summarize_in_milliseconds():
    assert measure.summarize([0.003, 0.001, 0.002, 0.010]) == pytest.approx({"ms": 2.5, "ms_min": 1.0, "ms_max": 10.0})


def test_peak_extra_memory_sees_an_allocation_held_during_the_call():
    size = 64 * 2**20

    def allocate():
        buffer = torch.ones(size // 4)  # float32: size bytes, touched, so resident
        return buffer

    assert measure.peak_extra_memory(allocate) >= 0.9 * size
    assert measure.peak_extra_memory(lambda: None) < size / 4


def test_measurers_by_device():
    assert measure.measurers("cpu") == (measure.time_call, measure.peak_extra_memory)
    assert measure.measurers(torch.device("cpu")) == (measure.time_call, measure.peak_extra_memory)
    cuda = (measure.cuda_time_call, measure.cuda_peak_extra_memory)
    assert measure.measurers("cuda") == cuda and measure.measurers(torch.device("cuda", 0)) == cuda


def test_measure_counts_its_calls():
    fn = _counting()
    result = measure.measure(fn, "cpu", warmup=1, repeats=4)
    assert fn.calls == 1 + 4 + 1  # warm-up, timed, the memory call
    assert set(result) == {"ms", "ms_min", "ms_max", "peak_extra_bytes"}
    assert result["ms_min"] <= result["ms"] <= result["ms_max"]
