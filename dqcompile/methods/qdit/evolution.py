"""Q-DiT's evolutionary search over per-layer group sizes: random configurations within the budget,
mutation and uniform crossover children, and a resumable generation loop.

The spec's configuration and random configurations within the budget form the first population;
each generation keeps the top_k and adds `mutation` children (a parent with each gene redrawn with
probability mutation_prob) and `crossover` children (each gene from one of two parents); a child
over the budget is drawn again. Everything random comes from one seeded generator, whose state the
checkpoint keeps, so a resumed search is the same search.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dqcompile.methods.qdit.cost import Genome, SearchSpace

logger = logging.getLogger("dqcompile.search")

# Draws allowed for one configuration within the budget before the search gives up.
MAX_DRAWS = 1000
CHECKPOINT_VERSION = 1


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
class SearchState:
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
    def load(cls, path: Path, config: dict[str, Any]) -> SearchState:
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


def ranked(population: Iterable[Genome], state: SearchState, space: SearchSpace) -> list[Genome]:
    """Distinct genomes, best first: by fitness, then cheaper, then the genome itself (a total order)."""
    return sorted(set(population), key=lambda genome: (state.fitness[genome], space.cost(genome), genome))


@dataclass
class Evolution:
    """The generation loop over a _State, saving it to the checkpoint after every change."""

    space: SearchSpace
    state: SearchState
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
            parents = ranked(state.population, state, space)[:top_k]
            children = [mutation_child(space, parents, self.rng, mutation_prob) for _ in range(mutation)]
            children += [crossover_child(space, parents, self.rng) for _ in range(crossover)]
            state.population = parents + children
            state.generation += 1
            state.rng_state = self.rng.getstate()
            self.save()

    def _record(self, new_evaluations: int, seconds: float) -> None:
        state, space = self.state, self.space
        best = ranked(state.population, state, space)[0]
        state.history.append({
            "generation": state.generation, "best_fitness": state.fitness[best], "best_bitops": space.cost(best),
            "new_evaluations": new_evaluations, "seconds": round(seconds, 3), "best_group_sizes": list(best),
        })
        logger.info("generation %d: best fitness %.6g at %.4g BitOps (budget %.4g), %d new evaluations",
                    state.generation, state.fitness[best], space.cost(best), space.budget, new_evaluations)
        self.save()
