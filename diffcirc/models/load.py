"""Loading a UNet and its DDPM scheduler: the bundled default, a local diffusers folder, or a hub id.

Weights are read only from safetensors files (``use_safetensors=True``); nothing is unpickled.

A model either loads exactly as saved or fails with a ``ModelLoadError`` that names the file and
says what to do; it never runs with weights it did not read. In particular:

- weights that are not a complete safetensors file (truncated, empty, random bytes, a Git LFS
  pointer) raise ``CorruptWeightsError`` before diffusers sees them, as do non-finite weights;
- weights that do not fit config.json (missing, unexpected or differently shaped tensors) raise
  ``WeightsMismatchError``. diffusers' ``from_pretrained`` only logs missing and unexpected keys
  (leaving missing tensors randomly initialised, or on the meta device) and, depending on its
  version and ``low_cpu_mem_usage``, may not report them at all, so the loader decides itself:
  for a local folder it compares the safetensors headers with the model config.json describes
  before loading anything, and after any load it checks diffusers' loading info and that no tensor
  was left unloaded (for a hub repo, whose files diffusers fetches itself, only the latter; older
  diffusers with ``low_cpu_mem_usage=True`` refuses a hub repo's missing or misshapen tensors with
  its own error, still a ``ModelLoadError`` here, and ignores its unexpected ones);
- with ``accelerate`` installed the model is loaded with ``low_cpu_mem_usage=True``: built on the
  meta device and given the checkpoint tensors. Without it (``low_cpu_mem_usage=False``) older
  diffusers, such as 0.30, first randomly initialises the whole model and then copies the weights
  in: a Stable Diffusion 1.5 UNet in float32 (3.2 GiB) then peaks at 6.8 GiB of host memory and
  takes 10 s instead of 3.8 GiB and under 2 s, in every process of a torchrun launch. Current
  diffusers skips that initialisation either way;
- a folder that holds no plain weights file but exactly one variant of it
  (``diffusion_pytorch_model.<variant>.safetensors``, or its sharded index, as
  ``save_pretrained(folder, variant=...)`` writes them) loads that variant, with the same checks;
- a hub repo that cannot be read (offline, gated, only pickle or variant weights) raises
  ``ModelLoadError`` carrying the hub's own reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re

import torch

from ..errors import InputError

BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "bundled")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = WEIGHTS_NAME + ".index.json"  # a sharded checkpoint
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name
_SHOWN = 5  # keys quoted per kind in a mismatch message; the rest are counted
_CAUSE_CHARS = 600  # of a hub error quoted in a message (diffusers' own run to several lines)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
_SHARD = re.compile(r".*-\d+-of-\d+")  # "fp16-00001-of-00002": a shard of a variant, not a variant itself


class ModelLoadError(InputError):
    """A model that cannot be loaded as it is; the message names the file and says what to do."""


class CorruptWeightsError(ModelLoadError):
    """A weights file that is not a complete safetensors file, or holds NaN/inf."""


class WeightsMismatchError(ModelLoadError):
    """Weights that do not fit the architecture config.json describes."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a hub repo id (owner/name). Says nothing about whether it exists."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def _fix_hint(unet_dir: str) -> str:
    """What to do about a broken model folder: the bundled one ships with the package."""
    if os.path.realpath(unet_dir) == os.path.realpath(BUNDLED):
        return ("the bundled model ships with diffcirc: reinstall the package "
                "(from a checkout, run `git lfs pull` first)")
    return ("re-export the model with `save_pretrained(folder)` (writes config.json and the safetensors together) "
            "or copy it again")


def _model_class(config: dict, where: str, accepted, role: str):
    """The diffusers class ``config`` names, if ``accepted`` takes it: a tuple of class names, or
    None for any diffusers UNet (what ``load`` reads). ``role`` says what the folder should hold,
    for the message."""
    import diffusers

    name = config.get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    fits = cls is not None and ("UNet" in name if accepted is None else name in accepted)
    if not fits:
        wanted = "a diffusers UNet" if accepted is None else f"one of {', '.join(accepted)}"
        raise ModelLoadError(f"{os.path.join(where, 'config.json')} names class {name!r}, which is not {wanted} "
                             f"({role})")
    return cls


def _local(folder: str):
    """(unet folder, scheduler config folder or None) for a pipeline folder or a bare UNet folder."""
    if os.path.isfile(os.path.join(folder, "unet", "config.json")):
        sched = os.path.join(folder, "scheduler")
        if not os.path.isfile(os.path.join(sched, "scheduler_config.json")):
            sched = folder if os.path.isfile(os.path.join(folder, "scheduler_config.json")) else None
        return os.path.join(folder, "unet"), sched
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder, folder if os.path.isfile(os.path.join(folder, "scheduler_config.json")) else None
    raise FileNotFoundError(f"{folder!r} holds neither unet/config.json nor config.json")


def _read_config(unet_dir: str) -> dict:
    path = os.path.join(unet_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ModelLoadError(f"{path} is not valid JSON ({e}); {_fix_hint(unet_dir)}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(config).__name__}, not a model config object")
    return config


def _with_variant(name: str, variant: str | None) -> str:
    """``name`` with ``variant`` before its last extension, as diffusers names variant files."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def weights_variant(folder: str, weights_name: str = WEIGHTS_NAME) -> str | None:
    """The weights variant to load from ``folder``: None where ``weights_name`` (or its shard index)
    is there, as diffusers and transformers read by default; else the one variant present, e.g.
    "fp16" for a folder written by ``save_pretrained(folder, variant="fp16")``. Several variants and
    no plain file: ModelLoadError, since picking one would be a guess.

    Both libraries name a variant file by putting the variant before the last extension
    (``_with_variant``): model.fp16.safetensors, model.safetensors.index.fp16.json."""
    index_name = weights_name + ".index.json"
    if any(os.path.isfile(os.path.join(folder, n)) for n in (weights_name, index_name)):
        return None
    stem = re.escape(weights_name.rsplit(".", 1)[0])
    variant_file = re.compile(stem + r"\.(?P<variant>[^.]+)\.safetensors")
    variant_index = re.compile(re.escape(index_name.rsplit(".", 1)[0]) + r"\.(?P<variant>[^.]+)\.json")
    found = set()
    for name in os.listdir(folder):
        match = variant_file.fullmatch(name) or variant_index.fullmatch(name)
        if match and not _SHARD.fullmatch(match["variant"]):
            found.add(match["variant"])
    if len(found) > 1:
        raise ModelLoadError(f"{folder!r} holds no {weights_name} but {len(found)} variants of it: {sorted(found)}; "
                             f"keep the files of only the variant to load there, or save that one with "
                             f"save_pretrained(folder) (no variant)")
    return found.pop() if found else None


def safetensors_files(folder: str, weights_name: str, variant: str | None, hint: str) -> list[str]:
    """The safetensors files a library will read from ``folder`` for ``weights_name`` and
    ``variant``: the shards its index names, or the single file; [] when neither is there. A shard
    index that is not valid JSON with a weight_map raises CorruptWeightsError (with ``hint``)."""
    index = os.path.join(folder, _with_variant(weights_name + ".index.json", variant))
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptWeightsError(f"{index} is not a valid shard index ({type(e).__name__}: {e}); {hint}") from None
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, _with_variant(weights_name, variant))
    return [single] if os.path.isfile(single) else []


def pickle_files(folder: str) -> list[str]:
    """The pickle weight files in ``folder`` (which diffcirc never reads: unpickling can run code)."""
    return sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))


def _weight_files(unet_dir: str, variant: str | None = None) -> list[str]:
    """The safetensors files diffusers will read from ``unet_dir`` for ``variant`` (one file, or the
    shards of an index)."""
    files = safetensors_files(unet_dir, WEIGHTS_NAME, variant, _fix_hint(unet_dir))
    if files:
        return files
    pickled = pickle_files(unet_dir)
    why = (f"; found {pickled}, but diffcirc reads only safetensors (pickle files can run code): load them yourself "
           "in a trusted environment and save with save_pretrained(folder, safe_serialization=True)") if pickled else ""
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {unet_dir!r}{why}")


def check_safetensors(path: str, hint: str = "") -> dict[str, tuple[int, ...]]:
    """-> {tensor name: shape} of a safetensors file, after checking it is complete.

    Reads only the header; safetensors itself rejects a header whose tensors do not exactly cover
    the rest of the file, which catches truncated, padded and random-byte files.
    """
    from safetensors import SafetensorError, safe_open

    hint = f"; {hint}" if hint else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} is missing{hint}")
    size = os.path.getsize(path)
    if size == 0:
        raise CorruptWeightsError(f"weights file {path!r} is empty (0 bytes){hint}")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise CorruptWeightsError(f"weights file {path!r} is a Git LFS pointer, not the weights: "
                                  f"run `git lfs pull`{hint}")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CorruptWeightsError(f"weights file {path!r} ({size} bytes) is not a complete safetensors file: {e}; "
                                  f"it is truncated or damaged{hint}") from None


def _low_memory_loading() -> bool:
    """Whether to load with ``low_cpu_mem_usage=True``. diffusers needs ``accelerate`` for it (without
    it diffusers warns and falls back to a full random initialisation), so this is whether it imports.
    A function, not a constant, so that tests can run the loader both ways."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


def _skeleton(cls, config: dict) -> torch.nn.Module:
    """The ``cls`` that ``config`` describes, without allocating it: built on the meta device, where
    tensors have shapes but no storage and the initialisers do nothing. Raises whatever diffusers
    raises for a config it cannot build."""
    with torch.device("meta"):
        return cls.from_config(config)


def _check_fits(cls, config: dict, checkpoint: dict[str, tuple[int, ...]], sharded: bool, where: str,
                hint: str) -> None:
    """Raise ``WeightsMismatchError`` unless the tensors of the weight files (``checkpoint``: the
    union of their safetensors headers) are exactly the state dict of the model ``config`` describes.

    Mirrors what diffusers' own loading does to the keys, so both ways of loading accept the same
    folders: it renames the attention keys of checkpoints saved before diffusers' attention refactor
    (query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0), for a single file only, as diffusers
    does, and ignores the unexpected keys the class declares harmless.
    """
    skeleton = _skeleton(cls, config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    loaded = dict(checkpoint)
    if not sharded:
        fix = (getattr(skeleton, "_fix_state_dict_keys_on_load", None)  # its name in current diffusers
               or getattr(skeleton, "_convert_deprecated_attention_blocks", None))  # in older ones
        if fix is not None:
            fix(loaded)  # renames keys in place; the values are only carried along
    unexpected = set(loaded) - set(expected)
    for pattern in getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ():
        unexpected = {k for k in unexpected if re.search(pattern, k) is None}
    mismatched = [(k, loaded[k], expected[k]) for k in loaded.keys() & expected.keys() if loaded[k] != expected[k]]
    _raise_mismatch(cls, where, hint, set(expected) - set(loaded), unexpected, mismatched)


def _raise_mismatch(cls, where: str, hint: str, missing, unexpected, mismatched, unloaded=()) -> None:
    """Raise ``WeightsMismatchError`` listing every kind of disagreement at once, if there is any.
    ``mismatched``: (key, shape in the weights, shape in the model); ``unloaded``: tensors left
    unloaded that diffusers did not report otherwise."""
    problems = []
    for kind, keys in (("missing from the weights", missing), ("in the weights but not in the model", unexpected),
                       ("not loaded from the weights", unloaded)):
        if keys:
            keys = sorted(keys)
            more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
            problems.append(f"{len(keys)} tensor(s) {kind}: {', '.join(keys[:_SHOWN])}{more}")
    mismatched = sorted(mismatched)
    if mismatched:
        shown = ", ".join(f"{k} {tuple(a)} in the weights vs {tuple(b)} in the model"
                          for k, a, b in mismatched[:_SHOWN])
        more = f" and {len(mismatched) - _SHOWN} more" if len(mismatched) > _SHOWN else ""
        problems.append(f"{len(mismatched)} tensor(s) of another shape: {shown}{more}")
    if problems:
        raise WeightsMismatchError(
            f"the weights in {where!r} do not fit the {cls.__name__} its config.json describes "
            f"(different channels, layers or blocks?): {'; '.join(problems)}. Use the config.json saved with "
            f"these weights; {hint}")


def _from_pretrained(cls, where: str, hint: str, *, config: dict | None = None,
                     checkpoint: dict[str, tuple[int, ...]] | None = None, sharded: bool = False, **kwargs):
    """``cls.from_pretrained`` that raises instead of leaving any tensor unread from the weights.

    With ``accelerate`` (``_low_memory_loading``) the model is loaded with ``low_cpu_mem_usage=True``.
    Where the weights are local (``config`` and ``checkpoint``, the union of the weight files'
    headers, given) they are checked against config.json before anything is read, whichever way
    the model is then loaded: with ``low_cpu_mem_usage=True`` diffusers ignores unexpected keys and
    older versions of it report nothing in their loading info, and in either mode diffusers takes
    the keys of a sharded checkpoint from its index, not from the shards, so a shard that lacks a
    tensor its index lists goes unreported. A hub repo's files are only known once diffusers has
    fetched them, so there the checks after loading are all.

    ``ignore_mismatched_sizes=True`` only makes diffusers report mismatched shapes in its loading
    info instead of raising its own error (whose advice is that very flag); every disagreement
    diffusers reports, and any tensor still on the meta device (not loaded), then raises
    ``WeightsMismatchError`` here, listing them all at once.
    """
    low_memory = _low_memory_loading()
    if config is not None and checkpoint is not None:
        _check_fits(cls, config, checkpoint, sharded, where, hint)
    with _quiet_loading_report():
        unet, info = cls.from_pretrained(where, use_safetensors=True, low_cpu_mem_usage=low_memory,
                                         ignore_mismatched_sizes=True, output_loading_info=True, **kwargs)
    missing, mismatched = info.get("missing_keys", []), info.get("mismatched_keys", [])
    reported = set(missing) | {k for k, _, _ in mismatched}
    unloaded = [k for k, v in unet.state_dict().items() if v.is_meta and k not in reported]
    _raise_mismatch(cls, where, hint, missing, info.get("unexpected_keys", []), mismatched, unloaded)
    _check_finite(unet, where, hint)
    return unet


@contextlib.contextmanager
def _quiet_loading_report():
    """Mute diffusers' "newly initialized ... you should probably TRAIN this model" report while loading:
    it describes a model diffcirc is about to refuse, and the error raised instead says it all."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_finite(unet: torch.nn.Module, where: str, hint: str) -> None:
    """safetensors has no checksum: damaged bytes inside the data often decode to NaN or inf."""
    bad = [k for k, v in unet.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        raise CorruptWeightsError(f"the weights in {where!r} hold NaN or inf in "
                                  f"{', '.join(bad[:_SHOWN])}{more}; {hint}")


def load_component(folder: str, accepted=None, role: str = "a denoiser", dtype=None) -> torch.nn.Module:
    """The diffusers model saved in ``folder`` (config.json and safetensors weights, as
    ``save_pretrained`` writes them), in eval mode, with every file checked before diffusers reads it.

    accepted: the class names the folder may hold (None: any diffusers UNet); role: what the
    folder is for, named in errors ("the VAE"). dtype: cast after loading (None: as saved, float32
    for diffusers). Raises FileNotFoundError without weights (and says so when only pickle files
    are there) and ``ModelLoadError`` for a folder that is there but broken (module docstring).
    """
    hint = _fix_hint(folder)
    config = _read_config(folder)
    cls = _model_class(config, folder, accepted, role)
    variant = weights_variant(folder)
    checkpoint = {}  # {key: shape} over all weight files (the shards of an index)
    for file in _weight_files(folder, variant):
        checkpoint.update(check_safetensors(file, hint))
    sharded = os.path.isfile(os.path.join(folder, _with_variant(WEIGHTS_INDEX_NAME, variant)))
    try:
        model = _from_pretrained(cls, folder, hint, config=config, checkpoint=checkpoint, sharded=sharded,
                                 variant=variant)
    except ModelLoadError:
        raise
    except (TypeError, ValueError, RuntimeError) as e:  # config values diffusers cannot build a model from
        raise ModelLoadError(f"could not build {cls.__name__} from {os.path.join(folder, 'config.json')!r}: "
                             f"{type(e).__name__}: {e}; {hint}") from e
    model = model.eval()
    return model if dtype is None or dtype == model.dtype else model.to(dtype=dtype)


def read_scheduler(folder: str, cls=None):
    """The scheduler whose scheduler_config.json is in ``folder``: as ``cls`` (e.g. DDPMScheduler,
    which reads the betas of any DDPM-family config) or, when None, as the class the config names.
    A config that cannot be read is a ``ModelLoadError``: a default in its place would silently
    change every result."""
    import diffusers

    path = os.path.join(folder, "scheduler_config.json")
    if cls is None:
        try:
            with open(path) as f:
                name = json.load(f).get("_class_name")
        except (OSError, ValueError, AttributeError) as e:
            raise ModelLoadError(f"{path!r} is not a valid scheduler config ({type(e).__name__}: {e})") from e
        cls = getattr(diffusers, name, None) if isinstance(name, str) else None
        if cls is None or not issubclass(cls, diffusers.SchedulerMixin):
            raise ModelLoadError(f"{path!r} names class {name!r}, which is not a diffusers scheduler")
    try:
        return cls.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:  # diffusers reports bad JSON as OSError
        raise ModelLoadError(f"{path!r} is not a valid scheduler config ({type(e).__name__}: {e})") from e


def _load_local(path: str):
    """(unet, scheduler or None) from a local folder, with every file checked before diffusers reads it."""
    from diffusers import DDPMScheduler

    unet_dir, sched_dir = _local(path)
    unet = load_component(unet_dir)
    scheduler = read_scheduler(sched_dir, DDPMScheduler) if sched_dir else None
    return unet, scheduler


def load(name_or_path: str = "bundled", device: str | None = None, dtype=None):
    """-> (unet in eval mode, DDPMScheduler).

    name_or_path: "bundled" (the default model shipped in diffcirc/weights/bundled), a local folder
    (a pipeline folder with unet/ and scheduler/ subfolders, or a UNet folder, optionally with its
    scheduler_config.json beside config.json), or a Hugging Face hub id ``owner/name`` (pipeline or
    UNet repo; downloaded by diffusers). Without a scheduler config the DDPM default of
    ``build_scheduler`` is used.

    Raises FileNotFoundError for a folder or file that is not there, and ``ModelLoadError``
    (``CorruptWeightsError``, ``WeightsMismatchError``) for one that is there but broken, and for a
    hub id that cannot be loaded, whether it is not there or cannot be reached (see the module
    docstring).
    """
    from .unet import build_scheduler

    path = BUNDLED if name_or_path == "bundled" else name_or_path
    if os.path.isdir(path):
        unet, scheduler = _load_local(path)
        scheduler = scheduler or build_scheduler()
    elif name_or_path == "bundled":
        raise FileNotFoundError(f"bundled weights missing at {BUNDLED}; reinstall diffcirc")
    elif os.path.exists(path):
        raise ModelLoadError(f"{path!r} is a file; pass the folder that holds config.json and {WEIGHTS_NAME}")
    elif not is_hub_id(name_or_path):
        raise FileNotFoundError(f"model {name_or_path!r} is neither 'bundled', an existing folder, nor a hub id "
                                "of the form owner/name")
    else:
        unet, scheduler = _from_hub(name_or_path)
    unet = unet.eval()
    # only move when needed: a no-op .to() still makes diffusers warn about dtype casting
    if (device is not None and torch.device(device) != unet.device) or (dtype is not None and dtype != unet.dtype):
        unet = unet.to(device=device, dtype=dtype)
    return unet, scheduler


def _from_hub(repo_id: str):
    """A hub repo laid out as a pipeline (unet/, scheduler/) or as a bare UNet (config.json at the root).

    Every failure of a hub call becomes a ``ModelLoadError`` quoting the hub's reason: diffusers
    reports them all (not found, offline, gated, 401, only .bin weights) as OSError, so telling
    them apart here would be guesswork, and the CLI prints a ModelLoadError as one line.
    """
    from diffusers import UNet2DModel

    last = None
    for sub in ("unet", None):
        try:
            config = UNet2DModel.load_config(repo_id, subfolder=sub)
        except (OSError, ValueError) as e:  # e.g. no unet/ in a bare UNet repo: try the root
            last = e
            continue
        cls = _model_class(config, f"{repo_id}/{sub}" if sub else repo_id, None, "a denoiser")
        return _hub_unet(cls, repo_id, sub), _hub_scheduler(repo_id, sub)
    raise ModelLoadError(f"{repo_id!r} is not a local folder, and no UNet config could be read for it from the hub "
                         f"(unet/config.json or config.json): {_cause(last)}")


def _cause(error: BaseException) -> str:
    """An exception as one line, its type first: a hub error's message often runs to several lines."""
    text = " ".join(str(error).split()) or "no message"
    if len(text) > _CAUSE_CHARS:
        text = text[:_CAUSE_CHARS] + " ..."
    return f"{type(error).__name__}: {text}"


def _hub_unet(cls, repo_id: str, sub: str | None):
    """The UNet of a hub repo, by ``_from_pretrained``; any failure becomes a ``ModelLoadError``."""
    from safetensors import SafetensorError

    hint = f"the hub repo {repo_id!r} may hold another architecture or a broken upload"
    try:
        return _from_pretrained(cls, repo_id, hint, subfolder=sub)
    except ModelLoadError:
        raise
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
        where = f"{repo_id}/{sub}" if sub else repo_id
        raise ModelLoadError(
            f"could not load the UNet weights of the hub repo {where!r}: {_cause(e)}. From the hub diffcirc reads only "
            f"{WEIGHTS_NAME} (no pickle .bin files, no variants such as fp16); for another repo, download it "
            f"(`hf download {repo_id}`) and pass its folder, which may hold one variant") from e


def _hub_scheduler(repo_id: str, sub: str | None):
    """The DDPMScheduler of a hub repo: from scheduler/ of a pipeline, else the root, else (no
    scheduler config in the repo) the default of ``build_scheduler``. A config that is there but
    cannot be read raises ``ModelLoadError``: the default in its place would silently change
    every result."""
    from diffusers import DDPMScheduler

    from .unet import build_scheduler

    for sched_sub in (("scheduler",) if sub else ()) + (None,):
        try:
            return DDPMScheduler.from_pretrained(repo_id, subfolder=sched_sub)
        except (OSError, ValueError, TypeError) as e:
            if not _absent_from_repo(e):
                where = f"{sched_sub}/scheduler_config.json" if sched_sub else "scheduler_config.json"
                raise ModelLoadError(f"could not read the scheduler config {where} of the hub repo {repo_id!r}: "
                                     f"{_cause(e)}") from e
    return build_scheduler()


def _absent_from_repo(error: BaseException) -> bool:
    """Whether a hub error means the file is not in the repo (the hub answered 404 for it), not that
    the repo could not be read. diffusers raises its OSError while handling huggingface_hub's
    EntryNotFoundError; the local kind of it means "not cached and offline", which says nothing
    about the repo."""
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, EntryNotFoundError):
            return not isinstance(error, LocalEntryNotFoundError)
        error = error.__cause__ or error.__context__
    return False
