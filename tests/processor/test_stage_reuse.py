"""Stage reuse: conditions resumed from the clean pass's stored stage outputs equal the same
conditions run one at a time as full passes (the oracle: each condition alone inside
``session.intervene``, nothing reused), on the bundled UNet, an SD 1.5-architecture
UNet2DConditionModel, SD3 and Flux; the stored outputs are keyed by the clean pass's inputs; and
the clean pass and stored outputs are accounted for (what runs, memory, fallbacks)."""

import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel

from helpers import tiny_models as tm
from helpers import tiny_transformers as tt
from helpers.hooks import removed_after
from diffcirc.models import load
from diffcirc.processor import (Mean, Patch, Scale, Session, Uniform, Zero, cache_head_outputs, mean_head_outputs,
                                run_conditions)
from diffcirc.processor.stage_reuse import ReuseFallback, StageReuse, model_stages, stage_units

REL_TOL = 1e-5


def sd15_like(seed: int = 0) -> UNet2DConditionModel:
    """Stable Diffusion 1.5's UNet layout (3 cross-attention down blocks, a plain one, the mirror-image up
    blocks, 2 layers per block, 8 heads, a cross-attention mid block) at 1/10 of its widths."""
    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    return model.eval()


class Case:
    """A model, its session, inputs of B = 2 images and forward_fn(inputs) -> output tensor."""

    def __init__(self, model, inputs, forward, counted: str):
        self.model, self.inputs, self.forward = model, inputs, forward
        self.session = Session(model)
        self.counted = counted  # a submodule inside the first stage: it runs only where that stage is computed
        self.order = _call_order(model, lambda: forward(inputs))

    def one_at_a_time(self, conditions) -> torch.Tensor:
        outs = []
        for cond in conditions:
            with self.session.intervene(cond), torch.no_grad():
                outs.append(self.forward(self.inputs))
        return torch.stack(outs)


def _call_order(model, run) -> list:
    """Attention layers in the order a plain pass first calls them (forward pre-hooks; no diffcirc code)."""
    order = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name) if name not in order else None)
               for name, m in tt.attention_modules(model).items()]
    with removed_after(handles):
        with torch.no_grad():
            run()
    return order


def _bundled():
    model, _ = load("bundled")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=g)
    return Case(model, (x, torch.tensor([400, 700])), lambda xt: model(*xt).sample, "time_embedding.linear_1")


def _sd15():
    model = sd15_like()
    g = torch.Generator().manual_seed(4)
    x, enc = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    return Case(model, (x, enc), lambda xe: model(xe[0], 500, encoder_hidden_states=xe[1]).sample,
                "time_embedding.linear_1")


def _transformer(built):
    return Case(built.model, built.inputs(1), lambda kw: built.model(**kw).sample,
                "time_text_embed.timestep_embedder.linear_1")


CASES = {"bundled": _bundled, "sd15": _sd15, "sd3": lambda: _transformer(tt.sd3()),
         "flux": lambda: _transformer(tt.flux())}


@pytest.fixture(scope="module", params=CASES.values(), ids=CASES.keys())
def case(request) -> Case:
    return request.param()


def _conditions(case: Case) -> list:
    """Clean; zero ablations in the first and the last layer called; Scale, Mean, Patch (one image),
    Uniform in between; one condition spanning the first and the last layer."""
    first, last = case.order[0], case.order[-1]
    middle = case.order[len(case.order) // 2]
    means = mean_head_outputs(case.session, case.forward, [case.inputs])
    cache = cache_head_outputs(case.session, lambda: case.forward(_other(case.inputs)))
    return [
        [],
        [Zero(first, 0)],
        [Zero(last, 1)],
        [Scale(middle, [0, 2], alpha=0.3)],
        [Mean(last, 2, means=means)],
        [Patch(middle, 1, cache=cache, elements=[1])],
        [Uniform(last, 3)],
        [Zero(first, 1), Zero(last, 0)],
    ]


def _other(inputs):
    """inputs with the first tensor replaced by other noise (a Patch source)."""
    g = torch.Generator().manual_seed(99)
    if isinstance(inputs, dict):
        key = next(iter(inputs))
        return {**inputs, key: torch.randn(inputs[key].shape, generator=g)}
    return (torch.randn(inputs[0].shape, generator=g), *inputs[1:])


def _count_elements(module):
    seen = []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    return seen, handle


def test_every_condition_equals_its_own_full_pass(case):
    conditions = _conditions(case)
    want = case.one_at_a_time(conditions)
    seen, handle = _count_elements(case.model.get_submodule(case.counted))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", ReuseFallback)  # nothing falls back to full passes here
            got = run_conditions(case.session, case.forward, case.inputs, conditions, reuse=True, max_batch=6)
    finally:
        handle.remove()
    scale = want.abs().max()
    assert got.shape == want.shape
    assert ((got - want).abs().max() / scale).item() <= REL_TOL
    # not vacuous: every condition changes the output, and the first stage ran in the clean pass only
    # (every intervention lies after it): full passes would have run it for all 8 conditions
    changes = (want[1:] - want[0]).flatten(1).abs().amax(1) / scale
    assert changes.min() > 1e-4, changes
    assert sum(seen) == 2


def test_a_pass_skips_the_stage_calls_before_its_first_changed_layer(case):
    reuse = StageReuse(case.session)
    with torch.no_grad():
        with reuse.recording():
            case.forward(case.inputs)
        first, last = case.order[0], case.order[-1]
        skipped = {}
        for layer in (first, last):
            with case.session.intervene([Zero(layer, 0)]), reuse.resuming():
                case.forward(case.inputs)
            skipped[layer] = reuse.last_skipped
    # by module path: the stage call each layer is (UNet2DModel's attentions are layers) or lies in
    within = lambda layer, stage: layer == stage or layer.startswith(stage + ".")  # noqa: E731
    in_first = next(i for i, name in enumerate(reuse.stage_calls) if within(first, name))
    in_last = max(i for i, name in enumerate(reuse.stage_calls) if within(last, name))
    assert skipped[first] == reuse.resume_index([first]) == in_first
    assert skipped[last] == reuse.resume_index([last]) == in_last
    assert skipped[first] < skipped[last]


def test_stored_outputs_tile_to_the_pass_and_are_keyed_by_the_clean_inputs():
    model = tm.unet2d()
    session = Session(model)
    x, t = tm.unet2d_inputs(2)
    reuse = StageReuse(session)
    late = [Zero("mid_block.attentions.0", 3)]
    with torch.no_grad():
        with reuse.recording():
            model(x, t)
        with session.intervene(late):
            want = model(x.repeat(3, 1, 1, 1), t.repeat(3)).sample
            other_t = model(x, t + 1).sample
            other_x = model(x.flip(0), t).sample
        with session.intervene(late), reuse.resuming():
            tiled = model(x.repeat(3, 1, 1, 1), t.repeat(3)).sample  # 3 copies of the clean batch
        assert reuse.last_skipped > 0
        assert (tiled - want).abs().max() <= 1e-5 * want.abs().max()
        for wrong, expected in (((x, t + 1), other_t), ((x.flip(0), t), other_x)):
            with session.intervene(late), reuse.resuming(), pytest.warns(ReuseFallback, match="inputs differ"):
                got = model(*wrong).sample
            assert reuse.last_skipped == 0
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_layer_changed_in_the_clean_pass_stays_changed_for_passes_that_leave_it_alone():
    # the stored outputs after that layer carry its change: a pass without it resumes before it
    model = tm.unet2d()
    session = Session(model)
    x, t = tm.unet2d_inputs(2)
    reuse = StageReuse(session)
    early, late = [Zero("down_blocks.1.attentions.0", 1)], [Zero("mid_block.attentions.0", 2)]
    with torch.no_grad():
        with session.intervene(early), reuse.recording():
            model(x, t)
        want = _alone(session, late, lambda: model(x, t).sample)
        with session.intervene(late), reuse.resuming():
            got = model(x, t).sample
    assert reuse.last_skipped == reuse.resume_index(["down_blocks.1.attentions.0"]) > 0
    assert (got - want).abs().max() <= REL_TOL * want.abs().max()


def test_glue_changing_a_stage_output_in_place_does_not_change_the_stored_one():
    # T2I adapters: UNet2DConditionModel adds the residuals in place to the down blocks' outputs
    model = tm.cond_unet()
    session = Session(model)
    x, t, enc, _ = tm.cond_inputs(2)
    with torch.no_grad():
        shapes = [r.shape for r in _down_outputs(model, x, t, enc)]
    g = torch.Generator().manual_seed(5)
    residuals = [torch.randn(s, generator=g) for s in shapes]

    def forward(batch):
        x, enc, *res = batch
        return model(x, t, encoder_hidden_states=enc, down_intrablock_additional_residuals=list(res)).sample

    # a mid-block condition: up_blocks.0 then computes from the skip connection the model changed in place
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1"
    conditions = [[], [Zero(layer, 0)], [Zero(layer, 1)], []]
    inputs = (x, enc, *residuals)
    want = torch.stack([_alone(session, c, lambda: forward(inputs)) for c in conditions])
    with torch.no_grad():
        got = run_conditions(session, forward, inputs, conditions, reuse=True, max_batch=2)
    assert (got - want).abs().max() <= REL_TOL * want.abs().max()
    assert (want[0] - _alone(session, [], lambda: model(x, t, encoder_hidden_states=enc).sample)).abs().max() > 1e-3


def _down_outputs(model, x, t, enc) -> list:
    """Where UNet2DConditionModel adds adapter residuals: a cross-attention block's last attention
    output (added by the block), a plain block's output (added in place by the model)."""
    outs = []
    hooked = [b.attentions[-1] if getattr(b, "has_cross_attention", False) else b for b in model.down_blocks]
    handles = [m.register_forward_hook(lambda m, a, o: outs.append(o[0])) for m in hooked]
    with removed_after(handles):
        model(x, t, encoder_hidden_states=enc)
    return outs


def _alone(session, condition, run):
    with session.intervene(condition), torch.no_grad():
        return run()


def test_an_intervention_open_around_the_conditions_applies_to_each_of_them():
    model = tm.unet2d()
    session = Session(model)
    x, t = tm.unet2d_inputs(2)
    forward = lambda xt: model(*xt).sample  # noqa: E731
    outer = [Scale("down_blocks.1.attentions.1", [1, 6], alpha=-1.0)]  # before the conditions' layer
    conditions = [[], [Zero("mid_block.attentions.0", 2)], [Scale("mid_block.attentions.0", 5, alpha=2.0)]]
    want = torch.stack([_alone(session, outer + c, lambda: forward((x, t))) for c in conditions])
    with session.intervene(outer), torch.no_grad():
        got = run_conditions(session, forward, (x, t), conditions, reuse=True, max_batch=6)
    assert (got - want).abs().max() <= REL_TOL * want.abs().max()
    assert (want[0] - _alone(session, [], lambda: forward((x, t)))).abs().max() > 1e-3


def test_fallbacks_are_said_and_still_give_every_condition(recwarn):
    wrapped = _Wrapper(tm.unet2d())  # no stage lists of its own: unknown stages
    session = Session(wrapped)
    x, t = tm.unet2d_inputs(2)
    forward = lambda xt: wrapped(*xt)  # noqa: E731
    conditions = [[], [Zero("unet.mid_block.attentions.0", 1)]]
    assert model_stages(wrapped) == [] and stage_units(wrapped) == []
    with pytest.raises(ValueError, match="stages are unknown"):
        StageReuse(session)
    with torch.no_grad():
        with pytest.raises(ValueError, match="stages are unknown"):
            run_conditions(session, forward, (x, t), conditions, reuse=True)
        with pytest.warns(ReuseFallback, match="stages are unknown"):
            got = run_conditions(session, forward, (x, t), conditions)
    assert (got - torch.stack([_alone(session, c, lambda: forward((x, t))) for c in conditions])).abs().max() <= 1e-5

    model = tm.unet2d()
    session = Session(model)
    forward = lambda xt: model(*xt).sample  # noqa: E731
    conditions = [[], [Zero("mid_block.attentions.0", 1)]]
    with pytest.warns(ReuseFallback, match="gradients are enabled"):
        run_conditions(session, forward, (x, t), conditions)
    with pytest.raises(ValueError, match="gradients are enabled"):
        run_conditions(session, forward, (x, t), conditions, reuse=True)
    with torch.no_grad(), session.capture(lambda layer, out: None):
        with pytest.warns(ReuseFallback, match="capture"):
            run_conditions(session, forward, (x, t), conditions)


class _Wrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t).sample


def test_stored_outputs_count_against_max_bytes():
    model = tm.unet2d()
    session = Session(model)
    x, t = tm.unet2d_inputs(2)
    forward = lambda xt: model(*xt).sample  # noqa: E731
    conditions = [[]] + [[Zero("mid_block.attentions.0", h)] for h in range(6)]
    cost = _module_output_bytes(lambda: forward((x, t)))  # the CPU bound of one condition, counted here
    store = _unit_output_bytes(model, stage_units(model), lambda: forward((x, t)))
    passes, handle = _count_elements(model)
    try:
        with torch.no_grad():
            got = run_conditions(session, forward, (x, t), conditions, max_bytes=store + 2 * cost - 1)
            # with the store left out of the budget the passes would hold 2 conditions
            assert passes[0] == 2 and max(passes[1:]) == 2, passes
            passes.clear()
            with pytest.warns(ReuseFallback, match="holds less than the stored stage outputs"):
                tight = run_conditions(session, forward, (x, t), conditions, max_bytes=store + cost - 1)
    finally:
        handle.remove()
    assert passes[0] == 2 and set(passes[1:]) == {2}, passes  # full passes, one condition each
    want = torch.stack([_alone(session, c, lambda: forward((x, t))) for c in conditions])
    for out in (got, tight):
        assert (out - want).abs().max() <= REL_TOL * want.abs().max()


def _module_output_bytes(run) -> int:
    total = [0]

    def count(module, args, output):
        outs = output if isinstance(output, (tuple, list)) else [getattr(output, "sample", output)]
        total[0] += sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor))

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return total[0]


def _unit_output_bytes(model, units, run) -> int:
    seen = {}

    def keep(module, args, output):
        outs = output if isinstance(output, (tuple, list)) else [output]
        for o in outs:
            for t in (o if isinstance(o, tuple) else (o,)):
                if isinstance(t, torch.Tensor):
                    seen[t.data_ptr()] = t.numel() * t.element_size()

    handles = [m.register_forward_hook(keep) for _, m in units]
    with removed_after(handles):
        with torch.no_grad():
            run()
    return sum(seen.values())


def test_stage_modules_are_unwrapped_after_each_pass_also_when_it_raises():
    model = tm.unet2d()
    session = Session(model)
    x, t = tm.unet2d_inputs(2)
    reuse = StageReuse(session)
    with torch.no_grad():
        with reuse.recording():
            model(x, t)
        with pytest.raises(IndexError):
            with session.intervene([Zero("mid_block.attentions.0", 99)]), reuse.resuming():
                model(x, t)
    assert not any("forward" in vars(m) for _, m in reuse.stages)
    assert not model._forward_pre_hooks


def test_active_dropout_makes_a_pass_compute_everything():
    torch.manual_seed(0)
    model = UNet2DConditionModel(  # training mode, dropout in every resnet
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8, dropout=0.5)
    session = Session(model)
    x, t, enc, _ = tm.cond_inputs(2)
    reuse = StageReuse(session)
    with torch.no_grad():
        with reuse.recording():
            model(x, t, encoder_hidden_states=enc)
        with reuse.resuming(), pytest.warns(ReuseFallback, match="dropout is active"):
            model(x, t, encoder_hidden_states=enc)
        assert reuse.last_skipped == 0
        model.eval()  # the stored outputs still hold the clean pass's dropout
        with reuse.resuming(), pytest.warns(ReuseFallback, match="dropout is active"):
            model(x, t, encoder_hidden_states=enc)
        assert reuse.last_skipped == 0
        with reuse.recording():
            model(x, t, encoder_hidden_states=enc)
        with reuse.resuming():
            model(x, t, encoder_hidden_states=enc)
        assert reuse.last_skipped == len(reuse.stage_calls)
