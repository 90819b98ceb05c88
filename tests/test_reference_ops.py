"""Tests of the dqcompile custom ops and their reference implementations (dqcompile/backends)."""

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dqcompile.backends.ops
from dqcompile.backends import OP_TABLE, bind_arguments, kernel, load_backend, op_def, reference, register_kernel
from dqcompile.quant import QuantizedWeight, compute_qparams, quantize, quantize_weight

ops = torch.ops.dqcompile

# float32 unit roundoff.
UNIT_ROUNDOFF = 2.0**-24

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]


def random_int8(*shape: int, seed: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8).to(device)


def int64_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact product, computed on the CPU in int64."""
    return a.cpu().long() @ b.cpu().long().t()


# --- int_matmul -----------------------------------------------------------------------------------------

# (M, K, N): M = 32 with K, N multiples of 8 takes torch._int_mm on CUDA; M = 5 (M <= 16) and odd sizes
# take the float64 fallback there. On CPU torch._int_mm takes every shape.
MATMUL_SHAPES = [(32, 64, 48), (5, 64, 48), (33, 30, 7), (0, 8, 8), (17, 1, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("m", "k", "n"), MATMUL_SHAPES)
def test_int_matmul_is_exact(device: str, m: int, k: int, n: int) -> None:
    a, b = random_int8(m, k, seed=1, device=device), random_int8(n, k, seed=2, device=device)
    result = ops.int_matmul(a, b)
    assert result.dtype == torch.int32 and result.shape == (m, n) and result.device.type == device
    assert torch.equal(result.cpu().long(), int64_matmul(a, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("m", "k", "n"), MATMUL_SHAPES)
def test_float64_fallback_is_exact(device: str, m: int, k: int, n: int) -> None:
    a, b = random_int8(m, k, seed=3, device=device), random_int8(n, k, seed=4, device=device)
    assert torch.equal(reference._int_matmul_float64(a, b).cpu().long(), int64_matmul(a, b))


@pytest.mark.parametrize("device", DEVICES)
def test_int_matmul_is_exact_at_the_extremes(device: str) -> None:
    # -128 * -128 summed over K = 8192 is 2^27: far beyond float32's exact integers, well inside int32.
    k = 8192
    a = torch.full((32, k), -128, dtype=torch.int8, device=device)
    b = torch.cat([torch.full((8, k), -128, dtype=torch.int8), torch.full((8, k), 127, dtype=torch.int8)]).to(device)
    expected = int64_matmul(a, b)
    assert int(expected.abs().max()) == 128 * 128 * k
    assert torch.equal(ops.int_matmul(a, b).cpu().long(), expected)
    assert torch.equal(reference._int_matmul_float64(a, b).cpu().long(), expected)

    # Random mixes of -128 and 127: the worst case for int8 kernels with 16-bit intermediate sums (AVX2
    # u8 x s8 pairs saturate there), which must not show up here.
    generator = torch.Generator().manual_seed(8)
    a = (torch.randint(0, 2, (64, 1024), generator=generator) * 255 - 128).to(torch.int8).to(device)
    b = (torch.randint(0, 2, (40, 1024), generator=generator) * 255 - 128).to(torch.int8).to(device)
    assert torch.equal(ops.int_matmul(a, b).cpu().long(), int64_matmul(a, b))


@pytest.mark.parametrize("device", DEVICES)
def test_int_mm_path_selection(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    large, small = random_int8(32, 64, seed=5, device=device), random_int8(5, 64, seed=6, device=device)
    weight = random_int8(48, 64, seed=7, device=device)
    if device == "cuda":
        assert reference._int_mm_accepts(large, weight) and not reference._int_mm_accepts(small, weight)
        return
    # CPU: wherever it is the faster exact GEMM, except degenerate shapes (a K = 1 call returns garbage).
    from dqcompile.backends import cpu_path

    monkeypatch.setattr(cpu_path, "int_mm_is_faster", lambda: True)
    assert reference._int_mm_accepts(large, weight) and reference._int_mm_accepts(small, weight)
    assert not reference._int_mm_accepts(large[:, :1], weight[:, :1])
    assert not reference._int_mm_accepts(large[:1], weight) and not reference._int_mm_accepts(large, weight[:1])
    monkeypatch.setattr(cpu_path, "int_mm_is_faster", lambda: False)
    assert not reference._int_mm_accepts(large, weight)


def test_int_matmul_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match=r"int8 \[M, K\] and int8 \[N, K\]"):
        reference.int_matmul(torch.zeros(2, 4, dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"K differs"):
        reference.int_matmul(torch.zeros(2, 4, dtype=torch.int8), torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"may overflow the int32 accumulator"):
        reference.int_matmul(torch.zeros(1, 2**17, dtype=torch.int8), torch.zeros(1, 2**17, dtype=torch.int8))


# --- int_linear -----------------------------------------------------------------------------------------


def float64_dequantized(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """s * (q - z) in float64 (exact: a 24-bit mantissa times a 9-bit integer), scale / zero [..., G]."""
    groups = scale.shape[-1]
    grouped = codes.double().reshape(*codes.shape[:-1], groups, -1)
    return ((grouped - zero.double().unsqueeze(-1)) * scale.double().unsqueeze(-1)).reshape(codes.shape)


def assert_matches_float_simulation(
    y: torch.Tensor, x_hat: torch.Tensor, w_hat: torch.Tensor, bias: torch.Tensor, groups: int
) -> None:
    """y must equal x_hat @ w_hat^T + bias up to the float32 epilogue's rounding.

    Each group's term s_x s_w float(acc) carries three float32 roundings (the int32 -> float conversion and
    two products): relative error <= 3u. Summing G terms and the bias in float32 adds at most G u times the
    sum of their magnitudes. Both are bounded by (G + 3) u (|x_hat| @ |w_hat|^T + |bias|); one more u covers
    the float64 simulation's own rounding (2^-53 per product, K <= 2^10 products) with room to spare.
    """
    y_ref = x_hat @ w_hat.t() + bias.double()
    magnitude = x_hat.abs() @ w_hat.abs().t() + bias.double().abs()
    tolerance = (groups + 4) * UNIT_ROUNDOFF * magnitude
    error = (y.double() - y_ref).abs()
    assert bool((error <= tolerance).all()), f"max excess {(error - tolerance).max().item()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_bits", [8, 6, 4])
@pytest.mark.parametrize("group_size", [0, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_linear_matches_float_simulation(device: str, w_bits: int, group_size: int, symmetric: bool) -> None:
    generator = torch.Generator().manual_seed(w_bits * 100 + group_size + symmetric)
    x = (torch.randn(2, 9, 128, generator=generator) + 0.7).to(device)  # offset: asymmetric ranges
    w = torch.randn(40, 128, generator=generator)
    bias = torch.randn(40, generator=generator).to(device)
    weight = quantize_weight(w, w_bits, group_size)
    qw, w_scale = weight.qweight.to(device), weight.scale.to(device)

    qx, x_scale, x_zero = ops.quantize_act(x, 8, group_size, symmetric)
    y = ops.int_linear(qx, x_scale, x_zero, qw, w_scale, bias, w_bits, group_size, torch.float32)
    assert y.shape == (2, 9, 40) and y.dtype == torch.float32 and y.device.type == device

    groups = x_scale.shape[-1]
    x_hat = float64_dequantized(qx, x_scale, x_zero).reshape(-1, 128)
    w_hat = float64_dequantized(weight.codes().to(device), w_scale, torch.zeros_like(w_scale))
    assert_matches_float_simulation(y.reshape(-1, 40), x_hat, w_hat, bias, groups)

    # Other output dtypes are the float32 result, cast.
    y_bf16 = ops.int_linear(qx, x_scale, x_zero, qw, w_scale, bias, w_bits, group_size, torch.bfloat16)
    assert torch.equal(y_bf16, y.to(torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
def test_int_linear_with_static_per_tensor_activations_and_no_bias(device: str) -> None:
    generator = torch.Generator().manual_seed(11)
    x = (torch.randn(3, 64, generator=generator) + 0.5).to(device)
    weight = quantize_weight(torch.randn(16, 64, generator=generator), 8, 16)
    qw, w_scale = weight.qweight.to(device), weight.scale.to(device)
    qp = compute_qparams(x, 8, symmetric=False, granularity="tensor")
    x_scale, x_zero = qp.scale.reshape(1), qp.zero.reshape(1)  # broadcast against [..., G]

    qx = ops.quantize_act_static(x, x_scale, x_zero, 8)
    assert torch.equal(qx, quantize(x, qp))
    y = ops.int_linear(qx, x_scale, x_zero, qw, w_scale, None, 8, 16, torch.float32)

    x_hat = float64_dequantized(qx, x_scale.expand(3, 4), x_zero.expand(3, 4))
    w_hat = float64_dequantized(weight.codes().to(device), w_scale, torch.zeros_like(w_scale))
    assert_matches_float_simulation(y, x_hat, w_hat, torch.zeros(16, device=device), groups=4)


def test_quantize_act_static_uses_the_full_code_range() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    q = ops.quantize_act_static(x, torch.tensor([1.0 / 127]), torch.tensor([0], dtype=torch.int32), 8)
    assert q.tolist() == [-128, -127, 0, 127, 127]


def test_int_linear_refuses_mismatched_input() -> None:
    too_wide = torch.zeros(1, 2**16, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"a group of 65536 input channels may overflow"):
        reference.int_linear(too_wide, torch.ones(1), torch.zeros(1, dtype=torch.int32), too_wide,
                             torch.ones(1, 1), None, 8, 0, torch.float32)
    weight = quantize_weight(torch.randn(8, 32), 8)
    qx, x_scale, x_zero = ops.quantize_act(torch.randn(2, 16), 8, 0, True)
    with pytest.raises(ValueError, match=r"matching weights \[N, K\]"):
        reference.int_linear(qx, x_scale, x_zero, weight.qweight, weight.scale, None, 8, 0, torch.float32)
    with pytest.raises(ValueError, match=r"4-bit weights must be 2-D torch.uint8"):
        reference.int_linear(qx, x_scale, x_zero, weight.qweight, weight.scale, None, 4, 0, torch.float32)


# --- weight_only_linear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("w_bits", "group_size"), [(8, 0), (4, 32), (6, 64)])
def test_weight_only_linear_matches_float_simulation(device: str, w_bits: int, group_size: int) -> None:
    generator = torch.Generator().manual_seed(w_bits)
    x = torch.randn(2, 5, 128, generator=generator).to(device)
    weight = quantize_weight(torch.randn(24, 128, generator=generator), w_bits, group_size)
    bias = torch.randn(24, generator=generator).to(device)
    qw, w_scale = weight.qweight.to(device), weight.scale.to(device)

    y = ops.weight_only_linear(x, qw, w_scale, bias, w_bits, group_size)
    assert y.shape == (2, 5, 24) and y.dtype == torch.float32

    w_hat = weight.dequantize().double().to(device)  # s * q: exact in float32 already
    y_ref = x.double() @ w_hat.t() + bias.double()
    # A float32 dot product of K terms plus the bias: error <= (K + 1) u times the sum of magnitudes.
    magnitude = x.double().abs() @ w_hat.abs().t() + bias.double().abs()
    assert bool(((y.double() - y_ref).abs() <= (128 + 2) * UNIT_ROUNDOFF * magnitude).all())

    x_bf16 = x.to(torch.bfloat16)
    y_bf16 = ops.weight_only_linear(x_bf16, qw, w_scale, bias, w_bits, group_size)
    assert y_bf16.dtype == torch.bfloat16
    assert torch.equal(y_bf16, ops.weight_only_linear(x_bf16.float(), qw, w_scale, bias, w_bits, group_size).bfloat16())


# --- registration, fake impls, export -------------------------------------------------------------------

CONTRACT_SCHEMAS = {
    "quantize_act": "dqcompile::quantize_act(Tensor x, int bits, int group_size, bool symmetric) "
    "-> (Tensor q, Tensor scale, Tensor zero)",
    "quantize_act_static": "dqcompile::quantize_act_static(Tensor x, Tensor scale, Tensor zero, int bits) -> Tensor q",
    "int_linear": "dqcompile::int_linear(Tensor qx, Tensor x_scale, Tensor? x_zero, Tensor qw, Tensor w_scale, "
    "Tensor? bias, int w_bits, int group_size, ScalarType out_dtype, Tensor? w_sum=None) -> Tensor",
    "weight_only_linear": "dqcompile::weight_only_linear(Tensor x, Tensor qw, Tensor w_scale, Tensor? bias, "
    "int w_bits, int group_size) -> Tensor",
    "int_matmul": "dqcompile::int_matmul(Tensor a, Tensor b) -> Tensor",
}


def test_schemas_are_those_of_the_contract() -> None:
    for name, schema in CONTRACT_SCHEMAS.items():
        assert str(getattr(ops, name).default._schema) == schema


def test_registration_survives_a_reload() -> None:
    load_backend("aten")
    table = dqcompile.backends.ops.OP_TABLE
    importlib.reload(dqcompile.backends.ops)
    assert dqcompile.backends.ops.OP_TABLE is table and "aten" in table["int_linear"].kernels
    a, b = random_int8(2, 8, seed=0, device="cpu"), random_int8(3, 8, seed=1, device="cpu")
    assert torch.equal(ops.int_matmul(a, b).long(), int64_matmul(a, b))


def test_fake_impls_give_shapes_and_dtypes() -> None:
    with FakeTensorMode():
        x = torch.empty(3, 7, 64)
        qx, x_scale, x_zero = ops.quantize_act(x, 8, 16, False)
        assert (qx.shape, qx.dtype) == ((3, 7, 64), torch.int8)
        assert (x_scale.shape, x_scale.dtype) == ((3, 7, 4), torch.float32)
        assert (x_zero.shape, x_zero.dtype) == ((3, 7, 4), torch.int32)
        assert ops.quantize_act(x, 8, 0, True)[1].shape == (3, 7, 1)

        q_static = ops.quantize_act_static(x, torch.empty(1), torch.empty(1, dtype=torch.int32), 8)
        assert (q_static.shape, q_static.dtype) == ((3, 7, 64), torch.int8)

        packed, w_scale = torch.empty(24, 32, dtype=torch.uint8), torch.empty(24, 4)
        y = ops.int_linear(qx, x_scale, x_zero, packed, w_scale, None, 4, 16, torch.bfloat16)
        assert (y.shape, y.dtype) == ((3, 7, 24), torch.bfloat16)

        y = ops.weight_only_linear(x.half(), packed, w_scale, torch.empty(24), 4, 16)
        assert (y.shape, y.dtype) == ((3, 7, 24), torch.float16)

        c = ops.int_matmul(torch.empty(5, 64, dtype=torch.int8), torch.empty(24, 64, dtype=torch.int8))
        assert (c.shape, c.dtype) == ((5, 24), torch.int32)


class QuantLinear(torch.nn.Module):
    """A linear layer lowered to the dqcompile ops: dynamic per-group activations, packed int4 weights."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("w_scale", weight.scale)
        self.register_buffer("bias", bias)
        self.w_bits, self.group_size = weight.bits, weight.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qx, x_scale, x_zero = torch.ops.dqcompile.quantize_act(x, 8, self.group_size, False)
        return torch.ops.dqcompile.int_linear(
            qx, x_scale, x_zero, self.qweight, self.w_scale, self.bias, self.w_bits, self.group_size, torch.float32
        )


def test_export_keeps_the_ops_as_single_nodes_with_a_dynamic_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = quantize_weight(torch.randn(24, 64, generator=generator), 4, 32)
    module = QuantLinear(weight, torch.randn(24, generator=generator))
    batch = torch.export.Dim("batch")
    exported = torch.export.export(
        module, (torch.randn(4, 7, 64, generator=generator),), dynamic_shapes={"x": {0: batch}}, strict=False
    )

    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.dqcompile.quantize_act.default) == 1
    assert targets.count(torch.ops.dqcompile.int_linear.default) == 1

    other_batch = torch.randn(3, 7, 64, generator=generator)
    assert torch.equal(exported.module()(other_batch), module(other_batch))


def test_compile_traces_the_ops_without_graph_breaks() -> None:
    generator = torch.Generator().manual_seed(1)
    weight = quantize_weight(torch.randn(24, 64, generator=generator), 8, 0)
    module = QuantLinear(weight, torch.randn(24, generator=generator))
    compiled = torch.compile(module, backend="eager", fullgraph=True, dynamic=True)
    for batch in (2, 5):
        x = torch.randn(batch, 7, 64, generator=generator)
        assert torch.equal(compiled(x), module(x))


def test_every_op_is_registered_from_its_table_entry() -> None:
    for name, definition in OP_TABLE.items():
        overload = getattr(ops, name).default
        assert definition.overload is overload
        assert str(overload._schema) == f"dqcompile::{name}{definition.schema}"
    assert op_def("ln_modulate_quantize").fused and op_def("gelu_quantize").fused
    assert not op_def("int_linear").fused
    with pytest.raises(ValueError, match=r"dqcompile has no op 'nope'; ops: quantize_act, "):
        op_def("nope")


def test_bind_arguments_reads_positions_from_the_schema() -> None:
    bound = bind_arguments("int_linear", ("qx", "s", None, "qw", "ws", None, 8, 0, torch.float32))
    assert list(bound) == list(op_def("int_linear").argument_names)
    assert bound["x_zero"] is None and bound["w_sum"] is None and bound["group_size"] == 0
    assert bind_arguments("quantize_act", ("x",), {"bits": 8, "group_size": 0, "symmetric": True})["bits"] == 8
    with pytest.raises(TypeError, match=r"dqcompile.quantize_act: missing argument 'symmetric'"):
        bind_arguments("quantize_act", ("x", 8, 0))
    with pytest.raises(TypeError, match=r"unexpected arguments \['bogus'\]"):
        bind_arguments("int_matmul", ("a", "b"), {"bogus": 1})


def test_register_kernel_makes_a_twin_with_the_schema_and_fake() -> None:
    calls = []

    def int_matmul_twin(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append((a.shape, b.shape))
        return reference.int_matmul(a, b)

    entry = register_kernel("unittest", "int_matmul", int_matmul_twin)
    assert entry.kind == "custom_op" and entry.target is ops.int_matmul_unittest.default
    assert kernel("unittest", "int_matmul") is entry and kernel("unittest", "int_linear") is None
    assert str(ops.int_matmul_unittest.default._schema) == "dqcompile::int_matmul_unittest(Tensor a, Tensor b) -> Tensor"
    a, b = random_int8(3, 8, seed=0, device="cpu"), random_int8(5, 8, seed=1, device="cpu")
    assert torch.equal(ops.int_matmul_unittest(a, b).long(), int64_matmul(a, b)) and len(calls) == 1
    with FakeTensorMode():  # the table's fake, not the kernel, answers for shapes
        assert ops.int_matmul_unittest(torch.empty(4, 8, dtype=torch.int8), torch.empty(6, 8, dtype=torch.int8)).shape == (4, 6)
    assert len(calls) == 1
    # Registering it again (a reloaded module) keeps the entry; another function for the same cell is refused.
    assert register_kernel("unittest", "int_matmul", int_matmul_twin) is entry
    with pytest.raises(ValueError, match=r"backend 'unittest' already registered a kernel for 'int_matmul'"):
        register_kernel("unittest", "int_matmul", reference.int_matmul)
    with pytest.raises(ValueError, match=r"the 'reference' column is the op itself"):
        register_kernel("reference", "int_matmul", int_matmul_twin)
    with pytest.raises(ValueError, match=r"backend names are lower-case identifiers, got 'Bad-Name'"):
        register_kernel("Bad-Name", "int_matmul", int_matmul_twin)
    decomposition = register_kernel("unittest", "quantize_act", reference.quantize_act, decomposition=True)
    assert decomposition.target is reference.quantize_act and not hasattr(ops, "quantize_act_unittest")


def test_backends_load_on_demand() -> None:
    assert load_backend("aten") == "aten" and kernel("aten", "int_linear").kind == "decomposition"
    with pytest.raises(ValueError, match=r"kernel backend 'nope' is not available; known backends: aten, reference"):
        load_backend("nope")
