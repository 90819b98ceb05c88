"""Sampling: determinism across batch sizes, classifier-free guidance, the step callback, model mode;
the core sampler's explicit scheduler, null class and sample shape; the noise schedule and the sampler
settings of the embedded model; the embedded model's loaders."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from dqcompile import sampling as core
from dqcompile.fmnist import sample
from dqcompile.fmnist.classifier import load_classifier
from dqcompile.fmnist.dit import (
    FMNIST_DIT_CONFIG,
    FMNIST_SCHEDULER_CONFIG,
    NULL_CLASS_ID,
    build_fmnist_dit,
    load_embedded_model,
    make_scheduler,
)

# The embedded architecture, narrowed and shortened so that a CPU test samples in well under a second.
TINY_DIT_CONFIG = {**FMNIST_DIT_CONFIG, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8}


@pytest.fixture(scope="module")
def tiny_dit() -> nn.Module:
    torch.manual_seed(0)
    return build_fmnist_dit(TINY_DIT_CONFIG).eval()


class CallRecorder(nn.Module):
    """Wraps a model; records each call's class labels and whether the model was in train mode."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.label_batches: list[torch.Tensor] = []
        self.training_flags: list[bool] = []

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):
        assert timestep.shape == (x.shape[0],) and class_labels.shape == (x.shape[0],)
        self.label_batches.append(class_labels.clone())
        self.training_flags.append(self.model.training)
        return self.model(x, timestep=timestep, class_labels=class_labels)


class LabelEcho(nn.Module):
    """A stand-in model whose epsilon is its class label, everywhere: guidance arithmetic becomes visible."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device and dtype
        self.config = SimpleNamespace(in_channels=1, sample_size=32)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):
        eps = class_labels.to(x.dtype).view(-1, 1, 1, 1).expand_as(x) + self.anchor
        return SimpleNamespace(sample=eps)


def assert_same_up_to_rounding(a: torch.Tensor, b: torch.Tensor) -> None:
    difference = (a - b).abs()
    assert difference.max() < 1e-2 and difference.mean() < 1e-5, (difference.max(), difference.mean())


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_same_seed_same_images_whatever_the_batch_size(tiny_dit: nn.Module, scheduler: str) -> None:
    labels = torch.tensor([0, 3, 9, 3, 7])
    kwargs = dict(steps=4, scheduler=scheduler, guidance_scale=2.0, seed=11, progress=False)
    in_twos = sample(tiny_dit, labels, batch_size=2, **kwargs)
    in_threes = sample(tiny_dit, labels, batch_size=3, **kwargs)
    assert in_twos.shape == (5, 1, 32, 32) and in_twos.dtype == torch.float32
    # Batching changes only the matmul blocking, i.e. float rounding, not the noise. The first step
    # (t = 999, sqrt(alpha_bar) = 5e-5) divides the epsilon rounding error by sqrt(alpha_bar) before
    # clipping x0 to [-1, 1], so a rare pixel at the clip boundary may move by ~1e-3.
    assert_same_up_to_rounding(in_twos, in_threes)
    # The first image does not depend on which other images are sampled with it.
    alone = sample(tiny_dit, labels[:1], batch_size=1, **kwargs)
    assert_same_up_to_rounding(alone, in_twos[:1])
    other_seed = sample(tiny_dit, labels, batch_size=2, **{**kwargs, "seed": 12})
    assert (other_seed - in_twos).abs().mean() > 0.1


@pytest.mark.parametrize("guidance_scale", [None, 1.0, 0.5])
def test_no_guidance_runs_no_null_rows(tiny_dit: nn.Module, guidance_scale: float | None) -> None:
    recorder = CallRecorder(tiny_dit)
    labels = torch.tensor([1, 2, 3, 4, 5])
    images = sample(recorder, labels, steps=3, guidance_scale=guidance_scale, batch_size=2, progress=False)
    assert images.shape == (5, 1, 32, 32)
    assert len(recorder.label_batches) == 3 * 3  # 3 steps x batches of 2, 2, 1
    assert [len(b) for b in recorder.label_batches[:3]] == [2, 2, 1]
    assert all(not (b == NULL_CLASS_ID).any() for b in recorder.label_batches)


def test_guidance_runs_conditional_and_null_rows_in_one_call(tiny_dit: nn.Module) -> None:
    recorder = CallRecorder(tiny_dit)
    labels = torch.tensor([1, 2, 3])
    sample(recorder, labels, steps=2, guidance_scale=1.5, batch_size=2, progress=False)
    assert len(recorder.label_batches) == 2 * 2
    assert recorder.label_batches[0].tolist() == [1, 2, NULL_CLASS_ID, NULL_CLASS_ID]
    assert recorder.label_batches[1].tolist() == [3, NULL_CLASS_ID]


def test_callback_sees_the_guided_epsilon_of_every_image_once_per_step() -> None:
    model = LabelEcho()
    labels = torch.tensor([0, 4, 9])
    recorded: list[tuple[int, int, torch.Tensor]] = []
    sample(
        model,
        labels,
        steps=3,
        guidance_scale=3.0,
        batch_size=2,
        progress=False,
        callback=lambda step, t, output: recorded.append((step, t, output.clone())),
    )
    assert [step for step, _, _ in recorded] == [0, 1, 2]
    timesteps = [t for _, t, _ in recorded]
    assert timesteps == [666, 333, 0]  # leading spacing, the embedded config's
    for _, _, output in recorded:
        assert output.shape == (3, 1, 32, 32)
        # eps = eps_u + w (eps_c - eps_u) with eps_c = label, eps_u = the null label.
        expected = NULL_CLASS_ID + 3.0 * (labels.float() - NULL_CLASS_ID)
        assert torch.equal(output[:, 0, 0, 0], expected)


def test_sampling_uses_eval_mode_and_restores_the_mode(tiny_dit: nn.Module) -> None:
    recorder = CallRecorder(tiny_dit)
    tiny_dit.train()
    try:
        sample(recorder, torch.tensor([2]), steps=2, progress=False)
        assert recorder.training_flags == [False, False]
        assert tiny_dit.training
    finally:
        tiny_dit.eval()


def test_bad_arguments_are_refused(tiny_dit: nn.Module) -> None:
    with pytest.raises(ValueError, match="ddim"):
        sample(tiny_dit, torch.tensor([0]), steps=2, scheduler="euler", progress=False)
    with pytest.raises(ValueError, match="empty"):
        sample(tiny_dit, torch.tensor([], dtype=torch.long), steps=2, progress=False)


def test_schedulers_follow_the_embedded_config() -> None:
    ddim, ddpm = make_scheduler("ddim"), make_scheduler("ddpm")
    assert isinstance(ddim, DDIMScheduler) and isinstance(ddpm, DDPMScheduler)
    for scheduler in (ddim, ddpm):
        assert scheduler.config.beta_schedule == FMNIST_SCHEDULER_CONFIG["beta_schedule"]
        assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"
    ddim.set_timesteps(20)
    assert ddim.timesteps[0] == 950 and ddim.timesteps[-1] == 0  # leading: no step at t = 999 (docs/quality.md)


def test_missing_checkpoint_error_says_how_to_train(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train_fmnist_dit.py"):
        load_embedded_model(directory=tmp_path)
    with pytest.raises(FileNotFoundError, match="train_fmnist_classifier.py"):
        load_classifier(directory=tmp_path)


def test_sampler_settings_are_arguments() -> None:
    assert make_scheduler("ddim").config.clip_sample is FMNIST_SCHEDULER_CONFIG["clip_sample"]
    clipped = make_scheduler("ddim", clip_sample=True, timestep_spacing="trailing")
    assert clipped.config.clip_sample is True and clipped.config.timestep_spacing == "trailing"
    assert clipped.config.beta_schedule == FMNIST_SCHEDULER_CONFIG["beta_schedule"]  # the schedule stays
    assert make_scheduler("ddpm", clip_sample=False).config.clip_sample is False


def test_clip_sample_changes_the_images(tiny_dit: nn.Module) -> None:
    labels = torch.tensor([1, 8])
    kwargs = dict(steps=3, guidance_scale=4.0, seed=0, progress=False)
    clipped = sample(tiny_dit, labels, clip_sample=True, **kwargs)
    unclipped = sample(tiny_dit, labels, clip_sample=False, **kwargs)
    assert clipped.abs().max() <= 1.0 + 1e-5 < unclipped.abs().max()
    with pytest.raises(ValueError, match="not with a scheduler instance"):
        sample(tiny_dit, labels, scheduler=make_scheduler("ddim"), clip_sample=False, **kwargs)


def test_core_sampler_takes_scheduler_null_class_and_shape_as_arguments(tiny_dit: nn.Module) -> None:
    labels = torch.tensor([0, 3, 9])
    kwargs = dict(steps=3, guidance_scale=2.0, seed=5, batch_size=2, progress=False)
    wrapped = sample(tiny_dit, labels, **kwargs)
    direct = core.sample(tiny_dit, labels, scheduler=make_scheduler("ddim"), null_class_id=NULL_CLASS_ID, **kwargs)
    assert torch.equal(wrapped, direct)
    # A scheduler config works too, and the caller's scheduler instance is not changed by sampling.
    instance = make_scheduler("ddim")
    core.sample(tiny_dit, labels[:1], scheduler=instance, null_class_id=NULL_CLASS_ID, steps=2, progress=False)
    assert instance.num_inference_steps is None
    from_config = core.sample(tiny_dit, labels, scheduler=dict(make_scheduler("ddim").config),
                              null_class_id=NULL_CLASS_ID, **kwargs)
    assert torch.equal(from_config, direct)
    recorder = CallRecorder(tiny_dit)
    core.sample(recorder, labels[:1], scheduler=make_scheduler("ddim"), null_class_id=7, steps=1,
                guidance_scale=2.0, progress=False)
    assert recorder.label_batches[0].tolist() == [0, 7]
    echo = LabelEcho()
    del echo.config
    with pytest.raises(ValueError, match=r"pass sample_shape=\(C, H, W\)"):
        core.sample(echo, labels, scheduler=make_scheduler("ddim"), null_class_id=10, steps=1, progress=False)
    shaped = core.sample(echo, labels, scheduler=make_scheduler("ddim"), null_class_id=10, steps=1,
                         sample_shape=(2, 4, 6), progress=False)
    assert shaped.shape == (3, 2, 4, 6)
