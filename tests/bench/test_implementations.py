"""diffcirc.bench.implementations: the op implementations, the optional GPU baselines (xformers,
flash-attn) and which failures skip an implementation.

The optional baselines are fake modules put into sys.modules (the real libraries are GPU-only and
not installed here), computing attention with torch so that the discovery and the correctness gate
can be exercised on the CPU. The op benchmark's cuda path runs on the CPU with the GPU timer and
memory helpers replaced, in diffcirc.bench.measure where it looks them up, by the CPU ones."""

import math
import sys
import types

import pytest
import torch

from diffcirc.bench import cases, implementations, measure, op
from diffcirc.bench.gate import IncorrectImplementation, check

SHAPE = (1, 2, 32, 16)  # H != N so that a kernel reading the wrong layout gives a wrong answer


def _quiet(*args):
    """A log that drops the table lines."""


def _attention_bnhd(q, k, v):
    """softmax(q k^T / sqrt(D)) v on (B, N, H, D) tensors, the layout xformers and flash-attn take."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return (p @ v).transpose(1, 2)


def _as_if_bhnd(q, k, v):
    """A kernel that wrongly takes its (B, N, H, D) inputs for (B, H, N, D): attends over heads."""
    return _attention_bnhd(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def _install(monkeypatch, name: str, kernel, version="0.0+fake"):
    """Puts a fake package providing the optional baseline `name` with kernel into sys.modules."""
    module, attr = implementations.OPTIONAL_BASELINES[name]
    top = module.split(".")[0]
    package = types.ModuleType(top)
    package.__version__ = version
    monkeypatch.setitem(sys.modules, top, package)
    target = package
    if module != top:
        target = types.ModuleType(module)
        monkeypatch.setitem(sys.modules, module, target)
    setattr(target, attr, kernel)


@pytest.fixture
def absent(monkeypatch):
    """Neither library importable, whatever is installed (None in sys.modules stops an import)."""
    for module in ("xformers", "xformers.ops", "flash_attn"):
        monkeypatch.setitem(sys.modules, module, None)


def _counting(kernel):
    def run(q, k, v):
        run.shapes.append(tuple(q.shape))
        return kernel(q, k, v)
    run.shapes = []
    return run


# ---------------------------------------------------------------------------------------------
# the implementations themselves

@pytest.mark.parametrize("name", list(implementations.IMPLEMENTATIONS))
def test_every_cpu_implementation_passes_the_gate(name):
    case = cases.make_case(*SHAPE, torch.float32)
    assert check(name, implementations.IMPLEMENTATIONS[name], case, torch.float32) < 1e-4


def test_materialising_entropy_by_hand():
    """Two keys with scores 0 and ln 3 (q = (ln 3) e1 * sqrt(D), keys 0 and e1): p = (1/4, 3/4),
    entropy -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351."""
    d = 4
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = math.log(3) * math.sqrt(d)
    k = torch.zeros(1, 1, 2, d)
    k[..., 1, 0] = 1.0
    v = torch.tensor([[[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]]])
    out, entropy = implementations.materialising({"q": q, "k": k, "v": v})
    assert entropy.item() == pytest.approx(0.5623351, abs=1e-6)
    assert out.flatten().tolist() == pytest.approx([0.25, 0.75, 0, 0], abs=1e-6)


def test_every_name_is_offered():
    assert set(implementations.ALL_NAMES) == {"fused", "fused+entropy", "fused+all stats", "sdpa", "materialising",
                                              "sdpa-flash", "sdpa-efficient", "xformers", "flash-attn"}


# ---------------------------------------------------------------------------------------------
# choosing a run's implementations

def test_choose_defaults_to_all_and_lists_missing_optional_baselines_on_cuda(absent):
    chosen, unavailable, status = implementations.choose("cpu")
    assert list(chosen) == list(implementations.IMPLEMENTATIONS) and unavailable == {}
    assert status == {"xformers": "cuda only", "flash-attn": "cuda only"}
    chosen, unavailable, _ = implementations.choose("cuda")
    assert list(chosen) == list(implementations.CUDA_IMPLEMENTATIONS)
    assert unavailable == {"xformers": "not installed", "flash-attn": "not installed"}
    chosen, unavailable, _ = implementations.choose("cuda", ["fused", "sdpa-flash"])
    assert list(chosen) == ["fused", "sdpa-flash"] and unavailable == {}  # a named set lists only itself


@pytest.mark.parametrize("device, names, message", [
    ("cpu", ["fused", "sdpa-flash"], "sdpa-flash not available on cpu; choose from fused"),
    ("cpu", ["xformers"], "xformers not available on cpu; xformers: cuda only"),
    ("cuda", ["flash-attn"], "flash-attn not available on cuda; flash-attn: not installed"),
])
def test_choose_refuses_a_name_the_device_lacks_and_says_why(absent, device, names, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        implementations.choose(device, names)


# ---------------------------------------------------------------------------------------------
# optional baselines

def test_absent_baselines_are_listed_not_an_error(absent):
    found, status = implementations.optional_baselines("cuda")
    assert found == {} and status == {"xformers": "not installed", "flash-attn": "not installed"}
    known, missing, _ = implementations.op_implementations("cuda")
    assert "xformers" not in known and missing["flash-attn"] == "not installed"
    rows = op.run_op([SHAPE], ["f32"], {"sdpa": implementations.sdpa}, unavailable=missing, log=_quiet)
    listed = {r["implementation"]: r for r in rows}
    assert listed["xformers"]["skipped"] == "not installed" and "ms" not in listed["xformers"]
    assert "ms" in listed["sdpa"]


@pytest.mark.parametrize("name", list(implementations.OPTIONAL_BASELINES))
def test_fake_baseline_is_discovered_and_checked(absent, monkeypatch, name):
    kernel = _counting(_attention_bnhd)
    _install(monkeypatch, name, kernel)
    assert implementations.optional_baselines("cpu") == ({}, {n: "cuda only" for n in implementations.OPTIONAL_BASELINES})
    found, status = implementations.optional_baselines("cuda")
    assert list(found) == [name] and status[name] == "available (0.0+fake)"
    known, missing, _ = implementations.op_implementations("cuda")
    assert name in known and name not in missing and len(missing) == 1
    rows = op.run_op([SHAPE], ["f32"], {"sdpa": implementations.sdpa, name: found[name]}, repeats=1, log=_quiet)
    (row,) = [r for r in rows if r["implementation"] == name]
    assert row["max_abs_err"] < 1e-5 and row["vs_sdpa"] is not None
    b, h, n, d = SHAPE
    assert set(kernel.shapes) == {(b, n, h, d)}  # handed (B, N, H, D), as the library expects


@pytest.mark.parametrize("wrong", [_as_if_bhnd, lambda q, k, v: _attention_bnhd(q, k, v) + 0.5],
                         ids=["wrong-layout", "wrong-values"])
@pytest.mark.parametrize("name", list(implementations.OPTIONAL_BASELINES))
def test_wrong_fake_baseline_is_refused_before_timing(absent, monkeypatch, name, wrong):
    kernel = _counting(wrong)
    _install(monkeypatch, name, kernel)
    found, _ = implementations.optional_baselines("cuda")
    with pytest.raises(IncorrectImplementation, match=name):
        op.run_op([SHAPE], ["f32"], {"sdpa": implementations.sdpa, name: found[name]}, repeats=3, log=_quiet)
    assert len(kernel.shapes) == 1  # the check only: no warm-up, no timed calls


def test_broken_install_says_why(absent, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))  # without flash_attn_func
    _, status = implementations.optional_baselines("cuda")
    assert status["flash-attn"] == "import failed: flash_attn has no flash_attn_func"


def test_baseline_that_cannot_run_a_case_is_skipped_but_fused_is_not():
    def unsupported(c):
        raise RuntimeError("FlashAttention only supports fp16 and bf16 data type\nmore")

    rows = op.run_op([SHAPE], ["f32"], {"sdpa": implementations.sdpa, "flash-attn": unsupported}, repeats=1,
                     log=_quiet)
    skipped = {r["implementation"]: r.get("skipped") for r in rows}
    assert skipped == {"sdpa": None, "flash-attn": "failed: FlashAttention only supports fp16 and bf16 data type"}
    with pytest.raises(RuntimeError):
        op.run_op([SHAPE], ["f32"], {"fused": unsupported}, repeats=1, log=_quiet)


def _fails_on_n(n, error):
    """A (B, N, H, D) kernel that raises error for sequence length n and is right otherwise."""
    def kernel(q, k, v):
        if q.shape[1] == n:
            raise error
        return _attention_bnhd(q, k, v)
    return kernel


@pytest.mark.parametrize("name", list(implementations.OPTIONAL_BASELINES))
def test_optional_baseline_failing_with_any_error_is_skipped_and_the_run_goes_on(absent, monkeypatch, name):
    _install(monkeypatch, name, _fails_on_n(32, TypeError("unsupported head dim 16\nmore")))
    found, _ = implementations.optional_baselines("cuda")
    other = (1, 2, 48, 16)
    rows = op.run_op([SHAPE, other], ["f32"], {"sdpa": implementations.sdpa, name: found[name]}, repeats=1,
                     log=_quiet)
    by_case = {(r["n"], r["implementation"]): r for r in rows}
    assert by_case[(32, name)]["skipped"] == "failed: unsupported head dim 16" and "ms" not in by_case[(32, name)]
    assert "ms" in by_case[(48, name)] and "ms" in by_case[(32, "sdpa")]


def test_only_optional_baselines_are_skipped_on_any_error():
    def broken(c):
        raise TypeError("a bug")

    for name in ("sdpa", "fused"):  # a TypeError of torch's own or of diffcirc's is a bug, not an unsupported case
        with pytest.raises(TypeError):
            op.run_op([SHAPE], ["f32"], {name: broken}, repeats=1, log=_quiet)


def test_skip_reasons():
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert implementations.skip_reason("fused", oom) == "out of memory"
    assert implementations.skip_reason("sdpa", NotImplementedError("no kernel")) == "failed: no kernel"
    assert implementations.skip_reason("xformers", IncorrectImplementation("wrong")) is None  # refused, not skipped
    assert implementations.skip_reason("xformers", KeyboardInterrupt()) is None
    assert implementations.skip_reason("xformers", ValueError("")) == "failed: ValueError"


# ---------------------------------------------------------------------------------------------
# the cuda path of the op benchmark, simulated on the CPU

@pytest.fixture
def run_cuda(monkeypatch):
    """op.run_op(device="cuda") on the CPU: its cases made on the CPU, the CPU timer standing in for
    CUDA events (counted), no memory figures; returns a function impls -> rows."""
    real_make_case, real_time_call = cases.make_case, measure.time_call
    timed = []
    monkeypatch.setattr(cases, "make_case", lambda *a, device=None, **k: real_make_case(*a, **k))
    monkeypatch.setattr(measure, "cuda_time_call", lambda *a, **k: timed.append(1) or real_time_call(*a, **k))
    monkeypatch.setattr(measure, "cuda_peak_extra_memory", lambda fn, case: 0)

    def run(impls):
        b, h, _, d = SHAPE
        rows = op.run_op([(b, h, 32, d), (b, h, 48, d)], ["f32"], impls, device="cuda", repeats=1, log=_quiet)
        assert timed  # the GPU's timer, as on a GPU
        return rows
    return run


@pytest.mark.parametrize("name", list(implementations.OPTIONAL_BASELINES))
def test_cuda_run_refuses_a_wrong_optional_baseline(absent, monkeypatch, run_cuda, name):
    _install(monkeypatch, name, lambda q, k, v: _attention_bnhd(q, k, v) + 0.5)
    found, _ = implementations.optional_baselines("cuda")
    with pytest.raises(IncorrectImplementation, match=name):
        run_cuda({"sdpa": implementations.sdpa, name: found[name]})


@pytest.mark.parametrize("name", list(implementations.OPTIONAL_BASELINES))
def test_cuda_run_skips_an_optional_baseline_that_fails(absent, monkeypatch, run_cuda, name):
    _install(monkeypatch, name, _fails_on_n(32, TypeError("unsupported head dim 16")))
    found, _ = implementations.optional_baselines("cuda")
    rows = run_cuda({"sdpa": implementations.sdpa, name: found[name]})
    by_case = {(r["n"], r["implementation"]): r for r in rows}
    assert by_case[(32, name)]["skipped"] == "failed: unsupported head dim 16" and "ms" not in by_case[(32, name)]
    assert "ms" in by_case[(48, name)]
