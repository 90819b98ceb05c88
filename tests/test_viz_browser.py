"""The graph page in headless Chromium: its script draws the graph, folds it, and search finds a layer.

Skipped where Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it).
"""

import re

import pytest
import torch
from PIL import Image

import dqcompile
from dqcompile.capture import capture
from dqcompile import find_adaln_pairs
from dqcompile.viz import graph_view, layer_errors, render
from dqcompile.viz.browser import chromium_path, dump_dom, page_url, screenshot
from tiny_models import tiny_dit

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="headless Chromium is not installed")

LAYER = "transformer_blocks.1.attn1.to_q"
MATCH_RGB = (0xFF, 0x00, 0xC8)  # the page's search-match outline (--match in its style)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    model = tiny_dit()
    generator = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(4, 4, 8, 8, generator=generator), "timestep": torch.tensor([999, 600, 300, 20]),
              "class_labels": torch.tensor([0, 3, 5, 9])}
    captured = capture(model, inputs)
    qmodel = dqcompile.quantize(model, "w4a8", progress=False)
    errors = layer_errors(captured, qmodel, inputs, progress=False)
    pairs = find_adaln_pairs(captured)
    path = tmp_path_factory.mktemp("viz") / "graph.html"
    render(qmodel, path, errors=errors, pairs=pairs, dot=False)
    return path, graph_view(qmodel)


def boxes(dom: str) -> list[str]:
    """The opening tags of the SVG boxes the script drew."""
    return re.findall(r'<g [^>]*class="unit[^"]*"[^>]*>', dom)


def test_folded_by_default_with_the_node_count(page):
    path, view = page
    dom = dump_dom(page_url(path))
    assert f'<b id="node-count">{len(view.nodes)}</b>' in dom
    drawn = boxes(dom)
    # The blocks are folded: each is one box, and no layer inside them is drawn.
    assert any('data-path="transformer_blocks.0"' in tag and "module" in tag for tag in drawn)
    assert not any(f'data-path="{LAYER}"' in tag for tag in drawn)
    visible = int(re.search(r'<b id="visible-count">(\d+)</b>', dom).group(1))
    assert visible == len(drawn) and 10 < visible < len(view.nodes) / 3


def test_search_unfolds_outlines_and_scrolls_to_the_layer(page, tmp_path):
    path, view = page
    url = page_url(path, f"search={LAYER}")
    dom = dump_dom(url)
    assert re.search(r'<span id="search-status">1 of 1 match</span>', dom)
    matched = [tag for tag in boxes(dom) if " match" in tag]
    assert len(matched) == 1 and f'data-path="{LAYER}"' in matched[0] and "layer p0" in matched[0]
    assert ">to_q</text>" in dom
    # The match is on screen: the screenshot holds its outline colour (a 4 px frame around a box).
    shot = screenshot(url, tmp_path / "graph_view.png")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 900)
    outline = sum(1 for pixel in image.getdata() if all(abs(a - b) <= 12 for a, b in zip(pixel, MATCH_RGB)))
    assert outline > 300, outline


def test_search_by_part_of_a_name_finds_every_block(page):
    path, _ = page
    dom = dump_dom(page_url(path, "search=to_q"))
    assert '<span id="search-status">1 of 2 matches</span>' in dom
    matched = [tag for tag in boxes(dom) if " match" in tag]
    assert sorted(re.search(r'data-path="([^"]+)"', tag).group(1) for tag in matched) == [
        "transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn1.to_q"]
