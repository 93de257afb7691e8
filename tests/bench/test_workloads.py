"""diffcirc.bench.workloads: the models and inputs of the UNet benchmarks."""

import pytest
import torch

pytest.importorskip("diffusers")

from diffcirc.bench import workloads  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def test_label_map_is_a_centred_square():
    labels = workloads.label_map(2, 8, "cpu")
    expected = torch.zeros(8, 8, dtype=torch.long)
    expected[2:6, 2:6] = 1  # rows and columns 8/4 .. 3*8/4
    assert labels.shape == (2, 8, 8) and torch.equal(labels[0], expected) and torch.equal(labels[1], expected)


def test_tiny_unet_inputs_by_seed():
    x, t = workloads.tiny_unet_inputs(3, "cpu", seed=2)
    assert x.shape == (3, 3, 32, 32) and t.tolist() == [500, 500, 500]
    assert torch.equal(x, workloads.tiny_unet_inputs(3, "cpu", seed=2)[0])
    assert not torch.equal(x, workloads.tiny_unet_inputs(3, "cpu", seed=1)[0])


def test_models_and_their_forwards():
    model, forward, batch = workloads.sd_block(64, 4, 2, "cpu")
    heads = {m.heads for m in model.modules() if hasattr(m, "heads")}
    assert batch == 2 and heads == {8} and forward().shape == (2, 64, 4, 4)
    model, forward, batch = workloads.tiny_unet(1, "cpu")
    assert forward().shape == (1, 3, 32, 32)
    rebuilt = workloads.tiny_unet_model("cpu")  # the same seed: the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))
