"""Noising and targets against the schedulers' own arithmetic: DDPMScheduler.add_noise and
get_velocity, EulerDiscreteScheduler.add_noise with scale_model_input, and
FlowMatchEulerDiscreteScheduler.scale_noise and step."""

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       PNDMScheduler)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from diffcirc.models import ModelLoadError
from diffcirc.models.noising import DDPMNoising, FlowMatching, noising_for

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _pair(shape=(3, 4, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("t", [0, 1, 37, 500, 999])
@pytest.mark.parametrize("scheduler", [DDPMScheduler(), DDPMScheduler(**SD_BETAS), PNDMScheduler(**SD_BETAS),
                                       DDIMScheduler(**SD_BETAS), EulerDiscreteScheduler(**SD_BETAS)],
                         ids=["ddpm-linear", "ddpm-scaled", "pndm", "ddim", "euler"])
def test_ddpm_family_noises_as_ddpm_scheduler_add_noise(scheduler, t):
    x0, eps = _pair()
    reference = DDPMScheduler.from_config(scheduler.config)
    expected = reference.add_noise(x0, eps, torch.full((3,), t))
    torch.testing.assert_close(noising_for(scheduler).add_noise(x0, eps, t), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [10, 400, 990])
def test_euler_add_noise_rescaled_by_scale_model_input_is_the_same_x_t(t):
    """Euler adds noise as x0 + σ ε and scales the model input by 1 / sqrt(σ² + 1): the model sees
    √ā x0 + √(1 − ā) ε, which is what the noising gives (a parameterisation independent of DDPM's)."""
    euler = EulerDiscreteScheduler(**SD_BETAS)
    x0, eps = _pair()
    timestep = torch.tensor(float(t))
    seen = euler.scale_model_input(euler.add_noise(x0, eps, timestep.expand(3)), timestep)
    torch.testing.assert_close(noising_for(euler).add_noise(x0, eps, t), seen, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [3, 250, 800])
def test_v_prediction_target_is_get_velocity(t):
    scheduler = DDPMScheduler(prediction_type="v_prediction", **SD_BETAS)
    x0, eps = _pair()
    noising = noising_for(scheduler)
    assert noising.prediction_type == "v_prediction"
    expected = scheduler.get_velocity(x0, eps, torch.full((3,), t))
    torch.testing.assert_close(noising.target(x0, eps, t), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t", [5, 500, 995])
def test_x0_from_the_target_is_x0_and_targets_are_the_schedulers(prediction_type, t):
    """The target DDPMScheduler.step would turn back into x0: its predicted original sample."""
    scheduler = DDPMScheduler(prediction_type=prediction_type, clip_sample=False, **SD_BETAS)
    x0, eps = _pair()
    noising = noising_for(scheduler)
    x_t = noising.add_noise(x0, eps, t)
    target = noising.target(x0, eps, t)
    pred_x0 = scheduler.step(target, t, x_t).pred_original_sample
    torch.testing.assert_close(pred_x0, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(noising.x0_from_prediction(x_t, target, t), x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheduler", [FlowMatchEulerDiscreteScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler()],
                         ids=["shift3", "shift1"])
@pytest.mark.parametrize("index", [0, 1, 400, 998])
def test_flow_matching_noises_as_scale_noise_on_the_schedulers_grid(scheduler, index):
    x0, eps = _pair()
    t = scheduler.timesteps[index]
    expected = scheduler.scale_noise(x0, t.expand(3), eps)
    noising = noising_for(scheduler)
    assert isinstance(noising, FlowMatching) and noising.prediction_type == "flow"
    torch.testing.assert_close(noising.add_noise(x0, eps, float(t)), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("index", [0, 300, 997])
def test_flow_matching_target_steps_exactly_to_the_next_noise_level(index):
    """FlowMatchEulerDiscreteScheduler.step moves x_t by (σ_next − σ) times the model output: with the
    target ε − x0 as the output it lands on scale_noise at σ_next. The opposite sign moves away."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, eps = _pair()
    noising = noising_for(scheduler)
    t, t_next = float(scheduler.timesteps[index]), scheduler.timesteps[index + 1]
    x_t = noising.add_noise(x0, eps, t)
    stepped = scheduler.step(noising.target(x0, eps, t), scheduler.timesteps[index], x_t).prev_sample
    torch.testing.assert_close(stepped, scheduler.scale_noise(x0, t_next.expand(3), eps), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(noising.x0_from_prediction(x_t, noising.target(x0, eps, t), t), x0,
                               rtol=1e-5, atol=1e-5)


def test_flow_default_timesteps_lie_on_the_shifted_grid_in_quantile_order():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    grid = set(scheduler.timesteps.round().int().tolist())
    defaults = noising_for(scheduler).default_timesteps(4)
    assert defaults == sorted(defaults) and set(defaults) <= grid
    # without a shift the grid is t = 1..1000: the centres of 4 bins of its 1000 entries are entries 125, 375, ...
    unshifted = noising_for(FlowMatchEulerDiscreteScheduler()).default_timesteps(4)
    assert unshifted == [126, 376, 626, 876]
    # shift 3 maps σ to 3σ / (1 + 2σ): every quantile moves to higher noise, the median to σ = 0.75
    expected = [round(1000 * 3 * (t / 1000) / (1 + 2 * (t / 1000))) for t in unshifted]
    assert all(abs(d - e) <= 1 for d, e in zip(defaults, expected)), (defaults, expected)


@pytest.mark.parametrize("tokens", [64, 256, 1024, 4096])
def test_dynamic_shift_is_the_pipelines_and_shifts_as_set_timesteps_does(tokens):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    noising = noising_for(scheduler)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert noising.shift_mu(tokens) == pytest.approx(mu)
    unshifted = scheduler.sigmas.tolist()
    scheduler.set_timesteps(sigmas=unshifted, mu=mu)  # the scheduler shifting its own grid
    torch.testing.assert_close(noising.training_sigmas(tokens).float(), scheduler.sigmas[:-1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="image_tokens"):
        noising.training_sigmas()


def test_timesteps_outside_the_schedulers_range_are_refused():
    ddpm, flow = DDPMNoising(DDPMScheduler().alphas_cumprod), FlowMatching(FlowMatchEulerDiscreteScheduler())
    for bad in (-1, 1000, 2.5):
        with pytest.raises(ValueError, match=r"\[0, 1000\)"):
            ddpm.check(bad)
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        flow.check(1001)
    assert flow.sigma(1000) == 1.0 and flow.sigma(250) == 0.25


def test_unknown_prediction_types_and_schedulers_are_refused():
    with pytest.raises(ModelLoadError, match="prediction_type"):
        DDPMNoising(DDPMScheduler().alphas_cumprod, "velocity")

    class NoSchedule:
        config = {}

    with pytest.raises(ModelLoadError, match="alphas_cumprod"):
        noising_for(NoSchedule())
