"""The report quantize() returns: what happened to each linear layer, and the weight memory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dqcompile.passes.context import LayerPlan
from dqcompile.spec import LayerSpec


def describe_weights(spec: LayerSpec) -> str:
    granularity = f"group {spec.weight_group_size}" if spec.weight_group_size else "per channel"
    if spec.fitted_from:
        granularity += f" (fitted from {spec.fitted_from})"
    clip = ", clip search" if spec.clip_search else ""
    return f"int{spec.weight_bits} {granularity}{clip}"


def describe_activations(spec: LayerSpec) -> str:
    if not spec.act_quantized:
        return "float"
    mode = {
        "dynamic_token": "dynamic per token",
        "dynamic_group": f"dynamic group {spec.act_group_size}",
        "dynamic_sample_group": f"dynamic per sample, group {spec.act_group_size}",
        "static_tensor": "static per tensor",
    }[spec.act_mode]
    return f"int{spec.act_bits} {mode}, {'sym' if spec.act_symmetric else 'asym'}"


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    weights: str
    activations: str
    note: str


@dataclass
class QuantReport:
    """Per-layer outcome of quantize(); `str(report)` is a table, `to_dict()` its JSON form.

    Memory figures count the weights of linear layers only (the parts quantization changes).
    """

    spec_name: str
    layers: list[LayerReport] = field(default_factory=list)
    float_weight_bytes: int = 0
    quantized_weight_bytes: int = 0

    @classmethod
    def from_plans(cls, spec_name: str, plans: list[LayerPlan], weight_bytes: dict[str, tuple[int, int]]) -> QuantReport:
        """weight_bytes: layer name -> (bytes as float, bytes now)."""
        report = cls(spec_name=spec_name)
        for plan in plans:
            before, after = weight_bytes[plan.name]
            report.float_weight_bytes += before
            report.quantized_weight_bytes += after
            if plan.quantized:
                row = LayerReport(
                    plan.name, (plan.out_features, plan.in_features), describe_weights(plan.spec),
                    describe_activations(plan.spec), "; ".join(plan.notes),
                )
            else:
                row = LayerReport(plan.name, (plan.out_features, plan.in_features), "float", "float", plan.float_reason or "")
            report.layers.append(row)
        return report

    @property
    def quantized_count(self) -> int:
        return sum(row.weights != "float" for row in self.layers)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        header = ("layer", "shape", "weights", "activations", "note")
        rows = [(r.name, f"{r.shape[0]}x{r.shape[1]}", r.weights, r.activations, r.note) for r in self.layers]
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        line = lambda row: "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
        ratio = self.float_weight_bytes / max(self.quantized_weight_bytes, 1)
        summary = (
            f"dqcompile {self.spec_name}: {self.quantized_count} of {len(self.layers)} linear layers quantized; "
            f"linear weights {self.float_weight_bytes / 2**20:.2f} MiB -> {self.quantized_weight_bytes / 2**20:.2f} MiB "
            f"({ratio:.2f}x smaller)"
        )
        return "\n".join([summary, line(header), *(line(row) for row in rows)])
