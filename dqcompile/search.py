"""Q-DiT's automatic group-size allocation: an evolutionary search over per-layer group sizes.

Each quantized linear gets its own group size g (weights and activations alike) from a per-layer
choice set. A configuration (a "genome": one g per layer, in layer order) costs B = sum over layers
of B_l(g_l) BitOps (`layer_bitops`), and must stay within a budget (by default the cost of the
spec's own group sizes, "uniform 128" for the qdit presets). Among those, the search minimises a
fitness: FID of generated samples (torch-fidelity with the Fashion-MNIST extractor), the mean squared
error of the final images against the float model's from the same noise ("proxy"), or any callable.

The algorithm (METHODS.md): the spec's configuration and random configurations within the budget
form the first population; each generation keeps the top_k, and adds `mutation` children (a parent
with each gene redrawn with probability mutation_prob) and `crossover` children (each gene from one
of two parents); a child over the budget is discarded and drawn again. Everything random comes from
one seeded generator, whose state the checkpoint keeps, so a resumed search is the same search.

Cost of a candidate: every (layer, g) is quantized once, by running the whole quantize pipeline once
per distinct group size over one captured graph; a candidate is then assembled in one working graph
by swapping in the changed layers' integer buffers and group-size arguments. Nothing is quantized
again between candidates, and the assembled model equals `quantize(model, spec.with_group_plan(plan))`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from dqcompile.capture import Captured, ExampleInputs, capture
from dqcompile.example_inputs import default_example_inputs
from dqcompile.model import QuantizedModel
from dqcompile.passes.annotate_linears import annotate_linears
from dqcompile.passes.context import PassContext
from dqcompile.passes.pipeline import run_pipeline
from dqcompile.report import QuantReport
from dqcompile.spec import QuantSpec

logger = logging.getLogger("dqcompile.search")

# Q-DiT's search space (DiT-XL/2, width 1152); per layer only the sizes that divide its width remain.
DEFAULT_CANDIDATES: tuple[int, ...] = (32, 64, 128, 192, 288)
FITNESSES = ("fid", "proxy")
# BitOps of the epilogue of one group for one output: the zero-point correction acc - x_zero * wsum
# (an int32 multiply-add), the scale product x_scale * w_scale (a float32 multiply) and its
# accumulation into the output (a float32 multiply-add): three 32 x 32-bit operations.
EPILOGUE_BITOPS = 3 * 32 * 32
# Draws allowed for one configuration within the budget before the search gives up.
MAX_DRAWS = 1000
PLAN_FORMAT = "dqcompile.group_plan"
PLAN_VERSION = 1
CHECKPOINT_VERSION = 1

Genome = tuple[int, ...]
Fitness = Callable[[nn.Module], float]


def layer_bitops(in_features: int, out_features: int, rows: int, group_size: int, w_bits: int, a_bits: int) -> int:
    """B_l(g): BitOps of one quantized linear for `rows` input rows (its tokens per sample).

        B_l(g) = rows * N * (K * w_bits * a_bits + (K / g) * EPILOGUE_BITOPS)

    The first term is the integer multiply-accumulates (one w_bits x a_bits product per MAC, the
    BitOps convention); the second is the float epilogue, once per group and output: smaller groups
    cost more. The activations' own quantization (one min/max pass per row) is the same for every g
    and left out.
    """
    return rows * out_features * (in_features * w_bits * a_bits + (in_features // group_size) * EPILOGUE_BITOPS)


@dataclass(frozen=True)
class SearchLayer:
    """One searched layer: its shape, its input rows per sample, its bits and its group-size choices.

    default: the spec's group size for the layer (fitted to its width as the spec says); it is
    always a choice, and the first population starts from the configuration of all defaults.
    """

    name: str
    in_features: int
    out_features: int
    rows: int
    w_bits: int
    a_bits: int
    choices: tuple[int, ...]
    default: int

    def bitops(self, group_size: int) -> int:
        return layer_bitops(self.in_features, self.out_features, self.rows, group_size, self.w_bits, self.a_bits)


@dataclass(frozen=True)
class SearchSpace:
    """The searched layers (in graph order) and the BitOps budget; refuses a budget below the
    cheapest configuration (nothing could fit)."""

    layers: tuple[SearchLayer, ...]
    budget: float

    def __post_init__(self) -> None:
        if self.cheapest() > self.budget:
            raise ValueError(
                f"budget {self.budget:.4g} BitOps is below the cheapest configuration ({self.cheapest():.4g} BitOps)"
            )

    def cost(self, genome: Genome) -> int:
        return sum(layer.bitops(g) for layer, g in zip(self.layers, genome))

    def within_budget(self, genome: Genome) -> bool:
        return self.cost(genome) <= self.budget

    @property
    def seed(self) -> Genome:
        return tuple(layer.default for layer in self.layers)

    def cheapest(self) -> int:
        return sum(min(layer.bitops(g) for g in layer.choices) for layer in self.layers)

    def group_sizes(self, genome: Genome) -> dict[str, int]:
        return {layer.name: g for layer, g in zip(self.layers, genome)}


def _draw_within_budget(space: SearchSpace, draw: Callable[[], Genome], what: str) -> Genome:
    for _ in range(MAX_DRAWS):
        genome = draw()
        if space.within_budget(genome):
            return genome
    raise RuntimeError(
        f"no {what} within the budget of {space.budget:.4g} BitOps after {MAX_DRAWS} draws (the spec's "
        f"configuration costs {space.cost(space.seed):.4g}, the cheapest {space.cheapest():.4g}); raise the budget"
    )


def random_genome(space: SearchSpace, rng: random.Random) -> Genome:
    """A configuration within the budget: each gene drawn uniformly from its layer's choices, then,
    while over the budget, a random gene not yet at its cheapest moved to its next cheaper choice.

    Repaired rather than redrawn: smaller groups cost more, so with a budget at the spec's "uniform
    128" a uniform draw over {32, ..., 288} is on average far over it, and a redraw would almost never
    land within it for a model of dozens of layers. The cheapest configuration fits (checked when the
    space is built), so the repair ends.
    """
    genome = [rng.choice(layer.choices) for layer in space.layers]
    while not space.within_budget(tuple(genome)):
        # Choices ascend, and a larger group costs less: the last choice is the cheapest.
        i = rng.choice([i for i, layer in enumerate(space.layers) if genome[i] != layer.choices[-1]])
        choices = space.layers[i].choices
        genome[i] = choices[choices.index(genome[i]) + 1]
    return tuple(genome)


def crossover_child(space: SearchSpace, parents: Sequence[Genome], rng: random.Random) -> Genome:
    """Uniform crossover of two parents drawn from `parents` (distinct when there are two or more),
    redrawn until within the budget."""

    def draw() -> Genome:
        first, second = rng.sample(list(parents), 2) if len(parents) > 1 else (parents[0], parents[0])
        return tuple(a if rng.random() < 0.5 else b for a, b in zip(first, second))

    return _draw_within_budget(space, draw, "crossover child")


def mutation_child(space: SearchSpace, parents: Sequence[Genome], rng: random.Random, probability: float) -> Genome:
    """A parent drawn from `parents` with each gene redrawn from its layer's choices with
    `probability`, redrawn until within the budget."""

    def draw() -> Genome:
        parent = rng.choice(list(parents))
        return tuple(
            rng.choice(layer.choices) if rng.random() < probability else g for layer, g in zip(space.layers, parent)
        )

    return _draw_within_budget(space, draw, "mutation child")


@dataclass
class GroupPlan:
    """The result of a search: a group size per layer (exact layer names), and how it was found.

    Apply it with `QuantSpec.with_group_plan(plan)` (or a saved plan's path); `save` / `load` write
    and read JSON.
    search: the search's settings, evaluations, seconds and per-generation history.
    """

    group_sizes: dict[str, int]
    spec_name: str
    bitops: float
    budget: float
    fitness: float | None = None
    fitness_kind: str = ""
    search: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GroupPlan:
        if data.get("format") != PLAN_FORMAT or data.get("version") != PLAN_VERSION:
            raise ValueError(f"not a version {PLAN_VERSION} group plan (format {data.get('format')!r}, "
                             f"version {data.get('version')!r})")
        fields = {key: value for key, value in data.items() if key not in ("format", "version")}
        return cls(**fields)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> GroupPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _example_inputs(
    model: nn.Module, calibration: list[dict[str, Any]] | None, example_inputs: ExampleInputs | None
) -> ExampleInputs:
    """quantize()'s rule: the given inputs, else the first calibration sample, else the family's defaults."""
    if example_inputs is not None:
        return example_inputs
    return calibration[0] if calibration else default_example_inputs(model)


def _rows_per_sample(gm: GraphModule, node_name: str) -> int:
    """Input rows per sample of a linear node: the product of its output's dims between batch and features."""
    node = next(node for node in gm.graph.nodes if node.name == node_name)
    return math.prod(int(size) for size in node.meta["val"].shape[1:-1])


def _search_layers(captured: Captured, spec: QuantSpec, candidates: Sequence[int]) -> list[SearchLayer]:
    gm = copy.deepcopy(captured.graph_module)
    ctx = PassContext(spec=spec, progress=False)
    annotate_linears(gm, ctx)
    layers = []
    for plan in ctx.quantized_layers():
        default = plan.spec.weight_group_size
        if default == 0:
            raise ValueError(
                f"layer {plan.name}: the spec {spec.name!r} gives it no group size, so the search has no starting "
                "configuration; search from a grouped spec such as qdit-w4a8"
            )
        choices = sorted({g for g in candidates if plan.in_features % g == 0} | {default})
        layers.append(SearchLayer(
            name=plan.name, in_features=plan.in_features, out_features=plan.out_features,
            rows=_rows_per_sample(gm, plan.node_names[0]), w_bits=plan.spec.weight_bits,
            a_bits=plan.spec.act_bits, choices=tuple(choices), default=default,
        ))
    if not layers:
        raise ValueError(f"spec {spec.name!r} quantizes no layer of the model: nothing to search")
    return layers


def search_space(
    model: nn.Module,
    spec: QuantSpec | str = "qdit-w4a8",
    *,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    budget: float | None = None,
    example_inputs: ExampleInputs | None = None,
) -> SearchSpace:
    """The layers the search assigns group sizes to, their choices and costs, and the budget
    (default: the cost of the spec's own group sizes). Captures the model once."""
    spec = QuantSpec.resolve(spec)
    captured = capture(model, _example_inputs(model, None, example_inputs), copy_parameters=True)
    return _space(captured, spec, candidates, budget)


def _space(captured: Captured, spec: QuantSpec, candidates: Sequence[int], budget: float | None) -> SearchSpace:
    if not candidates or any(not isinstance(g, int) or g <= 0 for g in candidates):
        raise ValueError(f"candidates must be positive integers, got {tuple(candidates)!r}")
    layers = tuple(_search_layers(captured, spec, candidates))
    if budget is None:
        budget = sum(layer.bitops(layer.default) for layer in layers)
    return SearchSpace(layers=layers, budget=float(budget))


class CandidateModels:
    """Every (layer, group size) quantized once, and one working model assembled from them.

    One quantize pipeline runs per distinct group size g over copies of one captured graph, with
    every layer at g where g is one of its choices and at its default otherwise. `assemble(genome)`
    installs each changed layer's buffers (shared, not copied) and its lowered nodes' non-tensor
    arguments (group sizes) from the graph of its new g into the working graph.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: QuantSpec,
        space: SearchSpace,
        captured: Captured,
        calibration: list[dict[str, Any]] | None,
        progress: bool,
    ) -> None:
        self.layers = space.layers
        values = sorted({g for layer in space.layers for g in layer.choices})
        self.graphs: dict[int, GraphModule] = {}
        for g in tqdm(values, desc="quantize each group size", disable=not progress, leave=False):
            plan = {layer.name: g if g in layer.choices else layer.default for layer in space.layers}
            gm = copy.deepcopy(captured.graph_module)
            run_pipeline(gm, captured.binding, PassContext(spec=spec.with_group_plan(plan), calibration=calibration,
                                                           progress=False))
            self.graphs[g] = gm
        self.nodes = {g: {node.name: node for node in gm.graph.nodes} for g, gm in self.graphs.items()}
        first = values[0]
        working = copy.deepcopy(self.graphs[first])
        self.current = {layer.name: first if first in layer.choices else layer.default for layer in space.layers}
        self.layer_nodes: dict[str, list[Node]] = {layer.name: [] for layer in space.layers}
        for node in working.graph.nodes:
            layer = node.meta.get("dqcompile", {}).get("layer")
            if layer in self.layer_nodes and node.op == "call_function":
                self.layer_nodes[layer].append(node)
        self.model = QuantizedModel(
            working, captured.binding, spec=spec, report=QuantReport(spec_name=f"{spec.name} (search candidate)"),
            config=getattr(model, "config", None), dtype=next(model.parameters()).dtype,
            source_class=f"{type(model).__module__}.{type(model).__qualname__}",
        )

    def assemble(self, genome: Genome) -> QuantizedModel:
        """The working model with each layer at its group size in `genome`."""
        gm = self.model.graph_module
        changed = False
        for layer, g in zip(self.layers, genome):
            if self.current[layer.name] != g:
                self._install(gm, layer.name, g)
                self.current[layer.name] = g
                changed = True
        if changed:
            gm.recompile()
        return self.model

    def _install(self, gm: GraphModule, layer: str, group_size: int) -> None:
        source = self.graphs[group_size]
        owner = gm.get_submodule(layer)
        for name, buffer in source.get_submodule(layer).named_buffers(recurse=False):
            owner.register_buffer(name, buffer)
        source_nodes = self.nodes[group_size]
        for node in self.layer_nodes[layer]:
            twin = source_nodes.get(node.name)
            if twin is None or twin.target != node.target:
                raise RuntimeError(f"layer {layer}: the lowered graphs of different group sizes differ at {node.name}")
            node.args = tuple(own if isinstance(own, Node) else theirs for own, theirs in zip(node.args, twin.args))


def _class_labels(samples: int, device: torch.device) -> torch.Tensor:
    """Class labels 0, 1, ..., 9, 0, ...: balanced over the classes."""
    from dqcompile.models import NUM_CLASSES

    return (torch.arange(samples) % NUM_CLASSES).to(device)


def proxy_fitness(
    model: nn.Module, *, samples: int, steps: int, guidance_scale: float, seed: int, batch_size: int
) -> Fitness:
    """Mean squared error of a candidate's final images against the float model's from the same noise
    (dqcompile.eval.sample, DDIM, class labels 0..9 in turn)."""
    from dqcompile.eval import sample

    def images(candidate: nn.Module) -> torch.Tensor:
        labels = _class_labels(samples, next(model.parameters()).device)
        return sample(candidate, labels, steps=steps, guidance_scale=guidance_scale, seed=seed,
                      batch_size=batch_size, progress=False)

    reference = images(model)
    return lambda candidate: float((images(candidate) - reference).square().mean())


def fid_fitness(
    model: nn.Module, *, samples: int, steps: int, guidance_scale: float, seed: int, batch_size: int
) -> Fitness:
    """FID of a candidate's samples against the Fashion-MNIST test split, in the feature space of the
    shipped classifier (dqcompile.eval.generative_metrics). The same noise serves every candidate."""
    from dqcompile.data import from_model_space, load_fashion_mnist
    from dqcompile.eval import generative_metrics, sample

    reference, _ = load_fashion_mnist("test")
    device = next(model.parameters()).device

    def fid(candidate: nn.Module) -> float:
        images = sample(candidate, _class_labels(samples, device), steps=steps, guidance_scale=guidance_scale,
                        seed=seed, batch_size=batch_size, progress=False)
        return generative_metrics(from_model_space(images), reference, prc=False, isc=False)["fid"]

    return fid


@dataclass
class _State:
    """What the checkpoint holds: the population of `generation`, the generator's state after it was
    drawn, every fitness so far, and the history of finished generations."""

    config: dict[str, Any]
    generation: int
    population: list[Genome]
    rng_state: Any
    fitness: dict[Genome, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0

    def save(self, path: Path) -> None:
        data = {
            "version": CHECKPOINT_VERSION, "config": self.config, "generation": self.generation,
            "population": [list(genome) for genome in self.population],
            "rng_state": [self.rng_state[0], list(self.rng_state[1]), self.rng_state[2]],
            "fitness": [[list(genome), value] for genome, value in self.fitness.items()],
            "history": self.history, "evaluations": self.evaluations, "seconds": self.seconds,
        }
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(data))
        os.replace(temporary, path)  # atomic: an interrupted write leaves the previous checkpoint

    @classmethod
    def load(cls, path: Path, config: dict[str, Any]) -> _State:
        data = json.loads(path.read_text())
        if data.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path}: not a version {CHECKPOINT_VERSION} search checkpoint")
        differing = sorted(key for key in config.keys() | data["config"].keys()
                           if config.get(key) != data["config"].get(key))
        if differing:
            raise ValueError(f"{path} is the checkpoint of another search (it differs in {', '.join(differing)}); "
                             "delete it or pass another checkpoint path")
        version, state, gauss = data["rng_state"]
        return cls(
            config=config, generation=data["generation"], population=[tuple(g) for g in data["population"]],
            rng_state=(version, tuple(state), gauss),
            fitness={tuple(genome): value for genome, value in data["fitness"]},
            history=data["history"], evaluations=data["evaluations"], seconds=data["seconds"],
        )


def _ranked(population: Iterable[Genome], state: _State, space: SearchSpace) -> list[Genome]:
    """Distinct genomes, best first: by fitness, then cheaper, then the genome itself (a total order)."""
    return sorted(set(population), key=lambda genome: (state.fitness[genome], space.cost(genome), genome))


@dataclass
class _Evolution:
    """The generation loop over a _State, saving it to the checkpoint after every change."""

    space: SearchSpace
    state: _State
    rng: random.Random
    checkpoint: Path | None
    progress: bool

    def save(self) -> None:
        if self.checkpoint is not None:
            self.state.save(self.checkpoint)

    def run(self, score: Callable[[Genome], float], *, iterations: int, top_k: int, crossover: int,
            mutation: int, mutation_prob: float) -> int:
        """Evaluate and breed until generation `iterations` is evaluated; returns the evaluations made."""
        state, space = self.state, self.space
        evaluations = 0
        bar = tqdm(total=iterations + 1, initial=len(state.history), desc="group-size search", disable=not self.progress)
        while True:
            started = time.perf_counter()
            fresh = [genome for genome in dict.fromkeys(state.population) if genome not in state.fitness]
            for genome in tqdm(fresh, desc=f"generation {state.generation}", disable=not self.progress, leave=False):
                evaluation_started = time.perf_counter()
                state.fitness[genome] = score(genome)
                state.evaluations += 1
                state.seconds += time.perf_counter() - evaluation_started
                evaluations += 1
                self.save()
            if len(state.history) == state.generation:  # not yet recorded (a resumed run may have it)
                self._record(len(fresh), time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix(best=f"{state.history[-1]['best_fitness']:.4g}", evaluations=state.evaluations)
            if state.generation >= iterations:
                bar.close()
                return evaluations
            parents = _ranked(state.population, state, space)[:top_k]
            children = [mutation_child(space, parents, self.rng, mutation_prob) for _ in range(mutation)]
            children += [crossover_child(space, parents, self.rng) for _ in range(crossover)]
            state.population = parents + children
            state.generation += 1
            state.rng_state = self.rng.getstate()
            self.save()

    def _record(self, new_evaluations: int, seconds: float) -> None:
        state, space = self.state, self.space
        best = _ranked(state.population, state, space)[0]
        state.history.append({
            "generation": state.generation, "best_fitness": state.fitness[best], "best_bitops": space.cost(best),
            "new_evaluations": new_evaluations, "seconds": round(seconds, 3), "best_group_sizes": list(best),
        })
        logger.info("generation %d: best fitness %.6g at %.4g BitOps (budget %.4g), %d new evaluations",
                    state.generation, state.fitness[best], space.cost(best), space.budget, new_evaluations)
        self.save()


def search_group_sizes(
    model: nn.Module,
    spec: QuantSpec | str = "qdit-w4a8",
    *,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    budget: float | None = None,
    population: int = 50,
    iterations: int = 10,
    top_k: int = 10,
    crossover: int = 25,
    mutation: int = 25,
    mutation_prob: float = 0.1,
    fitness: str | Fitness = "fid",
    samples: int = 256,
    steps: int = 20,
    guidance_scale: float = 1.5,
    batch_size: int = 256,
    seed: int = 0,
    calibration: Iterable[Mapping[str, Any]] | None = None,
    example_inputs: ExampleInputs | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> GroupPlan:
    """Search a group size per quantized layer of `model` under `spec` (default qdit-w4a8: its bits,
    rounding and activation mode; its group sizes are the starting configuration and set the default
    budget). Returns the best plan found; apply it with `spec.with_group_plan(plan)`.

    candidates: group sizes to choose from; a layer's choices are those that divide its input width,
        plus its spec group size.
    budget: the most BitOps (`layer_bitops`, summed over the layers, per sample) a configuration may
        cost; default: the cost of the spec's configuration.
    population, iterations, top_k, crossover, mutation, mutation_prob: the evolutionary algorithm
        (defaults: the paper's). The first population holds the spec's configuration and
        population - 1 random ones; then `iterations` generations of top_k parents + mutation +
        crossover children; every distinct configuration is evaluated once.
    fitness: "fid" (FID against the Fashion-MNIST test split; lower is better), "proxy" (mean squared
        error of the final images against the float model's, same noise), or a callable taking the
        candidate model and returning a number to minimise.
    samples, steps, guidance_scale, batch_size: images per evaluation (class labels 0..9 in turn),
        DDIM steps, classifier-free guidance, images per model call (for "fid" and "proxy").
    seed: seeds the search's random draws and the sampling noise.
    calibration, example_inputs: as for dqcompile.quantize (a GPTQ spec needs calibration).
    checkpoint: a JSON file, written after every evaluation; when it exists, the search resumes from
        it (settings must match, except iterations, which may grow to extend a finished search).
    progress: progress bars. Each generation's best is logged on the "dqcompile.search" logger.
    """
    spec = QuantSpec.resolve(spec)
    for name, value, least in (("population", population, 1), ("iterations", iterations, 0), ("top_k", top_k, 1),
                               ("crossover", crossover, 0), ("mutation", mutation, 0), ("samples", samples, 1),
                               ("steps", steps, 1), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name}={value!r} must be an integer >= {least}")
    if not 0.0 <= mutation_prob <= 1.0:
        raise ValueError(f"mutation_prob={mutation_prob!r} must be in [0, 1]")
    if not callable(fitness) and fitness not in FITNESSES:
        raise ValueError(f"fitness={fitness!r} is not allowed; allowed values: 'fid', 'proxy' or a callable")
    samples_list = None if calibration is None else [dict(sample) for sample in calibration]
    started = time.perf_counter()

    captured = capture(model, _example_inputs(model, samples_list, example_inputs), copy_parameters=True)
    space = _space(captured, spec, candidates, budget)
    config: dict[str, Any] = {
        "spec": spec.to_dict(), "layers": [[layer.name, list(layer.choices)] for layer in space.layers],
        "budget": space.budget, "population": population, "top_k": top_k, "crossover": crossover,
        "mutation": mutation, "mutation_prob": mutation_prob,
        "fitness": fitness if isinstance(fitness, str) else "custom", "samples": samples, "steps": steps,
        "guidance_scale": guidance_scale, "seed": seed,
    }
    config = json.loads(json.dumps(config))  # as a checkpoint holds it (lists, not tuples), to compare on resume
    checkpoint_path = Path(checkpoint) if checkpoint is not None else None
    rng = random.Random(seed)
    if checkpoint_path is not None and checkpoint_path.exists():
        state = _State.load(checkpoint_path, config)
        rng.setstate(state.rng_state)
        logger.info("resuming from %s at generation %d (%d evaluations so far)", checkpoint_path, state.generation,
                    state.evaluations)
    else:
        first = [space.seed] if space.within_budget(space.seed) else []
        first += [random_genome(space, rng) for _ in range(population - len(first))]
        state = _State(config=config, generation=0, population=first, rng_state=rng.getstate())

    library = CandidateModels(model, spec, space, captured, samples_list, progress)
    if callable(fitness):
        evaluate = fitness
    else:
        build = fid_fitness if fitness == "fid" else proxy_fitness
        evaluate = build(model, samples=samples, steps=steps, guidance_scale=guidance_scale, seed=seed,
                         batch_size=batch_size)
    setup_seconds = time.perf_counter() - started
    evolution = _Evolution(space, state, rng, checkpoint_path, progress)
    evaluations_now = evolution.run(
        lambda genome: float(evaluate(library.assemble(genome))), iterations=iterations, top_k=top_k,
        crossover=crossover, mutation=mutation, mutation_prob=mutation_prob,
    )

    best = _ranked(state.fitness, state, space)[0]
    return GroupPlan(
        group_sizes=space.group_sizes(best),
        spec_name=spec.name,
        bitops=float(space.cost(best)),
        budget=space.budget,
        fitness=state.fitness[best],
        fitness_kind=config["fitness"],
        search={
            **{key: value for key, value in config.items() if key not in ("spec", "layers")},
            "iterations": iterations,
            "candidates": list(candidates),
            "spec_bitops": float(space.cost(space.seed)),
            "spec_fitness": state.fitness.get(space.seed),
            "evaluations": state.evaluations,
            "evaluations_this_run": evaluations_now,
            "evaluation_seconds": round(state.seconds, 3),
            "setup_seconds": round(setup_seconds, 3),
            "history": state.history,
        },
    )
