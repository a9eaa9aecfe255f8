"""The variants of an ablation and the recipe of each (variant, seed) run.

A variant is a set of `--set` overrides: a point of the `--vary` grid (`expand_grid`), a named entry
of a variants file (`read_variants`), or both (`combine`). `resolve` turns the base recipe, a
variant and a seed into the recipe one run trains: only the compared stage's distillation, with its
baseline (the same student trained without a teacher, `baseline_stage`), and the teacher pinned to
one seed so every run shares it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.config.loading import apply_overrides, parse_override, read_yaml
from kdkit.config.schema import Recipe, RecipeError, shorten
from kdkit.config.validation import file_name_problem, parse_recipe
from kdkit.errors import UsageError

_OPENERS, _CLOSERS = "[{(", "]})"


# ------------------------------------------------------------------------------------ the grid
@dataclass(frozen=True)
class Variant:
    """One point of the grid: its `--set` overrides, a label for tables and a file-safe slug."""

    values: tuple[tuple[str, str], ...]  # (recipe key, value as written)
    label: str
    slug: str

    @property
    def overrides(self) -> list[str]:
        """The variant as `KEY=VALUE` override strings."""
        return [f"{key}={value}" for key, value in self.values]


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets, braces and quotes.

    ``'[[1,2]],[[1,2],[2,4]]'`` → ``['[[1,2]]', '[[1,2],[2,4]]']``; raises ValueError when the
    brackets or quotes do not balance or a value is empty.
    """
    values, current, depth, quote = [], [], 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced {char!r}")
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if depth or quote:
        raise ValueError("unbalanced brackets or quotes")
    values.append("".join(current).strip())
    if any(not v for v in values):
        raise ValueError("empty value (two commas in a row, or a comma at an end)")
    return values


def parse_vary(text: str) -> tuple[str, list[str]]:
    """`'KEY=V1,V2'` → `('KEY', ['V1', 'V2'])`; a `UsageError` names the option and what was expected."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise UsageError(
            f"--vary {text!r}: expected KEY=V1,V2,... e.g. distill.adapter=covariance,projection"
        )
    if key == "seed":
        raise UsageError(f"--vary {text!r}: use --seeds 0,1,2 to run every variant with several seeds")
    try:
        values = split_values(raw)
        for value in values:
            parse_override(f"{key}={value}")  # checks the key's form
    except (ValueError, RecipeError) as exc:
        raise UsageError(f"--vary {key}: {exc} in {raw!r}") from None
    if len(set(values)) != len(values):
        raise UsageError(f"--vary {key}: a value is listed twice in {raw!r}")
    return key, values


def expand_grid(varies: list[str]) -> list[Variant]:
    """The cartesian product of every `--vary` (first option outermost), in the order given."""
    axes = [parse_vary(text) for text in varies]
    keys = [key for key, _ in axes]
    for key in {k for k in keys if keys.count(k) > 1}:
        raise UsageError(f"--vary {key}: given more than once; list all its values in one --vary")
    names = _short_names(keys)
    variants = []
    for combo in itertools.product(*(values for _, values in axes)):
        values = tuple(zip(keys, combo, strict=True))
        label = ", ".join(f"{names[k]}={v}" for k, v in values)
        slug = "_".join(f"{_safe(names[k])}-{_safe(v)}" for k, v in values)
        variants.append(Variant(values, label, slug))
    return _unique_slugs(variants)


def read_variants(path: Path) -> list[Variant]:
    """Named variants from a YAML file, `NAME: {KEY: VALUE, ...}` with KEY a recipe key as for
    `--set` (a variant with no keys is the recipe as it is) and NAME following the rule of stage
    names (`file_name_problem`); a `RecipeError` names the entry."""
    variants, problems = [], []
    for name, overrides in read_yaml(path).items():
        # the rule of recipe and stage names: a variant's name names its folders (runs/<name>__seed<S>)
        problem = file_name_problem(name) if isinstance(name, str) else "is not text"
        if problem:
            problems.append(f"{name!r}: the variant name {problem}")
            continue
        if not isinstance(overrides, dict | None):
            problems.append(f"{name}: expected a mapping of recipe keys to values, got {shorten(overrides)}")
            continue
        values = tuple((str(key), json.dumps(value)) for key, value in (overrides or {}).items())
        for key, value in values:
            try:
                parse_override(f"{key}={value}")
            except RecipeError as exc:
                problems.append(f"{name}.{key}: {'; '.join(exc.problems)}")
        variants.append(Variant(values, name, name))
    if problems or not variants:
        raise RecipeError(problems or ["expected at least one variant"], str(path))
    return variants


def combine(named: list[Variant], grid: list[Variant]) -> list[Variant]:
    """Every named variant with every point of the `--vary` grid (either list may be empty)."""
    if not named or not grid:
        return named or grid
    return [
        Variant(n.values + g.values, f"{n.label}, {g.label}", f"{n.slug}_{g.slug}")
        for n, g in itertools.product(named, grid)
    ]


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each key (`adapter`), or the whole key when that part is ambiguous."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: short if last.count(short) == 1 else k for k, short in zip(keys, last, strict=True)}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def _unique_slugs(variants: list[Variant], limit: int = 80) -> list[Variant]:
    """Distinct values can sanitise to the same slug ([[1,2]] vs [1,2]): add a short hash there."""
    slugs = [v.slug for v in variants]
    out = []
    for v in variants:
        if slugs.count(v.slug) > 1 or len(v.slug) > limit:
            digest = hashlib.sha1(v.label.encode()).hexdigest()[:6]
            v = Variant(v.values, v.label, f"{v.slug[:limit]}-{digest}")
        out.append(v)
    return out


# ------------------------------------------------------------------------------------ recipes
BASELINE_STAGE = "student_alone"


def baseline_stage(recipe: Recipe, compared: str) -> str | None:
    """The train stage that trains the compared distill stage's student without a teacher, with the
    same data, schedule and seed; None when there is none or the compared stage is not a distill
    stage."""
    stage = recipe.plan.stage(compared)
    if stage.do != "distill":
        return None
    return next(
        (
            s.name
            for s in recipe.plan
            if s.do == "train" and s.model == stage.model and (s.train, s.data) == (stage.train, stage.data)
        ),
        None,
    )


def _with_baseline(data: dict[str, Any], recipe: Recipe, compared: str) -> dict[str, Any]:
    """`data` with a baseline stage before the compared stage when it has none, and the baseline
    among the runs (and as the `baseline`) of the evaluate stages that test the compared stage."""
    stage = next(s for s in recipe.pipeline if s.name == compared)
    name = baseline_stage(recipe, compared)
    pipeline = [dict(item) for item in data["pipeline"]]
    if name is None:
        names = {s.name for s in recipe.pipeline}
        name = next(
            n for n in (BASELINE_STAGE, *(f"{BASELINE_STAGE}_{i}" for i in range(2, 99))) if n not in names
        )
        position = [s.name for s in recipe.pipeline].index(compared)
        added = {"name": name, "do": "train", "model": recipe.plan.of(stage).model}
        added |= {key: getattr(stage, key) for key in ("train", "data") if getattr(stage, key)}
        pipeline.insert(position, added)
    for item in pipeline:
        if item.get("do") == "evaluate" and compared in item.get("runs", []):
            runs = list(item["runs"])
            item["runs"] = (
                runs if name in runs else [*runs[: runs.index(compared)], name, *runs[runs.index(compared) :]]
            )
            item["baseline"] = item.get("baseline") or name
    return {**data, "pipeline": pipeline}


def _refuse_shadowed(variant: Variant, recipe: Recipe, compared: str, label: str) -> None:
    """A variant that sets a top-level `distill.KEY` which the compared stage overrides itself would
    change nothing of what is compared: refused, naming the stage's own value."""
    own = next(s for s in recipe.pipeline if s.name == compared).distill
    fields = [key.split(".")[1] for key, _ in variant.values if key.startswith("distill.")]
    shadowed = [(field, key) for field in fields if (key := _shadowing_key(field, own))]
    if shadowed:
        raise RecipeError(
            [
                f"distill.{field}: the compared stage {compared!r} sets pipeline.{compared}.distill."
                f"{key}={own[key]!r} itself, so this variant would change nothing; vary "
                f"pipeline.{compared}.distill.{key} or compare another stage (--stage)"
                for field, key in shadowed
            ],
            label,
        )


def _shadowing_key(field: str, own: dict[str, Any]) -> str | None:
    """The stage's own distill key that hides a top-level `distill.<field>`: the same key, or the
    other form of naming teachers (a stage's `teacher` replaces the `teachers` it inherits, and
    its `teachers` the `teacher`)."""
    other_form = {"teacher": "teachers", "teachers": "teacher"}.get(field)
    return next((key for key in (field, other_form) if key in own), None)


def _without_other_distills(data: dict[str, Any], recipe: Recipe, compared: str) -> dict[str, Any]:
    """`data` without the distill stages other than the compared one (unless a stage learns from
    one as its teacher) and without them in evaluate stages' runs: each run of an ablation trains
    and tests only what its comparison needs."""
    teachers = {t.distill.teacher for s in recipe.plan for t in s.teachers}
    dropped = {
        s.name for s in recipe.pipeline if s.do == "distill" and s.name != compared and s.name not in teachers
    }
    if not dropped:
        return data
    pipeline = [dict(item) for item in data["pipeline"] if item.get("name") not in dropped]
    for item in pipeline:
        if item.get("do") == "evaluate":
            item["runs"] = [run for run in item.get("runs", []) if run not in dropped]
    return {**data, "pipeline": pipeline}


def resolve(
    base: dict[str, Any],
    variant: Variant,
    seed: int,
    source: str,
    *,
    stage: str | None = None,
    teacher_seed: int | None = None,
    baseline: bool = True,
) -> Recipe:
    """The recipe of one run: the base recipe with the variant's overrides and `seed`.

    With `baseline`, the compared stage's baseline (`baseline_stage`) is added when missing. With
    `teacher_seed`, every other train stage that does not pin a seed of its own (the teacher) is
    pinned to it, so one teacher serves every seed of the grid; the baseline follows `seed`."""
    label = f"{source} with {variant.label}, seed {seed}"
    data = apply_overrides(base, [*variant.overrides, f"seed={seed}"])
    recipe = parse_recipe(data, label)
    compared = target_stage(recipe, stage)
    _refuse_shadowed(variant, recipe, compared, label)
    data = _without_other_distills(data, recipe, compared)
    recipe = parse_recipe(data, label)
    if baseline and recipe.plan.stage(compared).do == "distill":
        data = _with_baseline(data, recipe, compared)
        recipe = parse_recipe(data, label)
    if teacher_seed is None:
        return recipe
    kept = {compared, baseline_stage(recipe, compared)}
    pins = [
        f"pipeline.{s.name}.train.seed={teacher_seed}"
        for s in recipe.pipeline
        if s.do == "train" and s.name not in kept and s.train.get("seed") is None
    ]
    return parse_recipe(apply_overrides(data, pins), label) if pins else recipe


def target_stage(recipe: Recipe, name: str | None) -> str:
    """The stage whose model is compared: `name`, else the last distill stage, else the last train stage."""
    fitted = [s.name for s in recipe.pipeline if s.do != "evaluate"]
    if name is not None:
        if name not in fitted:
            raise UsageError(
                f"--stage {name!r}: expected a train or distill stage of the recipe, one of {fitted}"
            )
        return name
    distill = [s.name for s in recipe.pipeline if s.do == "distill"]
    return (distill or fitted)[-1]
