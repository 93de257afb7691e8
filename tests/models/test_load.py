"""The paper-like UNet, its scheduler, random-weight controls, loading, and the bundled checkpoint."""

import importlib.util
import json
import os
import sys

import pytest
import torch

from diffcirc.models import BUNDLED, build_scheduler, build_unet, load, random_like
from diffcirc.models.evaluate import eps_mse

load_module = sys.modules["diffcirc.models.load"]  # the attribute diffcirc.models.load is the function

# paper-like UNets built, saved, loaded and run on 2 images: a second OpenMP thread buys nothing
# there and, on a shared machine, spins against the other jobs (see ``single_thread``)
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(params=["low-memory", "full-init"])
def loading_path(request, monkeypatch):
    """Run a test under each of the loader's ways of building the model: low_cpu_mem_usage=True (the
    default where accelerate is installed) and low_cpu_mem_usage=False (the fallback without it)."""
    low = request.param == "low-memory"
    if low:
        pytest.importorskip("accelerate")
    monkeypatch.setattr(load_module, "_low_memory_loading", lambda: low)
    return request.param


def _attention_inputs(unet, size):
    """(module name, heads, head dim, input feature-map shape) of every diffusers Attention layer."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.append(
        (name, mod.heads, mod.inner_dim // mod.heads, tuple(args[0].shape[-2:]))))
        for name, m in unet.named_modules() if type(m).__name__ == "Attention"]
    with torch.no_grad():
        out = unet(torch.zeros(1, 3, size, size), torch.tensor([10])).sample
    for h in hooks:
        h.remove()
    assert out.shape == (1, 3, size, size)
    return seen


@pytest.mark.parametrize("size", [32, 64])
def test_paper_like_layout(size):
    torch.manual_seed(0)
    seen = _attention_inputs(build_unet(size), size)
    assert len(seen) == 3
    assert {s[1:] for s in seen} == {(8, 32, (8, 8))}  # 8 heads x dim 32 over 64 tokens, nowhere else


def test_build_unet_rejects_sizes_without_an_8x8_level():
    with pytest.raises(ValueError, match="size"):
        build_unet(48)
    with pytest.raises(ValueError, match="expected 8x8"):
        build_unet(32, block_out_channels=(32, 256))


def test_scheduler_is_ddpm_linear():
    s = build_scheduler()
    assert s.config.num_train_timesteps == 1000 and s.config.prediction_type == "epsilon"
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(s.betas, torch.linspace(1e-4, 0.02, 1000))


def test_random_like_is_seeded_untrained_copy():
    torch.manual_seed(0)
    unet = build_unet(32)
    before = torch.random.get_rng_state()
    a, b, c = random_like(unet, seed=1), random_like(unet, seed=1), random_like(unet, seed=2)
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's RNG untouched
    assert a.config == unet.config
    pa, pb, pc, pu = (dict(m.named_parameters())["conv_in.weight"] for m in (a, b, c, unet))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc) and not torch.equal(pa, pu)
    assert not a.training


@pytest.mark.parametrize("layout", ["unet_folder", "pipeline_folder", "unet_without_scheduler"])
def test_load_folder_saved_with_save_pretrained(tmp_path, layout, loading_path):
    torch.manual_seed(0)
    unet, sched = build_unet(32), build_scheduler()
    sched = sched.from_config(sched.config, beta_end=0.03)  # a distinguishable scheduler
    if layout == "pipeline_folder":
        unet.save_pretrained(tmp_path / "unet")
        sched.save_pretrained(tmp_path / "scheduler")
    else:
        unet.save_pretrained(tmp_path)
        if layout == "unet_folder":
            sched.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("*.bin"))
    loaded, loaded_sched = load(str(tmp_path))
    assert not loaded.training
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 700])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, unet(x, t).sample)
    expected_end = 0.02 if layout == "unet_without_scheduler" else 0.03
    assert loaded_sched.config.beta_end == pytest.approx(expected_end)


def test_low_memory_loading_where_accelerate_is_installed(tmp_path, monkeypatch):
    """low_cpu_mem_usage=True (the model built on the meta device, then given the checkpoint tensors)
    exactly where diffusers can do it, i.e. where accelerate imports."""
    from diffusers import UNet2DModel

    expected = importlib.util.find_spec("accelerate") is not None
    assert load_module._low_memory_loading() is expected
    asked = []
    real = UNet2DModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.append(kwargs.get("low_cpu_mem_usage"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(UNet2DModel, "from_pretrained", classmethod(spy))
    torch.manual_seed(0)
    build_unet(32).save_pretrained(tmp_path)
    unet, _ = load(str(tmp_path))
    assert asked == [expected]
    assert not any(v.is_meta for v in unet.state_dict().values())


def test_load_rejects_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(str(tmp_path))



def _fp16_variant(folder, **save_kwargs):
    """A paper-like UNet saved as an fp16 variant only (save_pretrained(..., variant="fp16")); returns
    the original float32 state dict."""
    torch.manual_seed(0)
    unet = build_unet(32)
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.half().save_pretrained(folder, variant="fp16", **save_kwargs)
    return original


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_load_folder_holding_only_a_variant(tmp_path, sharded, loading_path):
    original = _fp16_variant(tmp_path, **({"max_shard_size": "1MB"} if sharded else {}))
    names = set(os.listdir(tmp_path))
    assert "diffusion_pytorch_model.safetensors" not in names
    if sharded:
        assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names
        assert len([n for n in names if n.startswith("diffusion_pytorch_model.fp16-")]) > 1
    else:
        assert "diffusion_pytorch_model.fp16.safetensors" in names
    loaded, _ = load(str(tmp_path))
    assert loaded.dtype == torch.float32  # the dtype of the model config.json describes, as before, either way
    state = loaded.state_dict()
    assert state.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(state[k].float(), v.half().float()), k


def test_load_refuses_a_folder_of_several_variants_naming_them(tmp_path):
    from diffcirc.models import ModelLoadError

    _fp16_variant(tmp_path)
    torch.manual_seed(0)
    build_unet(32).save_pretrained(tmp_path, variant="ema")
    with pytest.raises(ModelLoadError, match=r"\['ema', 'fp16'\]"):
        load(str(tmp_path))


def test_variant_weights_are_still_checked(tmp_path):
    from diffcirc.models import CorruptWeightsError

    _fp16_variant(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.fp16.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptWeightsError, match="fp16.safetensors.*not a complete safetensors file"):
        load(str(tmp_path))


@pytest.fixture
def one_thread():
    """One intra-op thread for a test, and the count it found restored after it: left at 1, later
    in-process runs differ in the last bits from the subprocesses test_analysis_e2e compares them with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_bundled_checkpoint_loads_offline_and_denoises(one_thread):
    """The acceptance bound of the bundled model on a small held-out batch (full figures: README)."""
    from diffcirc.data import load_dataset

    files = sorted(os.listdir(BUNDLED))
    assert {"config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "training.json"} <= set(files)
    assert sum(os.path.getsize(os.path.join(BUNDLED, f)) for f in files) <= 30 * 2**20
    with open(os.path.join(BUNDLED, "training.json")) as f:
        assert json.load(f)["steps"] > 0
    unet, scheduler = load("bundled")
    assert unet.config.sample_size == 32
    for spec, n in (("synthetic-gray", 24), ("lfw", 20)):
        ds = load_dataset(spec, size=32, n=n, split="heldout")
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])
        mse = eps_mse(unet, scheduler, images, seed=0)
        assert sum(mse.values()) / len(mse) <= 0.5, (spec, mse)
        assert mse[100] < 1.0, (spec, mse)  # beats predicting zero noise even where denoising is hardest
