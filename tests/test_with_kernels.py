"""QuantizedModel.with_kernels: the compile backend's graph rewrite applied to an eager copy of the model."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import dit_inputs, tiny_dit

import dqcompile


def _dqcompile_targets(model: dqcompile.QuantizedModel) -> set[str]:
    return {str(node.target) for node in model.graph_module.graph.nodes if "dqcompile" in str(node.target)}


def test_with_kernels_rewrites_a_copy_and_shares_the_tensors() -> None:
    """On CPU "auto" means the ATen decompositions: no dqcompile op is left in the copy's graph, its outputs
    equal the reference model's, the original graph still runs the reference ops, and no tensor is copied."""
    model = tiny_dit()
    qmodel = dqcompile.quantize(model, "w4a8", progress=False)
    inputs = dit_inputs(3)
    expected = qmodel(**inputs).sample
    nodes_before = len(qmodel.graph_module.graph.nodes)

    fast = qmodel.with_kernels()
    assert _dqcompile_targets(fast) == set()
    assert _dqcompile_targets(qmodel) == {"dqcompile.int_linear.default", "dqcompile.quantize_act.default"}
    assert len(qmodel.graph_module.graph.nodes) == nodes_before
    torch.testing.assert_close(fast(**inputs).sample, expected, rtol=0, atol=0)
    own = dict(qmodel.graph_module.named_buffers())
    assert all(tensor is own[name] for name, tensor in fast.graph_module.named_buffers())
    assert fast.plan is qmodel.plan and fast.spec is qmodel.spec

    reference = qmodel.with_kernels("reference", fuse=False)  # the rewrite that changes nothing
    assert _dqcompile_targets(reference) == _dqcompile_targets(qmodel)
    torch.testing.assert_close(reference(**inputs).sample, expected, rtol=0, atol=0)


def test_with_kernels_refuses_kernels_it_cannot_run() -> None:
    qmodel = dqcompile.quantize(tiny_dit(), "w8a8", progress=False)
    with pytest.raises(ValueError, match="kernels='bogus' is not 'auto', 'reference' or an available backend"):
        qmodel.with_kernels("bogus")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        with pytest.raises(ValueError, match="kernels='triton' needs CUDA tensors"):
            qmodel.with_kernels("triton")
