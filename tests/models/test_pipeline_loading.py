"""``load_pipeline``: pipeline folders, hub ids in the local cache, pixel models through ``load``,
and refusals that name what is wrong (no usable denoiser, a missing component, pickle-only or
damaged text encoders)."""

import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file, save_file

from diffcirc.models import BUNDLED, CorruptWeightsError, ModelLoadError, WeightsMismatchError
from diffcirc.models.noising import DDPMNoising, FlowMatching
from diffcirc.models.pipeline import load_pipeline
from diffcirc.models.pipeline_files import find_components, resolve_model_path
from diffcirc.models.text_encoders import load_text_encoder
from helpers import tiny_pipelines as tp


@pytest.fixture(scope="module")
def folders(tmp_path_factory, single_thread):
    """{family: a saved tiny pipeline folder}, built once; tests that damage one copy it first."""
    root = tmp_path_factory.mktemp("pipelines")
    out = {}
    for family, build in tp.BUILDERS.items():
        build(root / family)
        out[family] = root / family
    return out


@pytest.fixture
def copy_of(folders, tmp_path):
    def copy(family):
        return shutil.copytree(folders[family], tmp_path / family)
    return copy


@pytest.mark.parametrize("family, denoiser, noising, encoders", [
    ("sd", "UNet2DConditionModel", DDPMNoising, ["text_encoder"]),
    ("sdxl", "UNet2DConditionModel", DDPMNoising, ["text_encoder", "text_encoder_2"]),
    ("sd3", "SD3Transformer2DModel", FlowMatching, ["text_encoder", "text_encoder_2", "text_encoder_3"]),
    ("flux", "FluxTransformer2DModel", FlowMatching, ["text_encoder", "text_encoder_2"]),
    ("pixel", "UNet2DModel", DDPMNoising, []),
])
def test_each_layout_loads_its_components(folders, family, denoiser, noising, encoders):
    pipe = load_pipeline(str(folders[family]))
    assert pipe.family == family and type(pipe.model).__name__ == denoiser
    assert isinstance(pipe.noising, noising) and not pipe.model.training
    assert sorted(pipe.text_encoders) == encoders and sorted(pipe.tokenizers) == [e.replace("text_encoder", "tokenizer")
                                                                                  for e in encoders]
    assert (pipe.vae is not None) == (family != "pixel")
    assert pipe.image_size == (tp.IMAGE_SIZE if family != "flux" else 128 * 2)  # Flux: the pipeline's 128 latents


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_image_tokens_are_the_transformers_own_sequence_and_set_the_default_grid(folders, family):
    """The token count the flow schedulers' dynamic shift reads is the image's length in the
    denoiser's sequence: SD3's patch embedding, Flux's packing (their own code counts it)."""
    pipe = load_pipeline(str(folders[family]))
    size = 2 * tp.IMAGE_SIZE  # not the default size: the count must follow --size
    latent = torch.zeros(1, tp.LATENT_CHANNELS, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    with torch.no_grad():
        theirs = pipe.model.pos_embed(latent).shape[1] if family == "sd3" else \
            FluxPipeline._pack_latents(latent, 1, tp.LATENT_CHANNELS, latent.shape[2], latent.shape[3]).shape[1]
    assert pipe.image_tokens(size) == theirs
    assert pipe.default_timesteps(10, size) == pipe.noising.default_timesteps(10, image_tokens=theirs)


def test_unet_default_grid_is_the_centres_of_equal_bins_of_the_training_timesteps(folders):
    grid = [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    for family in ("sd", "sdxl", "pixel"):
        pipe = load_pipeline(str(folders[family]))
        assert pipe.image_tokens(tp.IMAGE_SIZE) is None and pipe.default_timesteps(10, tp.IMAGE_SIZE) == grid
    assert load_pipeline(BUNDLED).default_timesteps(4, 32) == [125, 375, 625, 875]


def test_scheduler_keeps_its_own_class_and_prediction_type(folders):
    sdxl = load_pipeline(str(folders["sdxl"]))
    assert type(sdxl.scheduler).__name__ == "EulerDiscreteScheduler"
    assert sdxl.noising.prediction_type == "v_prediction"
    flux = load_pipeline(str(folders["flux"]))
    assert flux.scheduler.config.use_dynamic_shifting and flux.noising.prediction_type == "flow"


def test_loaded_weights_are_the_saved_ones(folders):
    pipe = load_pipeline(str(folders["sd3"]))
    saved = load_file(str(folders["sd3"] / "text_encoder_3" / "model.safetensors"))
    state = pipe.text_encoders["text_encoder_3"].state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


def test_pixel_folder_without_model_index_and_the_bundled_model_load_through_load(copy_of):
    folder = copy_of("pixel")
    (folder / "model_index.json").unlink()
    pipe = load_pipeline(str(folder))
    assert pipe.family == "pixel" and pipe.folder is None and type(pipe.scheduler).__name__ == "DDPMScheduler"
    bundled = load_pipeline("bundled")
    assert bundled.family == "pixel" and bundled.image_size == 32 and bundled.vae_scale_factor == 1
    assert load_pipeline(BUNDLED).family == "pixel"


@pytest.mark.parametrize("remove", ["unet", "unet/config.json"])
def test_a_folder_without_a_usable_denoiser_is_refused_naming_it(copy_of, remove):
    folder = copy_of("sd")
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelLoadError, match=r"no usable denoiser \(unet/ (is missing|has no config.json)\)"):
        load_pipeline(str(folder))


def test_a_folder_with_neither_unet_nor_transformer_is_refused(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ModelLoadError, match="neither unet/ nor transformer/"):
        find_components(str(tmp_path))


def test_a_listed_component_that_is_missing_is_named(copy_of):
    folder = copy_of("flux")
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelLoadError, match=r"component 'vae' \(AutoencoderKL\)"):
        load_pipeline(str(folder))


def test_a_pipeline_without_its_scheduler_is_refused(copy_of):
    folder = copy_of("sd3")
    shutil.rmtree(folder / "scheduler")
    with pytest.raises(ModelLoadError, match="scheduler/scheduler_config.json"):
        load_pipeline(str(folder))


def test_a_denoiser_of_an_unsupported_class_is_refused(copy_of):
    folder = copy_of("sd")
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["_class_name"] = "UNet3DConditionModel"
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="UNet3DConditionModel.*not one of UNet2DModel"):
        load_pipeline(str(folder))


def test_a_text_encoder_with_only_pickle_weights_is_refused(copy_of):
    folder = copy_of("sd")
    encoder = folder / "text_encoder"
    torch.save(load_file(str(encoder / "model.safetensors")), encoder / "pytorch_model.bin")
    (encoder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"only pickle weights \['pytorch_model.bin'\].*reads only safetensors"):
        load_pipeline(str(folder))


def test_a_text_encoder_saved_as_a_sharded_variant_loads_its_saved_weights(folders, tmp_path):
    # transformers names a variant's shard index model.safetensors.index.fp16.json: the variant
    # goes before the last extension, as for the denoiser's files
    saved = load_text_encoder(str(folders["sd3"] / "text_encoder_3"))
    folder = tmp_path / "text_encoder_3"
    saved.save_pretrained(folder, variant="fp16", max_shard_size="20KB", safe_serialization=True)
    assert (folder / "model.safetensors.index.fp16.json").is_file() and not (folder / "model.safetensors").exists()
    loaded = load_text_encoder(str(folder))
    state = loaded.state_dict()
    assert state.keys() == saved.state_dict().keys()
    for key, value in saved.state_dict().items():
        assert torch.equal(state[key], value), key


def test_a_truncated_text_encoder_is_refused_before_transformers_reads_it(copy_of):
    folder = copy_of("flux")
    path = folder / "text_encoder_2" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptWeightsError, match="not a complete safetensors file"):
        load_pipeline(str(folder))


def test_a_text_encoder_missing_a_tensor_names_it(copy_of):
    folder = copy_of("sdxl")
    path = folder / "text_encoder_2" / "model.safetensors"
    tensors = load_file(str(path))
    dropped = sorted(k for k in tensors if k.endswith("final_layer_norm.weight"))[0]
    del tensors[dropped]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError, match="1 tensor.*missing from the weights: .*final_layer_norm.weight"):
        load_text_encoder(str(folder / "text_encoder_2"), "CLIPTextModelWithProjection")


def test_a_text_encoder_of_another_class_is_refused(folders):
    with pytest.raises(ModelLoadError, match="is a BertModel"):
        load_text_encoder(str(folders["sd"] / "text_encoder"), "BertModel")


def _cache(tmp_path, repo, folder):
    """A Hugging Face cache holding ``folder`` as the snapshot of ``repo`` at its main branch."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return tmp_path / "hub"


def test_a_hub_id_is_read_from_the_local_cache_and_never_downloaded(folders, tmp_path, monkeypatch):
    cache = _cache(tmp_path, "tiny/sd", folders["sd"])
    assert resolve_model_path("tiny/sd", cache_dir=str(cache)).endswith("0123456789abcdef0123456789abcdef01234567")
    pipe = load_pipeline("tiny/sd", cache_dir=str(cache))
    assert pipe.family == "sd" and pipe.name == "tiny/sd"
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert load_pipeline("tiny/sd").family == "sd"  # the default cache, as the CLI uses it
    with pytest.raises(ModelLoadError, match=r"not in the local Hugging Face cache.*hf download tiny/absent"):
        load_pipeline("tiny/absent", cache_dir=str(cache))
