"""The ablation engine behind `kdkit ablate`: one recipe, a grid of variants, every variant run with
every seed, compared fairly.

Output folder::

    OUT/runs/<variant>__seed<S>/   one complete `RecipeRun` per (variant, seed), plus run.json
    OUT/partial/<...>/             a run in progress (renamed into runs/ when complete)
    OUT/cache/<model>-<hash>/      train stages shared by runs (see `kdkit.run.stage_cache`)
    OUT/prepare/<run>/             where those train stages were trained, before the runs
    OUT/ablation.{csv,json,md,png} the results (`kdkit.run.ablation_report`)

Every run also holds the **baseline**: the compared stage's student trained without a teacher,
with the same data, schedule and seed (`kdkit.run.variants.baseline_stage`; added as a
`student_alone` train stage when the recipe has none, unless `Ablation.baseline` is off). Each
variant is reported with its paired difference to it.

The train stages (the teacher, the baseline) are trained first, once per distinct cache key, each
set in its own process. Seeds vary the compared runs and the baseline; the teacher is trained with
the recipe's seed and shared by every seed (`Ablation.teacher_per_seed` trains it again for each
seed). Then every run, in a fresh process of its own, reuses them and does the same work as every
other run, so runs cannot leak state into each other and their time and peak memory compare.
Running the same ablation again skips complete runs and continues interrupted ones.

A run that fails (its error is caught in its process, the traceback kept in its folder's
`error.log`) does not stop the others: the report is written from the complete runs, marked
incomplete, and `RunFailed` (exit status 1) names the failed runs; the same command retries them.
One ablation writes OUT at a time (`kdkit.utils.lock.exclusive`). A Ctrl-C, a SIGTERM or a run
process that dies stops every run process (`kdkit.utils.workers.WorkerPool`) and raises
`Interrupted` saying what is complete and the command (as typed) that continues.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from kdkit.config.loading import read_yaml, recipe_changes
from kdkit.config.schema import TRACKING_KEYS, Recipe
from kdkit.config.validation import parse_recipe
from kdkit.errors import RunFailed, UsageError
from kdkit.plugins import load_plugins
from kdkit.run.ablation_report import (
    BASELINE_LABEL,
    Group,
    cache_use,
    measure,
    memory_measure,
    write_report,
)
from kdkit.run.build import make_evaluator
from kdkit.run.checks import check_recipe
from kdkit.run.gpu_runs import run_recipe
from kdkit.run.pipeline import run_identity
from kdkit.run.stage_cache import train_stage_key
from kdkit.run.variants import Variant, baseline_stage, resolve, target_stage
from kdkit.utils.checkpoint import atomic_write_text
from kdkit.utils.gpus import GpuSet, describe_sets, gpu_environments, on_gpus
from kdkit.utils.lock import exclusive
from kdkit.utils.runlog import console
from kdkit.utils.trackers import RunIdentity
from kdkit.utils.workers import Interrupted, WorkerPool


@dataclass(frozen=True)
class Ablation:
    """What to compare and how: the base recipe (its file's data with the `--set` overrides
    applied), the variants and seeds, and the options of `kdkit ablate`."""

    recipe: Path  # the recipe file, as named in labels and the report
    base: dict[str, Any]  # its data, `overrides` applied
    variants: list[Variant]
    seeds: list[int]
    command_line: str  # as typed: the lock's holder and the command that continues
    overrides: list[str] = field(default_factory=list)
    vary: list[str] = field(default_factory=list)  # the `--vary` options, for the report
    variants_file: Path | None = None
    out: Path | None = None  # default runs/ablation-<recipe name>
    jobs: int = 1  # runs at the same time, each its own process
    gpu_sets: list[GpuSet] = field(default_factory=list)  # one per concurrent run (`--gpus`), or none
    stage: str | None = None  # the compared stage (default: `target_stage`)
    baseline: bool = True
    teacher_per_seed: bool = False


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

    def identity(self, run_dir: Path, suffix: str = "") -> RunIdentity:
        """How experiment trackers file this run (its name + `suffix`, its files in `run_dir`):
        every run of the ablation in one group (MLflow experiment, W&B group) named after the
        ablation's folder, tagged with its variant and seed."""
        tags = {"variant": self.variant.label, "seed": str(self.seed)}
        return run_identity(self.recipe, self.name + suffix, run_dir.resolve(), self.out.resolve().name, tags)


# ------------------------------------------------------------------------------------ the ablation
def run_ablation(ablation: Ablation) -> None:
    """Check every variant, run what is not done yet, then write the report. Raises `RunFailed`
    naming the runs that failed, `Interrupted` saying what is complete and how to continue."""
    start = time.perf_counter()
    jobs: list[RunJob] = []
    try:
        jobs, recipes, stage = plan_jobs(ablation)
        with exclusive(jobs[0].out, ablation.command_line):
            _run_grid(ablation, jobs, recipes, stage, start)
    except Interrupted as exc:
        runs = jobs[0].out / "runs" if jobs else None
        saved = (
            f"{sum(job.final.exists() for job in jobs)} of {len(jobs)} runs complete in {runs}, the "
            "others continue from their last checkpoint"
            if jobs
            else "nothing was run yet"
        )
        raise Interrupted(f"{exc}; {saved}; continue with: {ablation.command_line}", exc.signum) from None


def plan_jobs(ablation: Ablation) -> tuple[list[RunJob], dict[tuple[Variant, int], Recipe], str]:
    """The jobs of the grid (seed-major: an interrupted ablation has compared every variant on the
    first seeds), the recipe of each (variant, seed) and the compared stage."""
    variants, seeds = ablation.variants, ablation.seeds
    threads = max(1, torch.get_num_threads() // ablation.jobs)
    reference = parse_recipe(ablation.base, str(ablation.recipe))
    teacher_seed = None if ablation.teacher_per_seed else reference.seed
    recipes = {
        (v, s): resolve(
            ablation.base,
            v,
            s,
            str(ablation.recipe),
            stage=ablation.stage,
            teacher_seed=teacher_seed,
            baseline=ablation.baseline,
        )
        for v in variants
        for s in seeds
    }
    out = ablation.out or Path("runs") / f"ablation-{reference.name}"
    stage = target_stage(recipes[variants[0], seeds[0]], ablation.stage)
    jobs = [RunJob(v, s, recipes[v, s], out, threads) for s in seeds for v in variants]
    return jobs, recipes, stage


def _run_grid(
    ablation: Ablation,
    jobs: list[RunJob],
    recipes: dict[tuple[Variant, int], Recipe],
    stage: str,
    start: float,
) -> None:
    """Check every variant, train the shared train stages, run what is not done yet, write the report."""
    check_variants(ablation, jobs, recipes)
    out = jobs[0].out
    if ablation.gpu_sets:
        console.print(f"{ablation.jobs} run(s) at a time, {describe_sets(ablation.gpu_sets)}", markup=False)
    pending = pending_jobs(jobs)
    environments = gpu_environments(ablation.gpu_sets)
    failures = _prepare_train_stages(pending, ablation.jobs, environments)
    runnable = [job for job in pending if job.name not in failures]
    if runnable:
        errors = run_jobs(execute, runnable, ablation.jobs, "run", environments)
        failures |= {
            job.name: (errors[job.name], job.partial / ERROR_LOG) for job in runnable if job.name in errors
        }
    complete = [job for job in jobs if job.final.exists()]
    failed = [failure_record(job, *failures[job.name]) for job in jobs if job.name in failures]
    if complete:
        report_ablation(ablation, complete, stage, time.perf_counter() - start, failed)
    if failed:
        raise RunFailed(_incomplete(failed, len(jobs), len(complete), out, ablation.command_line))


def check_variants(
    ablation: Ablation, jobs: list[RunJob], recipes: dict[tuple[Variant, int], Recipe]
) -> None:
    """Everything `kdkit run` checks, once per variant (with the first seed); prepares the data."""
    variants = list(dict.fromkeys(job.variant for job in jobs))
    seeds = list(dict.fromkeys(job.seed for job in jobs))
    for variant in variants:
        source = f"{ablation.recipe} with {variant.label}"
        check_recipe(recipes[variant, seeds[0]], generate=True, source=source)
    console.print(f"{len(variants)} variants × {len(seeds)} seeds, checked; ablation folder: {jobs[0].out}")


# ------------------------------------------------------------------------------------ run processes
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
    console.rule(f"run {job.name}{on_gpus()}")
    return attempt(job, job.partial, _run_and_publish)


def _run_and_publish(job: RunJob) -> None:
    """Run the job's recipe in its partial folder, then move that into runs/ in one rename."""
    start = time.perf_counter()
    identity = job.identity(job.final)  # trackers name the folder the run is moved to
    peak = run_recipe(job.recipe, job.partial, job.out / "cache", job.threads, identity)
    record = {
        "run": job.name,
        "variant": job.variant.label,
        "values": dict(job.variant.values),
        "seed": job.seed,
        "wall_seconds": time.perf_counter() - start,
        **peak,
    }
    atomic_write_text(json.dumps(record, indent=2), job.partial / "run.json")
    job.final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(job.partial, job.final)


def pending_jobs(jobs: list[RunJob]) -> list[RunJob]:
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
    """Recipe keys at which the run in `run_dir` differs from the job's (none before it wrote its
    recipe), where it logs to aside: that changes no result."""
    saved = run_dir / "recipe.yaml"
    changed = recipe_changes(read_yaml(saved), job.recipe.to_dict()) if saved.exists() else []
    return [key for key in changed if key.removeprefix("train.") not in TRACKING_KEYS]


def prepare(job: RunJob) -> Outcome:
    """Train (or finish training) the train stages of `job.recipe` into the stage cache, in this
    process (see `attempt`)."""
    load_plugins()
    torch.set_num_threads(job.threads)
    console.rule(f"train stages for {job.name}{on_gpus()}")

    def train(job: RunJob) -> None:
        identity = job.identity(job.preparing, " (train stages)")
        run_recipe(job.recipe, job.preparing, job.out / "cache", job.threads, identity)

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
    function: Callable[[RunJob], Outcome],
    jobs: list[RunJob],
    processes: int,
    what: str,
    environments: list[dict[str, str]] | None = None,
) -> dict[str, str]:
    """`function(job)` for every job, each in a fresh worker process, `processes` at a time (each
    with a free one of `environments`, e.g. its GPU set, when given); return the failed jobs'
    errors by name. An interrupted or killed worker stops them all (`kdkit.utils.workers`)."""
    failed = {}
    with WorkerPool(
        function,
        min(processes, len(jobs)),
        fresh=True,
        describe=lambda j: f"{what} {j.name}",
        environments=environments,
    ) as pool:
        for done, (name, error) in enumerate(pool.run(jobs), 1):
            state = "complete" if error is None else f"FAILED: {error}"
            console.print(f"[ablate] {what} {name} {state} ({done}/{len(jobs)})", markup=False)
            if error is not None:
                failed[name] = error
    return failed


def _prepare_train_stages(
    pending: list[RunJob], processes: int, environments: list[dict[str, str]] | None
) -> dict[str, tuple[str, Path]]:
    """Train the train stages the pending runs need; return the runs that cannot run because one of
    theirs failed: run name → (error, log)."""
    first = preparation(pending)
    if not first:
        return {}
    console.print(f"train stages first: {len(first)} job(s), then the runs", markup=False)
    errors = run_jobs(prepare, list(first.values()), processes, "train stages for", environments)
    blocked = {}
    for job in pending:
        missing = set(missing_train_stages(job))
        for keys, trainer in first.items():
            if trainer.name in errors and missing & set(keys):
                error = f"its train stages could not be trained ({trainer.name}): {errors[trainer.name]}"
                blocked[job.name] = (error, trainer.preparing / ERROR_LOG)
    return blocked


# ------------------------------------------------------------------------------------ failures and the report
def failure_record(job: RunJob, error: str, log: Path) -> dict[str, Any]:
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


def report_ablation(
    ablation: Ablation, jobs: list[RunJob], stage: str, seconds: float, failed: list[dict[str, Any]]
) -> None:
    """Read the complete runs of the grid (`jobs`) and write the report files; `failed` lists the
    runs that are missing because they failed (the report is then marked incomplete)."""
    groups = _groups(jobs, stage, with_baseline=ablation.baseline)
    rows = [row for g in groups for row in g.rows()]
    finals = [j.final for j in jobs]
    info = {
        "recipe": str(ablation.recipe),
        "set": ablation.overrides,
        "vary": ablation.vary,
        "variants": str(ablation.variants_file) if ablation.variants_file else None,
        "seeds": ablation.seeds,
        "stage": stage,
        "baseline": baseline_stage(jobs[0].recipe, stage) if any(g.is_baseline for g in groups) else None,
        "teacher_per_seed": ablation.teacher_per_seed,
        "jobs": ablation.jobs,
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
