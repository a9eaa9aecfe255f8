"""SLURM through submitit: `kdkit run` and `kdkit ablate` with `--launcher slurm`.

A run is one SLURM job; an ablation is one job per set of shared train stages (the teacher, the
baseline), then one job per run, which starts after them (`--dependency=afterany`: a run whose
teacher failed to train trains it itself, through the stage cache, and reports the failure as its
own). Every job runs the local engine's own functions (`RecipeRun`, `prepare`, `execute`) in a
submitit callable whose `checkpoint` requeues it on timeout or preemption; it resumes from its
`last.pt`, as a local run does. Job ids go into `OUT/slurm.json`; `collect_ablation` writes the
report from the finished run folders and names the runs still queued or failed.

The state of a job comes from `squeue` (submitit's own watcher reads `sacct`, which needs SLURM's
accounting database); a run's outcome comes from its folder, never from SLURM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kdkit.config.schema import LauncherSpec, Recipe
from kdkit.errors import RunFailed, UsageError
from kdkit.plugins import load_plugins
from kdkit.run import ablation as engine
from kdkit.run.checks import check_recipe
from kdkit.run.pipeline import RecipeRun
from kdkit.run.resume import plan_resume
from kdkit.run.variants import Variant
from kdkit.utils import distributed
from kdkit.utils.checkpoint import atomic_write_text
from kdkit.utils.lock import exclusive

INSTALL = "pip install 'kdkit[slurm]'"
QUEUE_FILE = "slurm.json"  # in an ablation folder: its definition and the job id of every run
SQUEUE_TRIES, SQUEUE_RETRY_S = 5, 3.0  # how often and how far apart to ask an unanswering squeue
WAITING = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


def _submitit() -> Any:
    """The submitit module, or a `UsageError` with the line that installs it."""
    try:
        import submitit
    except ImportError:
        raise UsageError(f"--launcher slurm needs submitit: {INSTALL}") from None
    return submitit


@dataclasses.dataclass(frozen=True)
class Submitted:
    """A submitted job as the command prints it."""

    name: str
    job_id: str
    stdout: Path
    stderr: Path


class SlurmJob:
    """`work(argument)` in a SLURM job: a submitit callable whose `checkpoint` requeues it when SLURM
    signals a timeout or preemption; the work then resumes from its last checkpoint."""

    def __init__(self, work: Callable[[Any], Any], argument: Any, threads: int) -> None:
        self.work, self.argument, self.threads = work, argument, threads

    def __call__(self) -> Any:
        """Run the work, as one process of a (possibly multi-node) torch.distributed group."""
        submitit = _submitit()
        if submitit.JobEnvironment().num_tasks > 1:  # RANK, WORLD_SIZE, MASTER_ADDR, ... from SLURM's
            submitit.helpers.TorchDistributedEnvironment().export(overwrite=True)
        torch.set_num_threads(self.threads)
        load_plugins()
        return self.work(self.argument)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The same work again: every kind of work here continues from its `last.pt`."""
        return _submitit().helpers.DelayedSubmission(self)


def submit(
    work: Callable[[Any], Any],
    argument: Any,
    launcher: LauncherSpec,
    folder: Path,
    name: str,
    after: Sequence[str] = (),
) -> Submitted:
    """Submit `work(argument)` as one job (starting after the jobs `after`), its files in `folder`."""
    executor = _submitit().SlurmExecutor(folder=folder)
    executor.update_parameters(
        job_name=f"kdkit-{name}",
        partition=launcher.partition,
        time=launcher.time,
        nodes=launcher.nodes,
        ntasks_per_node=max(1, launcher.gpus_per_node),  # one process per GPU
        gpus_per_node=launcher.gpus_per_node or None,
        cpus_per_task=launcher.cpus_per_task,
        mem=launcher.mem,
        dependency=f"afterany:{':'.join(after)}" if after else None,
        additional_parameters=dict(launcher.sbatch),
    )
    try:
        job = executor.submit(SlurmJob(work, argument, launcher.cpus_per_task))
    except Exception as exc:  # sbatch refused it (partition, time limit, ...): its own words
        raise UsageError(f"SLURM refused the job {name}: {str(exc).strip()[-600:]}") from None
    return Submitted(name, str(job.job_id), job.paths.stdout, job.paths.stderr)


def job_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM's state of each job that `squeue` still knows (finished ones stay for `MinJobAge`)."""
    if not job_ids:
        return {}
    command = ["squeue", "--noheader", "--states=all", "--format=%i|%T", f"--jobs={','.join(job_ids)}"]
    for attempt in range(SQUEUE_TRIES):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        # squeue refuses ids it no longer knows (finished longer ago than MinJobAge): none queued
        if done.returncode == 0 or "Invalid job id" in done.stderr:
            rows = (line.split("|") for line in done.stdout.splitlines() if "|" in line)
            return {job_id.strip(): state.strip() for job_id, state in rows}
        if attempt < SQUEUE_TRIES - 1:  # a controller that is restarting or busy answers later
            time.sleep(SQUEUE_RETRY_S)
    raise UsageError(f"squeue failed {SQUEUE_TRIES} times: {done.stderr.strip() or done.returncode}")


def wait_for(job_ids: list[str], poll_s: float = 2.0) -> dict[str, str]:
    """Wait until no job of `job_ids` is queued or running; return the states squeue last showed."""
    while True:
        states = job_states(job_ids)
        if not any(states.get(j) in WAITING for j in job_ids):
            return states
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------ kdkit run
@dataclasses.dataclass(frozen=True)
class RunInJob:
    """What the job of `kdkit run --launcher slurm` runs: the recipe into `out`."""

    recipe: Recipe
    out: Path
    source: str
    command_line: str


def run_in_job(job: RunInJob) -> str:
    """The job's work: check the recipe and run (or continue) it; every process of a DDP run does this."""
    with distributed.session():
        main = distributed.is_main()
        with exclusive(job.out, job.command_line) if main else contextlib.nullcontext():
            with distributed.main_first():  # rank 0 first: checking may generate the data set
                check_recipe(job.recipe, generate=True, source=job.source)
            RecipeRun(job.recipe, job.out).run(resume=True)
    return str(job.out / "summary.json")


def run_complete(recipe: Recipe, out: Path) -> bool:
    """Whether every stage of the recipe's run in `out` is done."""
    return all((out / stage.name / "done.json").exists() for stage in recipe.pipeline)


def submit_run(recipe: Recipe, out: Path, resume: bool, source: str, command_line: str) -> Submitted:
    """Check the recipe here (a bad one stops before it queues), then submit its run into `out`."""
    _submitit()  # missing: say so before the checks
    with exclusive(out, command_line):
        plan = plan_resume(out, recipe) if resume else None
        check_recipe(recipe, generate=True, source=source)
        if plan is not None:
            plan.apply(out)
    job = RunInJob(recipe, out, source, command_line)
    return submit(run_in_job, job, recipe.launcher, out / recipe.launcher.folder, recipe.name)


# ------------------------------------------------------------------------------------ kdkit ablate
def submit_ablation(ablation: engine.Ablation, launcher: LauncherSpec) -> tuple[Path, list[Submitted]]:
    """Submit the train stages the pending runs need, then the runs (each after the train stages it
    reads); runs still queued from an earlier submission are left alone. Returns the ablation folder
    and what was submitted."""
    _submitit()  # missing: say so before the checks
    if launcher.nodes > 1 or launcher.gpus_per_node > 1:
        raise UsageError(
            "kdkit ablate --launcher slurm: one process per run (nodes 1, gpus_per_node 0 or 1); "
            "run a multi-GPU recipe with kdkit run --launcher slurm"
        )
    jobs, recipes, _ = engine.plan_jobs(ablation)
    out = jobs[0].out
    with exclusive(out, ablation.command_line):
        engine.check_variants(ablation, jobs, recipes)
        queued = _queued(out)
        pending = [job for job in engine.pending_jobs(jobs) if job.name not in queued]
        threads = launcher.cpus_per_task
        folder = out / launcher.folder
        submitted, after_keys = [], {}
        for keys, job in engine.preparation(pending).items():
            name = f"train-stages-of-{job.name}"
            submitted.append(submit(engine.prepare, _with(job, threads), launcher, folder, name))
            after_keys[keys] = submitted[-1].job_id
        for job in pending:
            missing = set(engine.missing_train_stages(job))
            after = [job_id for keys, job_id in after_keys.items() if missing & set(keys)]
            submitted.append(submit(engine.execute, _with(job, threads), launcher, folder, job.name, after))
        runs = {s.name: s.job_id for s in submitted[len(after_keys) :]}
        _write_queue(out, ablation, {**_read_queue(out).get("runs", {}), **runs})
    return out, submitted


def _with(job: engine.RunJob, threads: int) -> engine.RunJob:
    """The job with the threads of its SLURM task."""
    return dataclasses.replace(job, threads=threads)


def collect_ablation(out: Path) -> Path:
    """Write the report of the ablation submitted into `out` from its complete runs; raises
    `RunFailed` naming the runs still queued or failed (the report, if any, is marked incomplete)."""
    record = _read_queue(out)
    if not record:
        raise UsageError(f"--collect {out}: no ablation was submitted there (no {out / QUEUE_FILE})")
    ablation = _ablation_from(record["ablation"])
    jobs, _, stage = engine.plan_jobs(ablation)
    states = job_states(list(record["runs"].values()))
    complete = [job for job in jobs if job.final.exists()]
    missing = [_missing(job, record["runs"].get(job.name), states) for job in jobs if not job.final.exists()]
    if complete:
        ends = [(job.final / "run.json").stat().st_mtime for job in complete]
        engine.report_ablation(ablation, complete, stage, max(ends) - record["submitted"], missing)
    if missing:
        raise RunFailed(_not_complete(missing, len(jobs), out, ablation.command_line))
    return out / "ablation.md"


def _not_complete(missing: list[dict[str, Any]], total: int, out: Path, command: str) -> str:
    """Which runs are not complete and why; how to collect again and how to resubmit."""
    lines = [f"ablation not complete: {len(missing)} of {total} runs:"]
    lines += [f"  {m['run']} ({m['variant']}, seed {m['seed']}): {m['error']}" for m in missing]
    report = (
        f"the report of the complete runs is in {out}/ablation.md, marked incomplete"
        if total > len(missing)
        else "no run is complete, so no report was written"
    )
    lines.append(
        f"{report}; when the queued jobs are done: kdkit ablate --collect {out}; runs that failed or "
        f"stopped continue from their last checkpoint with: {command}"
    )
    return "\n".join(lines)


def _missing(job: engine.RunJob, job_id: str | None, states: dict[str, str]) -> dict[str, Any]:
    """An incomplete run as the report lists it: queued, failed (its error) or stopped."""
    state = states.get(job_id or "", "")
    error_log = job.partial / engine.ERROR_LOG
    if job_id is None:
        why = "not submitted"
    elif state in WAITING:
        why = f"SLURM job {job_id} is {state}"
    elif error_log.exists():
        why = f"failed in SLURM job {job_id}: {error_log.read_text().strip().splitlines()[-1]}"
    else:
        why = f"SLURM job {job_id} ended before the run was complete ({state or 'not in squeue any more'})"
    return engine.failure_record(job, why, error_log)


def _queued(out: Path) -> set[str]:
    """The runs of an earlier submission whose jobs are still queued or running."""
    runs = _read_queue(out).get("runs", {})
    states = job_states(list(runs.values()))
    return {name for name, job_id in runs.items() if states.get(job_id) in WAITING}


def _read_queue(out: Path) -> dict[str, Any]:
    path = out / QUEUE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_queue(out: Path, ablation: engine.Ablation, runs: dict[str, str]) -> None:
    """`OUT/slurm.json`: the ablation (for `--collect`), when it was first submitted, every run's job id."""
    submitted = _read_queue(out).get("submitted", time.time())
    record = {"ablation": _ablation_record(ablation, out), "submitted": submitted, "runs": runs}
    atomic_write_text(json.dumps(record, indent=2), out / QUEUE_FILE)


def _ablation_record(ablation: engine.Ablation, out: Path) -> dict[str, Any]:
    """The ablation writing into `out` as JSON (paths as strings), read back by `_ablation_from`."""
    record = {**dataclasses.asdict(ablation), "recipe": str(ablation.recipe), "out": str(out)}
    record["variants_file"] = str(ablation.variants_file) if ablation.variants_file else None
    return record


def _ablation_from(record: dict[str, Any]) -> engine.Ablation:
    """The `Ablation` that `_ablation_record` wrote."""
    variants = [
        Variant(tuple(tuple(pair) for pair in v["values"]), v["label"], v["slug"]) for v in record["variants"]
    ]
    paths = {key: Path(record[key]) if record[key] else None for key in ("recipe", "variants_file", "out")}
    return engine.Ablation(**{**record, **paths, "variants": variants})
