"""diffcirc.bench.processors: the attention processors the UNet benchmark compares."""

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

from diffcirc.bench import processors, workloads  # noqa: E402
from diffcirc.bench.configs import UNET_IMPLEMENTATIONS  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _processor_types(model):
    return {type(m.processor) for m in model.modules() if isinstance(m, Attention)}


@pytest.fixture(scope="module")
def block():
    """A small SD-like block (width 64, 8 heads of 8, 4x4 latent, self- and cross-attention)."""
    return workloads.sd_block(64, 4, 1, "cpu")


def test_every_implementation_reproduces_attn_processor(block):
    model, forward, batch = block
    labels = workloads.label_map(batch, 4, "cpu")
    with torch.no_grad():
        processors.set_processors(model, lambda n: AttnProcessor2_0())
        reference = forward()
        for name in UNET_IMPLEMENTATIONS:
            with processors.implementation(name, model, labels, {}):
                assert (forward() - reference).abs().max().item() < 1e-5, name
            assert _processor_types(model) == {AttnProcessor2_0}


def test_entropies_recorded_by_the_hook_and_the_recorder_agree_with_float64(block):
    """Mean entropy of each head of the self-attention layer against softmax(q k^T / sqrt(d)) in float64."""
    model, forward, _ = block
    attn = next(m for name, m in model.named_modules() if name.endswith("attn1"))
    seen = {}

    def keep_input(module, args, kwargs):  # the layer's input, as its processor gets it (after the block's norm)
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    handle = attn.register_forward_pre_hook(keep_input, with_kwargs=True)
    means = {}
    with torch.no_grad():
        for name in ("materialising", "fused+entropy"):
            state = {}
            with processors.implementation(name, model, None, state):
                forward()
            means[name] = processors.mean_entropy(state)
    handle.remove()
    x = seen["x"].double()
    q, k = (torch.nn.functional.linear(x, lin.weight.double(), None if lin.bias is None else lin.bias.double())
            .view(1, -1, 8, 8).transpose(1, 2) for lin in (attn.to_q, attn.to_k))  # (1, heads, N, 8)
    p = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    expected = (-(p * p.log()).sum(-1)).mean(dim=(0, 2))  # (heads,)
    layer = next(name for name, m in model.named_modules() if m is attn)
    for name, recorded in means.items():
        got = torch.tensor([recorded[(layer, h)] for h in range(8)], dtype=torch.float64)
        assert torch.allclose(got, expected, atol=1e-4), name


def test_processors_are_restored_after_an_error(block):
    model, _, _ = block
    with pytest.raises(RuntimeError, match="inside"), processors.implementation("fused", model, None, {}):
        raise RuntimeError("inside")
    assert _processor_types(model) == {AttnProcessor2_0}


def test_mean_entropy_of_nothing_recorded():
    assert processors.mean_entropy({}) is None
