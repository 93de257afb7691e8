"""A prompt as a denoiser's conditioning, encoded once as the diffusers pipelines encode it, or
read from a ``--prompt-embeds`` safetensors file.

Encoding (no classifier-free guidance, one prompt, batch 1), following each pipeline's
``encode_prompt``:

    sd     CLIP: last hidden state (final layer norm applied) of the prompt padded to the
           tokenizer's model_max_length                                          (1, 77, C)
    sdxl   both CLIPs: the penultimate hidden state of each, concatenated on channels; pooled: the
           projected text embedding of the first encoder that has one (text_encoder_2)
    sd3    CLIP-L and CLIP-G penultimate states concatenated on channels, zero-padded to T5's
           channels, then T5's last hidden state (max_sequence_length tokens, 256 by default; zeros
           without text_encoder_3) appended on the sequence; pooled: both projected embeddings
    flux   T5's last hidden state (512 tokens by default) as the sequence; pooled: CLIP's pooler output

A file holds ``prompt_embeds`` (1, L, C) and, where the model takes one, ``pooled_prompt_embeds``
(1, P), named as the pipelines name them; a missing or mis-shaped tensor is a ``ModelLoadError``
naming it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .denoiser import Conditioning, check_conditioning, conditioning_dims, denoiser_family
from .load import ModelLoadError, check_safetensors

MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' default T5 lengths
CLIP_FALLBACK_LENGTH = 77  # what SD3 and Flux pipelines use without a CLIP tokenizer
EMBEDS, POOLED = "prompt_embeds", "pooled_prompt_embeds"


def _ids(tokenizer, prompt: str, max_length: int) -> torch.Tensor:
    """(1, max_length) token ids of the prompt, padded and truncated as the pipelines do."""
    return tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


def _texts(tokenizer, ids: torch.Tensor) -> list:
    return tokenizer.convert_ids_to_tokens(ids[0].tolist())


def _own(tokenizer, ids: torch.Tensor, offset: int = 0) -> list:
    """Positions (plus offset) of the prompt's own tokens: not start, end or padding tokens."""
    special = set(tokenizer.all_special_ids)
    return [offset + i for i, token in enumerate(ids[0].tolist()) if token not in special]


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _clip_hidden(tokenizer, encoder, prompt: str, max_length: int):
    """(penultimate hidden state (1, L, C), first output (the projected embedding where 2-D), ids)."""
    ids = _ids(tokenizer, prompt, max_length)
    out = encoder(ids.to(_device(encoder)), output_hidden_states=True)
    return out.hidden_states[-2], out[0], ids


def encode_sd(tokenizers: dict, encoders: dict, prompt: str) -> Conditioning:
    tokenizer, encoder = tokenizers["tokenizer"], encoders["text_encoder"]
    ids = _ids(tokenizer, prompt, tokenizer.model_max_length)
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").attention_mask.to(_device(encoder))
    embeds = encoder(ids.to(_device(encoder)), attention_mask=mask)[0]
    return Conditioning(embeds, None, _texts(tokenizer, ids), _own(tokenizer, ids), prompt)


def encode_sdxl(tokenizers: dict, encoders: dict, prompt: str) -> Conditioning:
    names = [n for n in ("", "_2") if f"text_encoder{n}" in encoders and f"tokenizer{n}" in tokenizers]
    if "_2" not in names:
        raise ModelLoadError("an SDXL pipeline needs text_encoder_2 and tokenizer_2 (the pooled embedding comes "
                             "from it); pass --prompt-embeds instead")
    hidden, pooled, first_ids, first = [], None, None, None
    for n in names:
        tokenizer, encoder = tokenizers[f"tokenizer{n}"], encoders[f"text_encoder{n}"]
        states, output, ids = _clip_hidden(tokenizer, encoder, prompt, tokenizer.model_max_length)
        if pooled is None and output.dim() == 2:  # only the projection model's first output is 2-D
            pooled = output
        hidden.append(states)
        if first is None:
            first_ids, first = ids, tokenizer
    return Conditioning(torch.cat(hidden, dim=-1), pooled, _texts(first, first_ids), _own(first, first_ids), prompt)


def encode_sd3(tokenizers: dict, encoders: dict, prompt: str, max_sequence_length: Optional[int] = None,
               joint_attention_dim: Optional[int] = None) -> Conditioning:
    for n in ("", "_2"):
        if f"text_encoder{n}" not in encoders or f"tokenizer{n}" not in tokenizers:
            raise ModelLoadError(f"an SD3 pipeline needs text_encoder{n} and tokenizer{n} (CLIP); pass --prompt-embeds "
                                 "instead")
    length = max_sequence_length or MAX_SEQUENCE_LENGTH["sd3"]
    clip_length = tokenizers["tokenizer"].model_max_length
    parts, pooled = [], []
    for n in ("", "_2"):
        states, projected, ids = _clip_hidden(tokenizers[f"tokenizer{n}"], encoders[f"text_encoder{n}"], prompt,
                                              clip_length)
        parts.append(states)
        pooled.append(projected)
        if n == "":
            clip_ids = ids
    clip = torch.cat(parts, dim=-1)
    t5_tokenizer, t5 = tokenizers.get("tokenizer_3"), encoders.get("text_encoder_3")
    if t5 is None or t5_tokenizer is None:
        # the pipeline's stand-in for a missing T5: zeros of the transformer's joint width
        t5_embeds = torch.zeros(1, length, int(joint_attention_dim), device=clip.device, dtype=clip.dtype)
        t5_texts, t5_own = [""] * length, []
    else:
        ids = t5_tokenizer(prompt, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                           return_tensors="pt").input_ids
        t5_embeds = t5(ids.to(_device(t5)))[0]
        t5_texts, t5_own = _texts(t5_tokenizer, ids), _own(t5_tokenizer, ids, offset=clip.shape[1])
    clip = F.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
    first = tokenizers["tokenizer"]
    return Conditioning(torch.cat([clip, t5_embeds.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1),
                        _texts(first, clip_ids) + t5_texts, _own(first, clip_ids) + t5_own, prompt)


def encode_flux(tokenizers: dict, encoders: dict, prompt: str,
                max_sequence_length: Optional[int] = None) -> Conditioning:
    for n, what in (("", "CLIP"), ("_2", "T5")):
        if f"text_encoder{n}" not in encoders or f"tokenizer{n}" not in tokenizers:
            raise ModelLoadError(f"a Flux pipeline needs text_encoder{n} and tokenizer{n} ({what}); pass "
                                 "--prompt-embeds instead")
    clip_tokenizer, clip = tokenizers["tokenizer"], encoders["text_encoder"]
    clip_ids = _ids(clip_tokenizer, prompt, clip_tokenizer.model_max_length)
    pooled = clip(clip_ids.to(_device(clip)), output_hidden_states=False).pooler_output
    t5_tokenizer, t5 = tokenizers["tokenizer_2"], encoders["text_encoder_2"]
    ids = _ids(t5_tokenizer, prompt, max_sequence_length or MAX_SEQUENCE_LENGTH["flux"])
    embeds = t5(ids.to(_device(t5)), output_hidden_states=False)[0]
    return Conditioning(embeds, pooled, _texts(t5_tokenizer, ids), _own(t5_tokenizer, ids), prompt)


def encode_prompt(denoiser: torch.nn.Module, tokenizers: dict, encoders: dict, prompt: str,
                  max_sequence_length: Optional[int] = None) -> Optional[Conditioning]:
    """The conditioning of ``prompt`` for ``denoiser``, by the pipeline's own tokenizers and
    encoders ({component name: object}, as model_index.json names them). None for a pixel model
    (which takes an empty prompt only). Runs without gradients; the result is checked to fit."""
    family = denoiser_family(denoiser)
    if family == "pixel":
        if prompt:
            raise ModelLoadError("the model is an unconditional UNet2DModel: it takes no prompt")
        return None
    if not encoders:
        raise ModelLoadError(f"this {family} pipeline has no text encoder on disk: pass --prompt-embeds "
                             f"FILE.safetensors with {EMBEDS} (and {POOLED} where the model takes one)")
    with torch.no_grad():
        if family == "sd":
            if "text_encoder" not in encoders or "tokenizer" not in tokenizers:
                raise ModelLoadError("a Stable Diffusion pipeline needs text_encoder and tokenizer (CLIP); pass "
                                     "--prompt-embeds instead")
            conditioning = encode_sd(tokenizers, encoders, prompt)
        elif family == "sdxl":
            conditioning = encode_sdxl(tokenizers, encoders, prompt)
        elif family == "sd3":
            conditioning = encode_sd3(tokenizers, encoders, prompt, max_sequence_length,
                                      int(denoiser.config.joint_attention_dim))
        else:
            conditioning = encode_flux(tokenizers, encoders, prompt, max_sequence_length)
    conditioning.prompt_embeds = conditioning.prompt_embeds.detach().float().cpu()
    if conditioning.pooled_prompt_embeds is not None:
        conditioning.pooled_prompt_embeds = conditioning.pooled_prompt_embeds.detach().float().cpu()
    check_conditioning(denoiser, conditioning)
    return conditioning


def read_prompt_embeds(path: str, denoiser: torch.nn.Module) -> Conditioning:
    """The conditioning saved in the safetensors file ``path`` for ``denoiser``.

    Raises ``ModelLoadError`` naming the tensor that is missing or of the wrong shape (the shapes
    the denoiser takes: ``conditioning_dims``); other tensors in the file are ignored.
    """
    from safetensors.torch import load_file

    check_safetensors(path, "save the tensors with safetensors.torch.save_file")
    tensors = load_file(path)
    channels, pooled_dim = conditioning_dims(denoiser)
    if channels is None:
        raise ModelLoadError("the model is an unconditional UNet2DModel: it takes no prompt embeddings")
    if EMBEDS not in tensors:
        raise ModelLoadError(f"{path} holds no tensor {EMBEDS!r} (1, L, {channels}); it has {sorted(tensors)}")
    pooled = tensors.get(POOLED)
    if pooled_dim is not None and pooled is None:
        raise ModelLoadError(f"{path} holds no tensor {POOLED!r} (1, {pooled_dim}), which this "
                             f"{denoiser_family(denoiser)} denoiser takes; it has {sorted(tensors)}")
    conditioning = Conditioning(tensors[EMBEDS].float(), pooled.float() if pooled_dim is not None else None)
    check_conditioning(denoiser, conditioning, where=path)
    return conditioning
