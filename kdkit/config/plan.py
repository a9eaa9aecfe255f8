"""A recipe's plan: each stage resolved once, right after the recipe is loaded and checked.

`kdkit.config.validation.parse_recipe` merges every stage's overrides into the top-level `train`, `data` and
`distill` sections (one rule, the stage's seed included), checks the merged specs and keeps them
here; `Recipe.plan` hands them out. Checks, build, pipeline, stage cache, ablation and bench read
these specs, so what was checked is what runs. Key paths in messages are `pipeline.<stage>.<key>`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the specs are defined in kdkit.config.schema; validation builds the plan
    from kdkit.config.schema import DataSpec, DistillSpec, PairSpec, StageSpec, TrainSpec


@dataclass(frozen=True)
class TeacherPlan:
    """One teacher of a distill stage as it runs: its model, the earlier stage that trains it (or
    None), its weight, and the distill section with its own settings merged in (`teacher` set to it,
    `teachers` empty): exactly the section a one-teacher stage of this teacher would have."""

    model: str  # the teacher's model key
    stage: str | None  # the earlier stage that trains it
    weight: float
    distill: DistillSpec
    pairs: tuple[PairSpec, ...] | str  # `distill.pairs` parsed once ('uniform:N' stays a string)

    def pair_specs(self) -> tuple[PairSpec, ...]:
        """The parsed layer pairs; none for 'uniform:N' (whose pairs take the section's settings)."""
        return self.pairs if isinstance(self.pairs, tuple) else ()


@dataclass(frozen=True)
class StagePlan:
    """One stage as it runs: its merged specs and the models it trains and learns from."""

    spec: StageSpec  # the stage as written (its own overrides)
    seed: int  # the stage's `train.seed`, else the recipe's `seed` (also in `train.seed`)
    train: TrainSpec  # the top-level `train` with the stage's overrides and its seed
    data: DataSpec  # the top-level `data` with the stage's overrides
    distill: DistillSpec | None = None  # distill stages: the top-level `distill` with the overrides
    model: str | None = None  # the model key this stage trains (None for evaluate stages)
    teachers: tuple[TeacherPlan, ...] = ()  # distill stages: every teacher (one without distill.teachers)

    @property
    def name(self) -> str:
        """The stage's name."""
        return self.spec.name

    @property
    def do(self) -> str:
        """The stage's kind: train, distill or evaluate."""
        return self.spec.do

    @property
    def key(self) -> str:
        """The stage's key-path prefix in messages, e.g. `pipeline.student_kd`."""
        return f"pipeline.{self.name}"

    def distill_spec(self) -> DistillSpec:
        """The distill section of a distill stage (ValueError on a stage of another kind)."""
        if self.distill is None:
            raise ValueError(f"{self.key} is a {self.do} stage, not a distill stage")
        return self.distill

    def adapter_names(self) -> list[str]:
        """Every adapter this distill stage builds: `distill.adapter` and each pair's own
        (`['none']`: no feature KD). What its smallest batch depends on."""
        names = []
        for t in self.teachers:
            d = t.distill
            names += (
                [d.adapter]
                if d.adapter == "none"
                else [d.adapter, *(p.adapter for p in t.pair_specs() if p.adapter)]
            )
        return list(dict.fromkeys(names))

    def criterion_names(self) -> list[str]:
        """Every feature criterion this distill stage uses (none without feature KD)."""
        names = []
        for t in self.teachers:
            d = t.distill
            if d.adapter != "none":
                names += [d.criterion, *(p.criterion for p in t.pair_specs() if p.criterion)]
        return list(dict.fromkeys(names))

    def origin(self, section: str, key: str = "") -> str:
        """Where a setting of `section` (train, data or distill) comes from, as a key path: the
        stage's own override (`pipeline.<stage>.train.lr`) or the top-level one (`train.lr`)."""
        own = getattr(self.spec, section)
        where = f"{self.key}.{section}" if (key in own if key else own) else section
        return f"{where}.{key}" if key else where


@dataclass(frozen=True)
class Plan:
    """Every stage of a recipe, resolved, in pipeline order."""

    stages: tuple[StagePlan, ...]

    def __iter__(self) -> Iterator[StagePlan]:
        return iter(self.stages)

    def stage(self, name: str) -> StagePlan:
        """The stage named `name` (KeyError if there is none)."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def of(self, spec: Any) -> StagePlan:
        """The plan of a `StageSpec` of the recipe (looked up by its name)."""
        return self.stage(spec.name)
