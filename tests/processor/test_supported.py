"""The processor map: each supported diffusers processor class is reproduced by its fused counterpart
(fp32, max relative difference <= 1e-5, every layer traced; the transformers' processors in
test_transformer_models.py); any other processor is refused by name before a forward pass, or,
with ``unsupported="skip"``, left alone and listed."""

import re

import pytest
import torch
from diffusers.models.attention_processor import (Attention, AttnProcessor, AttnProcessor2_0, AuraFlowAttnProcessor2_0,
                                                  IPAdapterAttnProcessor2_0, JointAttnProcessor2_0,
                                                  SanaLinearAttnProcessor2_0)
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

from helpers import tiny_models as tm
from helpers import tiny_transformers as tt
from diffcirc.processor import (FusedAttnProcessor, FusedAuraFlowAttnProcessor, FusedFluxAttnProcessor,
                                FusedJointAttnProcessor, FusedSanaAttnProcessor, Recorder, Session, Zero)
from diffcirc.processor.session import SkippedLayer
from diffcirc.processor.supported import FUSED_COUNTERPARTS

REL_TOL = 1e-5


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _processors(model) -> dict:
    """{name: processor} of every module carrying one (Attention, FluxAttention, ...), found without diffcirc."""
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def _unet2d():
    model = tm.unet2d()
    x, t = tm.unet2d_inputs(2, hw=(16, 12))
    return model, lambda: model(x, t).sample


def _cond_unet():
    model = tm.cond_unet()
    x, t, enc, mask = tm.cond_inputs(3)
    return model, lambda: model(x, t, enc, encoder_attention_mask=mask).sample


def _transformer2d():
    model = tm.transformer2d()
    g = torch.Generator().manual_seed(3)
    x, enc = torch.randn(2, 32, 6, 5, generator=g), torch.randn(2, 5, 24, generator=g)
    return model, lambda: model(x, encoder_hidden_states=enc).sample


TINY_MODELS = {"unet2d": _unet2d, "cond_unet": _cond_unet, "transformer2d": _transformer2d}


@pytest.mark.parametrize("processor_class", [AttnProcessor2_0, AttnProcessor], ids=lambda c: c.__name__)
@pytest.mark.parametrize("build", TINY_MODELS.values(), ids=TINY_MODELS.keys())
def test_counterpart_reproduces_each_supported_processor(build, processor_class):
    model, run = build()
    tm.set_processors(model, lambda name: processor_class())
    session = Session(model)
    rec = Recorder(stats=("entropy",), bins=4)
    with torch.no_grad():
        want = run()
        with session.trace(rec):
            got = run()
    assert _relative(got, want) <= REL_TOL
    assert set(rec.to_frame().layer) == set(tm.attention_modules(model)) == set(session.layer_names)
    assert all(type(p) is processor_class for p in _processors(model).values())  # put back after the trace


@pytest.mark.parametrize("processor_class", [AttnProcessor2_0, AttnProcessor], ids=lambda c: c.__name__)
def test_counterpart_follows_each_processors_scale_on_a_scale_qk_false_layer(processor_class):
    # AttnProcessor2_0 scales by D ** -0.5 whatever the layer says, AttnProcessor by attn.scale (= 1 here)
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"attn": Attention(query_dim=16, heads=2, dim_head=8, scale_qk=False)}).eval()
    model["attn"].set_processor(processor_class())
    x = 3 * torch.randn(2, 5, 16)
    with torch.no_grad():
        want = model["attn"](x)
        with Session(model).trace(Recorder(stats=("entropy",), bins=4)):
            got = model["attn"](x)
    assert _relative(got, want) <= REL_TOL
    with torch.no_grad():
        other = (AttnProcessor if processor_class is AttnProcessor2_0 else AttnProcessor2_0)()
        model["attn"].set_processor(other)
        assert _relative(model["attn"](x), want) > 1e-2  # the two scales differ, so the check above can fail


def test_drop_in_fused_processor_is_replaced_keeping_its_scale_rule():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"attn": Attention(query_dim=16, heads=2, dim_head=8, scale_qk=False)}).eval()
    x = 3 * torch.randn(2, 5, 16)
    model["attn"].set_processor(AttnProcessor2_0())
    with torch.no_grad():
        want = model["attn"](x)
    model["attn"].set_processor(FusedAttnProcessor(scale_rule="head_dim"))
    session = Session(model)
    with session.trace(Recorder(stats=("entropy",), bins=4)), torch.no_grad():
        inside = model["attn"].processor
        got = model["attn"](x)
    assert inside.controller is session and inside.scale_rule == "head_dim"
    assert _relative(got, want) <= REL_TOL


def test_supported_classes_match_exactly():
    diffusers_classes = {AttnProcessor2_0, AttnProcessor, JointAttnProcessor2_0, FluxAttnProcessor,
                         AuraFlowAttnProcessor2_0, SanaAttnProcessor2_0}
    drop_ins = {FusedAttnProcessor, FusedJointAttnProcessor, FusedFluxAttnProcessor, FusedAuraFlowAttnProcessor,
                FusedSanaAttnProcessor}  # a counterpart already in place is replaced by its like
    assert set(FUSED_COUNTERPARTS) == diffusers_classes | drop_ins


# the transformers' drop-in counterparts, on the layers whose processor they reproduce
DROP_INS = {
    "sd3": (lambda: tt.sd3(dual_attention=True, qk_norm="rms_norm"), JointAttnProcessor2_0, FusedJointAttnProcessor),
    "flux": (tt.flux, FluxAttnProcessor, FusedFluxAttnProcessor),
    "auraflow": (tt.auraflow, AuraFlowAttnProcessor2_0, FusedAuraFlowAttnProcessor),
    "sana": (tt.sana, SanaAttnProcessor2_0, FusedSanaAttnProcessor),
}


@pytest.mark.parametrize("build, replaced, drop_in", DROP_INS.values(), ids=DROP_INS.keys())
def test_drop_in_transformer_counterparts_reproduce_their_processor_and_are_replaced_by_their_like(
        build, replaced, drop_in):
    built = build()
    with torch.no_grad():
        want = built.run()
    layers = [name for name, p in _processors(built.model).items() if type(p) is replaced]
    assert layers
    for name in layers:
        built.model.get_submodule(name).set_processor(drop_in())
    with torch.no_grad():
        alone = built.run()  # a drop-in without a session: plain attention on the fused op
    assert _relative(alone, want) <= REL_TOL
    session = Session(built.model, unsupported="skip" if built.skipped else "refuse")
    with session.trace(Recorder(stats=("entropy",), bins=4)), torch.no_grad():
        inside = {name: built.model.get_submodule(name).processor for name in layers}
        got = built.run()
    assert all(type(p) is drop_in and p.controller is session and p.layer == name for name, p in inside.items())
    assert _relative(got, want) <= REL_TOL


# ---- refusal ------------------------------------------------------------------------------------------

def _sana():
    """Two Sana blocks: linear self-attention (refused) and softmax cross-attention (supported)."""
    return tt.sana(layers=2).model


def _flux():
    return tt.flux().model


def _flux_with_ip_adapter():
    """Flux with diffusers' IP-adapter processor on its double-stream blocks, where diffusers puts it."""
    model = _flux()
    for name, m in tt.attention_modules(model).items():
        if name.startswith("transformer_blocks."):
            m.set_processor(FluxIPAdapterAttnProcessor(hidden_size=64, cross_attention_dim=16, num_tokens=(4,)))
    return model


class DoubledOutput(AttnProcessor2_0):
    """A user's variant of AttnProcessor2_0: a subclass of a supported class is not supported."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return 2 * super().__call__(attn, hidden_states, *args, **kwargs)


class OwnProcessor:
    """A user-defined processor of no diffusers class."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _cond_unet_with(factory, which: str):
    """cond_unet with factory() on its attn1 or attn2 layers; returns (model, {name: class} of those layers)."""
    model = tm.cond_unet()
    changed = {}
    for name, m in tm.attention_modules(model).items():
        if name.endswith(which):
            m.set_processor(factory())
            changed[name] = type(m.processor)
    return model, changed


def _every_layer(model):
    return model, {name: type(p) for name, p in _processors(model).items()}


def _layers_with(model, processor_class):
    return model, {name: type(p) for name, p in _processors(model).items() if type(p) is processor_class}


REFUSED = {
    "sana": lambda: _layers_with(_sana(), SanaLinearAttnProcessor2_0),
    "flux_ip_adapter": lambda: _layers_with(_flux_with_ip_adapter(), FluxIPAdapterAttnProcessor),
    "sana_linear_on_unet": lambda: _cond_unet_with(SanaLinearAttnProcessor2_0, "attn1"),
    "user_defined": lambda: _cond_unet_with(OwnProcessor, "attn1"),
    "subclass": lambda: _cond_unet_with(DoubledOutput, "attn2"),
    "ip_adapter": lambda: _cond_unet_with(lambda: IPAdapterAttnProcessor2_0(32, cross_attention_dim=24), "attn2"),
}


@pytest.mark.parametrize("build", REFUSED.values(), ids=REFUSED.keys())
def test_unsupported_processor_is_refused_by_name_before_any_forward_pass(build):
    model, unsupported = build()
    assert len(unsupported) >= 2
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    before = _processors(model)
    with pytest.raises(ValueError) as err:
        Session(model)
    message = str(err.value)
    for name, cls in unsupported.items():
        assert f"{name} ({cls.__name__})" in message
    assert "AttnProcessor2_0, AttnProcessor" in message and "unsupported='skip'" in message
    named = dict(re.findall(r"([\w.]+) \((\w+)\)", message))
    assert named == {name: cls.__name__ for name, cls in unsupported.items()}  # the supported layers are not named
    assert not calls and all(p is before[n] for n, p in _processors(model).items())


def test_the_refused_models_carry_the_processors_named_above():
    # the parametrised test above is only as strong as these layer lists
    flux = {f"{block}.{i}.attn": "FluxAttnProcessor" for block in ("transformer_blocks", "single_transformer_blocks")
            for i in range(2)}
    assert {n: c.__name__ for n, c in _every_layer(_flux())[1].items()} == flux
    assert {n: c.__name__ for n, c in _every_layer(_flux_with_ip_adapter())[1].items()} == {
        **flux, "transformer_blocks.0.attn": "FluxIPAdapterAttnProcessor",
        "transformer_blocks.1.attn": "FluxIPAdapterAttnProcessor"}
    assert {n: c.__name__ for n, c in _every_layer(_sana())[1].items()} == {
        f"transformer_blocks.{i}.attn{j}": "SanaLinearAttnProcessor2_0" if j == 1 else "SanaAttnProcessor2_0"
        for i in range(2) for j in (1, 2)}


def test_flux_and_sanas_cross_attention_are_supported():
    assert Session(_flux()).layer_names == list(_every_layer(_flux())[1])
    assert Session(_sana(), unsupported="skip").layer_names == ["transformer_blocks.0.attn2",
                                                                "transformer_blocks.1.attn2"]


def test_a_model_whose_every_layer_would_be_skipped_is_refused():
    model = tm.cond_unet()
    tm.set_processors(model, lambda name: OwnProcessor())
    with pytest.raises(ValueError, match="nothing to trace") as err:
        Session(model, unsupported="skip")
    first = next(iter(tm.attention_modules(model)))
    assert f"{first} (OwnProcessor)" in str(err.value)


def test_unknown_unsupported_option_is_refused():
    with pytest.raises(ValueError, match="unsupported must be one of"):
        Session(tm.unet2d(), unsupported="ignore")


def test_processor_changed_after_the_session_was_made_is_refused_when_a_context_opens():
    model = tm.cond_unet()
    session = Session(model)
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1"
    own = OwnProcessor()
    dict(model.named_modules())[layer].set_processor(own)
    before = _processors(model)
    with pytest.raises(ValueError, match=f"{layer} \\(OwnProcessor\\).*make a new Session"):
        with session.trace(Recorder(stats=("entropy",))):
            pass
    assert all(p is before[n] for n, p in _processors(model).items()) and session._depth == 0


# ---- skip ---------------------------------------------------------------------------------------------

def _skipping_session():
    model, skipped = _cond_unet_with(SanaLinearAttnProcessor2_0, "attn1")
    x, t, enc, mask = tm.cond_inputs(2)
    session = Session(model, unsupported="skip")
    return model, session, skipped, lambda: model(x, t, enc, encoder_attention_mask=mask).sample


def test_skip_leaves_unsupported_layers_on_their_own_processors_and_traces_the_others():
    model, session, skipped, run = _skipping_session()
    assert session.skipped == [SkippedLayer(name, SanaLinearAttnProcessor2_0) for name in skipped]
    assert set(session.layer_names) == set(tm.attention_modules(model)) - set(skipped)

    seen = {}  # skipped layer -> (processor during the trace, its input, its output)
    hooks = [m.register_forward_hook(lambda mod, args, kwargs, out, name=name: seen.__setitem__(
        name, (mod.processor, args[0], out)), with_kwargs=True)
        for name, m in tm.attention_modules(model).items() if name in skipped]
    originals = {name: p for name, p in _processors(model).items() if name in skipped}
    rec = Recorder(stats=("entropy",), bins=4)
    with torch.no_grad():
        want = run()
        seen.clear()
        with session.trace(rec):
            got = run()
    for h in hooks:
        h.remove()

    assert _relative(got, want) <= REL_TOL
    assert set(rec.to_frame().layer) == set(session.layer_names)  # every fused layer traced, no skipped one
    assert set(seen) == set(skipped)
    for name, (processor, hidden, out) in seen.items():
        assert processor is originals[name]
        with torch.no_grad():
            alone = originals[name](dict(model.named_modules())[name], hidden)
        assert torch.equal(out, alone)  # exactly the default processor's output on the same input


def test_sana_with_skip_traces_its_cross_attention_and_leaves_its_linear_attention_alone():
    built = tt.sana(layers=2)
    session = Session(built.model, unsupported="skip")
    linear = [f"transformer_blocks.{i}.attn1" for i in range(2)]
    assert session.skipped == [SkippedLayer(name, SanaLinearAttnProcessor2_0) for name in linear]
    originals = {name: built.model.get_submodule(name).processor for name in linear}
    seen = {}
    hooks = [built.model.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, name=name: seen.__setitem__(name, mod.processor)) for name in linear]
    rec = Recorder(stats=("entropy", "distance"), bins=4)
    with torch.no_grad():
        want = built.run()
        with session.trace(rec):
            got = built.run()
    for h in hooks:
        h.remove()
    assert _relative(got, want) <= REL_TOL
    assert set(rec.to_frame().layer) == {"transformer_blocks.0.attn2", "transformer_blocks.1.attn2"}
    assert seen == originals  # the linear attention ran on its own processor inside the trace


def test_replacing_the_skipped_linear_attention_would_change_the_output():
    # what the refusal prevents: softmax attention in place of linear attention differs visibly
    model, _, _, run = _skipping_session()
    with torch.no_grad():
        want = run()
        tm.set_processors(model, lambda name: FusedAttnProcessor())
        replaced = run()
    assert _relative(replaced, want) > 1e-2


def test_addressing_a_skipped_layer_raises():
    model, session, skipped, _ = _skipping_session()
    layer = next(iter(skipped))
    with pytest.raises(ValueError, match=f"{layer}' was skipped: its processor SanaLinearAttnProcessor2_0"):
        session.layer(layer)
    with pytest.raises(ValueError, match="was skipped"):
        with session.intervene([Zero(layer, 0)]):
            pass
    with pytest.raises(ValueError, match="was skipped"):
        with session.gate({layer: torch.ones(4)}):
            pass
    with pytest.raises(ValueError, match="was skipped"):
        with session.trace(Recorder(stats=("entropy",), maps={"layers": [layer]})):
            pass
    with pytest.raises(KeyError, match="no attention layer"):
        with session.trace(Recorder(stats=("entropy",), maps={"layers": ["no.such.layer"]})):
            pass
    assert session._depth == 0 and all(p is not None for p in _processors(model).values())


def test_unknown_scale_rule_is_refused():
    with pytest.raises(ValueError, match="scale_rule must be one of"):
        FusedAttnProcessor(scale_rule="sdpa")
