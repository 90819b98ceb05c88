"""The Q-DiT group-size search: the BitOps cost model, budget-keeping draws, and a seeded, resumable
search end to end on a tiny DiT (fitness "proxy", CPU)."""

import random

import pytest

import dqcompile
from dqcompile import ActivationSpec, GroupPlan, QuantSpec, WeightSpec
from dqcompile.cli import build_parser
from dqcompile.fmnist.fitness import proxy_fitness
from dqcompile.methods.qdit import SearchLayer, SearchSpace, layer_bitops, search_group_sizes, search_space
from dqcompile.methods.qdit.cost import EPILOGUE_BITOPS
from dqcompile.methods.qdit.evolution import crossover_child, mutation_child, random_genome
from tiny_models import tiny_dit

# The tiny DiT is 32 wide (fc2: 128): a spec of group 32 leaves room on both sides of its cost.
SPEC = QuantSpec(
    weights=WeightSpec(bits=4, group_size=32, clip_search=True),
    activations=ActivationSpec(mode="dynamic_group"),
    method="qdit",
    fit_group_sizes=True,
    name="tiny-qdit",
)
SEARCH = dict(
    candidates=(16, 32, 64, 128), population=4, iterations=2, top_k=2, crossover=2, mutation=2,
    mutation_prob=0.3, fitness_name="proxy", progress=False,
)


def fitness(source):
    return proxy_fitness(source, samples=4, steps=2, guidance_scale=1.5, seed=0, batch_size=256)


def model():
    return tiny_dit(out_channels=4)  # epsilon only, as dqcompile.fmnist.sample expects


def test_layer_bitops_known_values():
    # DiT-XL/2's qkv (1152 -> 3456) over 256 tokens at w4a8, groups of 128: 256 * 3456 outputs, each
    # 1152 4x8-bit MACs (32 BitOps) and 9 group epilogues.
    assert layer_bitops(1152, 3456, 256, 128, 4, 8) == 256 * 3456 * (1152 * 32 + 9 * 3072) == 57_076_088_832
    # Halving the group doubles the groups: 9 more epilogues per output.
    assert layer_bitops(1152, 3456, 256, 64, 4, 8) - layer_bitops(1152, 3456, 256, 128, 4, 8) == 256 * 3456 * 9 * EPILOGUE_BITOPS
    layer = SearchLayer("fc", 192, 768, 256, 6, 8, (32, 64, 96, 192), 96)
    space = SearchSpace((layer, layer), budget=1e12)
    assert space.cost((96, 192)) == layer_bitops(192, 768, 256, 96, 6, 8) + layer_bitops(192, 768, 256, 192, 6, 8)


def synthetic_space() -> SearchSpace:
    layers = tuple(
        SearchLayer(f"blocks.{i}", 192, 192 * (1 + i % 4), 256, 4, 8, (32, 64, 96, 192), 96) for i in range(24)
    )
    return SearchSpace(layers, budget=sum(layer.bitops(96) for layer in layers))


def test_random_crossover_and_mutation_keep_the_budget():
    space, rng = synthetic_space(), random.Random(0)
    parents = [random_genome(space, rng) for _ in range(10)]
    children = [crossover_child(space, parents, rng) for _ in range(200)]
    children += [mutation_child(space, parents, rng, 0.1) for _ in range(200)]
    assert all(space.within_budget(genome) for genome in parents + children)
    assert all(set(genome) <= {32, 64, 96, 192} for genome in children)
    assert len(set(parents)) == 10 and len(set(children)) > 100  # within the budget, they still explore

    cheapest = tuple(192 for _ in space.layers)
    tight = SearchSpace(space.layers, budget=space.cost(cheapest))
    assert random_genome(tight, rng) == cheapest  # repaired down to the one configuration that fits
    with pytest.raises(RuntimeError, match=r"no mutation child within the budget .* raise the budget"):
        mutation_child(tight, [cheapest], rng, 1.0)
    with pytest.raises(ValueError, match=r"budget 1 BitOps is below the cheapest configuration"):
        SearchSpace(space.layers, budget=1.0)


def test_search_space_of_tiny_dit():
    space = search_space(model(), SPEC, candidates=(16, 32, 64, 128))
    layers = {layer.name: layer for layer in space.layers}
    assert len(layers) == 12  # 2 blocks x (q, k, v, out, fc1, fc2); adaLN and embeddings stay float
    assert layers["transformer_blocks.0.attn1.to_q"].choices == (16, 32)
    assert layers["transformer_blocks.0.ff.net.2"].choices == (16, 32, 64, 128)
    assert layers["transformer_blocks.0.ff.net.2"].rows == 16  # 8x8 latents, patch 2
    assert space.budget == space.cost(space.seed) and space.seed == tuple(32 for _ in layers)


@pytest.fixture(scope="module")
def full_search() -> GroupPlan:
    source = model()
    return search_group_sizes(source, fitness(source), SPEC, **SEARCH)


def test_tiny_search_end_to_end(full_search, tmp_path):
    plan = full_search
    assert plan.bitops <= plan.budget == plan.search["spec_bitops"]
    history = plan.search["history"]
    assert [entry["generation"] for entry in history] == [0, 1, 2]
    assert all(later["best_fitness"] <= earlier["best_fitness"] for earlier, later in zip(history, history[1:]))
    assert plan.fitness == history[-1]["best_fitness"] and plan.search["evaluations"] >= 4
    saved = plan.save(tmp_path / "plan.json")
    assert GroupPlan.load(saved) == plan
    # Applied through quantize(), the plan gives the very model the search assembled and scored.
    source = model()
    qmodel = dqcompile.quantize(source, SPEC.with_group_plan(saved), progress=False)
    assert fitness(source)(qmodel) == plan.fitness


def test_seeded_search_is_deterministic_and_resumes(full_search, tmp_path):
    checkpoint = tmp_path / "search.json"
    source = model()
    first = search_group_sizes(source, fitness(source), SPEC, **{**SEARCH, "iterations": 1}, checkpoint=checkpoint)
    resumed = search_group_sizes(source, fitness(source), SPEC, **SEARCH, checkpoint=checkpoint)

    def trace(plan: GroupPlan) -> list:
        return [(h["best_fitness"], h["best_group_sizes"], h["new_evaluations"]) for h in plan.search["history"]]

    # Seeded: the interrupted-and-resumed run is the uninterrupted one, draw for draw.
    assert trace(resumed) == trace(full_search) and resumed.group_sizes == full_search.group_sizes
    assert resumed.search["evaluations"] == full_search.search["evaluations"]
    assert resumed.search["evaluations_this_run"] == full_search.search["evaluations"] - first.search["evaluations"]
    with pytest.raises(ValueError, match=r"checkpoint of another search \(it differs in seed\)"):
        search_group_sizes(source, fitness(source), SPEC, **{**SEARCH, "seed": 1}, checkpoint=checkpoint)


def test_cli_search_and_quantize_take_a_plan():
    args = build_parser().parse_args(["search", "--spec", "qdit-w6a8", "--fitness", "proxy", "--population", "10",
                                      "--iterations", "3", "--out", "plan.json"])
    assert (args.spec, args.fitness, args.population, args.iterations, args.top_k) == ("qdit-w6a8", "proxy", 10, 3, 10)
    args = build_parser().parse_args(["quantize", "--spec", "qdit-w4a8", "--group-plan", "plan.json", "--out", "q"])
    assert args.group_plan == "plan.json"
