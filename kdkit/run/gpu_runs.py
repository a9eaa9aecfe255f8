"""The GPUs of `kdkit ablate`'s runs (`--gpus`, `--gpus-per-run`; the sets themselves are
`kdkit.utils.gpus`), and a recipe run over the GPUs its worker process was given: in this process
for one GPU, or as a DDP run of N processes for N, started the way `torchrun --standalone
--nproc_per_node N` starts them (torch's elastic launcher, a c10d rendezvous on localhost).

Each rank runs the same `RecipeRun` as a single process under `kdkit.utils.distributed.session()`,
so a DDP run writes the same run folder (rank 0 alone writes it; see docs/scaling.md).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import torch
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from kdkit.config.schema import Recipe
from kdkit.plugins import load_plugins
from kdkit.run.pipeline import RecipeRun
from kdkit.run.stage_cache import StageCache
from kdkit.utils import distributed
from kdkit.utils.gpus import GpuPlan, plan_gpus, visible_gpus, worker_gpu_count
from kdkit.utils.memory import process_peak
from kdkit.utils.trackers import RunIdentity


def ablation_gpus(recipe: Recipe, gpus: str | None, per_run: int, jobs: int | None) -> GpuPlan:
    """The GPU sets of an ablation of `recipe` (see `plan_gpus`). Without `--gpus`, every visible
    GPU, unless the recipe trains on the CPU only: its runs then share the cores as before."""
    if gpus is None and not trains_on_cuda(recipe):
        gpus = "none"
    return plan_gpus(gpus, per_run, jobs, visible_gpus())


def trains_on_cuda(recipe: Recipe) -> bool:
    """Whether a stage of `recipe` may use CUDA (`train.device` other than 'cpu')."""
    return any(recipe.plan.of(stage).train.device != "cpu" for stage in recipe.pipeline)


def run_recipe(
    recipe: Recipe, out_dir: Path, cache: Path, threads: int, identity: RunIdentity | None = None
) -> dict[str, float]:
    """Run (or continue) `recipe` in `out_dir` with the stage cache `cache`, on this worker's GPUs,
    logged to the experiment trackers as `identity`; return the peak memory of the process that
    ran it (rank 0's under DDP)."""
    processes = max(1, worker_gpu_count())  # one process per GPU of this worker's set
    if processes == 1:
        return _run(recipe, out_dir, cache, threads, identity)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone picks
        max_restarts=0,  # a failed run is reported and retried by the next `kdkit ablate`
    )
    threads_each = max(1, threads // processes)
    return elastic_launch(config, _rank)(recipe, out_dir, cache, threads_each, identity)[0]


def _rank(
    recipe: Recipe, out_dir: Path, cache: Path, threads: int, identity: RunIdentity | None
) -> dict[str, float]:
    """One rank of a DDP run (a process started by the elastic launcher)."""
    load_plugins()
    with distributed.session():
        return _run(recipe, out_dir, cache, threads, identity)


def _run(
    recipe: Recipe, out_dir: Path, cache: Path, threads: int, identity: RunIdentity | None
) -> dict[str, float]:
    torch.set_num_threads(threads)
    RecipeRun(recipe, out_dir, StageCache(cache), identity).run(resume=True)
    return process_peak()
