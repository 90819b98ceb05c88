"""Capture: graphs of diffusers DiT, PixArt, SD3 and a hand-written DiT reproduce the model exactly."""

import pytest
import torch

import dqcompile
from dqcompile.example_inputs import default_example_inputs
from tiny_models import hand_dit, hand_dit_inputs, tiny_dit, tiny_pixart, tiny_sd3


def _with_batch(inputs: dict, batch: int, seed: int = 5) -> dict:
    generator = torch.Generator().manual_seed(seed)
    resized = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            resized[name] = torch.randn(batch, *value.shape[1:], generator=generator)
        elif isinstance(value, torch.Tensor):
            resized[name] = torch.randint(0, 10, (batch,), generator=generator)
        else:
            resized[name] = value
    return resized


@pytest.mark.parametrize("build", [tiny_dit, tiny_pixart, tiny_sd3], ids=["dit", "pixart", "sd3"])
def test_diffusers_graph_matches_model_at_another_batch(build):
    model = build()
    captured = dqcompile.capture(model, default_example_inputs(model))
    inputs = _with_batch(default_example_inputs(model), batch=3)
    graph_inputs, _ = captured.binding.graph_kwargs((), inputs)
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
        got = captured.graph_module(**graph_inputs)[0]
    assert got.shape[0] == 3
    assert torch.equal(got, expected)


def test_hand_written_dit_positional_inputs():
    model = hand_dit()
    captured = dqcompile.capture(model, hand_dit_inputs(batch=2))
    x, t, y = hand_dit_inputs(batch=5, seed=9)
    graph_inputs, _ = captured.binding.graph_kwargs((x, t, y), {})
    with torch.no_grad():
        assert torch.equal(captured.graph_module(**graph_inputs), model(x, t, y))


def test_parameters_keep_names_and_nodes_keep_module_paths():
    model = tiny_dit()
    captured = dqcompile.capture(model, default_example_inputs(model))
    graph_params = dict(captured.graph_module.named_parameters())
    assert set(graph_params) == {name for name, _ in model.named_parameters()}
    linears = [n for n in captured.graph_module.graph.nodes if n.target == torch.ops.aten.linear.default]
    paths = {list(n.meta["nn_module_stack"].values())[-1][0] for n in linears}
    assert "transformer_blocks.0.attn1.to_q" in paths


def test_capture_restores_training_mode_and_copies_on_request():
    model = tiny_dit().train()
    captured = dqcompile.capture(model, default_example_inputs(model), copy_parameters=True)
    assert model.training
    name = "transformer_blocks.0.attn1.to_q.weight"
    assert captured.graph_module.get_parameter(name).data_ptr() != model.get_parameter(name).data_ptr()


def test_capture_refuses_batch_of_one():
    model = tiny_dit()
    inputs = _with_batch(default_example_inputs(model), batch=1)
    with pytest.raises(ValueError, match="batch size of at least 2"):
        dqcompile.capture(model, inputs)
