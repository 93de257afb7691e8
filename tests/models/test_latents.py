"""VAE latents: the posterior mean normalised by the VAE config's factors, and the on-disk cache
that never serves a latent of another VAE (config or weights), image, size or source."""

import pytest
import torch

from diffcirc.models.latents import LatentCache, encode_images
from helpers import tiny_pipelines as tp


def _images(n=3, size=tp.IMAGE_SIZE, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("shift, scale", [(None, 0.18215), (0.0609, 1.5305), (0.1159, 0.3611)],
                         ids=["sd", "sd3", "flux"])
def test_latents_are_the_posterior_mean_shifted_and_scaled(shift, scale):
    vae = tp.vae(shift_factor=shift, scaling_factor=scale)
    images = _images()
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    expected = (posterior.mean.double() - (shift or 0.0)) * scale  # diffusers' img2img: (z - shift) * scale
    got = encode_images(vae, images)
    assert got.shape == (3, tp.LATENT_CHANNELS, tp.LATENT_SIZE, tp.LATENT_SIZE) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(posterior.mean, posterior.sample(torch.Generator().manual_seed(0)))  # a sample would differ


def test_vaes_with_latents_mean_and_std_normalise_per_channel():
    vae = tp.vae(scaling_factor=0.5)
    vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 1.0, 0.5, 4.0])
    images = _images()
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
    mu = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1)
    sd = torch.tensor([2.0, 1.0, 0.5, 4.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(encode_images(vae, images), (mean - mu) * 0.5 / sd, rtol=1e-5, atol=1e-6)


def test_the_cache_encodes_each_image_once_and_only_the_missing_ones(tmp_path):
    vae = tp.vae(shift_factor=0.06, scaling_factor=1.5)
    images, sources = _images(5), [f"img{i}" for i in range(5)]
    first = LatentCache(tmp_path, vae, batch_size=2)
    latents = first.latents(images[:3], sources[:3])
    assert first.encoded == 3
    again = LatentCache(tmp_path, vae, batch_size=2)
    torch.testing.assert_close(again.latents(images, sources)[:3], latents, rtol=0, atol=0)
    assert again.encoded == 2  # images 3 and 4 only
    torch.testing.assert_close(again.latents(images, sources), encode_images(vae, images), rtol=1e-4, atol=1e-5)


def test_a_changed_vae_image_size_or_source_is_encoded_anew(tmp_path):
    vae = tp.vae(shift_factor=0.06, scaling_factor=1.5)
    images, sources = _images(2), ["a", "b"]
    LatentCache(tmp_path, vae).latents(images, sources)

    def encoded(cache, imgs, names):
        cache.latents(imgs, names)
        return cache.encoded

    assert encoded(LatentCache(tmp_path, vae), images, sources) == 0
    rescaled = tp.vae(shift_factor=0.06, scaling_factor=1.0)  # same weights, another scaling_factor
    assert encoded(LatentCache(tmp_path, rescaled), images, sources) == 2
    retrained = tp.vae(shift_factor=0.06, scaling_factor=1.5, seed=1)  # same config, other weights
    assert encoded(LatentCache(tmp_path, retrained), images, sources) == 2
    edited = images.clone()
    edited[1, :, 0, 0] += 0.5
    assert encoded(LatentCache(tmp_path, vae), edited, sources) == 1
    assert encoded(LatentCache(tmp_path, vae), _images(2, size=16), sources) == 2
    assert encoded(LatentCache(tmp_path, vae), images, ["a", "c"]) == 1


def test_a_damaged_cache_file_is_encoded_again_and_replaced(tmp_path):
    vae = tp.vae()
    images, sources = _images(1), ["a"]
    cache = LatentCache(tmp_path, vae)
    good = cache.latents(images, sources)
    path = cache.path(images[0], "a")
    path.write_bytes(path.read_bytes()[:20])
    repaired = LatentCache(tmp_path, vae)
    torch.testing.assert_close(repaired.latents(images, sources), good, rtol=0, atol=0)
    assert repaired.encoded == 1 and LatentCache(tmp_path, vae).latents(images, sources).shape == good.shape
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary files


def _one_image_bytes(vae, image) -> int:
    """Bytes of every module output while the VAE encodes one image, counted by a hook of the test."""
    total = [0]

    def count(module, args, output):
        leaves = [output] if torch.is_tensor(output) else \
            [v for v in (output.values() if isinstance(output, dict) else output) if torch.is_tensor(v)] \
            if isinstance(output, (dict, tuple, list)) else []
        total[0] += sum(t.numel() * t.element_size() for t in leaves)

    handles = [m.register_forward_hook(count) for m in vae.modules()]
    try:
        with torch.no_grad():
            vae.encode(image[None])
    finally:
        for h in handles:
            h.remove()
    return total[0]


def test_max_bytes_bounds_the_vae_batches_without_changing_the_latents(tmp_path):
    vae = tp.vae(shift_factor=0.06, scaling_factor=1.5)
    images, sources = _images(5), [f"img{i}" for i in range(5)]
    one = _one_image_bytes(vae, images[0])
    expected = encode_images(vae, images)
    # the first image alone (measured), then as many as the budget holds, at most batch_size
    for images_per_budget, passes in [(2, [1, 2, 2]), (2.5, [1, 2, 2]), (100, [1, 4]), (None, [4, 1])]:
        budget = None if images_per_budget is None else int(images_per_budget * one)
        cache = LatentCache(tmp_path / str(images_per_budget), vae, batch_size=4, max_bytes=budget)
        got = cache.latents(images, sources)
        assert cache.passes == passes and cache.encoded == 5, images_per_budget
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
