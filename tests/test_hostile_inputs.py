"""Hostile and bad input: every case ends in an exception (or a usage error) whose message says what
is wrong and what to do, never in a segfault, a traceback for a user mistake, or a silent wrong answer.

All fixtures are built in tmp_path; nothing is downloaded, and weights are only ever read with safetensors.
"""

import json
import os
import re
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import _tiny_models as tm
from _tiny_models import single_thread  # noqa: F401  (autouse fixture)
from diffcirc.cli import main as cli
from diffcirc.cli._checks import check_writable_folder
from diffcirc.data import CelebA, DatasetError, ImageFolder, load_dataset, parse_mix
from diffcirc.models import CorruptWeightsError, ModelLoadError, WeightsMismatchError, load
from diffcirc.models.checkpoint import load_checkpoint, save_checkpoint
from diffcirc.models.train import TrainConfig, train

WEIGHTS = "diffusion_pytorch_model.safetensors"
load_module = sys.modules["diffcirc.models.load"]  # the attribute diffcirc.models.load is the function


# -- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_unet(tmp_path_factory):
    """A tiny UNet folder as save_pretrained writes it (config.json + safetensors); copied per test."""
    folder = tmp_path_factory.mktemp("unet")
    tm.unet2d().save_pretrained(folder)
    return folder


@pytest.fixture
def unet_dir(saved_unet, tmp_path):
    """A private copy of ``saved_unet`` that a test may damage."""
    folder = tmp_path / "model"
    folder.mkdir()
    for f in saved_unet.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.fixture(params=["low-memory", "full-init"])
def loading_path(request, monkeypatch):
    """Run a test under each of the loader's ways of building the model: low_cpu_mem_usage=True (on the
    meta device, no random initialisation; the default where accelerate is installed) and
    low_cpu_mem_usage=False (the fallback without accelerate)."""
    low = request.param == "low-memory"
    if low:
        pytest.importorskip("accelerate")
    monkeypatch.setattr(load_module, "_low_memory_loading", lambda: low)
    return request.param


def _edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_weights(folder, edit):
    path = str(folder / WEIGHTS)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _png(path, value=128, shape=(20, 24, 3)):
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


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


def _linear_checkpoint(path, in_features=3):
    """A real checkpoint folder (one optimizer step, so the optimizer has state) of a tiny Linear model."""
    torch.manual_seed(0)
    model = torch.nn.Linear(in_features, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, in_features)).sum().backward()
    opt.step()
    save_checkpoint(str(path), model=model, ema=dict(model.state_dict()), optimizer=opt,
                    generator=torch.Generator().manual_seed(0),
                    state={"step": 1, "losses": [1.0], "elapsed_s": 0.0, "config": {}})


def _restore_into(path, in_features=3):
    model = torch.nn.Linear(in_features, 2)
    return load_checkpoint(str(path), model=model, optimizer=torch.optim.AdamW(model.parameters()),
                           generator=torch.Generator())


def test_truncated_training_checkpoint_is_refused_and_kept(tmp_path):
    ckpt = tmp_path / "checkpoint"
    _linear_checkpoint(ckpt)
    _restore_into(ckpt)  # intact: restores
    bad = ckpt / "optimizer.safetensors"
    bad.write_bytes(bad.read_bytes()[:-4])
    before = bad.read_bytes()
    with pytest.raises(CorruptWeightsError, match="optimizer.safetensors.*not a complete safetensors file") as err:
        _restore_into(ckpt)
    assert "train from scratch" in str(err.value)
    assert bad.read_bytes() == before and (ckpt / "model.safetensors").is_file()  # nothing deleted or rewritten


def test_training_checkpoint_of_another_model_is_refused(tmp_path):
    _linear_checkpoint(tmp_path / "checkpoint", in_features=3)
    with pytest.raises(WeightsMismatchError, match="model.safetensors.*does not fit the model being trained"):
        _restore_into(tmp_path / "checkpoint", in_features=4)


def test_resume_with_another_size_names_the_setting(tmp_path):
    """The settings are compared before any tensor is loaded (else: a raw load_state_dict size mismatch)."""
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    saved = {"data": "synthetic:8", "size": 32, "batch_size": 4, "seed": 0}
    (ckpt / "state.json").write_text(json.dumps({"step": 5, "config": saved, "param_groups": []}))
    with pytest.raises(ValueError, match=r"different settings.*'size': \(32, 64\)"):
        train(TrainConfig(out=str(tmp_path), data="synthetic:8", size=64, steps=10, batch_size=4, progress=False))



def test_cli_resume_with_another_size_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    saved = {"data": "synthetic:8", "size": 32, "batch_size": 4, "seed": 0}
    (ckpt / "state.json").write_text(json.dumps({"step": 5, "config": saved, "param_groups": []}))
    code = cli(["train", "--out", str(tmp_path), "--data", "synthetic:8", "--size", "64", "--steps", "10",
                "--batch-size", "4", "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("diffcirc train: error: checkpoint in") and err.count("\n") == 1, err
    assert "'size': (32, 64)" in err and "Traceback" not in err


# -- 3. unreadable images ------------------------------------------------------------------------------

def _bad_files(folder):
    """A corrupt JPEG, a zero-byte PNG and a text file named .png, in sorted order."""
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    return [str(folder / n) for n in ("corrupt.jpg", "empty.png", "text.png")]


def test_image_folder_skips_unreadable_files_with_one_counting_warning(tmp_path):
    _png(tmp_path / "good.png", 200)
    bad = _bad_files(tmp_path)
    with pytest.warns(UserWarning, match="skipped 3 unreadable file") as record:
        ds = ImageFolder(str(tmp_path), size=8)
    assert len(record) == 1
    assert ds.skipped == 3 and ds.skipped_files == bad
    assert [ds[i]["source"] for i in range(len(ds))] == ["folder:good.png"]


@pytest.mark.parametrize("content", ["nothing", "only-unreadable", "only-other-files"])
def test_image_folder_without_readable_images_raises(tmp_path, content):
    if content == "only-unreadable":
        _bad_files(tmp_path)
    elif content == "only-other-files":
        (tmp_path / "notes.txt").write_text("hello")
    message = "none of the 3 image files" if content == "only-unreadable" else "holds no images"
    with pytest.raises(DatasetError, match=message) as err:
        ImageFolder(str(tmp_path), size=8)
    assert str(tmp_path) in str(err.value)


def test_image_that_breaks_after_the_check_is_named(tmp_path):
    _png(tmp_path / "a.png")
    ds = ImageFolder(str(tmp_path), size=8)
    (tmp_path / "a.png").write_bytes(b"")  # replaced after the dataset was built
    with pytest.raises(DatasetError, match="cannot read image .*a.png"):
        ds[0]


def test_sixteen_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "deep.png")  # mid-gray in 16 bits
    item = ImageFolder(str(tmp_path), size=8)[0]
    assert item["image"].shape == (3, 8, 8)
    # PIL's convert("RGB") clips 32768 to 255 (white, +1.0); scaled, mid-gray is ~0.0 in [-1, 1]
    torch.testing.assert_close(item["image"], torch.full((3, 8, 8), 128 / 255 * 2 - 1))


def _celeba(root, names, bad=()):
    """A CelebA tree listing ``names`` (all partition 2, attribute Smiling); files in ``bad`` are broken."""
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    for name in names:
        if name in bad:
            (images / name).write_bytes(b"" if name.startswith("0") else b"\xff\xd8\xff\xe0 garbage")
        else:
            _png(images / name, 150, shape=(218, 178, 3))
    rows = "".join(f"{n}  1\n" for n in names)
    (root / "list_attr_celeba.txt").write_text(f"{len(names)}\nSmiling\n{rows}")
    (root / "list_eval_partition.txt").write_text("".join(f"{n} 2\n" for n in names))


def test_celeba_skips_unreadable_files_and_keeps_n(tmp_path):
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    bad = {names[0], "x-corrupt.jpg"}  # a zero-byte file and a corrupt JPEG
    _celeba(tmp_path, names + ["x-corrupt.jpg"], bad=bad)
    with pytest.warns(UserWarning, match="skipped 2 missing or unreadable file") as record:
        full = CelebA(str(tmp_path), size=8)
    assert len(record) == 1
    assert full.skipped == 2 and full.skipped_files == sorted(bad)
    assert full.files == names[1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whether a seed's permutation meets a bad file first varies
        for seed in range(6):
            some = CelebA(str(tmp_path), size=8, n=4, seed=seed)
            assert len(some.files) == 4 and not set(some.files) & bad, seed  # n readable files, none broken
            assert some.files == CelebA(str(tmp_path), size=8, n=4, seed=seed).files  # same seed, same files
    assert some[0]["image"].shape == (3, 8, 8)


def test_celeba_without_usable_images_raises(tmp_path):
    names = ["000001.jpg", "000002.jpg"]
    _celeba(tmp_path, names, bad=set(names))
    with pytest.raises(DatasetError, match="none of the 2 selected CelebA images") as err:
        CelebA(str(tmp_path), size=8)
    assert "img_align_celeba" in str(err.value)


def test_celeba_malformed_attribute_file_names_the_line(tmp_path):
    _celeba(tmp_path, ["000001.jpg"])
    (tmp_path / "list_attr_celeba.txt").write_text("1\nSmiling\n000001.jpg yes\n")
    with pytest.raises(DatasetError, match=r"list_attr_celeba.txt' line 3: expected a file name and 1 values"):
        CelebA(str(tmp_path), size=8)


def test_dataset_specs_and_mix_counts_are_checked(tmp_path):
    with pytest.raises(ValueError, match="takes no ':' argument"):
        load_dataset("lfw:20")  # was silently all of LFW
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="must be >= 1"):
        parse_mix("synthetic:0,lfw-train")


# -- 4. CLI values out of range ------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["analyze", "--synthetic", "0"], "argument --synthetic: must be > 0"),
    (["analyze", "--natural-n", "-4"], "argument --natural-n: must be > 0"),
    (["analyze", "--timesteps", "10,1000"], r"argument --timesteps: timesteps must lie in \[0, 1000\)"),
    (["analyze", "--timesteps=-1"], r"argument --timesteps: timesteps must lie in \[0, 1000\)"),
    (["analyze", "--timesteps", "100,100"], "argument --timesteps: timesteps must be distinct"),
    (["analyze", "--ablation-timesteps", "1200"], r"argument --ablation-timesteps: timesteps must lie in \[0, 1000\)"),
    (["analyze", "--natural", "imagenet"], "argument --natural: unknown dataset spec 'imagenet'"),
    (["analyze", "--natural", "folder:MISSING"], "argument --natural: .*does not exist"),
    (["analyze", "--natural", "celeba:MISSING"], "argument --natural: .*does not exist"),
    (["analyze", "--synthetic-spec", "faces"], "argument --synthetic-spec: invalid choice"),
    (["analyze", "--model", "bundeld"], "argument --model: 'bundeld' is neither 'bundled'"),
    (["analyze", "--model", "MISSING"], "argument --model: .* is neither 'bundled', an existing folder"),
    (["analyze", "--seed", "-1"], "argument --seed: must be >= 0"),
    (["analyze", "--circuit-threshold", "nan"], "argument --circuit-threshold: must be a finite number"),
    (["analyze", "--max-memory", "1e400"], "argument --max-memory: size out of range"),
    (["analyze", "--ablation-modes", "zero,max"], "argument --ablation-modes: must be a comma-separated subset"),
    (["analyze", "--device", "gpu"], "argument --device: not a torch device"),
    (["train", "--steps", "0"], "argument --steps: must be > 0"),
    (["train", "--batch-size", "-2"], "argument --batch-size: must be > 0"),
    (["train", "--lr", "0"], "argument --lr: must be > 0"),
    (["train", "--size", "48"], "argument --size: invalid choice: 48"),
    (["train", "--ema-decay", "1.5"], r"argument --ema-decay: must lie in \[0, 1\)"),
    (["train", "--sample-steps", "0"], r"argument --sample-steps: must lie in \[1, 1000\]"),
    (["train", "--data", "synthetic:0"], "argument --data: .*count of 'synthetic' must be >= 1"),
    (["train", "--data", "imagenet:50"], "argument --data: unknown dataset spec 'imagenet'"),
    (["train", "--data", "folder:MISSING:5"], "argument --data: .*does not exist"),
    (["train", "--data", "synthetic:200000,synthetic-gray:10"], "argument --data: .*never share a seed"),
    (["faces", "--n", "0"], "argument --n: must be > 0"),
    (["faces", "--n", "-5"], "argument --n: must be > 0"),
    (["faces", "--size", "0"], r"argument --size: must lie in \[8, 1024\]"),
    (["faces", "--seed", "-3"], "argument --seed: must be >= 0"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_value_out_of_range_is_a_usage_error(tmp_path, capsys, monkeypatch, argv, message):
    import diffcirc.analysis.driver as driver
    import diffcirc.data as data
    import diffcirc.models.train as training

    def never(*args, **kwargs):
        raise AssertionError("the command started working despite a bad argument")

    for module, name in ((driver, "run_analysis"), (training, "train"), (data, "export_faces")):
        monkeypatch.setattr(module, name, never)
    argv = [a.replace("MISSING", str(tmp_path / "missing")) for a in argv]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli([*argv, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()


def test_cli_reports_corrupt_weights_without_traceback(unet_dir, tmp_path, capsys):
    path = unet_dir / WEIGHTS
    path.write_bytes(path.read_bytes()[:4096])
    assert cli(["analyze", "--model", str(unet_dir), "--out", str(tmp_path / "out"), "--synthetic", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffcirc analyze: error: weights file") and str(path) in err and "Traceback" not in err


def test_cli_reports_folder_without_images_without_traceback(saved_unet, tmp_path, capsys):
    empty = tmp_path / "images"
    empty.mkdir()
    code = cli(["analyze", "--model", str(saved_unet), "--natural", f"folder:{empty}", "--synthetic", "2",
                "--out", str(tmp_path / "out")])
    assert code == 1
    assert f"image folder '{empty}' holds no images" in capsys.readouterr().err


# -- 5. output folder not writable ---------------------------------------------------------------------

@pytest.mark.parametrize("command", [["analyze"], ["train", "--steps", "1"], ["faces", "--n", "1"]],
                         ids=lambda c: c[0])
@pytest.mark.parametrize("where", ["existing-file", "under-a-file"])
def test_output_folder_that_cannot_be_written_fails_up_front(tmp_path, capsys, monkeypatch, command, where):
    import diffcirc.analysis.driver as driver
    import diffcirc.data as data
    import diffcirc.models.train as training

    def never(*args, **kwargs):
        raise AssertionError("expensive work started before the output folder was checked")

    for module, name in ((driver, "run_analysis"), (training, "train"), (data, "export_faces")):
        monkeypatch.setattr(module, name, never)
    blocker = tmp_path / "results.txt"
    blocker.write_text("precious")
    out = blocker if where == "existing-file" else blocker / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli([*command, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    expected = {"existing-file": "is an existing file, not a folder",
                "under-a-file": "results.txt' is a file, not a folder"}[where]
    assert "argument --out" in err and expected in err and "Traceback" not in err
    assert blocker.read_text() == "precious"  # nothing lost


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the file cases above cover root")
def test_read_only_output_folder_fails_up_front(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli(["faces", "--n", "1", "--out", str(locked / "faces")])
        assert exit_info.value.code == 2
        assert "cannot write in" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_writable_check_leaves_nothing_behind(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    assert check_writable_folder(str(existing)) == str(existing)
    assert list(existing.iterdir()) == []  # the probe file is gone
    new = tmp_path / "a" / "b"
    assert check_writable_folder(str(new)) == str(new)
    assert not (tmp_path / "a").exists()  # checking does not create


def test_only_rank_0_of_a_torchrun_launch_checks_the_output_folder(tmp_path, monkeypatch):
    """Only rank 0 writes; the other ranks need not share its file system, so they do not probe it."""
    import argparse

    from diffcirc.cli._checks import writable_folder

    blocker = tmp_path / "results.txt"
    blocker.write_text("precious")
    for rank in (None, "0"):
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)
        else:
            monkeypatch.setenv("RANK", rank)
        with pytest.raises(argparse.ArgumentTypeError, match="is an existing file"):
            writable_folder(str(blocker))
    monkeypatch.setenv("RANK", "1")
    assert writable_folder(str(blocker)) == str(blocker)
    assert blocker.read_text() == "precious"
