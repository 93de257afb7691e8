"""Datasets for diffcirc: procedural synthetic faces with part labels, CelebA, image folders, and the
offline natural images shipped in scikit-image (LFW faces, sample photographs); ``controls`` holds
the image operations behind the study's matched-stimulus controls (face-box crops, spectrum and
moment matching).

Every dataset yields dicts ``{"image": (3, S, S) float32 in [-1, 1], "labels": (S, S) int64,
"attributes": dict, "source": str}``; ``collate`` batches them for a DataLoader.
"""

from .celeba import CelebA
from .faces import SyntheticFaces, export_faces
from .folder import ImageFolder
from .items import DatasetError, collate, make_item, slic_labels
from .skimage_sets import PHOTOS, LFWFaces, NaturalPhotos
from .specs import check_spec, load_dataset, parse_mix
from .splits import HELDOUT_SEED_BASE, LFW_SPLIT_SEED, LFW_TRAIN_COUNT, TRAIN_SEED_BASE, TRAIN_SEED_COUNT, lfw_split_indices
from .synthetic import PART_LABELS, generate, render_face, sample_attributes

__all__ = [
    "CelebA", "DatasetError", "ImageFolder", "LFWFaces", "NaturalPhotos", "SyntheticFaces", "PHOTOS", "PART_LABELS",
    "HELDOUT_SEED_BASE", "LFW_SPLIT_SEED", "LFW_TRAIN_COUNT", "TRAIN_SEED_BASE", "TRAIN_SEED_COUNT",
    "check_spec", "collate", "export_faces", "generate", "lfw_split_indices", "load_dataset", "make_item", "parse_mix",
    "render_face", "sample_attributes", "slic_labels",
]
