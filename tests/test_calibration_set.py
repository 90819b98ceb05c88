"""calibration_set: inputs recorded from the float model's own guided sampling trajectories."""

import pytest
import torch
from diffusers import DDIMScheduler

import dqcompile
from dqcompile.calib.runner import timestep_key
from tiny_models import hand_dit, tiny_dit, tiny_pixart


@pytest.fixture(scope="module")
def model():
    return tiny_dit()


@pytest.fixture(scope="module")
def ddim_every_step(model):
    return dqcompile.calibration_set(
        model, num_timesteps=6, samples_per_timestep=10, num_inference_steps=6, scheduler="ddim",
        guidance_scale=2.0, seed=3, progress=False,
    )


def test_batches_hold_one_timestep_balanced_classes_and_null_rows(model):
    calibration = dqcompile.calibration_set(
        model, num_timesteps=3, samples_per_timestep=20, num_inference_steps=9, seed=0, progress=False
    )
    assert len(calibration) == 3 and len(list(calibration)) == 3
    # DDPM over 1000 training steps, 9 steps (leading spacing): 888, 777, ..., 0; steps 0, 4 and 8 are kept.
    assert calibration.timesteps == [888, 444, 0]
    for batch, t in zip(calibration, calibration.timesteps):
        assert set(batch) == {"hidden_states", "timestep", "class_labels"}
        assert batch["hidden_states"].shape == (40, 4, 8, 8) and torch.isfinite(batch["hidden_states"]).all()
        assert torch.equal(batch["timestep"], torch.full((40,), t)) and timestep_key(batch) == t
        conditional, null = batch["class_labels"].chunk(2)
        assert torch.bincount(conditional, minlength=10).tolist() == [2] * 10  # 20 samples over 10 classes
        assert torch.equal(null, torch.full((20,), 10))  # diffusers DiT: the null class is num_embeds_ada_norm
        assert torch.equal(*batch["hidden_states"].chunk(2))  # the same x_t for both rows of a sample


def test_records_follow_the_models_own_guided_trajectory(model, ddim_every_step):
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(6)
    assert ddim_every_step.timesteps == scheduler.timesteps.tolist()
    with torch.no_grad():
        for step in range(5):
            batch = ddim_every_step[step]
            conditional, unconditional = model(**batch).sample[:, :4].chunk(2)
            eps = unconditional + 2.0 * (conditional - unconditional)
            x_t = batch["hidden_states"][:10]
            expected = scheduler.step(eps, ddim_every_step.timesteps[step], x_t).prev_sample
            assert torch.allclose(ddim_every_step[step + 1]["hidden_states"][:10], expected, atol=1e-5)


def test_seeded(model, ddim_every_step):
    def first_inputs(seed):
        return dqcompile.calibration_set(
            model, num_timesteps=1, samples_per_timestep=10, num_inference_steps=6, scheduler="ddim",
            guidance_scale=2.0, seed=seed, progress=False,
        )[0]["hidden_states"]

    assert torch.equal(first_inputs(3), ddim_every_step[0]["hidden_states"])
    assert not torch.equal(first_inputs(4), ddim_every_step[0]["hidden_states"])


def test_without_guidance_there_are_no_null_rows(model):
    calibration = dqcompile.calibration_set(
        model, num_timesteps=2, samples_per_timestep=5, num_inference_steps=4, guidance_scale=None, progress=False
    )
    assert calibration[0]["class_labels"].tolist() == [0, 1, 2, 3, 4]


def test_other_forwards_and_clear_errors():
    calibration = dqcompile.calibration_set(
        hand_dit(), num_timesteps=2, samples_per_timestep=4, num_inference_steps=4, num_classes=10,
        sample_shape=(4, 8, 8), progress=False,
    )
    assert set(calibration[0]) == {"x", "t", "y"} and calibration[0]["x"].shape == (8, 4, 8, 8)
    with pytest.raises(ValueError, match=r"pass make_inputs=.*PixArt and SD3 need their encoder states"):
        dqcompile.calibration_set(tiny_pixart(), progress=False)
    with pytest.raises(ValueError, match=r"pass sample_shape=\(C, H, W\)"):
        dqcompile.calibration_set(hand_dit(), num_classes=10, progress=False)
    with pytest.raises(ValueError, match="num_timesteps=30 must be between 1 and num_inference_steps=20"):
        dqcompile.calibration_set(tiny_dit(), num_timesteps=30, num_inference_steps=20, progress=False)
    with pytest.raises(ValueError, match="scheduler='euler' is not allowed"):
        dqcompile.calibration_set(tiny_dit(), scheduler="euler", progress=False)


def test_make_inputs_serves_text_conditioned_models():
    model = tiny_pixart()
    captions = torch.randn(11, 8, 24)  # one caption embedding per class, the last for the null class

    def make_inputs(sample, timestep, class_labels):
        return {"hidden_states": sample, "timestep": timestep, "encoder_hidden_states": captions[class_labels],
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

    calibration = dqcompile.calibration_set(
        model, num_timesteps=2, samples_per_timestep=3, num_inference_steps=3, num_classes=10,
        make_inputs=make_inputs, progress=False,
    )
    assert calibration[1]["encoder_hidden_states"].shape == (6, 8, 24)
    assert torch.equal(calibration[1]["encoder_hidden_states"][3:], captions[[10, 10, 10]])
