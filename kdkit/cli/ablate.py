"""`kdkit ablate`: one recipe, a grid of variants, every variant run with every seed, compared fairly.

Output folder::

    OUT/runs/<variant>__seed<S>/   one complete `RecipeRun` per (variant, seed), plus run.json
    OUT/partial/<...>/             a run in progress (renamed into runs/ when complete)
    OUT/cache/<model>-<hash>/      train stages shared by runs (see `kdkit.run.stage_cache`)
    OUT/prepare/<run>/             where those train stages were trained, before the runs
    OUT/ablation.{csv,json,md,png} the results (`kdkit.cli.ablation_report`)

Every run also holds the **baseline**: the compared stage's student trained without a teacher,
with the same data, schedule and seed (`baseline_stage`; added as a `student_alone` train stage
when the recipe has none, `--no-baseline` to leave it out). Each variant is reported with its
paired difference to it.

The train stages (the teacher, the baseline) are trained first, once per distinct cache key, each
set in its own process. Seeds vary the compared runs and the baseline; the teacher is trained with
the recipe's seed and shared by every seed (`--teacher-per-seed` trains it again for each seed).
Then every run, in a fresh process of its own, reuses them and does the same work as every other
run, so runs cannot leak state into each other and their time and peak memory compare. Re-running
the same command skips complete runs and continues interrupted ones.

A run that fails (its error is caught in its process, the traceback kept in its folder's
`error.log`) does not stop the others: the report is written from the complete runs, marked
incomplete, and the command exits 1 naming the failed runs; the same command retries them. One
ablation writes OUT at a time (`kdkit.utils.lock.exclusive`). A Ctrl-C, a SIGTERM or a run process
that dies stops every run process (`kdkit.utils.workers.WorkerPool`) and ends the command with 128 +
the signal and one line: what is complete, and the command (as typed) that continues.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import resource
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kdkit.cli.ablation_report import BASELINE_LABEL, Group, cache_use, measure, memory_measure, write_report
from kdkit.cli.arguments import add_recipe_args
from kdkit.config.recipe import (
    Recipe,
    RecipeError,
    apply_overrides,
    file_name_problem,
    parse_override,
    parse_recipe,
    read_yaml,
    recipe_changes,
    shorten,
)
from kdkit.errors import RunFailed, UsageError
from kdkit.plugins import load_plugins
from kdkit.run.build import make_evaluator
from kdkit.run.checks import check_recipe
from kdkit.run.pipeline import RecipeRun
from kdkit.run.stage_cache import StageCache, train_stage_key
from kdkit.utils.checkpoint import atomic_write_text
from kdkit.utils.lock import exclusive
from kdkit.utils.runlog import console
from kdkit.utils.workers import Interrupted, WorkerPool

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


def parse_seeds(text: str) -> list[int]:
    """`'0,1,2'` → `[0, 1, 2]` (distinct non-negative integers)."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise UsageError(f"--seeds {text!r}: expected distinct non-negative integers")
    return seeds


# ------------------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class RunJob:
    """One (variant, seed): what a worker process needs to run it and publish its directory."""

    variant: Variant
    seed: int
    recipe: Recipe
    out: Path  # the ablation folder
    threads: int = 1

    @property
    def name(self) -> str:
        """The run's directory name."""
        return f"{self.variant.slug}__seed{self.seed}"

    @property
    def final(self) -> Path:
        """Where the complete run lives."""
        return self.out / "runs" / self.name

    @property
    def partial(self) -> Path:
        """Where the run is written until it is complete."""
        return self.out / "partial" / self.name

    @property
    def preparing(self) -> Path:
        """Where the run's train stages are trained, when they are not in the cache yet."""
        return self.out / "prepare" / self.name


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
    shadowed = [field for field in fields if field in own]
    if shadowed:
        raise RecipeError(
            [
                f"distill.{field}: the compared stage {compared!r} sets pipeline.{compared}.distill."
                f"{field}={own[field]!r} itself, so this variant would change nothing; vary "
                f"pipeline.{compared}.distill.{field} or compare another stage (--stage)"
                for field in shadowed
            ],
            label,
        )


def _without_other_distills(data: dict[str, Any], recipe: Recipe, compared: str) -> dict[str, Any]:
    """`data` without the distill stages other than the compared one (unless a stage learns from
    one as its teacher) and without them in evaluate stages' runs: each run of an ablation trains
    and tests only what its comparison needs."""
    teachers = {s.distill.teacher for s in recipe.plan if s.distill is not None}
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


def peak_memory() -> dict[str, Any]:
    """This process's peak memory: resident set size, plus the CUDA allocator's peak when CUDA was used."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak: dict[str, Any] = {"peak_rss_MiB": rss / (2**20 if sys.platform == "darwin" else 2**10)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_cuda_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


Outcome = tuple[str, str | None]  # (job name, None or the one-line error of a failed job)
ERROR_LOG = "error.log"  # the traceback of a failed run, in its partial (or prepare) folder


def attempt(job: RunJob, folder: Path, work: Callable[[RunJob], None]) -> Outcome:
    """`work(job)`; an error becomes a one-line message, its traceback `folder/error.log`, so that the
    other runs go on (an interruption is no error: it still stops every run)."""
    (folder / ERROR_LOG).unlink(missing_ok=True)  # from an earlier try
    try:
        work(job)
    except Exception as exc:  # any failure of the run itself: reported, the ablation goes on
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(traceback.format_exc(), folder / ERROR_LOG)
        text = f"{type(exc).__name__}: {exc}"
        return job.name, text if len(text) <= 600 else f"{text[:600]} ..."
    return job.name, None


def execute(job: RunJob) -> Outcome:
    """Run one job in this (fresh worker) process (see `attempt`)."""
    load_plugins()
    torch.set_num_threads(job.threads)
    console.rule(f"run {job.name}")
    return attempt(job, job.partial, _run_and_publish)


def _run_and_publish(job: RunJob) -> None:
    """Run the job's recipe in its partial folder, then move that into runs/ in one rename."""
    start = time.perf_counter()
    RecipeRun(job.recipe, job.partial, stage_cache=StageCache(job.out / "cache")).run(resume=True)
    record = {
        "run": job.name,
        "variant": job.variant.label,
        "values": dict(job.variant.values),
        "seed": job.seed,
        "wall_seconds": time.perf_counter() - start,
        **peak_memory(),
    }
    atomic_write_text(json.dumps(record, indent=2), job.partial / "run.json")
    job.final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(job.partial, job.final)


def _pending(jobs: list[RunJob]) -> list[RunJob]:
    """Jobs still to run. Complete runs are skipped (refused when they ran another recipe);
    interrupted ones continue, or start again when they ran another recipe."""
    pending = []
    for job in jobs:
        if job.final.exists():
            changed = _differences(job, job.final)
            if changed:
                raise UsageError(
                    f"{job.final} holds a run of a different recipe (it differs at "
                    f"{', '.join(changed[:8])}); choose another --out, or delete that run to redo it"
                )
            console.print(f"{job.name}: complete, skipped", markup=False)
            continue
        if job.partial.exists():
            if _differences(job, job.partial):
                console.print(
                    f"{job.name}: discarding an interrupted run of a different recipe", markup=False
                )
                shutil.rmtree(job.partial)
            elif (job.partial / ERROR_LOG).exists():
                console.print(
                    f"{job.name}: retrying the run that failed (from its last checkpoint)", markup=False
                )
            else:
                console.print(f"{job.name}: continuing the interrupted run", markup=False)
        pending.append(job)
    return pending


def _differences(job: RunJob, run_dir: Path) -> list[str]:
    """Recipe keys at which the run in `run_dir` differs from the job's (none before it wrote its recipe)."""
    saved = run_dir / "recipe.yaml"
    return recipe_changes(read_yaml(saved), job.recipe.to_dict()) if saved.exists() else []


def prepare(job: RunJob) -> Outcome:
    """Train (or finish training) the train stages of `job.recipe` into the stage cache, in this
    process (see `attempt`)."""
    load_plugins()
    torch.set_num_threads(job.threads)
    console.rule(f"train stages for {job.name}")

    def train(job: RunJob) -> None:
        RecipeRun(job.recipe, job.preparing, stage_cache=StageCache(job.out / "cache")).run(resume=True)

    return attempt(job, job.preparing, train)


def missing_train_stages(job: RunJob) -> tuple[str, ...]:
    """The cache keys of the job's train stages that are not in the stage cache yet."""
    keys = [train_stage_key(job.recipe, s) for s in job.recipe.pipeline if s.do == "train"]
    return tuple(k for k in keys if not (job.out / "cache" / k / "done.json").exists())


def preparation(jobs: list[RunJob]) -> dict[tuple[str, ...], RunJob]:
    """One job per distinct set of train stages missing from the cache (`missing_train_stages` →
    job): the runs' recipes cut to their train stages."""
    todo: dict[tuple[str, ...], RunJob] = {}
    for job in jobs:
        missing = missing_train_stages(job)
        if missing and missing not in todo:
            train = [s for s in job.recipe.pipeline if s.do == "train"]
            first = replace(job, recipe=replace(job.recipe, pipeline=train))
            if first.preparing.exists() and _differences(first, first.preparing):
                shutil.rmtree(first.preparing)  # an interrupted training of another recipe
            todo[missing] = first
    return todo


def run_jobs(
    function: Callable[[RunJob], Outcome], jobs: list[RunJob], processes: int, what: str
) -> dict[str, str]:
    """`function(job)` for every job, each in a fresh worker process, `processes` at a time; return
    the failed jobs' errors by name. An interrupted or killed worker stops them all
    (`kdkit.utils.workers`)."""
    failed = {}
    with WorkerPool(
        function, min(processes, len(jobs)), fresh=True, describe=lambda j: f"{what} {j.name}"
    ) as pool:
        for done, (name, error) in enumerate(pool.run(jobs), 1):
            state = "complete" if error is None else f"FAILED: {error}"
            console.print(f"[ablate] {what} {name} {state} ({done}/{len(jobs)})", markup=False)
            if error is not None:
                failed[name] = error
    return failed


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


# ------------------------------------------------------------------------------------ command
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `kdkit ablate`."""
    p = subparsers.add_parser(
        "ablate",
        help="compare variants of a recipe (adapters, stages, loss weights) over several seeds",
        description="Run the cartesian product of every --vary with every seed, everything else identical, "
        "and write ablation.csv/.json/.md/.png. Re-running the same command continues it.",
    )
    add_recipe_args(p)
    p.add_argument(
        "--variants",
        type=Path,
        metavar="FILE",
        help="a YAML file of named variants, NAME: {KEY: VALUE, ...} (recipe keys as for --set), "
        "e.g. a list of methods; combined with every --vary",
    )
    p.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a recipe key and its values (YAML; commas inside [...] or {...} do not split), "
        "e.g. distill.adapter=covariance,projection,none (repeatable: the grid is the product)",
    )
    p.add_argument("--seeds", default="0,1,2", help="seeds every variant runs with (default 0,1,2)")
    p.add_argument("--out", type=Path, help="ablation folder (default runs/ablation-<recipe name>)")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at the same time, each its own process (default 1)"
    )
    p.add_argument("--stage", help="the stage whose model is compared (default: the last distill stage)")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="leave out the baseline (the compared stage's student trained without a teacher, same data, "
        "schedule and seed), which is otherwise trained once per seed and compared with every variant",
    )
    p.add_argument(
        "--teacher-per-seed",
        action="store_true",
        help="train the teacher (every train stage but the compared one) again for every seed; by "
        "default it is trained once, with the recipe's seed, and every seed of every variant uses it",
    )
    p.set_defaults(func=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> int:
    """`kdkit ablate`: check every variant, run what is not done yet, then write the report (a
    `RunFailed`, exit status 1, names the runs that failed)."""
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: expected at least 1")
    start = time.perf_counter()
    jobs: list[RunJob] = []
    try:
        jobs, recipes, stage = _plan(args)
        with exclusive(jobs[0].out, args.command_line):
            _run_grid(args, jobs, recipes, stage, start)
    except Interrupted as exc:
        runs = jobs[0].out / "runs" if jobs else None
        saved = (
            f"{sum(job.final.exists() for job in jobs)} of {len(jobs)} runs complete in {runs}, the "
            "others continue from their last checkpoint"
            if jobs
            else "nothing was run yet"
        )
        raise Interrupted(f"{exc}; {saved}; continue with: {args.command_line}", exc.signum) from None
    return 0


def _plan(args: argparse.Namespace) -> tuple[list[RunJob], dict[tuple[Variant, int], Recipe], str]:
    """The jobs of the grid (seed-major: an interrupted ablation has compared every variant on the
    first seeds), the recipe of each (variant, seed) and the compared stage."""
    base = apply_overrides(read_yaml(args.recipe), args.overrides)
    if not args.vary and args.variants is None:
        raise UsageError(
            "kdkit ablate: give the variants to compare: --vary KEY=V1,V2,... or --variants FILE"
        )
    named = read_variants(args.variants) if args.variants else []
    variants = combine(named, expand_grid(args.vary) if args.vary else [])
    seeds = parse_seeds(args.seeds)
    threads = max(1, torch.get_num_threads() // args.jobs)
    reference = parse_recipe(base, str(args.recipe))
    teacher_seed = None if args.teacher_per_seed else reference.seed
    recipes = {
        (v, s): resolve(
            base,
            v,
            s,
            str(args.recipe),
            stage=args.stage,
            teacher_seed=teacher_seed,
            baseline=not args.no_baseline,
        )
        for v in variants
        for s in seeds
    }
    out = args.out or Path("runs") / f"ablation-{reference.name}"
    stage = target_stage(recipes[variants[0], seeds[0]], args.stage)
    jobs = [RunJob(v, s, recipes[v, s], out, threads) for s in seeds for v in variants]
    return jobs, recipes, stage


def _run_grid(
    args: argparse.Namespace,
    jobs: list[RunJob],
    recipes: dict[tuple[Variant, int], Recipe],
    stage: str,
    start: float,
) -> None:
    """Check every variant, train the shared train stages, run what is not done yet, write the report."""
    variants = list(dict.fromkeys(job.variant for job in jobs))
    seeds = list(dict.fromkeys(job.seed for job in jobs))
    for variant in variants:  # everything `kdkit run` checks, once per variant; prepares the data
        check_recipe(recipes[variant, seeds[0]], generate=True, source=f"{args.recipe} with {variant.label}")
    out = jobs[0].out
    console.print(f"{len(variants)} variants × {len(seeds)} seeds, checked; ablation folder: {out}")
    pending = _pending(jobs)
    failures = _prepare_train_stages(pending, args.jobs)
    runnable = [job for job in pending if job.name not in failures]
    if runnable:
        errors = run_jobs(execute, runnable, args.jobs, "run")
        failures |= {
            job.name: (errors[job.name], job.partial / ERROR_LOG) for job in runnable if job.name in errors
        }
    complete = [job for job in jobs if job.final.exists()]
    failed = [_failure(job, *failures[job.name]) for job in jobs if job.name in failures]
    if complete:
        _report(args, complete, stage, time.perf_counter() - start, failed)
    if failed:
        raise RunFailed(_incomplete(failed, len(jobs), len(complete), out, args.command_line))


def _prepare_train_stages(pending: list[RunJob], processes: int) -> dict[str, tuple[str, Path]]:
    """Train the train stages the pending runs need; return the runs that cannot run because one of
    theirs failed: run name → (error, log)."""
    first = preparation(pending)
    if not first:
        return {}
    console.print(f"train stages first: {len(first)} job(s), then the runs", markup=False)
    errors = run_jobs(prepare, list(first.values()), processes, "train stages for")
    blocked = {}
    for job in pending:
        missing = set(missing_train_stages(job))
        for keys, trainer in first.items():
            if trainer.name in errors and missing & set(keys):
                error = f"its train stages could not be trained ({trainer.name}): {errors[trainer.name]}"
                blocked[job.name] = (error, trainer.preparing / ERROR_LOG)
    return blocked


def _failure(job: RunJob, error: str, log: Path) -> dict[str, Any]:
    """A failed run as the report lists it."""
    return {"run": job.name, "variant": job.variant.label, "seed": job.seed, "error": error, "log": str(log)}


def _incomplete(failed: list[dict[str, Any]], total: int, complete: int, out: Path, command: str) -> str:
    """The message of an ablation that ended with failed runs: which, why, and how to continue."""
    lines = [f"ablation incomplete: {len(failed)} of {total} runs failed:"]
    lines += [
        f"  {f['run']} ({f['variant']}, seed {f['seed']}): {f['error']} (log: {f['log']})" for f in failed
    ]
    report = (
        f"the report of the {complete} complete runs is in {out}/ablation.md, marked incomplete"
        if complete
        else "no run is complete, so no report was written"
    )
    lines.append(
        f"{report}; fix the cause (or drop the variant) and continue with: {command} "
        "(complete runs are kept, failed ones retried)"
    )
    return "\n".join(lines)


def _groups(jobs: list[RunJob], stage: str, with_baseline: bool) -> list[Group]:
    """With `with_baseline`, the baseline groups first (one per distinct trained baseline, i.e. per
    set of stage-cache keys over the seeds); then one group per variant, its runs in seed order."""
    by_variant: dict[Variant, list[RunJob]] = {}
    for job in sorted(jobs, key=lambda j: j.seed):
        by_variant.setdefault(job.variant, []).append(job)
    groups, baselines = [], {}
    for variant, members in by_variant.items():
        seeds = [j.seed for j in members]
        name = baseline_stage(members[0].recipe, stage) if with_baseline else None
        base = [measure(j.final, name, run_costs=False) for j in members] if name else None
        measured = [measure(j.final, stage) for j in members]
        runs = [j.name for j in members]
        groups.append(Group(variant.label, seeds, measured, base, runs=runs, values=dict(variant.values)))
        if base is not None:
            identity = tuple(b.cache_key for b in base)
            baselines.setdefault(identity, (seeds, base, [f"{r}/{name}" for r in runs], []))[3].append(
                variant.label
            )
    labels = (
        [BASELINE_LABEL]
        if len(baselines) == 1
        else [f"{BASELINE_LABEL} for {', '.join(v[3])}" for v in baselines.values()]
    )
    first = [
        Group(label, seeds, base, is_baseline=True, runs=runs)
        for label, (seeds, base, runs, _) in zip(labels, baselines.values(), strict=True)
    ]
    return first + groups


def _report(
    args: argparse.Namespace, jobs: list[RunJob], stage: str, seconds: float, failed: list[dict[str, Any]]
) -> None:
    """Read the complete runs of the grid (`jobs`) and write the report files; `failed` lists the
    runs that are missing because they failed (the report is then marked incomplete)."""
    groups = _groups(jobs, stage, with_baseline=not args.no_baseline)
    rows = [row for g in groups for row in g.rows()]
    finals = [j.final for j in jobs]
    info = {
        "recipe": str(args.recipe),
        "set": args.overrides,
        "vary": args.vary,
        "variants": str(args.variants) if args.variants else None,
        "seeds": parse_seeds(args.seeds),
        "stage": stage,
        "baseline": baseline_stage(jobs[0].recipe, stage) if any(g.is_baseline for g in groups) else None,
        "teacher_per_seed": args.teacher_per_seed,
        "jobs": args.jobs,
        "wall_seconds": seconds,  # this invocation; a continued ablation's runs ran in earlier ones too
        "run_seconds": sum(row.get("wall_s", 0.0) for row in rows),
        "memory_measure": memory_measure(finals[0]),
        "stage_cache": cache_use(finals),
        "complete": not failed,
        "failed": failed,
    }
    for name, use in info["stage_cache"].items():
        console.print(
            f"stage cache: {name!r} trained {use['trained']}×, reused {use['reused']}× over {len(jobs)} runs",
            markup=False,
        )
    out = jobs[0].out
    write_report(out, groups, make_evaluator(jobs[0].recipe), info)
