"""A fourth method is one registration: options, passes and a preset declared in this file alone.

The method here ("shrink") clips every static activation range to a fraction of what calibration saw:
its options class, its calibrate pass (which only fills plans in) and its preset are registered
through dqcompile.methods, and quantize, the spec's validation, from_dict, save and load reach it
through that registry, with no edit anywhere in dqcompile.
"""

from dataclasses import dataclass

import pytest
import torch

import dqcompile
from dqcompile import ActivationSpec, Method, QuantSpec, WeightSpec, register_method, register_preset
from dqcompile.quant import compute_qparams
from dqcompile.spec import check_field_types
from tiny_models import dit_inputs, rel_l2, tiny_dit


@dataclass(frozen=True)
class ShrinkOptions:
    ratio: float = 0.5

    def __post_init__(self) -> None:
        check_field_types(self, "options.")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"options.ratio={self.ratio!r} must be in (0, 1]")


def shrink_ranges(gm, ctx) -> None:
    """Needs: the calibration run (ctx.input_stats of the static layers). Guarantees: every static
    activation plan holds parameters for its calibrated range times options.ratio."""
    for layer in ctx.plan.quantized_layers():
        stats = ctx.input_stats[layer.name].values()
        low = min(float(s.minimum.min()) for s in stats) * ctx.spec.options.ratio
        high = max(float(s.maximum.max()) for s in stats) * ctx.spec.options.ratio
        qparams = compute_qparams(torch.tensor([low, high]), layer.activations.bits, symmetric=False, granularity="tensor")
        layer.activations.set_tensors(scale=qparams.scale.reshape(1), zero=qparams.zero.reshape(1).to(torch.int32))
        layer.notes.append(f"range shrunk to {ctx.spec.options.ratio:g}")


def _static_only(spec: QuantSpec) -> None:
    if spec.activations.mode != "static_tensor":
        raise ValueError("method='shrink' needs activations.mode='static_tensor'")


register_method(Method(name="shrink", options=ShrinkOptions, calibrate=(shrink_ranges,), check=_static_only,
                       needs_calibration=lambda spec: True))
register_preset(QuantSpec(weights=WeightSpec(bits=8), activations=ActivationSpec(mode="static_tensor"),
                          method="shrink", name="shrink-w8a8"))

CALIBRATION = [dit_inputs(batch=2, seed=seed) for seed in range(3)]


def test_the_registered_method_quantizes_saves_and_loads(tmp_path):
    model = tiny_dit()
    qmodel = dqcompile.quantize(model, "shrink-w8a8", calibration=CALIBRATION, progress=False)
    static = QuantSpec.from_preset("w8a8").replace(activations=ActivationSpec(mode="static_tensor"))
    baseline = dqcompile.quantize(model, static, calibration=CALIBRATION, progress=False)
    layer = "transformer_blocks.0.attn1.to_q"
    shrunk, full = (q.plan.layers[layer].activations.tensors["scale"] for q in (qmodel, baseline))
    # Half the range, half the step (to float rounding of the range's ends).
    assert torch.allclose(shrunk, full * 0.5, rtol=1e-5)
    assert {row.name: row.note for row in qmodel.report.layers}[layer] == "range shrunk to 0.5"
    inputs = dit_inputs(batch=3, seed=9)
    with torch.no_grad():
        out = qmodel(**inputs).sample
        assert rel_l2(out, model(**inputs).sample) < 0.5  # it runs; clipping half the range costs accuracy
        dqcompile.save(qmodel, tmp_path / "q")
        loaded = dqcompile.load(tmp_path / "q")
        assert loaded.spec == qmodel.spec and loaded.spec.options == ShrinkOptions(0.5)
        assert torch.equal(loaded(**inputs).sample, out)


def test_the_spec_validates_the_method_through_the_registry():
    spec = QuantSpec.from_preset("shrink-w8a8")
    assert spec.needs_calibration and spec.options == ShrinkOptions()
    assert QuantSpec.from_dict(spec.replace(options=ShrinkOptions(0.25)).to_dict()).options.ratio == 0.25
    with pytest.raises(ValueError, match=r"options of method='shrink' must be a ShrinkOptions, got dict"):
        spec.replace(options={"ratio": 0.25})
    with pytest.raises(ValueError, match=r"options\.ratio='half' is not allowed: expected float, got str"):
        ShrinkOptions(ratio="half")
    with pytest.raises(ValueError, match="method='shrink' needs activations.mode='static_tensor'"):
        spec.replace(activations=ActivationSpec(mode="dynamic_token"))
    with pytest.raises(ValueError, match="a method named 'shrink' is already registered"):
        register_method(Method(name="shrink"))
    with pytest.raises(ValueError, match=r"method='shrnk' is not allowed; allowed values: .*'shrink'"):
        QuantSpec(method="shrnk")
