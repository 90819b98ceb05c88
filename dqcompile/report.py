"""The report quantize() returns: what happened to each linear layer, and the weight memory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dqcompile.plan import ActivationPlan, ModelPlan, WeightPlan


def describe_weights(weight: WeightPlan) -> str:
    granularity = f"group {weight.group_size}" if weight.group_size else "per channel"
    if weight.fitted_from:
        granularity += f" (fitted from {weight.fitted_from})"
    clip = (", clip search (unit gain)" if weight.clip_unit_gain else ", clip search") if weight.clip_search else ""
    return f"int{weight.bits} {granularity}{clip}"


def describe_activations(activations: ActivationPlan) -> str:
    if not activations.quantized:
        return "float"
    per = "per time group" if activations.time_grouped else "per tensor"
    mode = {
        "dynamic_token": "dynamic per token",
        "dynamic_group": f"dynamic group {activations.group_size}",
        "dynamic_sample_group": f"dynamic per sample, group {activations.group_size}",
        "static": f"static {per}",
        "two_region": f"two-region (MRQ) {per}",
    }[activations.kind]
    return f"int{activations.bits} {mode}, {'sym' if activations.symmetric else 'asym'}"


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
    def from_plan(cls, spec_name: str, plan: ModelPlan, weight_bytes: dict[str, tuple[int, int]]) -> QuantReport:
        """weight_bytes: layer name -> (bytes as float, bytes now)."""
        report = cls(spec_name=spec_name)
        for layer in plan.layers.values():
            before, after = weight_bytes[layer.name]
            report.float_weight_bytes += before
            report.quantized_weight_bytes += after
            shape = (layer.out_features, layer.in_features)
            if layer.quantized:
                row = LayerReport(layer.name, shape, describe_weights(layer.weight),
                                  describe_activations(layer.activations), "; ".join(layer.notes))
            else:
                row = LayerReport(layer.name, shape, "float", "float", layer.float_reason or "")
            report.layers.append(row)
        return report

    @property
    def quantized_count(self) -> int:
        return sum(row.weights != "float" for row in self.layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantReport:
        layers = [LayerReport(**{**row, "shape": tuple(row["shape"])}) for row in data["layers"]]
        return cls(**{**data, "layers": layers})

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
