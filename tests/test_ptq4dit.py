"""PTQ4DiT: CSB / SSC math, the exact fold on every model family, and quantize() with the presets."""

import math

import pytest
import torch

import dqcompile
from dqcompile import AdaLNPair, QuantSpec
from dqcompile.calib.probes import ChannelStats
from dqcompile.example_inputs import default_example_inputs
from dqcompile.methods.ptq4dit import PTQ4DiTOptions, balanced_layers
from dqcompile.methods.ptq4dit.balance import (
    BALANCES,
    PAIRS,
    Balance,
    activation_salience,
    balancing_vector,
    find_balance_pairs,
    pair_key,
    salience_balance,
    spearman_weights,
)
from dqcompile.methods.ptq4dit.fold import fold_balancing
from dqcompile.passes.context import PassContext
from dqcompile.passes.lower import apply_edits
from dqcompile.passes.pipeline import calibrate
from dqcompile.passes.plan_layers import plan_layers
from dqcompile.quant import fake_quantize
from tiny_models import hand_dit, hand_dit_inputs, rel_l2, tiny_dit, tiny_pixart, tiny_sd3



def dit_inputs(batch: int, seed: int = 3, timestep: int | None = None) -> dict:
    generator = torch.Generator().manual_seed(seed)
    t = torch.full((batch,), timestep) if timestep is not None else torch.randint(0, 1000, (batch,), generator=generator)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": t,
        "class_labels": torch.randint(0, 10, (batch,), generator=generator),
    }


# ---------------------------------------------------------------------------------------------- math


def test_balancing_gives_both_sides_the_geometric_mean_salience():
    x_salience = torch.tensor([8.0, 0.5, 2.0, 0.0])
    w_salience = torch.tensor([0.5, 2.0, 2.0, 1.0])
    b = balancing_vector(x_salience, w_salience)
    assert torch.allclose(b[:3], torch.tensor([4.0, 0.5, 1.0]))
    assert b[3] == 1.0  # a channel that never carries activation is left alone
    assert torch.allclose(x_salience[:3] / b[:3], (x_salience * w_salience)[:3].sqrt())
    assert torch.allclose(w_salience[:3] * b[:3], (x_salience * w_salience)[:3].sqrt())


def test_balancing_reduces_the_error_of_complementary_outliers():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=generator)
    w = torch.randn(32, 64, generator=generator) * 0.05
    x[:, 3] *= 40.0  # an activation outlier channel ...
    w[:, 7] *= 40.0  # ... and a different weight outlier channel
    b = balancing_vector(x.abs().amax(0), w.abs().amax(0))

    def error(x_in, w_in):
        x_hat = fake_quantize(x_in, 8, symmetric=False, granularity="tensor")
        w_hat = fake_quantize(w_in, 4, symmetric=True, granularity="channel")
        return rel_l2(x_hat @ w_hat.T, x @ w.T)

    assert error(x / b, w * b) < 0.5 * error(x, w)


def test_spearman_weights_favour_timesteps_where_extremes_do_not_coincide():
    w_salience = torch.tensor([1.0, 2.0, 3.0, 4.0])
    per_t = {999.0: torch.tensor([1.0, 2.0, 3.0, 4.0]), 500.0: torch.tensor([4.0, 3.0, 2.0, 1.0]),
             0.0: torch.ones(4)}
    rho, eta = spearman_weights(per_t, w_salience)
    assert rho == {999.0: pytest.approx(1.0), 500.0: pytest.approx(-1.0), 0.0: 0.0}  # constant: no ranking
    norm = math.exp(-1) + math.exp(1) + 1
    assert eta == {999.0: pytest.approx(math.exp(-1) / norm), 500.0: pytest.approx(math.exp(1) / norm),
                   0.0: pytest.approx(1 / norm)}


def test_activation_salience_of_a_shared_input_is_the_max_over_its_readers():
    def stats(values):
        s = ChannelStats.empty(3, torch.device("cpu"))
        s.update(torch.tensor([values]))
        return s

    per_t = activation_salience([{1.0: stats([1.0, -5.0, 2.0])}, {1.0: stats([3.0, 1.0, 0.0]), 2.0: stats([1, 1, 1.0])}])
    assert per_t[1.0].tolist() == [3.0, 5.0, 2.0] and per_t[2.0].tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------- fold


def prepared(model, example_inputs, spec="ptq4dit-w8a8", calibration=None):
    """A captured graph (own parameters) with its pairs analysed: what the pipeline has before calibration."""
    captured = dqcompile.capture(model, example_inputs, copy_parameters=True)
    ctx = PassContext(spec=QuantSpec.resolve(spec), binding=captured.binding, calibration=calibration, progress=False)
    plan_layers(captured.graph_module, ctx)
    find_balance_pairs(captured.graph_module, ctx)
    return captured, ctx


def fold_into_graph(captured, ctx):
    """Fold the balancing vectors and apply the plan's float-graph edits, as the lowering does."""
    fold_balancing(captured.graph_module, ctx)
    _register_edit_buffers(captured.graph_module, ctx.plan)
    apply_edits(captured.graph_module, ctx.plan)
    captured.graph_module.recompile()


def _register_edit_buffers(gm, plan):
    for edit in plan.edits:
        owner, _, leaf = edit.buffer.rpartition(".")
        gm.get_submodule(owner).register_buffer(leaf, edit.tensor)


def graph_output(captured, inputs):
    kwargs, _ = captured.binding.graph_kwargs((), dict(inputs))
    out = captured.graph_module(**kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def model_output(model, inputs):
    out = model(**inputs)
    return out.sample if hasattr(out, "sample") else out


FAMILIES = {
    "dit": (tiny_dit, lambda m: default_example_inputs(m, batch=3)),
    "pixart": (tiny_pixart, lambda m: default_example_inputs(m, batch=3)),
    "sd3": (tiny_sd3, lambda m: default_example_inputs(m, batch=3)),
    "hand": (hand_dit, lambda m: dict(zip(("x", "t", "y"), hand_dit_inputs(3)))),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_of_random_balancing_is_exact_in_float32(family):
    build, make_inputs = FAMILIES[family]
    model = build()
    inputs = make_inputs(model)
    captured, ctx = prepared(model, inputs)
    pairs = ctx.annotations[PAIRS]
    assert any(isinstance(p, AdaLNPair) for p in pairs) and any(not isinstance(p, AdaLNPair) for p in pairs)
    generator = torch.Generator().manual_seed(1)
    # Vectors over two orders of magnitude, so that a wrong row, chunk or sign would show.
    layers = ctx.plan.layers
    ctx.annotations[BALANCES] = {
        pair_key(p): Balance(4.0 ** (2 * torch.rand(layers[balanced_layers(p)[0]].in_features, generator=generator) - 1), {}, {})
        for p in pairs
    }
    nodes_before = len(captured.graph_module.graph.nodes)
    fold_into_graph(captured, ctx)
    with torch.no_grad():
        folded, reference = graph_output(captured, inputs), model_output(model, inputs)
    # float32 rounding of a 2-block model with rescaled weights: ~1e-7 per op, well under 1e-5.
    assert rel_l2(folded, reference) < 1e-5
    assert len(captured.graph_module.graph.nodes) <= nodes_before
    fresh = build()
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), f"the user's model changed: {name}"
    consumer = balanced_layers(pairs[0])[0]
    assert not torch.equal(captured.graph_module.get_parameter(f"{consumer}.weight"), model.get_parameter(f"{consumer}.weight"))


def test_pixart_fold_rewrites_the_table_add_as_one_addcmul():
    model = tiny_pixart()
    inputs = default_example_inputs(model, batch=2)
    captured, ctx = prepared(model, inputs)
    ctx.annotations[BALANCES] = {pair_key(p): Balance(torch.full((32,), 2.0), {}, {}) for p in ctx.annotations[PAIRS]}
    fold_into_graph(captured, ctx)
    gm = captured.graph_module
    addcmuls = [n for n in gm.graph.nodes if n.target == torch.ops.aten.addcmul.default]
    assert len(addcmuls) == 2  # one per block; the final layer's proj_out stays float, so it is not balanced
    u = gm.get_buffer("transformer_blocks.0.scale_shift_table_embedding_scale")
    # chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; 1/b on shift and scale
    assert u[:, 0].tolist() == [0.5, 0.5, 1.0, 0.5, 0.5, 1.0]
    table, original = gm.get_parameter("transformer_blocks.0.scale_shift_table"), model.transformer_blocks[0].scale_shift_table
    assert torch.allclose(table[1], (1 + original[1]) / 2 - 1) and torch.allclose(table[0], original[0] / 2)
    assert torch.equal(table[2], original[2])


def test_balanced_statistics_are_those_of_the_folded_graph():
    model = tiny_dit()
    calibration = [dit_inputs(4, seed=s, timestep=t) for s, t in enumerate((999, 500, 20))]
    captured, ctx = prepared(model, calibration[0], calibration=calibration)
    gm = captured.graph_module
    calibrate(gm, ctx)
    salience_balance(gm, ctx)
    fold_into_graph(captured, ctx)
    before = ctx.input_stats
    ctx.input_stats = {}
    calibrate(gm, ctx)
    assert set(before["transformer_blocks.0.attn1.to_q"]) == {999.0, 500.0, 20.0}
    for layer, per_t in before.items():
        for t, stats in per_t.items():
            assert torch.allclose(stats.absmax, ctx.input_stats[layer][t].absmax, rtol=1e-5), layer
            assert torch.allclose(stats.minimum, ctx.input_stats[layer][t].minimum, rtol=1e-5, atol=1e-6), layer


def test_ssc_weights_timesteps_and_csb_takes_the_max():
    model = tiny_dit()
    calibration = [dit_inputs(4, seed=s, timestep=t) for s, t in enumerate((999, 500, 20))]
    results = {}
    for ssc in (True, False):
        spec = QuantSpec.from_preset("ptq4dit-w8a8").replace(options=PTQ4DiTOptions(ssc=ssc))
        captured, ctx = prepared(model, calibration[0], spec, calibration)
        calibrate(captured.graph_module, ctx)
        salience_balance(captured.graph_module, ctx)
        results[ssc] = (ctx, ctx.annotations[BALANCES])
    ctx, balances = results[False]
    pair = ctx.annotations[PAIRS][0]
    w = torch.cat([captured.graph_module.get_parameter(f"{name}.weight") for name in pair.consumers])
    stats = ctx.input_stats[pair.consumers[0]]
    x_max = torch.stack([s.absmax for s in stats.values()]).amax(0)
    assert torch.allclose(balances[pair_key(pair)].vector, (x_max / w.abs().amax(0)).sqrt())
    assert balances[pair_key(pair)].eta == {}
    ctx, balances = results[True]
    balance = balances[pair_key(pair)]
    assert set(balance.eta) == {999.0, 500.0, 20.0} and sum(balance.eta.values()) == pytest.approx(1.0)
    x_rho = sum(balance.eta[t] * s.absmax for t, s in stats.items())
    assert torch.allclose(balance.vector, (x_rho / w.abs().amax(0)).sqrt())


# ---------------------------------------------------------------------------------------------- quantize


def test_presets_and_switches():
    assert {"ptq4dit-w8a8", "ptq4dit-w4a8", "ptq4dit-w8a8-dyn", "ptq4dit-w4a8-dyn"} <= set(dqcompile.presets())
    spec = QuantSpec.from_preset("ptq4dit-w4a8")
    assert (spec.method, spec.weights.bits, spec.activations.mode) == ("ptq4dit", 4, "static_tensor")
    assert QuantSpec.from_preset("ptq4dit-w8a8-dyn").activations.mode == "dynamic_token"
    assert spec.options == PTQ4DiTOptions(ssc=True, balance_out_proj=True)
    assert QuantSpec.from_dict(spec.replace(options=PTQ4DiTOptions(ssc=False)).to_dict()).options.ssc is False


@pytest.fixture(scope="module")
def dit_calibration():
    return dqcompile.calibration_set(
        tiny_dit(), num_timesteps=4, samples_per_timestep=4, num_inference_steps=8, progress=False
    )


def test_quantize_dit_with_csb_ssc_notes_and_accuracy(dit_calibration):
    model = tiny_dit()
    qmodel = dqcompile.quantize(model, "ptq4dit-w8a8", calibration=dit_calibration, progress=False)
    rtn = dqcompile.quantize(
        model, QuantSpec.from_preset("ptq4dit-w8a8").replace(method="rtn"), calibration=dit_calibration, progress=False
    )
    rows = {row.name: row.note for row in qmodel.report.layers}
    assert rows["transformer_blocks.0.attn1.to_q"] == (
        "CSB+SSC balanced with transformer_blocks.0.norm1.linear (scale chunk 1, shift chunk 0)"
    )
    assert rows["transformer_blocks.1.attn1.to_out.0"] == "CSB+SSC balanced with the V rows of transformer_blocks.1.attn1.to_v"
    assert rows["transformer_blocks.0.ff.net.2"] == ""  # after GELU: nothing to fold into
    inputs = dit_calibration[2]
    with torch.no_grad():
        reference = model(**inputs).sample
        assert rel_l2(qmodel(**inputs).sample, reference) < 0.05
    # Nothing is added at run time: the balanced graph has no more nodes than round-to-nearest.
    assert len(qmodel.graph_module.graph.nodes) <= len(rtn.graph_module.graph.nodes)


def test_csb_only_and_no_out_projection_switches(dit_calibration):
    spec = QuantSpec.from_preset("ptq4dit-w8a8-dyn").replace(options=PTQ4DiTOptions(ssc=False, balance_out_proj=False))
    qmodel = dqcompile.quantize(tiny_dit(), spec, calibration=dit_calibration, progress=False)
    rows = {row.name: row.note for row in qmodel.report.layers}
    assert rows["transformer_blocks.0.attn1.to_k"].startswith("CSB balanced with transformer_blocks.0.norm1.linear")
    assert rows["transformer_blocks.0.attn1.to_out.0"] == ""


def test_pixart_quantizes_saves_and_loads_with_the_table_fold(tmp_path):
    model = tiny_pixart()
    calibration = [default_example_inputs(model, batch=2) for _ in range(2)]
    qmodel = dqcompile.quantize(model, "ptq4dit-w8a8", calibration=calibration, progress=False)
    inputs = default_example_inputs(model, batch=3)
    with torch.no_grad():
        out = qmodel(**inputs).sample
        assert rel_l2(out, model(**inputs).sample) < 0.1
        dqcompile.save(qmodel, tmp_path / "q")
        loaded = dqcompile.load(tmp_path / "q")
        assert torch.equal(loaded(**inputs).sample, out)
