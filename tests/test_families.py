"""Every diffusers DiT family (tiny random configs, CPU): w8a8 / w4a8 within tolerance at a batch size other
than the captured one, PTQ4DiT's fold exact (or skipped with its reason), the capture fallback of the
families whose code fixes the batch, one-sentence refusals where no capture works, compile equals eager."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import dqcompile
from dqcompile.capture import CaptureError
from dqcompile.methods.ptq4dit.adaln_pairs import AdaLNPair, skipped_adaln_pairs
from dqcompile.methods.ptq4dit.balance import BALANCES, PAIRS, Balance, find_balance_pairs, pair_key
from dqcompile.methods.ptq4dit.fold import fold_balancing
from dqcompile.methods.ptq4dit.pairs import balanced_layers
from dqcompile.model import QuantizedModel
from dqcompile.passes.context import PassContext
from dqcompile.passes.lower import apply_edits, lower
from dqcompile.passes.pipeline import decide
from dqcompile.passes.plan_layers import plan_layers
from dqcompile.report import QuantReport
from dqcompile.spec import QuantSpec
from family_models import FAMILIES, UNCAPTURED, family
from tiny_models import rel_l2

# adaLN pairs PTQ4DiT folds in each tiny config (0: none, and why is in SKIPPED_WHY or the README).
ADALN_PAIRS = {"dit": 4, "pixart": 4, "sd3": 7, "flux": 5, "hunyuan_video": 5, "allegro": 2, "qwen_image": 8,
               "cogvideox": 4, "sana": 1, "hunyuan_dit": 0, "ltx_video": 2, "wan": 2, "auraflow": 0,
               "stable_audio": 0}
SKIPPED_WHY = {"auraflow": "has no bias"}
W8A8, W4A8 = 0.01, 0.08


@functools.lru_cache(maxsize=1)
def captured_family(name: str):
    model, inputs = family(name)
    return model, inputs, dqcompile.capture(model, inputs(2), copy_parameters=True)


def output(result):
    return result.sample if hasattr(result, "sample") else result[0]


def run(model, inputs):
    with torch.no_grad():
        return output(model(**inputs, return_dict=False))


def quantized_copy(captured, spec: str) -> QuantizedModel:
    """What dqcompile.quantize does, on a copy of one capture (one export per family for every spec)."""
    gm = copy.deepcopy(captured.graph_module)
    plan = decide(gm, captured.binding, QuantSpec.resolve(spec), None, progress=False)
    lower(gm, plan)
    return QuantizedModel(gm, captured.binding, spec=QuantSpec.resolve(spec), plan=plan,
                          report=QuantReport(spec), dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_quantizes_within_tolerance_and_folds_exactly(name):
    model, inputs, captured = captured_family(name)
    batch = inputs(3, seed=11)  # not the captured batch
    reference = run(model, batch)
    for spec, tolerance in (("w8a8", W8A8), ("w4a8", W4A8)):
        qmodel = quantized_copy(captured, spec)
        assert qmodel.plan.quantized_layers(), spec
        error = rel_l2(run(qmodel, batch), reference)
        assert error < tolerance, f"{name} {spec}: relative error {error:.4f}"

    # PTQ4DiT: random balancing vectors over two orders of magnitude, folded; the float graph is unchanged.
    gm = copy.deepcopy(captured.graph_module)
    ctx = PassContext(spec=QuantSpec.resolve("ptq4dit-w8a8"), binding=captured.binding, progress=False)
    plan_layers(gm, ctx)
    find_balance_pairs(gm, ctx)
    pairs = ctx.annotations[PAIRS]
    assert sum(isinstance(p, AdaLNPair) for p in pairs) == ADALN_PAIRS[name]
    if name in SKIPPED_WHY:
        assert any(SKIPPED_WHY[name] in skipped.reason for skipped in skipped_adaln_pairs(gm))
    generator = torch.Generator().manual_seed(1)
    layers = ctx.plan.layers
    ctx.annotations[BALANCES] = {
        pair_key(p): Balance(4.0 ** (2 * torch.rand(layers[balanced_layers(p)[0]].in_features, generator=generator) - 1),
                             {}, {})
        for p in pairs
    }
    fold_balancing(gm, ctx)
    for edit in ctx.plan.edits:
        owner, _, leaf = edit.buffer.rpartition(".")
        gm.get_submodule(owner).register_buffer(leaf, edit.tensor)
    apply_edits(gm, ctx.plan)
    gm.recompile()
    kwargs, _ = captured.binding.graph_kwargs((), batch)
    with torch.no_grad():
        folded = gm(**kwargs)[0]
    assert rel_l2(folded, reference) < 1e-5
    if name in SKIPPED_WHY:
        notes = [note for plan in ctx.plan.quantized_layers() for note in plan.notes]
        assert any("not balanced" in note and SKIPPED_WHY[name] in note for note in notes)


def test_public_quantize_on_a_family_the_name_patterns_missed():
    """StableAudio: its condition MLPs and projections stay in float by their role in the graph."""
    model, inputs = family("stable_audio")
    qmodel = dqcompile.quantize(model, "w8a8", example_inputs=inputs(2), progress=False)
    reasons = {plan.name: plan.float_reason for plan in qmodel.plan.layers.values()}
    for layer in ("timestep_proj.0", "timestep_proj.2", "global_proj.0", "cross_attention_proj.0", "proj_in"):
        assert reasons[layer] and "role in the graph" in reasons[layer], layer
    assert reasons["transformer_blocks.0.attn1.to_q"] is None
    batch = inputs(3, seed=2)
    assert rel_l2(run(qmodel, batch), run(model, batch)) < W8A8


def test_per_sample_list_argument_at_any_batch():
    """Qwen-Image's img_shapes holds one entry per sample: the quantized model takes it at any batch."""
    model, inputs, captured = captured_family("qwen_image")
    qmodel = quantized_copy(captured, "w8a8")
    for batch in (1, 3):
        values = inputs(batch, seed=batch)
        assert rel_l2(run(qmodel, values), run(model, values)) < W8A8
    bad = inputs(3, seed=3)
    bad["img_shapes"] = [[(1, 4, 4)], [(1, 4, 4)], [(1, 2, 8)]]
    with pytest.raises(ValueError, match="img_shapes.*one entry per sample"):
        run(qmodel, bad)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cosmos", "mochi", "lumina_next", "chroma"])
def test_family_whose_code_fixes_the_batch_falls_back_to_a_static_capture(name):
    model, inputs = family(name)
    with pytest.warns(UserWarning, match="static batch of 2"):
        qmodel = dqcompile.quantize(model, "w8a8", example_inputs=inputs(2), progress=False)
    assert qmodel.binding.static_batch == 2
    for batch in (3, 3, 2):  # the second batch-3 call reuses the cached graph
        values = inputs(batch, seed=batch)
        assert rel_l2(run(qmodel, values), run(model, values)) < W8A8
    assert list(qmodel.__dict__["_graphs_by_batch"]) == [3]


@pytest.mark.slow
@pytest.mark.parametrize("name, line", [
    ("lumina2", r"transformer_lumina2.py:\d+ `use_mask = len\(set\(seq_lengths\)\) > 1`"),
    ("omnigen", r"transformer_omnigen.py:\d+ `if seq_len > self.original_max_position_embeddings:` branches"),
    ("hidream", r"transformer_hidream_image.py:\d+ .*numpy\(\).* converts a traced tensor to numpy"),
])
def test_family_that_cannot_be_captured_is_refused_in_one_sentence(name, line):
    model, inputs = family(name)
    with pytest.raises(CaptureError, match=line) as refused:
        dqcompile.capture(model, inputs(2))
    assert "\n" not in str(refused.value)
    assert name in UNCAPTURED


@pytest.mark.slow
def test_compile_equals_eager_on_sana():
    """Sana's quantized linears read transposed tensors (the fake-stride bug of the issue)."""
    model, inputs, captured = captured_family("sana")
    qmodel = quantized_copy(captured, "w8a8")
    compiled = torch.compile(qmodel, backend="dqcompile")
    batch = inputs(2, seed=4)
    eager = run(qmodel, batch)
    with torch.no_grad():
        got = output(compiled(**batch, return_dict=False))
    assert rel_l2(got, eager) < 1e-5
