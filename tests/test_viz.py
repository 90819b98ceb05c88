"""The graph view: the page, its colours against the report, per-layer errors, DOT, and `dqcompile viz`."""

import csv
import io
import json
import math
import re

import pytest
import torch

import dqcompile
from dqcompile import ActivationSpec, QuantSpec, WeightSpec
from dqcompile.capture import capture
from dqcompile import find_adaln_pairs
from dqcompile.viz import build_graph_view, format_layer_errors, graph_view, layer_errors, render
from dqcompile.viz.dot import dot_source, write_dot
from dqcompile.viz.html import page
from tiny_models import dit_inputs, hand_dit, hand_dit_inputs, layer_inputs_and_outputs, tiny_dit



@pytest.fixture(scope="module")
def dit():
    """A tiny diffusers DiT, its capture, two input batches, and w8a8 / w4a8 models with their errors."""
    model = tiny_dit()
    inputs = [dit_inputs(4, seed) for seed in (1, 2)]
    captured = capture(model, inputs[0])
    quantized = {spec: dqcompile.quantize(model, spec, progress=False) for spec in ("w8a8", "w4a8")}
    errors = {spec: layer_errors(captured, q, inputs, progress=False) for spec, q in quantized.items()}
    return {"model": model, "inputs": inputs, "captured": captured, "q": quantized, "errors": errors}


def expected_label(weights: str, activations: str) -> str:
    """The precision label the view should show for a report row: bits and granularity only."""
    weights = re.sub(r" \(fitted from .*\)", "", weights).removesuffix(", clip search")
    activations = activations.removesuffix(", sym").removesuffix(", asym")
    return "float" if weights == activations == "float" else f"W {weights} · A {activations}"


def page_data(html: str) -> dict:
    return json.loads(re.search(r'<script id="graph-data" type="application/json">(.*?)</script>', html, re.S).group(1))


def test_page_is_self_contained_and_names_every_layer(dit, tmp_path):
    qmodel = dit["q"]["w4a8"]
    files = render(qmodel, tmp_path / "graph.html", errors=dit["errors"]["w4a8"], dot=False)
    html = files.html.read_text()
    # Nothing is fetched at view time: the only URL in the page is the SVG namespace name.
    assert set(re.findall(r"https?://[^\s\"'<>)]+", html)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|@import", html)
    for row in qmodel.report.layers:
        assert f'data-layer="{row.name}"' in html
    view = graph_view(qmodel)
    assert f'<b id="node-count">{len(view.nodes)}</b>' in html
    # Every integer linear of the graph is one of the page's operations, in its layer.
    names = {node.name: node for node in view.nodes}
    int_linears = [n for n in qmodel.graph_module.graph.nodes if n.target == torch.ops.dqcompile.int_linear.default]
    assert len(int_linears) == 12
    for node in int_linears:
        assert view.layers[names[node.name].layer].name == node.meta["dqcompile"]["layer"]
    # Parameter reads are part of their layer, not operations of their own.
    assert not any(name.endswith("_qweight") for name in names)


@pytest.mark.parametrize("spec", ["w4a8", "w8a8"])
def test_colour_classes_match_the_report(dit, spec):
    qmodel = dit["q"][spec]
    view = graph_view(qmodel)
    html = page(view)
    labels = [p.label for p in view.precisions]
    for row in qmodel.report.layers:
        index = labels.index(expected_label(row.weights, row.activations))
        assert view.layer(row.name).precision == index, row.name
        # The summary row's swatch carries the same colour class as the graph boxes (".p<index>").
        assert re.search(rf'<tr data-layer="{re.escape(row.name)}">.*?class="swatch p{index}"', html), row.name
    assert labels == ["W int8 per channel · A int8 dynamic per token" if spec == "w8a8" else
                      "W int4 per channel · A int8 dynamic per token", "float"]


def test_other_specs_group_weight_only_static_and_folds(dit):
    """Precisions of grouped, weight-only and static specs as the report gives them; PTQ4DiT's V fold
    leaves the V layers unmeasured (their outputs are divided by b) and the output projections sane."""
    grouped = QuantSpec(weights=WeightSpec(bits=4, group_size=16), activations=ActivationSpec(bits=8, mode="dynamic_group"))
    hand = dqcompile.quantize(hand_dit(), "w4a16", example_inputs=hand_dit_inputs(), progress=False)
    cases = (
        (dqcompile.quantize(tiny_dit(), grouped, progress=False), "W int4 group 16 · A int8 dynamic group 16"),
        (hand, "W int4 per channel · A float"),
        (dqcompile.quantize(dit["model"], "ptq4dit-w4a8", calibration=dit["inputs"], progress=False),
         "W int4 per channel · A int8 static per tensor"),
    )
    for qmodel, expected in cases:
        view = graph_view(qmodel)
        for row in qmodel.report.layers:
            assert view.precisions[view.layer(row.name).precision].label == expected_label(row.weights, row.activations)
        assert expected in [p.label for p in view.precisions]
    errors = {e.name: e for e in layer_errors(dit["captured"], cases[2][0], dit["inputs"], progress=False)}
    for block in (0, 1):
        value, out = errors[f"transformer_blocks.{block}.attn1.to_v"], errors[f"transformer_blocks.{block}.attn1.to_out.0"]
        assert not value.measured and math.isnan(value.sqnr_db) and "not comparable" in value.note
        # Without the fold's rescale, the output projection would read as a few dB; balanced, it is an
        # ordinary 4-bit layer, like the adaLN-balanced ones.
        assert out.measured and "includes its error" in out.note and out.sqnr_db > 15
        assert errors[f"transformer_blocks.{block}.attn1.to_q"].sqnr_db > 15
    table = format_layer_errors(errors.values(), fmt="csv").splitlines()
    assert table[-1].startswith("12,") and ",not measured," in table[-1]
    # A float model that is not the quantized model's source is refused, naming a layer.
    with pytest.raises(ValueError, match=r"layer blocks\.0\.qkv: the quantized graph calls it 1 time\(s\), the float model 0"):
        layer_errors(dit["captured"], hand, dit["inputs"], progress=False)


def test_w8a8_layers_have_higher_sqnr_than_w4a8(dit):
    w8 = {e.name: e for e in dit["errors"]["w8a8"]}
    w4 = {e.name: e for e in dit["errors"]["w4a8"]}
    assert set(w8) == set(w4) and len(w8) == 12
    for name in w8:
        # 4 fewer weight bits cost about 6 dB a bit in the weights' share of the error; on this random
        # tiny DiT the layers sit near 44 dB (w8a8) and 22-27 dB (w4a8), far apart.
        assert w8[name].sqnr_db > w4[name].sqnr_db + 10, name
        assert 35 < w8[name].sqnr_db < 60 and 15 < w4[name].sqnr_db < 35, name
    aggregate = lambda errors: 10 * math.log10(sum(e.signal for e in errors) / sum(e.noise for e in errors))
    assert aggregate(w8.values()) > aggregate(w4.values()) + 15


def test_isolated_error_is_the_layer_on_float_inputs(dit):
    """to_q of block 0 by hand: the float model's input and output of the layer (forward hooks), and the
    quantized layer's ops on that input; the error table must give the same SQNR."""
    model, qmodel, inputs = dit["model"], dit["q"]["w4a8"], dit["inputs"]
    name = "transformer_blocks.0.attn1.to_q"
    seen = layer_inputs_and_outputs(model, name, inputs)
    layer = qmodel.graph_module.get_submodule(name)
    ops = torch.ops.dqcompile
    signal = noise = 0.0
    for x, y in seen:
        qx, scale, zero = ops.quantize_act(x, 8, 0, False)
        y_q = ops.int_linear(qx, scale, zero, layer.qweight, layer.weight_scale, layer.bias, 4, 0, torch.float32)
        signal += float(y.square().sum())
        noise += float((y - y_q).square().sum())
    by_name = {e.name: e for e in dit["errors"]["w4a8"]}
    assert by_name[name].sqnr_db == pytest.approx(10 * math.log10(signal / noise), abs=1e-3)


def test_accumulated_mode_carries_earlier_errors(dit):
    isolated = {e.name: e.sqnr_db for e in dit["errors"]["w4a8"]}
    accumulated = {e.name: e.sqnr_db for e in layer_errors(dit["captured"], dit["q"]["w4a8"], dit["inputs"],
                                                           mode="accumulated", progress=False)}
    first = "transformer_blocks.0.attn1.to_q"  # the first quantized layer sees float inputs either way
    assert accumulated[first] == pytest.approx(isolated[first], abs=1e-6)
    # Block 1's output projection comes after six quantized layers: its error has grown.
    assert accumulated["transformer_blocks.1.attn1.to_out.0"] < isolated["transformer_blocks.1.attn1.to_out.0"] - 1
    with pytest.raises(ValueError, match="mode='total' is not allowed"):
        layer_errors(dit["captured"], dit["q"]["w4a8"], dit["inputs"], mode="total")


def test_error_tables_are_sorted_worst_first_and_name_the_mode(dit):
    errors = dit["errors"]["w4a8"]
    rows = list(csv.DictReader(io.StringIO(format_layer_errors(errors, fmt="csv"))))
    values = [float(row["sqnr_db"]) for row in rows]
    assert values == sorted(values) and len(rows) == 12
    assert [row["rank"] for row in rows] == [str(i) for i in range(1, 13)]
    assert {row["mode"] for row in rows} == {"isolated"}
    assert rows[0]["layer"] == min(errors, key=lambda e: e.sqnr_db).name
    text = format_layer_errors(errors).splitlines()
    assert text[0].startswith("per-layer SQNR, worst first (isolated: each quantized layer sees the float model's inputs")
    assert [line.split()[1] for line in text[2:]] == [row["layer"] for row in rows]
    with pytest.raises(ValueError, match="fmt='xml' is not allowed"):
        format_layer_errors(errors, fmt="xml")


def test_pairs_are_drawn_and_bad_names_refused(dit, tmp_path):
    qmodel = dit["q"]["w4a8"]
    pairs = find_adaln_pairs(dit["captured"])
    view = graph_view(qmodel, pairs=pairs)
    data = page_data(page(view))
    assert ["adaLN", ["transformer_blocks.0.norm1.linear"],
            ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k", "transformer_blocks.0.attn1.to_v"],
            ""] in data["pairs"]
    assert ["V->out", ["transformer_blocks.1.attn1.to_v"], ["transformer_blocks.1.attn1.to_out.0"], ""] in data["pairs"]
    dot = dot_source(view)
    assert dot.count('label="adaLN"]') >= 4 and 'label="V->out"]' in dot
    with pytest.raises(ValueError, match="layer blocks.9.fc1 is not in the graph"):
        graph_view(qmodel, pairs=[{"source": "transformer_blocks.0.norm1.linear", "consumers": ["blocks.9.fc1"]}])
    wrong = [dataclass_copy(dit["errors"]["w4a8"][0], name="blocks.9.fc1")]
    with pytest.raises(ValueError, match="layer error for blocks.9.fc1: the graph has no such layer"):
        graph_view(qmodel, errors=wrong)


def dataclass_copy(instance, **changes):
    import dataclasses

    return dataclasses.replace(instance, **changes)


def test_float_graph_view_and_dot_without_graphviz(dit, tmp_path, monkeypatch):
    view = build_graph_view(dit["captured"].graph_module)
    assert [p.label for p in view.precisions] == ["float"]
    assert len(view.layers) == 20  # 2 blocks x (q, k, v, out, fc1, fc2, adaLN, 2 timestep) + 2 final
    monkeypatch.setattr("dqcompile.viz.dot.shutil.which", lambda name: None)
    files = write_dot(view, tmp_path / "g.dot")
    assert files.svg is None and "Graphviz (dot) is not installed" in files.message
    text = files.dot.read_text()
    assert text.startswith("digraph dqcompile {") and text.rstrip().endswith("}")
    assert "subgraph cluster_" in text and "transformer_blocks.0.attn1.to_q" in text


def test_dot_renders_svg_when_graphviz_is_installed(dit, tmp_path):
    import shutil

    if shutil.which("dot") is None:
        pytest.skip("Graphviz is not installed")
    files = write_dot(graph_view(dit["q"]["w4a8"], errors=dit["errors"]["w4a8"]), tmp_path / "g.dot")
    svg = files.svg.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "transformer_blocks.1.ff.net.2" in svg


def test_cli_viz_runs_on_an_injected_model(tmp_path, monkeypatch, capsys):
    """`dqcompile viz` end to end, with the embedded model swapped for a tiny DiT (8 output channels:
    the trajectory sampler keeps the epsilon half)."""
    from dqcompile import cli
    from dqcompile.viz import command

    monkeypatch.setattr(cli, "_embedded_model", lambda device: tiny_dit())
    out, table = tmp_path / "g.html", tmp_path / "e.csv"
    assert cli.main(["viz", "--spec", "w8a8", "--out", str(out), "--samples", "2", "--steps", "1", "--csv", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "per-layer SQNR, worst first (isolated" in printed and f"wrote {out}" in printed
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 12 and {row["precision"] for row in rows} == {"W int8 per channel · A int8 dynamic per token"}
    data = page_data(out.read_text())
    assert data["error_mode"] == "isolated" and any(p[0] == "adaLN" for p in data["pairs"])
    assert out.with_suffix(".dot").is_file()
    with pytest.raises(ValueError, match="csv_path with images > 0"):
        command.run_viz(tiny_dit(), out=tmp_path / "x.html", images=0, csv_path=tmp_path / "x.csv")
