"""`train.compile`: a compiled distillation trains to the same losses and weights as eager mode."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_vit

from kdkit.config.schema import TrainSpec
from kdkit.distill.distiller import Distiller
from kdkit.distill.pairs import layer_pairs
from kdkit.training.task import SupervisedTask
from kdkit.training.trainer import EpochProgress, Trainer, compile_task


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)
    ]


def _distiller(teacher: torch.nn.Module, student: torch.nn.Module) -> Distiller:
    pairs = layer_pairs(teacher, student, [[1, 1], [1, 2]])
    return Distiller(teacher, student, pairs, adapter="projection", example_input=torch.zeros(2, 1, 16, 16))


def test_compiled_distillation_matches_eager_mode() -> None:
    teacher, student = tiny_vit(embed_dim=48, depth=2, seed=1), tiny_vit(embed_dim=32, depth=1, seed=2)
    # As in a pipeline: the same architecture compiled first without taps (student_alone); its graph
    # must not be reused for the tapped student below, whose feature terms would then never fire.
    alone = TrainSpec(epochs=1, device="cpu", compile=True)
    Trainer(SupervisedTask(copy.deepcopy(student)), alone, _batches(1), stage="alone").train_steps(
        _batches(1), 1
    )
    eager_task = _distiller(teacher, student)
    compiled_task = _distiller(copy.deepcopy(teacher), copy.deepcopy(student))
    compiled_task.adapters.load_state_dict(eager_task.adapters.state_dict())
    batches = _batches()
    runs = {}
    for compiled, task in ((False, eager_task), (True, compiled_task)):
        spec = TrainSpec(epochs=1, lr=1e-3, device="cpu", compile=compiled, log_every=1)
        trainer = Trainer(task, spec, batches, stage="compile")
        tally = EpochProgress()
        trainer.train_steps(batches, len(batches), tally)
        runs[compiled] = (tally.sums / tally.seen, task.student.state_dict())
    assert compiled_task.student._compiled_call_impl is not None  # it really ran compiled
    assert compiled_task.teacher._compiled_call_impl is not None
    (eager_terms, eager_weights), (compiled_terms, compiled_weights) = runs[False], runs[True]
    assert eager_weights.keys() == compiled_weights.keys()  # checkpoints keep their keys
    torch.testing.assert_close(compiled_terms, eager_terms, rtol=1e-4, atol=1e-5)
    for key in eager_weights:
        torch.testing.assert_close(compiled_weights[key], eager_weights[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_task_without_compile_models_is_refused() -> None:
    with pytest.raises(TypeError, match="train.compile: Linear has no compile_models"):
        compile_task(torch.nn.Linear(2, 2))
