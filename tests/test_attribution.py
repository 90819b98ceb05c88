"""Per-layer attribution (dqcompile.viz.errors): each layer's error split into its weight part and its
activation part, which add up to the layer's error; shown in the error tables and the graph view."""

import csv
import io
import math

import pytest
import torch
import torch.nn.functional as F

import dqcompile
from dqcompile.capture import capture
from dqcompile.quant import QuantizedWeight
from dqcompile.viz import build_graph_view, format_layer_errors, layer_errors
from dqcompile.viz.html import page
from tiny_models import dit_inputs, layer_inputs_and_outputs, tiny_dit

INPUTS = [dit_inputs(batch=4, seed=seed) for seed in range(2)]


@pytest.fixture(scope="module")
def dit():
    model = tiny_dit()
    captured = capture(model, INPUTS[0])
    quantized = {spec: dqcompile.quantize(model, spec, progress=False) for spec in ("w4a8", "w8a16", "w8a8")}
    errors = {spec: layer_errors(captured, q, INPUTS, progress=False) for spec, q in quantized.items()}
    return {"model": model, "captured": captured, "q": quantized, "errors": errors}


def test_the_split_is_the_weight_only_layer_and_the_rest(dit):
    """to_q of block 0 by hand: the float input and output (forward hooks), the weight-only output from
    the plan's codes and scales, and the integer layer: the two parts are what the table reports."""
    model, qmodel = dit["model"], dit["q"]["w4a8"]
    name = "transformer_blocks.0.attn1.to_q"
    seen = layer_inputs_and_outputs(model, name, INPUTS)
    plan = qmodel.plan.layers[name]
    w_hat = QuantizedWeight(plan.weight.qweight, plan.weight.scale, 4, 0).dequantize()
    layer = qmodel.graph_module.get_submodule(name)
    ops = torch.ops.dqcompile
    signal = weight_noise = activation_noise = noise = 0.0
    for x, y in seen:
        qx, scale, zero = ops.quantize_act(x, 8, 0, False)
        y_q = ops.int_linear(qx, scale, zero, layer.qweight, layer.weight_scale, layer.bias, 4, 0, torch.float32)
        y_w = F.linear(x, w_hat, layer.bias)
        signal += float(y.square().sum())
        noise += float((y_q - y).square().sum())
        weight_noise += float((y_w - y).square().sum())
        activation_noise += float((y_q - y_w).square().sum())
    error = {e.name: e for e in dit["errors"]["w4a8"]}[name]
    assert error.signal == pytest.approx(signal, rel=1e-6) and error.noise == pytest.approx(noise, rel=1e-6)
    assert error.weight_noise == pytest.approx(weight_noise, rel=1e-5)
    assert error.activation_noise == pytest.approx(activation_noise, rel=1e-5)
    assert error.weight_sqnr_db == pytest.approx(10 * math.log10(signal / weight_noise), abs=1e-3)


def test_the_parts_add_up_to_the_layer_error(dit):
    for spec, errors in dit["errors"].items():
        assert len(errors) == 12
        for e in errors:
            # e_w + e_a is the layer's error exactly: the powers add up to it with the cross term.
            assert e.weight_noise + e.activation_noise + e.cross == pytest.approx(e.noise, rel=1e-9)
            # Weight and activation errors are unrelated here: the cross term is a small share (measured:
            # at most 2.5% of the noise, on w8a8's layers; 0.3% at w4a8; 0 for weight-only w8a16).
            assert abs(e.cross) < 0.05 * e.noise, (spec, e.name)
            # Neither part alone is worse than the whole (up to the small cross term).
            assert min(e.weight_sqnr_db, e.activation_sqnr_db) > e.sqnr_db - 1.0, (spec, e.name)


def test_weight_only_layers_have_no_activation_error(dit):
    for e in dit["errors"]["w8a16"]:
        assert e.activation_noise == pytest.approx(0.0, abs=1e-12 * e.signal)
        assert e.weight_noise == pytest.approx(e.noise, rel=1e-6)
        assert e.weight_sqnr_db == pytest.approx(e.sqnr_db, abs=1e-4)


def test_the_split_ranks_the_sources(dit):
    """4-bit weights dominate w4a8's error (measured: 22-27 dB against 45-48 dB), 8-bit per-token
    activations w8a8's (45-48 dB against 48-51 dB); the weight part moves with the weight bits, the
    activation part does not (within 0.1 dB here)."""
    w4 = {e.name: e for e in dit["errors"]["w4a8"]}
    w8 = {e.name: e for e in dit["errors"]["w8a8"]}
    for name in w4:
        assert w4[name].weight_sqnr_db < w4[name].activation_sqnr_db - 15, name
        assert w8[name].weight_sqnr_db > w8[name].activation_sqnr_db, name
        assert w8[name].weight_sqnr_db > w4[name].weight_sqnr_db + 20, name  # 4 more bits: about 24 dB
        assert w8[name].activation_sqnr_db == pytest.approx(w4[name].activation_sqnr_db, abs=1.0), name


def test_tables_and_graph_view_show_the_split(dit, tmp_path):
    errors = dit["errors"]["w4a8"]
    rows = list(csv.DictReader(io.StringIO(format_layer_errors(errors, fmt="csv"))))
    by_name = {e.name: e for e in errors}
    for row in rows:
        assert float(row["weight_sqnr_db"]) == pytest.approx(by_name[row["layer"]].weight_sqnr_db, abs=1e-3)
        assert float(row["activation_sqnr_db"]) == pytest.approx(by_name[row["layer"]].activation_sqnr_db, abs=1e-3)
    text = format_layer_errors(errors)
    assert "weights dB" in text.splitlines()[1] and "activations dB" in text.splitlines()[1]
    entry = by_name["transformer_blocks.1.ff.net.2"].to_dict()
    assert entry["weight_sqnr_db"] == pytest.approx(by_name["transformer_blocks.1.ff.net.2"].weight_sqnr_db)
    view = build_graph_view(dit["q"]["w4a8"].graph_module, errors=errors)
    layer = view.layer("transformer_blocks.0.attn1.to_k")
    assert layer.weight_sqnr_db == pytest.approx(by_name[layer.name].weight_sqnr_db)
    assert layer.activation_sqnr_db == pytest.approx(by_name[layer.name].activation_sqnr_db)
    data = view.to_json()["layers"]
    assert all(len(entry) == 10 for entry in data)
    html = page(view)
    assert "weights alone dB" in html and "activations alone" in html
    # Without the split, nothing of it is drawn.
    plain = layer_errors(dit["captured"], dit["q"]["w4a8"], INPUTS[:1], split=False, progress=False)
    assert all(e.weight_noise is None and math.isnan(e.weight_sqnr_db) for e in plain)
    assert "weights alone dB" not in page(build_graph_view(dit["q"]["w4a8"].graph_module, errors=plain))
