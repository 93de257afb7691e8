"""diffcirc.bench.sweep: the conditions of the ablation sweep, its batch sizes, its models and the
rows of one case (one at a time, batched, batched + reuse), each checked before it is timed (the
runs through ``diffcirc bench sweep``: tests/cli/test_bench.py)."""

import pytest
import torch

pytest.importorskip("diffusers")

from diffcirc.bench import configs, gate, sweep, workloads  # noqa: E402
from diffcirc.processor import Session, Zero  # noqa: E402


@pytest.fixture(scope="module")
def session():
    return Session(workloads.tiny_unet_model("cpu"))


def test_ablation_conditions(session):
    heads = session.heads()
    assert len(heads) == 3 * 8  # 3 attention layers x 8 heads
    assert sweep.ablation_conditions(session, 1) == [[]]
    conditions = sweep.ablation_conditions(session)
    assert len(conditions) == 25 and conditions[0] == []
    assert conditions[1:] == [[Zero(layer, h)] for layer, h in heads]
    assert sweep.ablation_conditions(session, 3) == conditions[:3]
    for count in (0, 26):
        with pytest.raises(ValueError, match=f"{count} conditions: this model has 1 to 25"):
            sweep.ablation_conditions(session, count)


def test_default_max_batches():
    assert sweep.default_max_batches(25, 8) == [8, 40, 200]  # 1, 5 and 25 conditions of 8 images per pass
    assert sweep.default_max_batches(3, 2) == [2, 6]  # 5 > 3 conditions: left out
    assert sweep.default_max_batches(1, 4) == [4]


def test_options_the_model_cannot_take_are_refused_before_measuring(monkeypatch):
    measured = []
    monkeypatch.setattr(sweep, "sweep_case", lambda *a, **k: measured.append(a) or [])
    with pytest.raises(ValueError, match=r"max_batch \[1\] below the 2 images"):
        sweep.run_sweep(configs.sweep_config(images=2, max_batch=[4, 1]), "cpu")
    with pytest.raises(ValueError, match="999 conditions"):
        sweep.run_sweep(configs.sweep_config(images=1, conditions=[2, 999]), "cpu")
    assert measured == []


def test_unknown_models_are_refused_before_anything_is_built(monkeypatch):
    monkeypatch.setattr(sweep, "MODELS", {**sweep.MODELS, "bundled": lambda device: pytest.fail("built")})
    with pytest.raises(ValueError, match=r"unknown sweep models \['sd14'\]"):
        sweep.run_sweep(configs.sweep_config(images=1), "cpu", models=("bundled", "sd14"))


@pytest.fixture(scope="module")
def tiny(single_thread):
    """The processor tests' tiny UNet2DModel (attention in down_blocks.1 and the mid block) as a sweep model."""
    from helpers import tiny_models as tm

    model = tm.unet2d()
    return sweep.SweepModel("tiny sweep", model, lambda images, device, seed: tm.unet2d_inputs(images, seed=seed),
                            lambda xt: model(*xt).sample)


def test_each_implementation_is_checked_and_its_passes_counted(tiny, monkeypatch):
    session = Session(tiny.model)
    first = session.layer_names[0]  # down_blocks.1.attentions.0, called before the others
    conditions = [[], [Zero(first, 0)], [Zero(first, 1)]]
    timed = []
    monkeypatch.setattr(sweep.measure, "measure", lambda fn, *a: timed.append(fn) or {"ms": 1.0, "peak_extra_bytes": 0})
    cfg = configs.sweep_config(images=1, warmup=0, repeats=2)  # checked, then timed
    with torch.no_grad():
        rows = sweep.sweep_case(session, tiny.forward, tiny.inputs(1, "cpu", seed=2), conditions, [1, 3], cfg, "cpu",
                                log=lambda line: None, case=tiny.case)
    assert [(r["implementation"], r["max_batch"], r["passes"]) for r in rows] == [
        ("one at a time", None, 3), ("batched", 1, 3), ("batched", 3, 1),
        # reuse: the clean pass, then the clean condition alone and the two ablations of one stage
        ("batched + reuse", 1, 4), ("batched + reuse", 3, 3)]
    assert len(timed) == 5 and all(r["max_abs_err"] <= 1e-4 for r in rows)


def test_a_wrong_reuse_run_is_refused_before_it_is_timed(tiny, monkeypatch):
    session = Session(tiny.model)
    real = sweep.run_conditions
    monkeypatch.setattr(sweep, "run_conditions", lambda *a, reuse, **k: real(*a, reuse=reuse, **k) + 1e-2 * reuse)
    timed = []
    monkeypatch.setattr(sweep.measure, "measure", lambda fn, *a: timed.append(fn) or {"ms": 1.0, "peak_extra_bytes": 0})
    cfg = configs.sweep_config(images=1, warmup=0, repeats=2)  # checked, then timed
    conditions = sweep.ablation_conditions(session, 2)
    with torch.no_grad(), pytest.raises(gate.IncorrectImplementation, match="batched \\+ reuse"):
        sweep.sweep_case(session, tiny.forward, tiny.inputs(1, "cpu", seed=2), conditions, [1], cfg, "cpu",
                         log=lambda line: None)
    assert len(timed) == 2  # one at a time and batched, not reuse


def test_a_sample_of_heads_per_layer(session):
    conditions = sweep.ablation_conditions(session, heads_per_layer=2)
    assert conditions == [[]] + [[Zero(layer, h)] for layer in session.layer_names for h in (0, 1)]
    assert sweep.ablation_conditions(session, 3, heads_per_layer=2) == conditions[:3]


def test_one_run_per_row_times_the_checked_run(tiny, monkeypatch):
    session = Session(tiny.model)
    monkeypatch.setattr(sweep.measure, "measure", lambda *a: pytest.fail("a second, separately timed run"))
    runs = []
    real = sweep.run_conditions
    monkeypatch.setattr(sweep, "run_conditions", lambda *a, **k: runs.append(k["reuse"]) or real(*a, **k))
    cfg = configs.sweep_config(images=1, warmup=0, repeats=1)
    with torch.no_grad():
        rows = sweep.sweep_case(session, tiny.forward, tiny.inputs(1, "cpu", seed=2), sweep.ablation_conditions(session, 3),
                                [3], cfg, "cpu", log=lambda line: None)
    assert runs == [False, True]  # each batched run once: checked and timed together
    assert [r["implementation"] for r in rows] == list(sweep.IMPLEMENTATIONS)
    assert all(r["ms"] > 0 and r["ms_min"] == r["ms"] == r["ms_max"] and r["peak_extra_bytes"] >= 0 for r in rows)
    assert all(r["cpu_ms"] > 0 for r in rows)
