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


class _FakeCuda:
    """torch.cuda's events and synchronize as a log of what the timer asks for, in order."""

    def __init__(self, monkeypatch):
        self.log = []
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.at = None

            def record(self):
                self.at = len(fake.log)
                fake.log.append("record")

            def synchronize(self):
                fake.log.append("sync")

            def elapsed_time(self, end):  # ms: the log entries between the two records
                assert "sync" in fake.log[end.at:], "read before the events were waited for"
                return float(end.at - self.at)

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: fake.log.append("sync"))

    def call(self, arg=None):
        self.log.append("call")


def test_cuda_time_call_queues_the_timed_calls_back_to_back(monkeypatch):
    cuda = _FakeCuda(monkeypatch)
    times = measure.cuda_time_call(cuda.call, None, repeats=3, warmup=2)
    # warm-up, a synchronize, one call queued ahead, then event / call / event three times with no
    # wait among them (host overhead overlaps the GPU's work), and one synchronize at the end
    assert cuda.log == ["call", "call", "sync", "call"] + ["record", "call", "record"] * 3 + ["sync"]
    assert times == pytest.approx([2e-3] * 3)  # each sample spans its own call only


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
