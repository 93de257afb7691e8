"""Argument checks shared by the commands.

Each is an argparse ``type=`` function: a value out of range becomes a usage error (exit 2, a
message naming the option) at parse time, before any model is loaded or image rendered, instead
of a traceback minutes later. None of them changes anything on disk.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
import tempfile

from ..errors import InputError


def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value):  # float("nan") would pass every comparison below
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive(kind):
    """type= for a number > 0 (int or float)."""
    def parse(text):
        value = _number(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def non_negative(kind):
    """type= for a number >= 0 (int or float)."""
    def parse(text):
        value = _number(kind, text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def int_in(lo: int, hi: int):
    """type= for an integer in [lo, hi]."""
    def parse(text):
        value = _number(int, text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must lie in [{lo}, {hi}], got {text}")
        return value
    return parse


def fraction(text):
    """type= for a number in [0, 1) (a decay rate)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def byte_size(text):
    """'512MiB', '2GiB', '1.5GB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 512MiB or 2GiB, got {text!r}")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(value):  # '1e400': int() of it would raise OverflowError, which argparse does not catch
        raise argparse.ArgumentTypeError(f"size out of range, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return int(value)


def timesteps(text):
    """'50,150 250' -> [50, 150, 250]: distinct integers in [0, 1000), the DDPM schedule's range."""
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"timesteps must be integers, got {text!r}") from None
    if not values or any(not 0 <= v < 1000 for v in values):
        raise argparse.ArgumentTypeError(f"timesteps must lie in [0, 1000), got {text!r}")
    if len(set(values)) != len(values):  # a repeated timestep would count twice in every average over timesteps
        raise argparse.ArgumentTypeError(f"timesteps must be distinct, got {text!r}")
    return values


def dataset_spec(text):
    """type= for a dataset spec (see diffcirc.data.specs): known kind, existing folder for celeba:/folder:."""
    from ..data import check_spec

    try:
        return check_spec(text)
    except (ValueError, FileNotFoundError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def dataset_mix(text):
    """type= for a training mix: every component a valid spec with a COUNT >= 1, seed ranges kept apart."""
    from ..models.train import check_mix

    try:
        check_mix(text)
    except (ValueError, FileNotFoundError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def model_name(text):
    """type= for --model: 'bundled', an existing folder, or a hub id owner/name (not checked offline).

    A path that does not exist is refused here rather than sent to the hub as a repo id.
    """
    from ..models.load import is_hub_id

    if text == "bundled" or os.path.isdir(text):
        return text
    if os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file; pass the model folder (config.json and "
                                         "diffusion_pytorch_model.safetensors)")
    if not is_hub_id(text):
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'bundled', an existing folder, nor a hub id of the "
                                         "form owner/name")
    return text


def device(text):
    """type= for --device: a torch device string whose backend this machine has."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device type {dev.type!r} is not supported; use cpu or cuda")
    return text


def check_writable_folder(path: str) -> str:
    """``path`` if it is, or can be created as, a folder this process can write in; else ValueError.

    Probes by creating (and removing) a temporary file in ``path`` or, when ``path`` does not exist
    yet, in its nearest existing ancestor: permission bits alone do not tell, since root ignores
    them while a read-only file system stops root too. Nothing is left behind.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path!r} is an existing file, not a folder; choose another output folder")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"cannot create {path!r}: {probe!r} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".diffcirc-write-check-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ValueError(f"cannot write in {probe!r} ({e.strerror or e}); choose a folder you can write to") from None
    return path


def _writes_output() -> bool:
    """Whether this process writes the output folder: every process but ranks 1.. of a torchrun
    launch (RANK set and not "0"). Only rank 0 writes, and the other ranks need not share its file
    system (another machine), so probing the folder there would refuse a good run."""
    return os.environ.get("RANK", "").strip() in ("", "0")


def writable_folder(text):
    """type= for an output folder: see ``check_writable_folder``; not checked on ranks 1.. of a
    torchrun launch (see ``_writes_output``)."""
    if not _writes_output():
        return text
    try:
        return check_writable_folder(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


EXIT_INPUT_ERROR = 1


def reports_input_errors(run=None, *, exit_code: int = EXIT_INPUT_ERROR):
    """Decorate a command's ``run(args)``: a broken input found only while working (corrupt or
    mismatched weights, a hub repo that cannot be read, a folder without a readable image, a missing
    file, an output folder or a training checkpoint of another configuration) prints its message and
    exits with EXIT_INPUT_ERROR instead of a traceback. These errors name the file and what to do;
    anything else is a bug and keeps its traceback.

    ``@reports_input_errors(exit_code=2)``: another exit status, for a command whose exit 1 already
    means something else (``recompute``: a row that differs)."""
    if run is None:
        return functools.partial(reports_input_errors, exit_code=exit_code)

    @functools.wraps(run)
    def wrapper(args) -> int:
        try:
            return run(args)
        except (InputError, FileNotFoundError) as e:
            print(f"diffcirc {args.command}: error: {e}", file=sys.stderr)
            return exit_code
    return wrapper
