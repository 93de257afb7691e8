"""diffcirc.bench.unet: forward passes per implementation, checked before they are timed."""

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")

from diffcirc.bench import configs, measure, processors, unet, workloads  # noqa: E402
from diffcirc.bench.gate import IncorrectImplementation  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _quiet(*args):
    """A log that drops the table lines."""


def test_unet_refuses_a_wrong_implementation_listed_before_sdpa(monkeypatch):
    """--impl fused sdpa: sdpa still runs first, so fused is checked against it and, wrong, refused
    before it is timed; listed first without a reference (nan error), it is refused too."""
    cfg = configs.unet_config(quick=True, impl=["fused", "sdpa"])
    assert cfg.impl == ("sdpa", "fused")

    class WrongFused(processors.FusedAttnProcessor):
        def __call__(self, *a, **k):
            return super().__call__(*a, **k) + 0.5

    monkeypatch.setattr(processors, "FusedAttnProcessor", WrongFused)
    timed = []
    real_measure = measure.measure
    monkeypatch.setattr(measure, "measure", lambda fn, *a: timed.append(fn) or real_measure(fn, *a))
    device = torch.device("cpu")
    model, forward, batch = workloads.tiny_unet(1, device)
    labels = workloads.label_map(batch, 32, device)
    with pytest.raises(IncorrectImplementation, match="fused: output differs"):
        unet.bench_case("tiny-unet", model, forward, labels, cfg, device)
    assert len(timed) == 1  # sdpa only: fused was refused before timing

    cfg = dataclasses.replace(cfg, impl=("fused", "sdpa"))  # not through unet_config: no reference yet
    timed.clear()
    with pytest.raises(IncorrectImplementation, match="fused: output differs .* nan"):
        unet.bench_case("tiny-unet", model, forward, labels, cfg, device)
    assert timed == []


def test_entropy_differing_from_the_materialising_hook_is_refused():
    hook = {("layer", 0): 1.0, ("layer", 1): 2.0}
    unet._check_entropy("case", {"materialising": hook, "fused+entropy": {("layer", 0): 1.0, ("layer", 1): 2.00005}})
    with pytest.raises(IncorrectImplementation, match="fused\\+entropy mean entropy differs .* 0.001"):
        unet._check_entropy("case", {"materialising": hook, "fused+entropy": {("layer", 0): 1.0, ("layer", 1): 2.001}})
    with pytest.raises(IncorrectImplementation, match="other layers"):
        unet._check_entropy("case", {"materialising": hook, "fused+all": {("layer", 0): 1.0}})


def test_rows_of_a_small_run():
    cfg = configs.unet_config(latent=4, widths=[64], sd_batch=1, unet_batch=1, impl=["fused", "materialising"],
                              warmup=0, repeats=1)
    lines = []
    rows = unet.run_unet(cfg, "cpu", log=lines.append)
    assert [(r["case"], r["implementation"]) for r in rows] == [
        ("sd-block w64 D8 4x4", "sdpa"), ("sd-block w64 D8 4x4", "fused"), ("sd-block w64 D8 4x4", "materialising"),
        ("tiny-unet 32x32 b1", "sdpa"), ("tiny-unet 32x32 b1", "fused"), ("tiny-unet 32x32 b1", "materialising")]
    for r in rows:
        assert r["max_abs_err_vs_sdpa"] <= cfg.tolerance and r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert r["vs_sdpa"] == pytest.approx(r["ms"] / next(s["ms"] for s in rows
                                                           if s["case"] == r["case"] and s["implementation"] == "sdpa"))
    assert lines == [unet.format_row(r) for r in rows]
