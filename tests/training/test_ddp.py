"""DDP with gloo on the CPU: two processes train exactly what one process trains at the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import tiny_recipe_dict, tiny_vit

from kdkit.cli import main
from kdkit.config.schema import DataSpec, TrainSpec
from kdkit.data.datasets import build_loaders
from kdkit.distill.distiller import Distiller
from kdkit.distill.pairs import layer_pairs
from kdkit.evaluation.classification import ClassificationEvaluator
from kdkit.training.trainer import Trainer
from kdkit.utils import distributed
from kdkit.utils.checkpoint import load_file, seed_everything
from kdkit.utils.runlog import MetricsLog

# Global batch 32: one process loads 32, each of two loads 16 of the same 32 samples.
DATA = DataSpec(dataset="digits", image_size=16, batch_size=32, mean=[0.5], std=[0.5])
TRAIN = TrainSpec(epochs=2, max_steps_per_epoch=3, warmup_epochs=1, clip_grad=1.0, log_every=2, device="cpu")


def train(out: Path) -> dict[str, torch.Tensor]:
    """Distil a tiny pair for 6 steps with a projection adapter (no batch statistics, no dropout)."""
    seed_everything(0)
    teacher, student = tiny_vit(embed_dim=48, seed=1), tiny_vit(embed_dim=32, seed=2)
    pairs = layer_pairs(teacher, student, [[1, 1], [2, 2]])
    task = Distiller(teacher, student, pairs, adapter="projection", example_input=torch.zeros(2, 1, 16, 16))
    loader, evals, set_epoch = build_loaders(DATA, seed=0)
    log = MetricsLog(out)
    trainer = Trainer(
        task, TRAIN, loader, evals, ClassificationEvaluator(), out, log, "s", set_epoch=set_epoch
    )
    seed_everything(0)
    trainer.fit()
    log.close()
    return task.trainable_state_dict()


def _worker(rank: int, init_file: str, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        assert (distributed.rank(), distributed.world_size()) == (rank, 2)
        state = train(out)
        torch.save(state, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_at_the_same_global_batch(tmp_path: Path) -> None:
    single = train(tmp_path / "single")
    (tmp_path / "ddp").mkdir()
    mp.spawn(_worker, args=(str(tmp_path / "init"), tmp_path / "ddp"), nprocs=2, join=True)
    ranks = [load_file(tmp_path / "ddp" / f"rank{r}.pt") for r in range(2)]
    # Every rank ends with the same weights, and they are the single process's.
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in single)
    initial = tiny_vit(embed_dim=32, seed=2).state_dict()["head.weight"]
    assert not torch.equal(single["student.head.weight"], initial)  # training did change the weights
    for key in single:
        torch.testing.assert_close(ranks[0][key], single[key], rtol=0, atol=1e-6, msg=key)
    # Rank 0 alone logged and checkpointed; its logged losses are the means over the global batch.
    lines = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [r["step"] for r in expected]
    for got, want in zip(lines, expected, strict=True):
        for key in (k for k in want if k.startswith(("train/", "val/"))):
            assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), key
    assert {p.name for p in (tmp_path / "ddp").iterdir()} >= {"last.pt", "model.pt", "rank0.pt", "rank1.pt"}


def free_port() -> int:
    """A TCP port nobody listens on now (for the rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_of_two_processes_write_one_run_directory_like_a_single_process(
    tmp_path: Path,
) -> None:
    """Two `torchrun --nnodes 2 --nproc_per_node 2 -m kdkit run` launches (two "nodes" on localhost,
    one c10d rendezvous, gloo): rank 0 of the 4 picks the directory and alone writes it; the model
    is the one a single process trains on the same global batch."""
    data = tiny_recipe_dict()
    data["train"].update(epochs=1, max_steps_per_epoch=2)
    data["distill"].update(adapter="projection", teacher="teacher", cache_dir=str(tmp_path / "cache"))
    data["pipeline"] = [
        {"name": "student_kd", "do": "distill"},
        {"name": "test", "do": "evaluate", "runs": ["student_kd"], "split": "val"},
    ]
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))  # global batch 32: 8 per process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2"]
    rendezvous = ["--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{free_port()}", "--rdzv_id=two-nodes"]
    command = [*torchrun, *rendezvous, "-m", "kdkit", "run", str(recipe), "--out", str(tmp_path / "ddp")]
    nodes = [subprocess.Popen(command, env=env) for _ in range(2)]  # the same command on every node
    assert [node.wait(timeout=300) for node in nodes] == [0, 0]
    assert main(["run", str(recipe), "--out", str(tmp_path / "single")]) == 0
    runs = {name: tmp_path / name for name in ("ddp", "single")}
    lines = {name: (run / "metrics.jsonl").read_text().splitlines() for name, run in runs.items()}
    assert len(lines["ddp"]) == len(lines["single"])  # ranks 1-3 logged nothing
    for got, want in zip(map(json.loads, lines["ddp"]), map(json.loads, lines["single"]), strict=True):
        for key in (k for k in want if k.startswith(("train/", "val/"))):  # means over the global batch
            assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), key
    summary = json.loads((runs["ddp"] / "summary.json").read_text())
    assert set(summary) == {"student_kd", "test"} and summary["test"]["results"]["student_kd"]
    models = {name: load_file(run / "student_kd" / "model.pt")["model"] for name, run in runs.items()}
    for key in models["single"]:
        # Float rounding only (the teacher cache, filled by the four processes, served the single run):
        # AdamW's first steps divide by the gradients' own size, so sums in another order differ by up
        # to ~1e-5 here; a rank that trained on other samples would differ by about the lr, 1e-3.
        torch.testing.assert_close(models["ddp"][key], models["single"][key], rtol=0, atol=1e-4, msg=key)
