"""Q-DiT's automatic group-size allocation: an evolutionary search over per-layer group sizes.

Each quantized linear gets its own group size g (weights and activations alike) from a per-layer
choice set, under a BitOps budget (cost.py), minimising a fitness the caller gives: a function of
the candidate model, lower is better (FID of generated samples, the error of final images against
the float model's, ...; dqcompile.fmnist.fitness builds both for the Fashion-MNIST example). The
algorithm is evolution.py's; every (layer, g) is decided once and candidates are assembled from
those decisions (candidates.py), so nothing is quantized again between candidates, and the chosen
plan gives the same model as `quantize(model, spec.with_group_plan(plan))`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from dqcompile.capture import ExampleInputs, capture
from dqcompile.example_inputs import default_example_inputs
from dqcompile.methods.qdit.candidates import CandidateModels
from dqcompile.methods.qdit.cost import DEFAULT_CANDIDATES, SearchSpace, build_space
from dqcompile.methods.qdit.evolution import Evolution, SearchState, logger, random_genome, ranked
from dqcompile.spec import QuantSpec

PLAN_FORMAT = "dqcompile.group_plan"
PLAN_VERSION = 1

Fitness = Callable[[nn.Module], float]


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
    return build_space(captured, spec, candidates, budget)


def search_group_sizes(
    model: nn.Module,
    fitness: Fitness,
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
    fitness_name: str = "custom",
    seed: int = 0,
    calibration: Iterable[Mapping[str, Any]] | None = None,
    example_inputs: ExampleInputs | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> GroupPlan:
    """Search a group size per quantized layer of `model` under `spec` (default qdit-w4a8: its bits,
    rounding and activation mode; its group sizes are the starting configuration and set the default
    budget). Returns the best plan found; apply it with `spec.with_group_plan(plan)`.

    fitness: fitness(candidate model) -> a number to minimise (e.g. dqcompile.fmnist.fitness's FID).
    candidates: group sizes to choose from; a layer's choices are those that divide its input width,
        plus its spec group size.
    budget: the most BitOps (`layer_bitops`, summed over the layers, per sample) a configuration may
        cost; default: the cost of the spec's configuration.
    population, iterations, top_k, crossover, mutation, mutation_prob: the evolutionary algorithm
        (defaults: the paper's). The first population holds the spec's configuration and
        population - 1 random ones; then `iterations` generations of top_k parents + mutation +
        crossover children; every distinct configuration is evaluated once.
    fitness_name: how the plan and the checkpoint name the fitness (a resumed search must use the same).
    seed: seeds the search's random draws.
    calibration, example_inputs: as for dqcompile.quantize (a GPTQ spec needs calibration).
    checkpoint: a JSON file, written after every evaluation; when it exists, the search resumes from
        it (settings must match, except iterations, which may grow to extend a finished search).
    progress: progress bars. Each generation's best is logged on the "dqcompile.search" logger.
    """
    spec = QuantSpec.resolve(spec)
    if not callable(fitness):
        raise ValueError(f"fitness must be a callable taking the candidate model, got {type(fitness).__name__}")
    for name, value, least in (("population", population, 1), ("iterations", iterations, 0), ("top_k", top_k, 1),
                               ("crossover", crossover, 0), ("mutation", mutation, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name}={value!r} must be an integer >= {least}")
    if not 0.0 <= mutation_prob <= 1.0:
        raise ValueError(f"mutation_prob={mutation_prob!r} must be in [0, 1]")
    samples_list = None if calibration is None else [dict(sample) for sample in calibration]
    started = time.perf_counter()

    captured = capture(model, _example_inputs(model, samples_list, example_inputs), copy_parameters=True)
    space = build_space(captured, spec, candidates, budget)
    config: dict[str, Any] = {
        "spec": spec.to_dict(), "layers": [[layer.name, list(layer.choices)] for layer in space.layers],
        "budget": space.budget, "population": population, "top_k": top_k, "crossover": crossover,
        "mutation": mutation, "mutation_prob": mutation_prob, "fitness": fitness_name, "seed": seed,
    }
    config = json.loads(json.dumps(config))  # as a checkpoint holds it (lists, not tuples), to compare on resume
    checkpoint_path = Path(checkpoint) if checkpoint is not None else None
    rng = random.Random(seed)
    if checkpoint_path is not None and checkpoint_path.exists():
        state = SearchState.load(checkpoint_path, config)
        rng.setstate(state.rng_state)
        logger.info("resuming from %s at generation %d (%d evaluations so far)", checkpoint_path, state.generation,
                    state.evaluations)
    else:
        first = [space.seed] if space.within_budget(space.seed) else []
        first += [random_genome(space, rng) for _ in range(population - len(first))]
        state = SearchState(config=config, generation=0, population=first, rng_state=rng.getstate())

    library = CandidateModels(model, spec, space, captured, samples_list, progress)
    setup_seconds = time.perf_counter() - started
    evolution = Evolution(space, state, rng, checkpoint_path, progress)
    evaluations_now = evolution.run(
        lambda genome: float(fitness(library.assemble(genome))), iterations=iterations, top_k=top_k,
        crossover=crossover, mutation=mutation, mutation_prob=mutation_prob,
    )

    best = ranked(state.fitness, state, space)[0]
    return GroupPlan(
        group_sizes=space.group_sizes(best),
        spec_name=spec.name,
        bitops=float(space.cost(best)),
        budget=space.budget,
        fitness=state.fitness[best],
        fitness_kind=fitness_name,
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
