"""Activation statistics of a Fashion-MNIST DiT over its own sampling: what quantizing its linears meets.

    python benchmarks/activation_stats.py --model embedded --samples 16 --steps 20 --out docs/img/activation_stats_embedded
    python benchmarks/activation_stats.py --model benchmark --samples 64 --steps 50 --device cuda --out results/stats_b

The model samples `--samples` images (classes 0..9 in turn, classifier-free guidance, DDIM `--steps`
steps; sampler settings as in benchmarks/evaluate.py) and every call is observed, conditional and
null-class rows together, one call per timestep. For each linear that the default spec quantizes (the
w8a8 preset's keep-float rules decide), at each timestep t:

- channel salience s_c(t) = max over rows and tokens of |x_c| for each input channel c;
- salience ratio(t) = max_c s_c(t) / median_c s_c(t): how far the most salient channel stands out (the
  outlier channels that PTQ4DiT balances; 1 means flat);
- range(t) = max_c s_c(t), and its variation across timesteps, max_t range / min_t range (what TQ-DiT's
  time grouping targets), with the Spearman correlation of the salience vectors of the first and last
  step (do the same channels stay salient?);
- post-GELU range: min and max of the fc2 inputs (the GELU outputs);
- post-softmax: the attention probabilities of each self-attention (recomputed from its query and key
  projections for the first rows of the batch), their maximum and the mean over queries of each query's
  largest probability.

Writes OUT.json (per layer and timestep), OUT.md (a table per layer: salience ratio max and median over
timesteps, range variation, Spearman, post-GELU and post-softmax ranges) and OUT.png (a heat map of the
salience ratio, layer by timestep, drawn with pillow).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import run_metadata  # noqa: E402
from dqcompile.spec import QuantSpec  # noqa: E402

SOFTMAX_ROWS = 8  # rows of each call whose attention probabilities are recomputed (memory: rows x heads x N^2)


def quantized_linears(model: nn.Module) -> list[str]:
    """The names of the nn.Linear modules that the default spec (w8a8) quantizes."""
    spec = QuantSpec.resolve("w8a8")
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if hasattr(spec, "keep_float_reason"):
            kept = spec.keep_float_reason(name) is not None
        else:
            kept = any(fnmatch.fnmatchcase(name, pattern) for pattern, _ in spec.keep_float)
        if not kept:
            names.append(name)
    return names


class Observer:
    """Forward hooks that reduce each quantized linear's input and each attention's probabilities to
    per-timestep statistics as the model runs (nothing large is kept)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.timestep: int | None = None
        self.salience: dict[str, dict[int, torch.Tensor]] = {}
        self.gelu: dict[str, dict[int, tuple[float, float]]] = {}
        self.softmax: dict[str, dict[int, tuple[float, float]]] = {}
        self.handles = []
        self.layers = quantized_linears(model)
        for name in self.layers:
            module = model.get_submodule(name)
            self.handles.append(module.register_forward_pre_hook(self._linear_hook(name)))
        for name, module in model.named_modules():
            if hasattr(module, "to_q") and hasattr(module, "to_k") and hasattr(module, "heads"):
                self._attach_attention(name, module)

    def _linear_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            s = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).cpu()
            per_step = self.salience.setdefault(name, {})
            per_step[self.timestep] = torch.maximum(per_step[self.timestep], s) if self.timestep in per_step else s
            if name.endswith("ff.net.2"):  # the fc2 input is the GELU output
                low, high = float(x.min()), float(x.max())
                old = self.gelu.setdefault(name, {}).get(self.timestep, (math.inf, -math.inf))
                self.gelu[name][self.timestep] = (min(old[0], low), max(old[1], high))
        return hook

    def _attach_attention(self, name: str, attention: nn.Module) -> None:
        captured: dict[str, torch.Tensor] = {}

        def keep(key: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                captured[key] = output.detach()[:SOFTMAX_ROWS].float()
            return hook

        def probabilities(module: nn.Module, args: tuple, output: Any) -> None:
            q, k = captured.pop("q", None), captured.pop("k", None)
            if q is None or k is None or q.dim() != 3:
                return
            heads = module.heads
            rows, tokens, inner = q.shape
            q = q.view(rows, tokens, heads, inner // heads).transpose(1, 2)
            k = k.view(rows, k.shape[1], heads, inner // heads).transpose(1, 2)
            scale = getattr(module, "scale", 1.0 / math.sqrt(inner // heads))
            probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
            peak = float(probs.amax())
            mean_row_max = float(probs.amax(dim=-1).mean())
            old = self.softmax.setdefault(name, {}).get(self.timestep, (0.0, 0.0))
            self.softmax[name][self.timestep] = (max(old[0], peak), max(old[1], mean_row_max))

        self.handles += [attention.to_q.register_forward_hook(keep("q")),
                         attention.to_k.register_forward_hook(keep("k")),
                         attention.register_forward_hook(probabilities)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class TimestepSetter(nn.Module):
    """Calls the model after telling the observer which timestep this call is."""

    def __init__(self, model: nn.Module, observer: Observer) -> None:
        super().__init__()
        self.model, self.observer, self.config = model, observer, getattr(model, "config", None)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> Any:
        self.observer.timestep = int(timestep.reshape(-1)[0])
        return self.model(hidden_states, timestep=timestep, class_labels=class_labels)


def layer_summary(name: str, observer: Observer) -> dict[str, Any]:
    per_step = observer.salience[name]
    steps = sorted(per_step, reverse=True)  # sampling order: t from high to low
    ratios = [float(per_step[t].max() / per_step[t].median().clamp_min(1e-12)) for t in steps]
    ranges = [float(per_step[t].max()) for t in steps]
    first, last = per_step[steps[0]].numpy(), per_step[steps[-1]].numpy()
    rho = float(spearmanr(first, last).statistic) if len(steps) > 1 else math.nan
    summary: dict[str, Any] = {
        "layer": name,
        "channels": int(first.shape[0]),
        "timesteps": steps,
        "salience_ratio": ratios,
        "range": ranges,
        "salience_ratio_max": max(ratios),
        "salience_ratio_median": float(np.median(ratios)),
        "range_variation": max(ranges) / max(min(ranges), 1e-12),
        "spearman_first_last": rho,
        "top_channel": [int(per_step[t].argmax()) for t in steps],
    }
    if name in observer.gelu:
        lows, highs = zip(*(observer.gelu[name][t] for t in steps))
        summary["post_gelu_min"], summary["post_gelu_max"] = min(lows), max(highs)
        summary["post_gelu_max_variation"] = max(highs) / max(min(highs), 1e-12)
    attention = name.rsplit(".", 1)[0] if ".attn1." in f"{name}." else None
    if attention is not None and attention in observer.softmax:
        peaks, row_max = zip(*(observer.softmax[attention][t] for t in steps))
        summary["post_softmax_max"], summary["post_softmax_mean_row_max"] = max(peaks), float(np.mean(row_max))
    return summary


def markdown(result: dict[str, Any]) -> str:
    meta, setting = result["metadata"], result["settings"]
    lines = [
        f"{result['model']}: {setting['samples']} images, DDIM {setting['steps']} steps (every step observed), "
        f"guidance {setting['guidance']}, clip_sample {setting['clip_sample']}; {meta['device']}, torch "
        f"{meta['torch']}, {meta['date']}, commit {meta['commit'][:12]}.",
        "",
        "Salience ratio: max over channels / median over channels of the per-channel max |x| (per timestep); "
        "range variation: max over timesteps / min over timesteps of the largest |x|; Spearman: rank "
        "correlation of the channel saliences of the first and last step.",
        "",
        "| layer | salience ratio, max over t | median over t | range variation over t | Spearman first/last | "
        "post-GELU range | post-softmax max (mean row max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["layers"]:
        gelu = (f"[{row['post_gelu_min']:.2f}, {row['post_gelu_max']:.1f}]" if "post_gelu_max" in row else "")
        soft = (f"{row['post_softmax_max']:.3f} ({row['post_softmax_mean_row_max']:.3f})"
                if "post_softmax_max" in row else "")
        lines.append(f"| {row['layer']} | {row['salience_ratio_max']:.1f} | {row['salience_ratio_median']:.1f} | "
                     f"{row['range_variation']:.2f} | {row['spearman_first_last']:.2f} | {gelu} | {soft} |")
    totals = result["summary"]
    lines += ["", f"Over all {len(result['layers'])} quantized linears: salience ratio up to "
              f"{totals['salience_ratio_max']:.1f} (median layer {totals['salience_ratio_median_layer']:.1f}); range "
              f"variation over timesteps up to {totals['range_variation_max']:.2f}x (median layer "
              f"{totals['range_variation_median_layer']:.2f}x)."]
    return "\n".join(lines) + "\n"


def _color(value: float, low: float, high: float) -> tuple[int, int, int]:
    """A perceptually ordered dark-blue -> yellow ramp (viridis-like, 5 anchors, linear in between)."""
    anchors = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    f = 0.0 if high <= low else min(max((value - low) / (high - low), 0.0), 1.0)
    position = f * (len(anchors) - 1)
    i = min(int(position), len(anchors) - 2)
    w = position - i
    return tuple(round(a + (b - a) * w) for a, b in zip(anchors[i], anchors[i + 1]))


def draw_heatmap(result: dict[str, Any], path: Path) -> None:
    """log2 of the salience ratio: one row per quantized linear, one column per timestep (high t left)."""
    layers = result["layers"]
    steps = layers[0]["timesteps"]
    values = np.log2(np.array([row["salience_ratio"] for row in layers]))
    low, high = 0.0, max(float(values.max()), 1.0)
    cell_w, cell_h = max(6, 360 // len(steps)), 12
    font = ImageFont.load_default()
    label_w = 8 + max(int(font.getlength(row["layer"])) for row in layers)
    width = label_w + cell_w * len(steps) + 90
    height = 40 + cell_h * len(layers) + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), f"{result['model']}: log2(max/median channel salience) of each quantized linear's input",
              fill="black", font=font)
    draw.text((4, 18), f"rows: layers; columns: the {len(steps)} sampling steps, t = {steps[0]} (left) to {steps[-1]}",
              fill="black", font=font)
    top = 36
    for r, row in enumerate(layers):
        y = top + r * cell_h
        draw.text((4, y), row["layer"], fill="black", font=font)
        for c in range(len(steps)):
            x = label_w + c * cell_w
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=_color(values[r, c], low, high))
    # Colour bar.
    bar_x = label_w + cell_w * len(steps) + 16
    bar_h = cell_h * len(layers)
    for i in range(bar_h):
        draw.line([bar_x, top + bar_h - 1 - i, bar_x + 14, top + bar_h - 1 - i],
                  fill=_color(low + (high - low) * i / max(bar_h - 1, 1), low, high))
    draw.text((bar_x + 18, top - 4), f"{2 ** high:.0f}x", fill="black", font=font)
    draw.text((bar_x + 18, top + bar_h // 2 - 6), f"{2 ** ((low + high) / 2):.1f}x", fill="black", font=font)
    draw.text((bar_x + 18, top + bar_h - 10), "1x", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="embedded, benchmark, or a checkpoint folder")
    parser.add_argument("--samples", type=int, default=16, help="images (default 16)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps, each observed (default 20)")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--clip-sample", choices=("true", "false"), default="false",
                        help="clip the predicted x0 while sampling (default false)")
    parser.add_argument("--timestep-spacing", default="leading",
                        help="leading (default: the protocol of docs/quality.md), trailing or linspace")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.json, .md, .png)")
    args = parser.parse_args(argv)

    from evaluate import load_model  # the driver's model loader: embedded, benchmark or a folder

    from dqcompile.fmnist import NUM_CLASSES
    from dqcompile.sampling import make_scheduler, sample

    model, config, description = load_model(args.model, args.device, torch.float32)
    observer = Observer(model)
    clip = args.clip_sample == "true"
    scheduler = make_scheduler("ddim", config["scheduler"], clip_sample=clip, timestep_spacing=args.timestep_spacing)
    labels = torch.arange(args.samples) % NUM_CLASSES
    try:
        sample(TimestepSetter(model, observer), labels, scheduler=scheduler, null_class_id=config.get("null_class_id", 10),
               steps=args.steps, guidance_scale=args.guidance, seed=args.seed, batch_size=args.samples,
               device=args.device, progress=False)
    finally:
        observer.remove()
    layers = [layer_summary(name, observer) for name in observer.layers if name in observer.salience]
    ratios = [row["salience_ratio_max"] for row in layers]
    variations = [row["range_variation"] for row in layers]
    result = {
        "metadata": run_metadata(),
        "model": description,
        "settings": {"samples": args.samples, "steps": args.steps, "guidance": args.guidance, "clip_sample": clip,
                     "timestep_spacing": args.timestep_spacing, "seed": args.seed,
                     "softmax_rows_per_call": SOFTMAX_ROWS},
        "summary": {"salience_ratio_max": max(ratios), "salience_ratio_median_layer": float(np.median(ratios)),
                    "range_variation_max": max(variations), "range_variation_median_layer": float(np.median(variations))},
        "layers": layers,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table)
    draw_heatmap(result, args.out.with_suffix(".png"))
    print(table)
    print(f"wrote {args.out.with_suffix('.json')}, .md and .png")
    return result


if __name__ == "__main__":
    main()
