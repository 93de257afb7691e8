"""diffcirc.bench.sweep: the conditions of the ablation sweep and its batch sizes (the runs
themselves: tests/cli/test_bench.py, through ``diffcirc bench sweep``)."""

import pytest

pytest.importorskip("diffusers")

from diffcirc.bench import configs, sweep, workloads  # noqa: E402
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
