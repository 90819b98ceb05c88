"""PTQ4DiT block reconstruction (dqcompile/methods/ptq4dit/reconstruct.py): blocks found from the module
stack, the graph run node by node (PixArt's table fold included), learned rounding that lowers each
block's output error against round to nearest, the fallback to round to nearest, and the options."""

import math

import pytest
import torch

import dqcompile
from dqcompile import QuantSpec
from dqcompile.capture import capture
from dqcompile.example_inputs import default_example_inputs
from dqcompile.methods.ptq4dit import PTQ4DiTOptions, ReconstructionOptions
from dqcompile.methods.ptq4dit.balance import BALANCES, PAIRS, Balance, find_balance_pairs, pair_key
from dqcompile.methods.ptq4dit.fold import fold_balancing
from dqcompile.methods.ptq4dit.pairs import balanced_layers
from dqcompile.methods.ptq4dit.reconstruct import SUMMARY, _batch_symbol, _graph_inputs, _Rows, _Runner, find_blocks
from dqcompile.passes.context import PassContext
from dqcompile.passes.plan_layers import plan_layers
from tiny_models import dit_inputs, hand_dit, hand_dit_inputs, rel_l2, tiny_dit, tiny_pixart, tiny_sd3

CALIBRATION = [dit_inputs(batch=8, seed=seed) for seed in range(6)]
# Short runs for the tests (the defaults run 1,000 iterations of 32 rows a block).
FAST = dict(enabled=True, iterations=300, batch_size=8)


def _spec(preset: str, **options) -> QuantSpec:
    balance = options.pop("balance", True)
    return QuantSpec.from_preset(preset).replace(
        options=PTQ4DiTOptions(balance=balance, reconstruction=ReconstructionOptions(**{**FAST, **options})))


def _context(model, inputs, spec="ptq4dit-w8a8"):
    captured = capture(model, inputs, copy_parameters=True)
    ctx = PassContext(spec=QuantSpec.resolve(spec), binding=captured.binding, calibration=[inputs], progress=False)
    plan_layers(captured.graph_module, ctx)
    return captured, ctx


FAMILIES = {
    "dit": (tiny_dit, lambda m: default_example_inputs(m, batch=2), "transformer_blocks"),
    "pixart": (tiny_pixart, lambda m: default_example_inputs(m, batch=2), "transformer_blocks"),
    "sd3": (tiny_sd3, lambda m: default_example_inputs(m, batch=2), "transformer_blocks"),
    "hand": (hand_dit, lambda m: dict(zip(("x", "t", "y"), hand_dit_inputs(2))), "blocks"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_are_the_repeated_modules_of_the_graph(family):
    build, make_inputs, prefix = FAMILIES[family]
    model = build()
    captured, ctx = _context(model, make_inputs(model))
    blocks, outside = find_blocks(captured.graph_module, ctx)
    assert [block.path for block in blocks] == [f"{prefix}.0", f"{prefix}.1"]
    quantized = [layer.name for layer in ctx.plan.quantized_layers()]
    assert sorted([name for block in blocks for name in block.layers] + outside) == sorted(quantized)
    # The hand-written DiT's final linear is quantized (no default pattern keeps it float) and in no block.
    assert outside == (["final_linear"] if family == "hand" else [])
    # (SD3's last block writes no text stream: fewer layers.)
    assert min(len(blocks[0].layers), len(blocks[1].layers)) >= 4
    for block in blocks:
        names = {node.name for node in block.nodes}
        for layer in block.layers:
            assert layer.startswith(block.path + ".") and set(ctx.plan.layers[layer].node_names) <= names
        assert block.outputs and block.inputs and not names & {node.name for node in block.inputs}
    # Block 1 reads what block 0 wrote.
    assert set(blocks[0].outputs) <= set(blocks[1].inputs)


def test_the_runner_applies_pixarts_table_fold():
    """The fold leaves PixArt's table add to the lowering (a GraphEdit): the runner must compute it as
    table + embedding * u, or every float target of a block would be wrong."""
    model = tiny_pixart()
    inputs = default_example_inputs(model, batch=2)
    captured, ctx = _context(model, inputs)
    find_balance_pairs(captured.graph_module, ctx)
    generator = torch.Generator().manual_seed(1)
    ctx.annotations[BALANCES] = {
        pair_key(p): Balance(4.0 ** (2 * torch.rand(ctx.plan.layers[balanced_layers(p)[0]].in_features,
                                                    generator=generator) - 1), {}, {})
        for p in ctx.annotations[PAIRS]}
    fold_balancing(captured.graph_module, ctx)
    assert ctx.plan.edits
    gm = captured.graph_module
    env = _graph_inputs(gm, ctx, inputs, 0)
    nodes = [node for node in gm.graph.nodes if node.op in ("call_function", "call_module")]
    with torch.no_grad():
        env = _Runner(gm, ctx).run(nodes, env)
        output = env[next(node for node in gm.graph.nodes if node.op == "output").args[0][0]]
        assert rel_l2(output, model(**inputs).sample) < 1e-5


def test_minibatches_gather_rows_across_calls_and_resize_the_graph():
    model = tiny_dit()
    captured, ctx = _context(model, dit_inputs(2))
    gm = captured.graph_module
    blocks, _ = find_blocks(gm, ctx)
    runner = _Runner(gm, ctx)
    stem = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module")]
    stem = stem[: stem.index(blocks[0].nodes[0])]
    with torch.no_grad():
        calls = [{n: env[n] for n in blocks[0].inputs}
                 for env in (runner.run(stem, _graph_inputs(gm, ctx, s, i)) for i, s in enumerate(CALIBRATION[:3]))]
        rows = _Rows(blocks[0].inputs, calls, _batch_symbol(gm))
        assert rows.batch_major and rows.total == 24
        selection = rows.select(5, torch.Generator().manual_seed(0))
        assert sum(len(local) for _, local in selection) == 5
        env = rows.values(selection)
        out = runner.run(blocks[0].nodes, env)[blocks[0].outputs[0]]
        # The same rows, block by block from their own calls: the minibatch computes the same values.
        expected = torch.cat([runner.run(blocks[0].nodes, dict(calls[c]))[blocks[0].outputs[0]][local]
                              for c, local in selection])
    assert out.shape[0] == 5 and torch.allclose(out, expected, atol=1e-5)


def test_reconstruction_lowers_every_block_output_error_against_round_to_nearest():
    model = tiny_dit()
    spec = _spec("ptq4dit-w4a8-dyn")
    qmodel = dqcompile.quantize(model, spec, calibration=CALIBRATION, progress=False)
    summary = qmodel.plan.summary[SUMMARY]
    assert [b["block"] for b in summary["blocks"]] == ["transformer_blocks.0", "transformer_blocks.1"]
    for block in summary["blocks"]:
        # Measured (300 iterations of 8 rows, 6 x 8 calibration rows): +5.7 and +4.6 dB; about one weight
        # in ten rounds the other way than to nearest, and every h has settled at 0 or 1.
        assert block["kept"] == "adaround" and block["gain_db"] > 3.0, block
        assert block["adaround_mse"] < 0.5 * block["rtn_mse"]
        assert 0.03 < block["flipped"] / block["weights"] < 0.3 and block["undecided"] < 0.01 * block["weights"]
    assert summary["seconds"] > 0 and summary["peak_memory_mib"] > 0 and summary["peak_memory_kind"]
    for layer in qmodel.plan.quantized_layers():
        assert layer.weight.rounding == "adaround"
        assert any("AdaRound block reconstruction" in note for note in layer.notes)
        assert any("peak memory" in note for note in layer.notes)
    # The whole model on inputs it was not calibrated on: closer to float than the same spec rounded to nearest.
    rtn = dqcompile.quantize(model, QuantSpec.from_preset("ptq4dit-w4a8-dyn"), calibration=CALIBRATION, progress=False)
    held_out = [dit_inputs(batch=8, seed=seed) for seed in range(20, 24)]
    with torch.no_grad():
        error = lambda q: sum(rel_l2(q(**x).sample, model(**x).sample) for x in held_out)
        assert error(qmodel) < 0.9 * error(rtn)


def test_static_activations_float_inputs_and_no_balancing():
    model = hand_dit()
    calibration = [dict(zip(("x", "t", "y"), hand_dit_inputs(8, seed=seed))) for seed in range(4)]
    qmodel = dqcompile.quantize(model, _spec("ptq4dit-w4a8", inputs="float", balance=False), calibration=calibration,
                                progress=False)
    summary = qmodel.plan.summary[SUMMARY]
    assert [b["block"] for b in summary["blocks"]] == ["blocks.0", "blocks.1"]
    assert all(b["gain_db"] > 1.0 for b in summary["blocks"]), summary["blocks"]
    assert not any("balanced" in note for layer in qmodel.plan.quantized_layers() for note in layer.notes)
    assert all(layer.activations.kind == "static" and layer.activations.tensors for layer in qmodel.plan.quantized_layers())


def test_a_block_that_learning_does_not_improve_keeps_round_to_nearest():
    model = tiny_dit()
    qmodel = dqcompile.quantize(model, _spec("ptq4dit-w8a8-dyn", iterations=1, learning_rate=1e-9),
                                calibration=CALIBRATION[:2], progress=False)
    for block in qmodel.plan.summary[SUMMARY]["blocks"]:
        assert block["kept"] == "rtn" and block["adaround_mse"] >= block["rtn_mse"]
    for layer in qmodel.plan.quantized_layers():
        assert layer.weight.rounding == "rtn" and any("kept round to nearest" in note for note in layer.notes)


def test_options_are_checked_and_survive_save_and_load(tmp_path):
    with pytest.raises(ValueError, match=r"options\.reconstruction\.iterations=0 must be a positive integer"):
        ReconstructionOptions(iterations=0)
    with pytest.raises(ValueError, match=r"options\.reconstruction\.inputs='noisy' is not allowed"):
        ReconstructionOptions(inputs="noisy")
    with pytest.raises(ValueError, match=r"beta_start >= beta_end > 0"):
        ReconstructionOptions(beta_start=1.0, beta_end=2.0)
    with pytest.raises(ValueError, match="would round them twice"):
        _spec("ptq4dit-w4a8").replace(weights=dqcompile.WeightSpec(bits=4, rounding="gptq"))
    spec = _spec("ptq4dit-w4a8-dyn", iterations=20)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    model = tiny_dit()
    qmodel = dqcompile.quantize(model, spec, calibration=CALIBRATION[:2], progress=False)
    dqcompile.save(qmodel, tmp_path / "q")
    loaded = dqcompile.load(tmp_path / "q")
    inputs = dit_inputs(batch=3, seed=9)
    with torch.no_grad():
        assert loaded.spec == spec and torch.equal(loaded(**inputs).sample, qmodel(**inputs).sample)
    assert math.isfinite(qmodel.plan.summary[SUMMARY]["seconds"])
