"""Which images may be used for training and which for analysis.

No image used in training may ever be used in analysis. Synthetic faces are functions of a seed,
so the two uses get disjoint seed ranges; LFW faces get a fixed index split.
"""

# Synthetic faces: training draws seeds in [TRAIN_SEED_BASE, TRAIN_SEED_BASE + TRAIN_SEED_COUNT),
# analysis (held out) draws seeds from HELDOUT_SEED_BASE upwards. The gap makes an overlap impossible
# for any held-out set smaller than 9 million images.
TRAIN_SEED_BASE = 0
TRAIN_SEED_COUNT = 1_000_000
HELDOUT_SEED_BASE = 10_000_000

# LFW (skimage.data.lfw_subset, first 100 images = faces): a fixed permutation of the 100 indices
# from default_rng(LFW_SPLIT_SEED); its first LFW_TRAIN_COUNT entries are the training split, the rest
# the held-out split.
LFW_SPLIT_SEED = 0
LFW_TRAIN_COUNT = 80


def lfw_split_indices(split: str) -> list[int]:
    """Indices into the 100 LFW faces for ``split`` in {"train", "heldout"}, in permutation order."""
    import numpy as np

    perm = np.random.default_rng(LFW_SPLIT_SEED).permutation(100)
    if split == "train":
        return [int(i) for i in perm[:LFW_TRAIN_COUNT]]
    if split == "heldout":
        return [int(i) for i in perm[LFW_TRAIN_COUNT:]]
    raise ValueError(f"LFW split must be 'train' or 'heldout', got {split!r}")


def synthetic_seed_base(split: str) -> int:
    """First seed of the synthetic-face range for ``split`` ("train" or "heldout"/"test")."""
    if split == "train":
        return TRAIN_SEED_BASE
    if split in ("heldout", "test"):
        return HELDOUT_SEED_BASE
    raise ValueError(f"synthetic split must be 'train' or 'heldout', got {split!r}")
