"""TQ-DiT: multi-region codes, integer attention, time groups (and torch.compile), the Hessian-guided search."""

import pytest
import torch
from torch.fx._pytree import tree_flatten_spec

import dqcompile
from dqcompile import QuantSpec
from dqcompile.backends import reference
from dqcompile.methods.tqdit import TQDiTOptions
from dqcompile.methods.tqdit.common import TimeGroups, UniformTables
from dqcompile.methods.tqdit.hessian_search import candidate_grid, search_layer
from dqcompile.quant import QParams, compute_qparams, pack_int4, quantize, quantize_weight
from dqcompile.quant.mrq import (
    fake_quantize_mrq,
    mrq_dequantize,
    mrq_quantize,
    softmax_high_scale,
    softmax_low_scales,
)
from dqcompile.spec import ActivationSpec
from tiny_models import hand_dit, rel_l2, tiny_dit

ops = torch.ops.dqcompile

CALIBRATION_TIMESTEPS = (900, 600, 300, 50)



def dit_inputs(batch: int, seed: int, timestep: int | None = None) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": torch.full((batch,), timestep) if timestep is not None
        else torch.randint(0, 1000, (batch,), generator=generator),
        "class_labels": torch.randint(0, 10, (batch,), generator=generator),
    }


def calibration(batch: int = 2) -> list[dict]:
    """One sample batch per timestep, as a calibration set from sampling trajectories holds."""
    return [dit_inputs(batch, seed=index, timestep=t) for index, t in enumerate(CALIBRATION_TIMESTEPS)]


@pytest.fixture(scope="module")
def tgq_model():
    """Tiny DiT with the tqdit-w8a8 preset: 4 calibration timesteps fill 4 of its 10 time groups."""
    model = tiny_dit()
    return model, dqcompile.quantize(model, "tqdit-w8a8", calibration=calibration(), progress=False)


# --- MRQ ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [6, 8])
def test_post_gelu_codes_decode_exactly_to_their_regions_values(bits):
    top = 2 ** (bits - 1) - 1
    low, high = torch.tensor(0.17 / (top + 1)), torch.tensor(3.1 / top)
    negative = torch.arange(-(top + 1), 0, dtype=torch.float32) * low  # every negative code's value
    positive = torch.arange(0, top + 1, dtype=torch.float32) * high  # every non-negative code's value
    values = torch.cat([negative, positive])
    q_low, q_high = ops.quantize_act_mrq(values, low, high, bits, True)
    assert q_low.dtype == q_high.dtype == torch.int8
    assert torch.equal(q_low[: top + 1], torch.arange(-(top + 1), 0, dtype=torch.int8))
    assert torch.equal(q_high[top + 1 :], torch.arange(0, top + 1, dtype=torch.int8))
    assert not q_high[: top + 1].any() and not q_low[top + 1 :].any()  # one region per value
    assert torch.equal(mrq_dequantize(q_low, q_high, low, high), values)  # bit for bit
    assert torch.equal(fake_quantize_mrq(values, low, high, bits, True), values)  # what HO simulates


@pytest.mark.parametrize("bits", [6, 8])
def test_post_softmax_codes_decode_exactly_to_their_regions_values(bits):
    top = 2 ** (bits - 1) - 1
    high = torch.tensor(softmax_high_scale(bits))
    assert float(high) * 2 ** (bits - 1) == 1.0
    low = torch.tensor(softmax_low_scales(bits)[3])  # split at 2^(b-1) * low = 1/8
    fine = torch.arange(0, top + 1, dtype=torch.float32) * low
    coarse = torch.arange(0, top + 1, dtype=torch.float32) * high
    coarse = coarse[coarse >= (top + 0.5) * low]  # the values the fine region cannot hold
    q_low, q_high = mrq_quantize(torch.cat([fine, coarse]), low, high, bits, False)
    assert torch.equal(q_low[: top + 1], torch.arange(0, top + 1, dtype=torch.int8))
    assert not q_low[top + 1 :].any() and not q_high[: top + 1].any()
    assert torch.equal(mrq_dequantize(q_low, q_high, low, high), torch.cat([fine, coarse]))
    # Any probability is within half a step of its region's grid (the coarse grid ends at 1 - step).
    probs = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    q_low, q_high = mrq_quantize(probs, low, high, bits, False)
    error = (mrq_dequantize(q_low, q_high, low, high) - probs).abs()
    in_fine = q_high == 0
    assert error[in_fine].max() <= low / 2 + 1e-7
    assert error[~in_fine & (probs < 1 - float(high))].max() <= high / 2 + 1e-7


def test_two_region_linear_is_the_sum_of_two_exact_integer_products():
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(3, 7, 64, generator=generator) * 2, approximate="tanh")
    weight = quantize_weight(torch.randn(16, 64, generator=generator), 8)
    bias = torch.randn(16, generator=generator)
    low, high = torch.tensor(0.17 / 128), x.max() / 127
    q_low, q_high = ops.quantize_act_mrq(x, low, high, 8, True)
    zero = torch.zeros(1, dtype=torch.int32)
    y = (ops.int_linear(q_low, low.reshape(1), zero, weight.qweight, weight.scale, None, 8, 0, torch.float32)
         + ops.int_linear(q_high, high.reshape(1), zero, weight.qweight, weight.scale, bias, 8, 0, torch.float32))
    simulated = mrq_dequantize(q_low, q_high, low, high) @ weight.dequantize().T + bias
    # Both sides are exact integer sums rescaled in float32; they differ by float32 rounding only.
    torch.testing.assert_close(y, simulated, rtol=1e-5, atol=1e-5)


# --- integer attention ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [reference.FLOAT32_EXACT_K, 4096])  # float32 and float64 paths
def test_batched_int_matmul_accumulates_exactly(k):
    generator = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (2, 3, 17, k), generator=generator, dtype=torch.int8)
    b = torch.randint(-128, 128, (2, 3, 9, k), generator=generator, dtype=torch.int8)
    a[0, 0, 0], b[0, 0, 0] = -128, -128  # the largest sum: k * 2^14
    a[0, 0, 1], b[0, 0, 1] = torch.tensor([127, -128] * (k // 2), dtype=torch.int8), 127  # odd sums
    result = reference.int_matmul_batched(a, b)
    assert result.dtype == torch.int32
    assert torch.equal(result.long(), a.long() @ b.long().transpose(-1, -2))
    assert int(result[0, 0, 0, 0]) == k * 2**14


@pytest.mark.parametrize("mrq", [False, True])
def test_int_attention_accumulators_are_exact_and_output_close_to_float(mrq):
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 20, 16, generator=generator) for _ in range(3))
    bits, scale = 8, 16**-0.5
    steps = [x.abs().amax(dim=(0, 2, 3)).reshape(1, 3, 1, 1) / 127 for x in (q, k, v)]
    p_low = torch.tensor(softmax_low_scales(bits)[2]) if mrq else None
    out = ops.int_attention(q, k, v, *steps, p_low, bits, scale)
    # The same computation with int64 accumulators and float64 epilogues (the softmax as the op's, in
    # float32 on the same logits, so that P gets the same codes).
    codes = [quantize(x, QParams(s, torch.zeros_like(s, dtype=torch.int32), bits, True, 0)).long()
             for x, s in zip((q, k, v), steps)]
    logits = (codes[0] @ codes[1].transpose(-1, -2)).float() * (steps[0] * steps[1] * scale)
    probs = torch.softmax(logits, dim=-1)
    if mrq:
        p_l, p_h = mrq_quantize(probs, p_low, torch.tensor(softmax_high_scale(bits)), bits, False)
        expected = (float(p_low) * (p_l.long() @ codes[2]).double() + (p_h.long() @ codes[2]).double() / 128)
    else:
        p_codes = torch.round(probs / torch.tensor(1 / 255)).long()  # u + 128, u the stored int8 code
        expected = (p_codes @ codes[2]).double() * float(torch.tensor(1 / 255))
    expected = expected * steps[2].double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    reference_out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert rel_l2(out, reference_out) < 0.05  # 8-bit Q, K, V and P on random data: about 1e-2


# --- time groups ------------------------------------------------------------------------------------------


def test_time_groups_split_consecutive_timesteps_and_pick_the_nearest():
    groups = TimeGroups.split([0, 100, 200, 300, 400, 500, 600, 700, 800, 900], 4)
    assert groups.members == ((0.0, 100.0, 200.0), (300.0, 400.0, 500.0), (600.0, 700.0), (800.0, 900.0))
    assert groups.boundaries.tolist() == [250.0, 550.0, 750.0]
    for index, members in enumerate(groups.members):
        assert all(groups.index(t) == index for t in members)
    assert [groups.index(t) for t in (249, 251, 999, -5)] == [0, 1, 3, 0]
    few = TimeGroups.split([999, 10], 4)
    assert few.real == 2 and few.count == 4 and few.members[3] == (999.0,)
    assert few.boundaries.tolist() == [504.5, float("inf"), float("inf")]


def _node_values(qmodel, inputs: dict, nodes: list) -> list[torch.Tensor]:
    """The values some nodes of the quantized graph compute for one call."""
    seen: dict = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            seen[node] = super().run_node(node)
            return seen[node]

    graph_inputs, _ = qmodel.binding.graph_kwargs((), inputs)
    gm = qmodel.graph_module
    Recorder(gm).run(*tree_flatten_spec(((), graph_inputs), gm._in_spec), enable_io_processing=False)
    return [seen[node] for node in nodes]


def test_each_row_reads_its_timesteps_group(tgq_model):
    _, qmodel = tgq_model
    gm = qmodel.graph_module
    # Midpoints of 50, 300, 600, 900, then groups that no calibration timestep reached.
    assert gm.time_boundaries.tolist() == [175.0, 450.0, 750.0] + [float("inf")] * 6
    layer = "transformer_blocks.0.attn1.to_q"
    table = gm.get_submodule(layer).input_scale
    assert qmodel.plan.layers[layer].activations.time_grouped
    assert table.shape == (10,) and len(set(table[:4].tolist())) == 4
    quantize_node = next(n for n in gm.graph.nodes
                         if n.target == ops.quantize_act_static.default and n.meta["dqcompile"]["layer"] == layer)
    inputs = dit_inputs(6, seed=9)
    inputs["timestep"] = torch.tensor([900, 50, 460, 440, 751, 0])
    (selected,) = _node_values(qmodel, inputs, [quantize_node.args[1]])
    assert selected.shape == (6, 1, 1)
    assert torch.equal(selected.reshape(-1), table[torch.tensor([3, 0, 2, 1, 3, 0])])


def test_compiled_model_traces_once_for_every_timestep(tgq_model):
    from torch._dynamo.testing import CompileCounter

    _, qmodel = tgq_model
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(qmodel, backend=counter)
    inputs = dit_inputs(2, seed=5)
    with torch.no_grad():
        for step, t in enumerate((900, 600, 300, 50)):
            out = compiled(**{**inputs, "timestep": torch.full((2,), t)}).sample
            if step == 0:
                traced = counter.frame_count
        eager = qmodel(**{**inputs, "timestep": torch.full((2,), 50)}).sample
    assert traced >= 1 and counter.frame_count == traced  # no recompilation for a new timestep value
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


# --- the quantized model ----------------------------------------------------------------------------------


def test_lowered_graph_runs_mrq_and_integer_attention(tgq_model):
    model, qmodel = tgq_model
    targets = [n.target for n in qmodel.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.int_attention.default) == 2
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    assert targets.count(ops.quantize_act_mrq.default) == 2  # the two fc2 layers
    assert targets.count(ops.int_linear.default) == 2 * 6 + 2  # fc2 runs two integer products
    rows = {row.name: row.note for row in qmodel.report.layers}
    assert "MRQ post-GELU" in rows["transformer_blocks.0.ff.net.2"]
    with torch.no_grad():
        for t in CALIBRATION_TIMESTEPS:
            inputs = dit_inputs(2, seed=7, timestep=t)
            assert rel_l2(qmodel(**inputs).sample, model(**inputs).sample) < 0.05  # measured: about 3e-3


def test_hessian_search_lowers_the_fisher_weighted_error_of_every_layer(tgq_model):
    _, qmodel = tgq_model
    summary = qmodel.plan.summary["tqdit"]
    errors = summary["hessian_errors"]
    assert len(errors) == 12
    assert all(0 < after <= before for before, after in errors.values())
    assert sum(after for _, after in errors.values()) < 0.9 * sum(before for before, _ in errors.values())
    assert summary["calibration_calls"] == 4 and summary["time_groups"] == 4
    assert summary["peak_memory_mib"] > 0 and summary["hessian_seconds"] > 0


def test_hessian_search_beats_round_to_nearest_on_integer_kernels():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(32, 64, generator=generator)
    weight[:, 5] *= 8  # an outlier column: the per-channel max of RTN wastes most 4-bit codes
    bias = torch.randn(32, generator=generator)
    rows, lows, highs = [], [], []
    for spread in (1.0, 4.0):  # two time groups with different activation ranges
        x = torch.randn(256, 64, generator=generator) * spread
        x[:2] *= 10  # rare outliers that stretch the min / max range
        grads = torch.randn(256, 32, generator=generator) * torch.linspace(0.1, 2, 32)
        rows.append((x, grads))
        lows.append(x.min())
        highs.append(x.max())
    qparams = compute_qparams(torch.stack([torch.stack(lows), torch.stack(highs)], 1), 6, symmetric=False,
                              granularity="token")
    tables = UniformTables(qparams.scale.reshape(-1), qparams.zero.reshape(-1))
    found = search_layer(weight, 4, 0, tables, 6, rows, candidate_grid(24), 2)

    def weighted_error(qweight, weight_scale, act: UniformTables) -> float:
        total = 0.0
        for g, (x, grads) in enumerate(rows):
            scale, zero = act.scale[g].reshape(1), act.zero[g].reshape(1)
            qx = ops.quantize_act_static(x, scale, zero, 6)
            y = ops.int_linear(qx, scale, zero, qweight, weight_scale, bias, 4, 0, torch.float32)
            total += float((grads * (x @ weight.T + bias - y)).square().sum())
        return total

    rtn = quantize_weight(weight, 4)
    rtn_error = weighted_error(rtn.qweight, rtn.scale, tables)
    codes = quantize(weight, QParams(found.weight_scale, torch.zeros_like(found.weight_scale, dtype=torch.int32),
                                     4, True, 0))
    ho_error = weighted_error(pack_int4(codes), found.weight_scale, found.tables)
    # The search's float simulation of the kernels agrees with them (float32 rounding apart).
    assert found.error_before == pytest.approx(rtn_error, rel=1e-3)
    assert found.error_after == pytest.approx(ho_error, rel=1e-3)
    assert ho_error < 0.7 * rtn_error  # measured: about 0.4x


def test_save_and_load_round_trip(tmp_path, tgq_model):
    _, qmodel = tgq_model
    dqcompile.save(qmodel, tmp_path / "q")
    loaded = dqcompile.load(tmp_path / "q")
    inputs = dit_inputs(3, seed=8)
    inputs["timestep"] = torch.tensor([900, 300, 10])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, qmodel(**inputs).sample)


# --- presets and spec -------------------------------------------------------------------------------------


# Measured on this random tiny DiT: about 9e-3 (w6a6) and 1.3e-2 (w4a8), against 6e-3 and 1.6e-2 for the
# dynamic per-token presets; the bounds leave 4x for other seeds and platforms.
@pytest.mark.parametrize("preset,bound", [("tqdit-w6a6", 0.04), ("tqdit-w4a8", 0.06)])
def test_presets_on_tiny_dit(preset, bound):
    model = tiny_dit()
    qmodel = dqcompile.quantize(model, preset, calibration=calibration(), progress=False)
    with torch.no_grad():
        for t in (900, 50):
            inputs = dit_inputs(3, seed=4, timestep=t)
            assert rel_l2(qmodel(**inputs).sample, model(**inputs).sample) < bound


def test_hand_written_dit_quantizes_with_time_groups():
    """Not diffusers: a fused qkv linear, its own modulate, the timestep argument named `t`."""
    model = hand_dit()
    samples = []
    for index, t in enumerate(CALIBRATION_TIMESTEPS):
        inputs = dit_inputs(2, seed=index, timestep=t)
        samples.append({"x": inputs["hidden_states"], "t": inputs["timestep"], "y": inputs["class_labels"]})
    spec = QuantSpec.from_preset("tqdit-w8a8").replace(options=TQDiTOptions(hessian_candidates=12))
    qmodel = dqcompile.quantize(model, spec, calibration=samples, progress=False)
    assert qmodel.plan.summary["tqdit"]["time_groups"] == 4  # 4 timesteps for 10 groups
    assert qmodel.graph_module.time_boundaries.tolist()[:3] == [175.0, 450.0, 750.0]
    with torch.no_grad():
        x, t, y = samples[1]["x"], samples[1]["t"], samples[1]["y"]
        assert rel_l2(qmodel(x, t, y), model(x, t, y)) < 0.05


def test_tqdit_spec_is_validated():
    with pytest.raises(ValueError, match="method='tqdit' needs activations.mode='static_tensor'"):
        QuantSpec(method="tqdit", activations=ActivationSpec(mode="dynamic_token"))
    with pytest.raises(ValueError, match=r"options\.time_groups=0 is not allowed"):
        TQDiTOptions(time_groups=0)
    with pytest.raises(ValueError, match=r"options\.beta_schedule='cosine' is not allowed"):
        TQDiTOptions(beta_schedule="cosine")
    assert {"tqdit-w8a8", "tqdit-w6a6", "tqdit-w4a8"} <= set(dqcompile.presets())
