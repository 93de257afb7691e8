"""Text encoders and tokenizers of a pipeline, from ``transformers``, read from safetensors only.

The encoders diffusers' Stable Diffusion, SDXL, SD3 and Flux pipelines use: ``CLIPTextModel``,
``CLIPTextModelWithProjection`` and ``T5EncoderModel``. As for the denoiser (``load.py``), an
encoder either loads exactly as saved or raises a ``ModelLoadError`` naming the folder:

- only ``model.safetensors`` (or its shard index, or exactly one variant of it such as
  ``model.fp16.safetensors``) is read, with ``use_safetensors=True``; a folder with only pickle
  files (``pytorch_model.bin``) is refused, saying how to convert it;
- every weights file's header is checked to be a complete safetensors file before transformers
  reads it (``check_safetensors``);
- tensors transformers reports missing, unexpected or of another shape, any tensor left on the
  meta device, and NaN or inf weights raise, never a half-random encoder.

Tokenizers (vocab.json + merges.txt, tokenizer.json, spiece.model: data, not code) load by the
class model_index.json names, from the folder only (``local_files_only``).
"""

from __future__ import annotations

import contextlib
import json
import os

import torch

from .load import (ModelLoadError, _check_finite, _raise_mismatch, check_safetensors, pickle_files, safetensors_files,
                   weights_variant)

TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")
WEIGHTS_NAME = "model.safetensors"


def _hint(folder: str) -> str:
    return (f"re-export the encoder with save_pretrained({os.path.basename(os.path.normpath(folder))!r}) "
            "(writes config.json and model.safetensors together) or copy it again")


def weight_files(folder: str, variant=None) -> list:
    """The safetensors files transformers will read from ``folder``; a ``ModelLoadError`` when there
    are none (naming the pickle files there, if any)."""
    files = safetensors_files(folder, WEIGHTS_NAME, variant, _hint(folder))
    if files:
        return files
    pickled = pickle_files(folder)
    if pickled:
        raise ModelLoadError(
            f"the text encoder in {folder!r} has only pickle weights {pickled}, and diffcirc reads only safetensors "
            "(pickle files can run code): load it yourself in a trusted environment and save it with "
            "save_pretrained(folder, safe_serialization=True)")
    raise ModelLoadError(f"no {WEIGHTS_NAME} in the text encoder folder {folder!r}; {_hint(folder)}")


def _config_class(folder: str) -> str:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
        return config["architectures"][0]
    except FileNotFoundError:
        raise ModelLoadError(f"the text encoder folder {folder!r} has no config.json; {_hint(folder)}") from None
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ModelLoadError(f"{path} names no architecture ({type(e).__name__}: {e}); {_hint(folder)}") from None


@contextlib.contextmanager
def _quiet_transformers():
    """Mute transformers' loading report and progress bars: a report of missing keys describes an
    encoder that is about to be refused, and the error raised instead says it all."""
    from transformers.utils import logging as tf_logging

    level, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def load_text_encoder(folder: str, class_name: str | None = None, dtype=torch.float32) -> torch.nn.Module:
    """The text encoder saved in ``folder``, in eval mode and ``dtype``.

    class_name: the class model_index.json names (default: config.json's first architecture); one of
    ``TEXT_ENCODER_CLASSES``.
    """
    import transformers

    class_name = class_name or _config_class(folder)
    if class_name not in TEXT_ENCODER_CLASSES:
        raise ModelLoadError(f"the text encoder in {folder!r} is a {class_name}; diffcirc reads "
                             f"{', '.join(TEXT_ENCODER_CLASSES)}")
    cls = getattr(transformers, class_name)
    hint = _hint(folder)
    variant = weights_variant(folder, WEIGHTS_NAME)
    for file in weight_files(folder, variant):
        check_safetensors(file, hint)
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, dtype=dtype,
                                              output_loading_info=True, ignore_mismatched_sizes=True, variant=variant)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise ModelLoadError(f"could not load the {class_name} in {folder!r}: {type(e).__name__}: {e}; {hint}") from e
    missing, mismatched = info.get("missing_keys", ()), info.get("mismatched_keys", ())
    reported = set(missing) | {k for k, _, _ in mismatched}
    unloaded = [k for k, v in model.state_dict().items() if v.is_meta and k not in reported]
    _raise_mismatch(cls, folder, hint, missing, info.get("unexpected_keys", ()), mismatched, unloaded)
    _check_finite(model, folder, hint)
    return model.eval()


def load_tokenizer(folder: str, class_name: str | None = None):
    """The tokenizer saved in ``folder``: as ``class_name`` (one of ``TOKENIZER_CLASSES``) or, when
    None, as its tokenizer_config.json says."""
    import transformers

    if class_name is not None and class_name not in TOKENIZER_CLASSES:
        raise ModelLoadError(f"the tokenizer in {folder!r} is a {class_name}; diffcirc reads "
                             f"{', '.join(TOKENIZER_CLASSES)}")
    cls = getattr(transformers, class_name) if class_name else transformers.AutoTokenizer
    try:
        with _quiet_transformers():
            return cls.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # tokenizers' Rust errors are bare Exceptions, beside OSError and ValueError
        raise ModelLoadError(f"could not read the tokenizer in {folder!r}: {type(e).__name__}: {e}; "
                             "copy the tokenizer folder of the pipeline again") from e
