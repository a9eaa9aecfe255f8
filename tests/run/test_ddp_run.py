"""`kdkit ablate --gpus-per-run 2`: a worker given two GPUs runs its recipe as a DDP run of two
processes (gloo on the CPU here), through the ablation's stage cache, and writes what one process writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe_dict

from kdkit.config.validation import parse_recipe
from kdkit.run.gpu_runs import run_recipe
from kdkit.utils.checkpoint import load_file


@pytest.mark.slow
def test_a_worker_given_two_gpus_runs_ddp_through_the_stage_cache_like_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tiny_recipe_dict()
    data["train"].update(epochs=1, max_steps_per_epoch=2)
    data["pipeline"] = data["pipeline"][:1]  # the teacher: a train stage of the stage cache
    recipe = parse_recipe(data, "tiny")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("KDKIT_GPUS", raising=False)
    runs = {"single": tmp_path / "single", "ddp": tmp_path / "ddp"}
    run_recipe(recipe, runs["single"], tmp_path / "cache-single", threads=1)
    monkeypatch.setenv("KDKIT_GPUS", "0,1")  # what a worker of `--gpus 0,1 --gpus-per-run 2` is given
    peak = run_recipe(recipe, runs["ddp"], tmp_path / "cache-ddp", threads=2)

    assert peak["peak_rss_MiB"] > 0  # rank 0's measure, for the run's run.json
    files = {
        name: sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) for name, run in runs.items()
    }
    assert files["ddp"] == files["single"]  # one run folder, written once (rank 0)
    lines = {name: (run / "metrics.jsonl").read_text().splitlines() for name, run in runs.items()}
    assert len(lines["ddp"]) == len(lines["single"])  # rank 1 logged nothing
    # The teacher was trained once, by both ranks together, and published into the cache by rank 0.
    (entry,) = [p for p in (tmp_path / "cache-ddp").iterdir() if p.is_dir()]
    assert json.loads((entry / "done.json").read_text())["trained_by"] == "ddp"
    models = {name: load_file(run / "teacher" / "model.pt")["model"] for name, run in runs.items()}
    for key in models["single"]:
        # Rounding only (see tests/training/test_ddp.py): up to ~2e-5 here; a wrong split, ~lr = 2e-3.
        torch.testing.assert_close(models["ddp"][key], models["single"][key], rtol=0, atol=1e-4, msg=key)
