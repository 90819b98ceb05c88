"""Legal but unusual models and calls: tied and bare weights, other timestep dtypes, other shapes,
pickling, calibration in other forms, re-quantizing. Each either works as the float model does or is
refused in one sentence that names the argument, layer or sample and says what to do."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dqcompile
from tiny_models import dit_inputs, rel_l2, tiny_dit


class TiedHead(nn.Module):
    """A language-model-style head whose weight is the embedding's."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)))


class BareWeight(nn.Module):
    """F.linear with a parameter that belongs to no nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 16)  # the first linear on the input: kept float by its role
        self.w = nn.Parameter(torch.randn(16, 16) / 4)
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.linear(self.inp(x), self.w))


@pytest.fixture(scope="module")
def dit():
    model = tiny_dit()
    return model, dqcompile.quantize(model, "w8a8", progress=False)


def test_a_tied_weight_stays_float_with_the_reason():
    model = TiedHead().eval()
    ids = torch.randint(0, 10, (2, 5))
    qmodel = dqcompile.quantize(model, "w8a8", example_inputs=(ids,), progress=False)
    rows = {row.name: row for row in qmodel.report.layers}
    assert rows["body"].weights == "int8 per channel"
    assert rows["head"].weights == "float" and rows["head"].note == "weight also read by aten.embedding.default: kept in float"
    with torch.no_grad():
        assert rel_l2(qmodel(ids), model(ids)) < 0.05


def test_a_bare_weight_parameter_is_quantized_and_saved(tmp_path):
    model = BareWeight().eval()
    x = torch.randn(2, 4, 16)
    qmodel = dqcompile.quantize(model, "w8a8", example_inputs=(x,), progress=False)
    assert {row.name for row in qmodel.report.layers if row.weights != "float"} == {"w", "out"}
    assert qmodel.graph_module.w_qweight.dtype == torch.int8 and not hasattr(qmodel.graph_module, "w")
    dqcompile.save(qmodel, tmp_path / "q")
    loaded = dqcompile.load(tmp_path / "q", model=BareWeight())
    with torch.no_grad():
        assert rel_l2(qmodel(x), model(x)) < 0.05
        assert torch.equal(loaded(x), qmodel(x))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.float32, torch.float64])
def test_timesteps_of_other_dtypes_give_the_same_output(dit, dtype):
    model, qmodel = dit
    inputs = dit_inputs(3)
    with torch.no_grad():
        expected = qmodel(**inputs).sample
        assert torch.equal(qmodel(**{**inputs, "timestep": inputs["timestep"].to(dtype)}).sample, expected)


def test_fractional_timesteps_into_an_integer_capture_are_refused(dit):
    _, qmodel = dit
    inputs = dit_inputs(2)
    with pytest.raises(ValueError, match=r"input timestep holds fractional values \(torch\.float32\) but the model was "
                                         r"captured with torch\.int64 timestep: quantize with example inputs"):
        qmodel(**{**inputs, "timestep": inputs["timestep"].float() + 0.5})


def test_another_spatial_size_is_refused_with_the_captured_shape(dit):
    _, qmodel = dit
    inputs = {**dit_inputs(2), "hidden_states": torch.randn(2, 4, 16, 16)}
    with pytest.raises(ValueError, match=r"input hidden_states has shape \(2, 4, 16, 16\); the model was captured at "
                                         r"\(B, 4, 8, 8\) \(B: any batch\): quantize with example_inputs of this shape"):
        qmodel(**inputs)


def test_pickling_points_to_save_and_deepcopy_works(dit):
    _, qmodel = dit
    with pytest.raises(TypeError, match=r"cannot be pickled .* dqcompile\.save\(qmodel, folder\)"):
        torch.save(qmodel, io.BytesIO())
    clone = copy.deepcopy(qmodel)
    inputs = dit_inputs(2)
    with torch.no_grad():
        assert torch.equal(clone(**inputs).sample, qmodel(**inputs).sample)


def test_calibration_in_other_forms(dit):
    model, _ = dit
    sample = dit_inputs(2)
    positional = [(sample["hidden_states"], sample["timestep"], sample["class_labels"])]
    qmodel = dqcompile.quantize(model, "ptq4dit-w8a8", calibration=positional, progress=False)
    assert qmodel.report.quantized_count == 12
    with pytest.raises(ValueError, match=r"calibration must be a list of samples.*got a single dict \(wrap one sample in a list\)"):
        dqcompile.quantize(model, "ptq4dit-w8a8", calibration=sample, progress=False)
    with pytest.raises(ValueError, match=r"got a single Tensor"):
        dqcompile.quantize(model, "ptq4dit-w8a8", calibration=sample["hidden_states"], progress=False)
    with pytest.raises(ValueError, match=r"calibration sample 0: 8 positional inputs do not fit DiTTransformer2DModel\.forward"):
        dqcompile.quantize(model, "ptq4dit-w8a8", calibration=[(1,) * 8], progress=False)
    mismatched = [sample, {**dit_inputs(2), "hidden_states": torch.randn(2, 4, 4, 4)}]
    with pytest.raises(ValueError, match=r"calibration sample 1 does not fit the model as it was captured"):
        dqcompile.quantize(model, "ptq4dit-w8a8", calibration=mismatched, progress=False)


def test_quantizing_a_quantized_model_is_refused(dit):
    _, qmodel = dit
    with pytest.raises(ValueError, match=r"the model is already quantized \(w8a8\); quantize the float model"):
        dqcompile.quantize(qmodel, "w8a8")
