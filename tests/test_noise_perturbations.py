"""Offset noise and input perturbation (`train.noise_offset`, `train.input_perturbation`; training/diffusion_system.py).

What the training step feeds the network and the loss, drawn from a seeded global generator: z_t from which noise,
the target from which, in which order the draws come, and that with both off the step draws exactly what it drew
before they existed (the default run is unchanged). Then the stage: the settings reach the system, train other
weights, and are logged; bad values stop it before any work.
"""

import pytest
import torch
from test_train_stage import (  # noqa: F401 (upstream: a fixture)
    _tiny_seed_model,
    copy_project,
    train_in_process,
    trains_otherwise,
    upstream,
)

from diffusion.scheduler import DDPMScheduler
from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings

B, C, H, W = 4, 4, 8, 8  # a batch of the tiny seed model's latents (16 px images, its factor-2 VAE)


def _step_noises(**settings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One diffusion_loss at seed 3: the noise z_t was made from, the noise the target was made from, and the
    global generator's next draw after the step (which shows how many numbers the step consumed)."""
    model, _ = _tiny_seed_model("dit")
    scheduler = DDPMScheduler(num_timesteps=1000, prediction_type="v_prediction")
    system = DiffusionSystem(model, scheduler, OptimSettings(**settings))
    seen = {}
    add_noise, get_target = scheduler.add_noise, scheduler.get_target
    scheduler.add_noise = lambda x0, noise, t: (seen.__setitem__("input", noise), add_noise(x0, noise, t))[1]
    scheduler.get_target = lambda x0, noise, t: (seen.__setitem__("target", noise), get_target(x0, noise, t))[1]
    latents = torch.zeros(B, C, H, W)
    tokens = torch.zeros(B, 16, dtype=torch.long)  # the text encoder's max_length
    torch.manual_seed(3)
    loss = system.diffusion_loss(latents, tokens)
    assert torch.isfinite(loss)
    return seen["input"], seen["target"], torch.randn(1)


def _draws(extra: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """What the generator at seed 3 gives for t, eps and the `extra` shapes, in that order, and one number after."""
    torch.manual_seed(3)
    torch.randint(0, 1000, (B,))
    return [torch.randn(B, C, H, W), *(torch.randn(s) for s in extra), torch.randn(1)]


def test_with_both_off_the_step_draws_what_it_always_drew():
    inp, target, after = _step_noises()
    eps, nxt = _draws([])
    assert torch.equal(inp, eps) and torch.equal(target, eps)
    assert torch.equal(after, nxt)  # nothing more drawn: the default run's stream is unchanged


def test_offset_noise_is_one_constant_per_sample_and_channel_in_input_and_target():
    inp, target, after = _step_noises(noise_offset=0.1)
    eps, offset, nxt = _draws([(B, C, 1, 1)])
    assert torch.equal(inp, target)  # the offset noise is the noise trained on: z_t and the target alike
    assert torch.allclose(inp, eps + 0.1 * offset)
    shift = inp - eps  # constant over each latent's pixels, different between samples and channels
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)
    assert shift[:, :, 0, 0].unique().numel() == B * C
    assert torch.equal(after, nxt)


def test_input_perturbation_moves_z_t_and_leaves_the_target():
    inp, target, after = _step_noises(input_perturbation=0.1)
    eps, xi, nxt = _draws([(B, C, H, W)])
    assert torch.equal(target, eps)
    assert torch.allclose(inp, eps + 0.1 * xi)
    assert torch.equal(after, nxt)


def test_both_the_offset_first_and_the_perturbation_on_the_offset_noise():
    inp, target, _ = _step_noises(noise_offset=0.05, input_perturbation=0.1)
    eps, offset, xi, _ = _draws([(B, C, 1, 1), (B, C, H, W)])
    assert torch.allclose(target, eps + 0.05 * offset)
    assert torch.allclose(inp, eps + 0.05 * offset + 0.1 * xi)


def test_the_stage_trains_with_them_and_logs_them(upstream, tmp_path):  # noqa: F811
    args = ("train.max_steps=2", "train.warmup_steps=0", "train.sample_every_n_steps=0", "train.val_batches=0")
    params = trains_otherwise(copy_project(upstream, tmp_path), args, "train.noise_offset=0.1",
                              "train.input_perturbation=0.1")
    assert (params["noise_offset"], params["input_perturbation"]) == ("0.1", "0.1")


@pytest.mark.parametrize("key", ["noise_offset", "input_perturbation"])
def test_a_negative_value_stops_the_stage_before_any_work(upstream, tmp_path, key):  # noqa: F811
    from diffusion.config import ConfigError

    root = copy_project(upstream, tmp_path)
    with pytest.raises(ConfigError, match=rf"{key}: .*>= 0"):
        train_in_process(root, f"train.{key}=-0.1")
    assert not (root / "checkpoints/train").exists() and not (root / "models/diffusion").exists()
