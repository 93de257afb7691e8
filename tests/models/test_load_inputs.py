"""Corrupt, truncated, mismatched or unreachable weights and configs: every case ends in an exception
whose message names the file and says what to do, never a segfault or a silent wrong answer. Weights are
only ever read with safetensors; nothing is downloaded (the hub calls of diffusers are replaced)."""

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffcirc.cli import main as cli
from diffcirc.models import CorruptWeightsError, ModelLoadError, WeightsMismatchError, load

WEIGHTS = "diffusion_pytorch_model.safetensors"
load_module = sys.modules["diffcirc.models.load"]  # the attribute diffcirc.models.load is the function

pytestmark = pytest.mark.usefixtures("single_thread")


def _edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_weights(folder, edit):
    path = str(folder / WEIGHTS)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)

# -- 1. corrupt or truncated weights -------------------------------------------------------------------

@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "not a complete safetensors file"),  # cut in half
    (lambda b: b[:-10], "not a complete safetensors file"),  # a few bytes missing at the end
    (lambda b: np.random.default_rng(0).bytes(len(b)), "not a complete safetensors file"),  # random bytes
    (lambda b: b"", r"is empty \(0 bytes\)"),
    (lambda b: b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n", "Git LFS pointer"),
], ids=["half", "tail-cut", "random-bytes", "empty", "lfs-pointer"])
def test_corrupt_weights_file_is_refused_naming_it(unet_dir, damage, message):
    path = unet_dir / WEIGHTS
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptWeightsError, match=message) as err:
        load(str(unet_dir))
    assert str(path) in str(err.value) and "save_pretrained" in str(err.value)  # which file, and what to do


def test_weights_with_nan_are_refused(unet_dir, loading_path):
    # safetensors has no checksum: damaged data bytes parse fine, but typically decode to NaN/inf
    _edit_weights(unet_dir, lambda t: t["conv_in.bias"].__setitem__(0, float("nan")))
    with pytest.raises(CorruptWeightsError, match="NaN or inf in conv_in.bias"):
        load(str(unet_dir))


def test_bundled_path_with_corrupt_weights_says_reinstall(unet_dir, monkeypatch):
    monkeypatch.setattr(load_module, "BUNDLED", str(unet_dir))
    path = unet_dir / WEIGHTS
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptWeightsError, match="reinstall") as err:
        load("bundled")
    assert str(path) in str(err.value)


def test_bundled_path_missing_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(load_module, "BUNDLED", str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="bundled weights missing"):
        load("bundled")


def test_pickle_weights_are_never_read(unet_dir):
    (unet_dir / WEIGHTS).unlink()
    (unet_dir / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle either")
    with pytest.raises(FileNotFoundError, match="reads only safetensors"):
        load(str(unet_dir))


def test_unknown_model_name_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'bundled', an existing folder, nor a hub id"):
        load(str(tmp_path / "no" / "such" / "model"))
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load(str(tmp_path / "weights.safetensors"))



# -- 1b. a hub id that cannot be loaded (no network: the hub calls of diffusers are replaced) -----------

HUB_ID = "someone/tiny-unet"


def _hub_error(message, missing=False):
    """An OSError as diffusers raises it for the hub; with missing, raised while handling huggingface_hub's
    EntryNotFoundError (a file the repo lacks), as diffusers does for a 404."""
    from huggingface_hub.utils import EntryNotFoundError

    error = OSError(message)
    if missing:
        error.__context__ = EntryNotFoundError("404 Client Error: Entry Not Found")
    return error


def _raising(error):
    def fail(cls, *args, **kwargs):
        raise error
    return classmethod(fail)


def _serve_as_hub(monkeypatch, folder, tmp_path):
    """HUB_ID as a bare UNet repo without a scheduler config, served from ``folder``."""
    from diffusers import DDPMScheduler, UNet2DModel

    monkeypatch.chdir(tmp_path)  # HUB_ID is no local folder
    real_config, real_load = UNet2DModel.load_config.__func__, UNet2DModel.from_pretrained.__func__

    def load_config(cls, repo_id, subfolder=None, **kwargs):
        if subfolder:
            raise _hub_error(f"{repo_id} does not appear to have a file named {subfolder}/config.json.", missing=True)
        return real_config(cls, str(folder), **kwargs)

    def from_pretrained(cls, repo_id, subfolder=None, **kwargs):
        return real_load(cls, str(folder), **kwargs)

    monkeypatch.setattr(UNet2DModel, "load_config", classmethod(load_config))
    monkeypatch.setattr(UNet2DModel, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(DDPMScheduler, "from_pretrained", _raising(
        _hub_error(f"{HUB_ID} does not appear to have a file named scheduler_config.json.", missing=True)))
    return UNet2DModel, DDPMScheduler


@pytest.fixture
def hub(monkeypatch, saved_unet, tmp_path):
    """HUB_ID served from ``saved_unet``; a test replaces one of the calls (UNet2DModel.load_config /
    .from_pretrained, DDPMScheduler.from_pretrained) with a failure."""
    return _serve_as_hub(monkeypatch, saved_unet, tmp_path)


def test_hub_repo_without_scheduler_config_gets_the_default(hub, loading_path):
    unet, scheduler = load(HUB_ID)
    assert list(unet.config.block_out_channels) == [32, 64] and scheduler.config.beta_end == pytest.approx(0.02)


OFFLINE = ("We couldn't connect to 'https://huggingface.co' to load this file, couldn't find it in the cached files\n"
           "and it looks like someone/tiny-unet is not the path to a directory containing a config.json file.")
NO_SAFETENSORS = (f"{HUB_ID} does not appear to have a file named diffusion_pytorch_model.safetensors.\n"
                  "Checkout 'https://huggingface.co/someone/tiny-unet/tree/main' for available files.")
GATED = ("You are trying to access a gated repo.\nMake sure to have access to it at https://huggingface.co/someone/"
         "tiny-unet.\n401 Client Error.")


@pytest.mark.parametrize("call, message, expected", [
    ("load_config", OFFLINE, "no UNet config could be read.*couldn't connect to 'https://huggingface.co'"),
    ("load_config", GATED, "no UNet config could be read.*gated repo"),
    ("from_pretrained", NO_SAFETENSORS, "does not appear to have a file named diffusion_pytorch_model.safetensors"),
    ("from_pretrained", GATED, "could not load the UNet weights.*gated repo"),
    ("scheduler", "401 Client Error: Unauthorized for url", "scheduler config.*401 Client Error"),
], ids=["config-offline", "config-gated", "weights-bin-only", "weights-gated", "scheduler-401"])
def test_hub_failure_is_a_model_load_error_naming_the_cause(hub, monkeypatch, call, message, expected):
    unet_cls, scheduler_cls = hub
    monkeypatch.setattr(scheduler_cls if call == "scheduler" else unet_cls,
                        "from_pretrained" if call == "scheduler" else call, _raising(OSError(message)))
    with pytest.raises(ModelLoadError, match=expected) as err:
        load(HUB_ID)
    assert HUB_ID in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("call", ["load_config", "from_pretrained"])
def test_cli_reports_hub_failure_in_one_line(hub, monkeypatch, capsys, tmp_path, call):
    import diffcirc.analysis.driver as driver

    unet_cls, _ = hub
    monkeypatch.setattr(unet_cls, call, _raising(OSError(GATED)))
    monkeypatch.setattr(driver, "run_analysis", lambda config: load(config.model))  # the load is what is tested
    assert cli(["analyze", "--model", HUB_ID, "--out", str(tmp_path / "out"), "--synthetic", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffcirc analyze: error:") and err.count("\n") == 1, err
    assert "gated repo" in err and "Traceback" not in err


# -- 2. config that does not match the weights ---------------------------------------------------------

def _drop(key):
    return lambda t: t.pop(key)


def _add(key):
    return lambda t: t.__setitem__(key, torch.zeros(3))


def _reshape(key, shape):
    return lambda t: t.__setitem__(key, torch.zeros(shape))


MISMATCHES = pytest.mark.parametrize("config, weights, message", [
    ({"block_out_channels": [32, 128]}, None, "tensor\\(s\\) of another shape"),  # config says other channels
    ({"layers_per_block": 1}, None, "in the weights but not in the model"),  # config says fewer layers
    ({"layers_per_block": 3}, None, "missing from the weights"),  # config says more layers
    ({}, _drop("conv_in.bias"), "1 tensor\\(s\\) missing from the weights: conv_in.bias"),
    ({}, _add("extra.weight"), "1 tensor\\(s\\) in the weights but not in the model: extra.weight"),
    ({}, _reshape("conv_in.weight", (32, 3, 5, 5)),
     r"conv_in.weight \(32, 3, 5, 5\) in the weights vs \(32, 3, 3, 3\)"),
], ids=["channels", "fewer-layers", "more-layers", "missing-key", "unexpected-key", "shape"])


@MISMATCHES
def test_config_weights_mismatch_is_refused(unet_dir, loading_path, config, weights, message):
    """diffusers only logs missing/unexpected keys, leaving the missing tensors unread (and, with
    low_cpu_mem_usage=True, some versions report nothing): the folder is checked against the
    safetensors headers first."""
    if config:
        _edit_config(unet_dir, **config)
    if weights:
        _edit_weights(unet_dir, weights)
    with pytest.raises(WeightsMismatchError, match=message) as err:
        load(str(unet_dir))
    assert "config.json" in str(err.value)


@MISMATCHES
def test_hub_weights_that_do_not_fit_are_refused(unet_dir, loading_path, monkeypatch, tmp_path, config, weights,
                                                 message):
    """A hub repo's files are only known once diffusers has them: diffusers' loading info and the
    tensors left on the meta device decide, with the same message as for a folder."""
    if config:
        _edit_config(unet_dir, **config)
    if weights:
        _edit_weights(unet_dir, weights)
    _serve_as_hub(monkeypatch, unet_dir, tmp_path)
    with pytest.raises(WeightsMismatchError, match=message) as err:
        load(HUB_ID)
    assert HUB_ID in str(err.value) and "config.json" in str(err.value)


def test_shard_without_a_tensor_its_index_lists_is_refused(saved_unet, tmp_path, loading_path):
    """diffusers takes a sharded checkpoint's keys from its index: a shard that lacks one of them
    would leave that tensor unread, unreported."""
    from diffusers import UNet2DModel

    folder = tmp_path / "sharded"
    UNet2DModel.from_pretrained(saved_unet).save_pretrained(folder, max_shard_size="100KB")
    index = json.loads((folder / (WEIGHTS + ".index.json")).read_text())
    shard = folder / index["weight_map"]["conv_in.bias"]
    tensors = load_file(str(shard))
    del tensors["conv_in.bias"]
    save_file(tensors, str(shard))
    with pytest.raises(WeightsMismatchError, match="1 tensor\\(s\\) missing from the weights: conv_in.bias"):
        load(str(folder))


def test_weights_saved_before_the_attention_refactor_still_load(unet_dir, saved_unet, loading_path):
    """Attention keys of old checkpoints (query/key/value/proj_attn) are renamed by diffusers on load;
    the check before loading renames them the same way instead of calling them unexpected."""
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(tensors):
        for key in [k for k in tensors if ".attentions." in k]:
            for new, old in old_names.items():
                if f".{new}." in key:
                    tensors[key.replace(f".{new}.", f".{old}.")] = tensors.pop(key)

    _edit_weights(unet_dir, rename)
    assert any(".query." in k for k in load_file(str(unet_dir / WEIGHTS)))
    unet, _ = load(str(unet_dir))
    original = load_file(str(saved_unet / WEIGHTS))
    state = unet.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], v) for k, v in original.items())


def test_config_that_is_not_json_or_not_buildable(unet_dir, loading_path):
    (unet_dir / "config.json").write_text('{"block_out_channels": [32,')
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load(str(unet_dir))
    (unet_dir / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "block_out_channels": [-32, 64]}))
    with pytest.raises(ModelLoadError, match="could not build UNet2DModel"):
        load(str(unet_dir))
