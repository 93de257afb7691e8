"""The random UNet the analysis tests run the study on: the study's layout (self-attention only on
the 8x8 feature map, three attention layers, heads of dimension 32 over 64 tokens) made narrow,
2 heads per layer and 64 channels at 8x8 instead of the paper-like 8 heads over 256.

The analysis cost grows with heads x forward cost (one ablation condition and one circuit step per
head), so the narrow model runs a whole analysis about 16 times faster than ``build_unet(32)``
while every phase still sees several layers with several heads each. The paper-like width itself
is tested in tests/models/test_load.py.
"""

from pathlib import Path

import torch

from diffcirc.models import build_scheduler, build_unet

CHANNELS = (32, 32, 64)  # 32 -> 16 -> 8 pixels; 64 channels at 8x8 = 2 heads x head dim 32
HEADS_PER_LAYER = 2
LAYERS = 3
TOKENS = 64              # 8 x 8: what every self-attention head attends over


def save_analysis_unet(folder: Path, seed: int = 0) -> Path:
    """A diffusers folder (UNet + DDPM scheduler) of the narrow UNet, initialised from ``seed``."""
    torch.manual_seed(seed)
    build_unet(32, block_out_channels=CHANNELS).save_pretrained(folder)
    build_scheduler().save_pretrained(folder)
    return folder
