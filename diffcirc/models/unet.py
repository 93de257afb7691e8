"""Building the "paper-like" DDPM UNet and its scheduler.

The architecture follows the shape the study needs, not a published checkpoint: self-attention
only on the 8x8 feature map, three attention layers (one in the encoder's last block, two in the
decoder's first block), each with 8 heads of dimension 32 over 256 channels, so every head attends
over 64 tokens. Everything else is kept small so the model trains on one CPU thread.
"""

from __future__ import annotations

from diffusers import DDPMScheduler, UNet2DModel

ATTENTION_RESOLUTION = 8  # the only feature-map size with attention: 8 x 8 = 64 tokens
ATTENTION_CHANNELS = 256  # 8 heads x 32 head dim
ATTENTION_HEAD_DIM = 32

# Per input size: channels of each resolution level, last level at 8x8.
_LEVELS = {
    32: (32, 64, ATTENTION_CHANNELS),  # 32 -> 16 -> 8
    64: (32, 64, 128, ATTENTION_CHANNELS),  # 64 -> 32 -> 16 -> 8
}

# The DDPM noise schedule of Ho et al. (2020): T = 1000, linear betas 1e-4 .. 0.02, eps prediction.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    variance_type="fixed_small",
    clip_sample=True,
)


def build_unet(size: int = 32, in_channels: int = 3, block_out_channels: tuple[int, ...] | None = None,
               layers_per_block: int = 1, dropout: float = 0.0) -> UNet2DModel:
    """A randomly initialised UNet2DModel for (B, in_channels, size, size) inputs.

    size: 32 or 64 (other powers of two >= 16 work if ``block_out_channels`` is given so that the
    last level is 8x8). Attention sits only in the last down block and the first up block (8x8),
    and the mid block is left out, which gives exactly 1 + 2 = 3 attention layers.
    """
    if block_out_channels is None:
        if size not in _LEVELS:
            raise ValueError(f"size must be one of {sorted(_LEVELS)} unless block_out_channels is given, got {size}")
        block_out_channels = _LEVELS[size]
    levels = len(block_out_channels)
    if size // 2 ** (levels - 1) != ATTENTION_RESOLUTION:
        raise ValueError(f"{levels} levels on a {size}x{size} input end at {size // 2 ** (levels - 1)}x"
                         f"{size // 2 ** (levels - 1)}, expected {ATTENTION_RESOLUTION}x{ATTENTION_RESOLUTION}")
    if block_out_channels[-1] % ATTENTION_HEAD_DIM:
        raise ValueError(f"last level channels must be a multiple of {ATTENTION_HEAD_DIM}, got {block_out_channels[-1]}")
    down = ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",)
    up = ("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1)
    return UNet2DModel(
        sample_size=size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type=None,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        attention_head_dim=ATTENTION_HEAD_DIM,
        dropout=dropout,
        norm_num_groups=32,
    )


def build_scheduler() -> DDPMScheduler:
    """The DDPM scheduler the bundled model was trained with (T=1000, linear 1e-4..0.02, epsilon)."""
    return DDPMScheduler(**SCHEDULER_CONFIG)


def random_like(unet: UNet2DModel, seed: int = 0) -> UNet2DModel:
    """An untrained copy of ``unet`` (same config, fresh initialisation from ``seed``).

    The random-weights control of the analysis: same architecture and attention layout, no
    learned function. The global RNG state is restored afterwards so callers are not perturbed.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = type(unet).from_config(unet.config)  # any diffusers UNet class, not only UNet2DModel
    # .to() only when needed: diffusers warns on every dtype cast of a model
    if model.dtype != unet.dtype:
        model = model.to(dtype=unet.dtype)
    return model.to(unet.device).eval()
