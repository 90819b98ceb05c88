"""The torch.compile backend "dqcompile" (dqcompile/backends/compile.py and fusion.py) on tiny models, CPU.

An Inductor compile costs 30-70 s here (it builds C++ kernels), so one test compiles through Inductor;
the others stop after dynamo's capture and run the backend's rewritten graph eagerly.

The Triton wiring test runs the Triton kernels on CPU through the Triton interpreter, which must be
switched on (TRITON_INTERPRET=1) before Triton is first imported: `test_triton_wiring_under_interpreter`
re-runs this file in a subprocess with the variable set, where the `interp` test runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import dqcompile
from dqcompile.backends import bind_arguments, reference
from dqcompile.backends.compile import (RewriteSummary, make_backend, prepare_int_linears, resolve_kernels,
                                       rewrite_graph)
from dqcompile.quant import quantize_weight
from dqcompile.example_inputs import default_example_inputs
from tiny_models import hand_dit, hand_dit_inputs, tiny_dit

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
REPO_ROOT = Path(__file__).resolve().parent.parent

interp = pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 subprocess")


def dqcompile_ops(gm: torch.fx.GraphModule) -> Counter:
    """How many nodes of each dqcompile op (and of the weight-sum helper) the graph holds."""
    names: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if getattr(node.target, "namespace", None) == "dqcompile":
            names[str(node.target).removesuffix(".default")] += 1
        elif getattr(node.target, "__name__", "") == "weight_group_sums":
            names["weight_group_sums"] += 1
    return names


def call(model: Any, inputs: dict | tuple) -> torch.Tensor:
    if isinstance(inputs, dict):
        return model(**inputs, return_dict=False)[0]
    return model(*inputs)


def run_rewritten(qmodel: dqcompile.QuantizedModel, inputs: dict | tuple,
                  kernels: str) -> tuple[torch.Tensor, torch.fx.GraphModule, RewriteSummary]:
    """Capture `qmodel` with dynamo, apply the backend's rewrite, and run the rewritten graph eagerly."""
    torch._dynamo.reset()
    captured: list[tuple[torch.fx.GraphModule, RewriteSummary]] = []

    def rewrite_only(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        captured.append((gm, rewrite_graph(gm, kernels=kernels)))
        return gm.forward

    output = call(torch.compile(qmodel, backend=rewrite_only), inputs)
    assert len(captured) == 1, "the quantized model should be captured as one graph"
    return output, *captured[0]


def diffusers_inputs(batch: int, timestep: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + batch)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": torch.full((batch,), timestep),
        "class_labels": torch.arange(batch) % 10,
    }


@pytest.fixture(scope="module")
def one_block_w8a8() -> dqcompile.QuantizedModel:
    """A one-block diffusers DiT, W8A8 (asymmetric per-token activations): q, k, v and fc1 read modulated
    LayerNorms (2 shared inputs); to_out and fc2 do not; the final projection stays float."""
    return dqcompile.quantize(tiny_dit(num_layers=1), "w8a8", progress=False)


# Per block: the attention input (q, k, v) and the MLP input (fc1) are modulated LayerNorms, and the fc2
# input is a GELU; the hand DiT also quantizes its final linear, fed by the final modulated LayerNorm.
# What stays a plain quantize_act is the attention output's (to_out / proj input), one per block.
@pytest.mark.parametrize(
    ("build", "ln_fused", "blocks"),
    [
        pytest.param(lambda: (tiny_dit(num_layers=2), None), 2 * 2, 2, id="diffusers_dit"),
        pytest.param(lambda: (hand_dit(), hand_dit_inputs()), 2 * 2 + 1, 2, id="hand_dit_fused_qkv"),
    ],
)
def test_fusion_replaces_quantizers_of_layer_norms_and_gelus(build, ln_fused: int, blocks: int) -> None:
    model, inputs = build()
    inputs = inputs if inputs is not None else default_example_inputs(model)
    qmodel = dqcompile.quantize(model, "w8a8", example_inputs=inputs, progress=False)
    before = dqcompile_ops(qmodel.graph_module)

    output, gm, summary = run_rewritten(qmodel, inputs, kernels="reference")

    after = dqcompile_ops(gm)
    assert summary.kernels == "reference" and summary.retargeted == {}
    assert summary.fused == {"ln_modulate_quantize": ln_fused, "gelu_quantize": blocks}
    assert after["dqcompile.ln_modulate_quantize"] == ln_fused
    assert after["dqcompile.gelu_quantize"] == blocks
    assert after["dqcompile.quantize_act"] == blocks
    assert after["dqcompile.int_linear"] == before["dqcompile.int_linear"]
    assert not any(node.target == torch.ops.aten.gelu.default for node in gm.graph.nodes)
    # w8a8 quantizes activations asymmetrically: every linear keeps x_zero and has its weight's sums
    # (passed by the lowering; the backend adds them where a graph lacks them, see below).
    linears = [bind_arguments("int_linear", n.args, n.kwargs) for n in gm.graph.nodes
               if n.target == torch.ops.dqcompile.int_linear.default]
    assert linears and all(args["x_zero"] is not None and args["w_sum"] is not None for args in linears)
    # The reference fused ops run the unfused graph's float32 ops in the same order: bit-identical.
    assert torch.equal(output, call(qmodel, inputs))


def test_symmetric_quantizers_drop_the_zero_point_term() -> None:
    spec = dqcompile.QuantSpec.resolve("w8a8").replace(activations=dqcompile.ActivationSpec(bits=8, symmetric=True))
    qmodel = dqcompile.quantize(tiny_dit(num_layers=1), spec, progress=False)
    inputs = diffusers_inputs(2, 500)

    output, gm, summary = run_rewritten(qmodel, inputs, kernels="reference")

    linears = [bind_arguments("int_linear", n.args, n.kwargs) for n in gm.graph.nodes
               if n.target == torch.ops.dqcompile.int_linear.default]
    assert len(linears) == 6 and all(args["x_zero"] is None and args["w_sum"] is None for args in linears)
    assert summary.w_sums == 0
    assert torch.equal(output, call(qmodel, inputs))


class TwoLinears(torch.nn.Module):
    """Two linears on one weight, lowered by hand without x_zero None or w_sum: one after a symmetric
    quantizer, one after an asymmetric one."""

    def __init__(self) -> None:
        super().__init__()
        weight = quantize_weight(torch.randn(24, 64, generator=torch.Generator().manual_seed(0)), 4, 32)
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("w_scale", weight.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.dqcompile
        outputs = []
        for symmetric in (True, False):
            qx, x_scale, x_zero = ops.quantize_act(x, 8, 32, symmetric)
            outputs.append(ops.int_linear(qx, x_scale, x_zero, self.qweight, self.w_scale, None, 4, 32,
                                          torch.float32))
        return outputs[0] + outputs[1]


def test_prepare_int_linears_drops_zero_terms_and_adds_weight_sums() -> None:
    module = TwoLinears()
    gm = torch.fx.symbolic_trace(module)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    expected = module(x)

    assert prepare_int_linears(gm) == (1, 1)

    linears = [bind_arguments("int_linear", n.args, n.kwargs) for n in gm.graph.nodes
               if n.target == torch.ops.dqcompile.int_linear]  # symbolic_trace calls the op packet
    assert linears[0]["x_zero"] is None and linears[0]["w_sum"] is None
    assert linears[1]["x_zero"] is not None and linears[1]["w_sum"].target is reference.weight_group_sums
    assert torch.equal(gm(x), expected)
    assert prepare_int_linears(gm) == (0, 0)  # idempotent


def test_aten_decompositions_match_the_reference() -> None:
    # Run eagerly (no Inductor), the decompositions give the reference's codes and, up to float32
    # rounding of the epilogue's order, its outputs.
    qmodel = dqcompile.quantize(tiny_dit(num_layers=1), "w4a8", progress=False)
    inputs = diffusers_inputs(2, 500)

    output, gm, summary = run_rewritten(qmodel, inputs, kernels="aten")

    assert summary.kernels == "aten"
    assert summary.retargeted == {"dqcompile::ln_modulate_quantize": 2, "dqcompile::gelu_quantize": 1,
                                  "dqcompile::quantize_act": 1, "dqcompile::int_linear": 6}
    ops = dqcompile_ops(gm)
    assert ops["dqcompile.int_linear"] == ops["dqcompile.quantize_act"] == 0
    expected = call(qmodel, inputs)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_backend_registration_and_kernel_choice(one_block_w8a8: dqcompile.QuantizedModel) -> None:
    assert "dqcompile" in torch._dynamo.list_backends()
    with pytest.raises(ValueError, match=r"kernels='cuda' is not 'auto', 'reference' or an available backend "
                                         r"\(kernel backend 'cuda' is not available; known backends: aten, reference"):
        make_backend(kernels="cuda")
    graph = one_block_w8a8.graph_module
    assert resolve_kernels(graph, "auto") == "aten"
    assert resolve_kernels(graph, "reference") == "reference"
    if not INTERPRETING:
        with pytest.raises(ValueError, match="kernels='triton' needs CUDA tensors, the quantized model is on cpu"):
            resolve_kernels(graph, "triton")


def test_compiled_model_matches_eager_in_one_graph(one_block_w8a8: dqcompile.QuantizedModel,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(one_block_w8a8, backend="dqcompile")  # kernels "auto": "aten" on CPU
    caplog.set_level(logging.INFO, logger="dqcompile.backends.compile")
    for index, (batch, timestep) in enumerate([(2, 999), (2, 500), (2, 1), (3, 999), (3, 500), (3, 1)]):
        inputs = diffusers_inputs(batch, timestep)
        if index == 0:  # one graph for every batch size (see dqcompile.backends.compile, "Dynamic shapes")
            for tensor in inputs.values():
                torch._dynamo.mark_dynamic(tensor, 0)
        expected = call(one_block_w8a8, inputs)
        actual = call(compiled, inputs)
        # Inductor's float ops round differently from eager (float32, ~1e-7 relative), and a value that
        # sits on a rounding boundary of the 8-bit quantizer may then take the neighbouring code: one
        # activation step (~0.4% of the token's range) times a few weights of ~0.1. That stays far below
        # 1% of the output's scale, while a broken rewrite (a lost modulation, a wrong eps or zero point)
        # moves outputs by their own magnitude.
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-2 * expected.abs().max().item())
        assert (actual - expected).abs().median() < 1e-5, "most outputs should agree to float32 rounding"

    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, "timesteps or batch sizes caused a recompile"
    assert "kernels=aten, fused {'ln_modulate_quantize': 2, 'gelu_quantize': 1}" in caplog.text


def test_modes_reach_inductor_as_its_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """mode= and extra options become compile_fx's config patches, as backend="inductor" would pass them
    ("reduce-overhead": CUDA graphs; Inductor skips them for CPU graphs)."""
    import torch._inductor.compile_fx as compile_fx_module

    seen: list[Any] = []
    monkeypatch.setattr(compile_fx_module, "compile_fx",
                        lambda gm, example_inputs, config_patches=None: seen.append(config_patches) or gm.forward)
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    make_backend("reference", mode="reduce-overhead")(gm, [])
    make_backend("reference", inductor_options={"max_autotune": True})(gm, [])
    make_backend("reference")(gm, [])
    assert seen[0]["triton.cudagraphs"] is True
    assert seen[1] == {"max_autotune": True} and seen[2] is None


def test_diffusers_output_type_compiles_without_graph_break(one_block_w8a8: dqcompile.QuantizedModel) -> None:
    torch._dynamo.reset()
    counters.clear()
    output = torch.compile(one_block_w8a8, backend=lambda gm, example_inputs: gm.forward)(**diffusers_inputs(2, 10))
    assert type(output).__name__ == "Transformer2DModelOutput"
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.skipif(INTERPRETING or not HAS_TRITON, reason="launches the interpreter run; needs triton")
def test_triton_wiring_under_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "interp"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "4 passed" in result.stdout, result.stdout[-2000:]


@interp
def test_interp_merged_qkv_gemm_on_triton() -> None:
    """q, k and v as one Triton GEMM (N = 3 x 32 over a stacked weight) give the three GEMMs' outputs."""
    qmodel = dqcompile.quantize(tiny_dit(num_layers=1), "w8a8", progress=False)
    inputs = diffusers_inputs(2, 500)
    results = {}
    for merge in (False, True):
        torch._dynamo.reset()
        seen: list[tuple[RewriteSummary, int]] = []

        def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
            summary = rewrite_graph(gm, kernels="triton", merge=merge, example_inputs=example_inputs)
            seen.append((summary, dqcompile_ops(gm)["dqcompile.int_linear_triton"]))
            return gm.forward

        results[merge] = call(torch.compile(qmodel, backend=backend), inputs)
        assert seen[0][0].merged_linears == int(merge) and seen[0][1] == (4 if merge else 6)
    assert torch.equal(results[True], results[False])


@interp
@pytest.mark.parametrize(
    ("symmetric", "unpack_rows"), [(False, None), (True, 1)],
    ids=["w4a8_asymmetric_in_kernel", "w4a8_symmetric_unpacked_then_int8"]
)
def test_interp_triton_kernels_replace_reference_ops(monkeypatch: pytest.MonkeyPatch, symmetric: bool,
                                                     unpack_rows: int | None) -> None:
    """The backend's Triton kernels in the rewritten graph give the reference model's output: int4 weights
    unpacked in the GEMM with asymmetric activations (zero-point term, weight sums), and with `unpack_rows`
    1 the many-rows path (the unpack kernel, then the int8 GEMM) with symmetric activations (no zero-point
    term)."""
    from dqcompile.backends.triton import gemm

    if unpack_rows is not None:
        monkeypatch.setattr(gemm, "W4_UNPACK_ROWS", unpack_rows)
    unpacked: list[tuple[int, ...]] = []
    unpack = gemm.triton_unpack_int4

    def counting_unpack(packed: torch.Tensor) -> torch.Tensor:
        unpacked.append(tuple(packed.shape))
        return unpack(packed)

    monkeypatch.setattr(gemm, "triton_unpack_int4", counting_unpack)
    spec = dqcompile.QuantSpec.resolve("w4a8")
    spec = spec.replace(activations=dqcompile.ActivationSpec(bits=8, symmetric=symmetric))
    qmodel = dqcompile.quantize(tiny_dit(num_layers=1), spec, progress=False)
    inputs = diffusers_inputs(2, 500)

    output, gm, summary = run_rewritten(qmodel, inputs, kernels="triton")
    assert bool(unpacked) == (unpack_rows is not None)  # the many-rows path ran exactly when it was forced

    assert summary.retargeted == {"dqcompile::ln_modulate_quantize": 2, "dqcompile::gelu_quantize": 1,
                                  "dqcompile::quantize_act": 1, "dqcompile::int_linear": 6}
    ops = dqcompile_ops(gm)
    assert ops["dqcompile.int_linear_triton"] == 6 and ops["dqcompile.ln_modulate_quantize_triton"] == 2
    assert ops["dqcompile.gelu_quantize_triton"] == 1
    assert ops["dqcompile.int_linear"] == ops["dqcompile.quantize_act"] == ops["dqcompile.ln_modulate_quantize"] == 0
    linears = [bind_arguments("int_linear", node.args, node.kwargs) for node in gm.graph.nodes
               if node.target == torch.ops.dqcompile.int_linear_triton.default]
    if symmetric:  # zero points are all 0: no zero-point term, no weight sums
        assert all(args["x_zero"] is None and args["w_sum"] is None for args in linears)
    else:
        assert all(args["x_zero"] is not None and args["w_sum"] is not None for args in linears)
    # The Triton LayerNorm sums in another order than ATen's (float32); codes may then flip by one step,
    # as in test_compiled_model_matches_eager_in_one_graph.
    expected = call(qmodel, inputs)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-2 * expected.abs().max().item())



def _register_triton_op_int_matmul() -> Any:
    """A small Triton int_matmul registered for the test backend "unittesttriton" with triton_op=True."""
    import triton
    import triton.language as tl

    from dqcompile.backends import register_kernel

    @triton.jit
    def outer_sum_kernel(a_ptr, b_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(K):
            a = tl.load(a_ptr + rows * K + k, mask=rows < M, other=0).to(tl.int32)
            b = tl.load(b_ptr + cols * K + k, mask=cols < N, other=0).to(tl.int32)
            acc += a[:, None] * b[None, :]
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc, mask=(rows[:, None] < M) & (cols[None, :] < N))

    def int_matmul_triton_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)
        torch.library.wrap_triton(outer_sum_kernel)[(1,)](a, b, out, a.shape[0], b.shape[0], a.shape[1],
                                                          BLOCK_M=8, BLOCK_N=8)
        return out

    return register_kernel("unittesttriton", "int_matmul", int_matmul_triton_op, triton_op=True)


def _small_int8_operands(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (5, 7), generator=generator, dtype=torch.int8)
    b = torch.randint(-128, 128, (6, 7), generator=generator, dtype=torch.int8)
    return a.to(device), b.to(device), a.long() @ b.long().t()


@interp
def test_interp_triton_op_kernels_run_as_their_twin() -> None:
    # (Tracing a triton_op needs real Triton kernels: the interpreter's stand-ins cannot take fake tensors,
    # so the traced graph is checked on CUDA, below.)
    entry = _register_triton_op_int_matmul()
    assert entry.kind == "triton_op" and entry.target is torch.ops.dqcompile.int_matmul_unittesttriton.default
    assert str(entry.target._schema) == "dqcompile::int_matmul_unittesttriton(Tensor a, Tensor b) -> Tensor"
    a, b, expected = _small_int8_operands("cpu")
    assert torch.equal(torch.ops.dqcompile.int_matmul_unittesttriton(a, b).cpu().long(), expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs CUDA")
def test_triton_op_kernels_are_traced_into_the_graph() -> None:
    """What AOTAutograd hands Inductor for a triton_op kernel: the Triton launch itself (a
    `triton_kernel_wrapper` node that Inductor's generated code launches), not an opaque op."""
    from torch._dynamo.backends.common import aot_autograd

    _register_triton_op_int_matmul()
    a, b, expected = _small_int8_operands("cuda")
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        graphs.append(gm)
        return gm

    compiled = torch.compile(lambda x, y: torch.ops.dqcompile.int_matmul_unittesttriton(x, y),
                             backend=aot_autograd(fw_compiler=capture))
    assert torch.equal(compiled(a, b).cpu().long(), expected)
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert not any("int_matmul_unittesttriton" in target for target in targets), targets
    assert any("triton_kernel_wrapper" in target for target in targets), targets


@pytest.mark.parametrize(("dtype", "approximate", "fused_for_triton"), [
    (torch.float32, "none", 0), (torch.float32, "tanh", 1), (torch.bfloat16, "none", 1)])
def test_triton_leaves_float32_erf_gelu_unfused(dtype: torch.dtype, approximate: str, fused_for_triton: int) -> None:
    """Triton's fused erf GELU moved a few float32 codes on an H200 (its erf is not aten's bit for bit), so
    for Triton kernels a float32 erf GELU keeps aten's GELU; the other cases fuse for every backend."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from dqcompile.backends.fusion import fuse_quantizers

    def mlp_tail(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.ops.dqcompile.quantize_act(torch.ops.aten.gelu(x, approximate=approximate), 8, 0, False)

    for float32_erf, expected in ((True, 1), (False, fused_for_triton)):
        gm = make_fx(mlp_tail)(torch.randn(2, 8, dtype=dtype))
        assert fuse_quantizers(gm, float32_erf=float32_erf).get("gelu_quantize", 0) == expected
        targets = [node.target for node in gm.graph.nodes]
        assert (torch.ops.aten.gelu.default in targets) == (expected == 0)
