"""The teacher-output cache (kdkit.distill.teacher_cache) and the seeded augmentation it relies on."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_vit
from torch.utils.data import Dataset

from kdkit.config.schema import DataSpec, DistillSpec, TrainSpec
from kdkit.data.datasets import SeededAugmentation, build_loaders
from kdkit.data.samplers import EpochSampler
from kdkit.distill.distiller import Distiller
from kdkit.distill.pairs import layer_pairs
from kdkit.distill.teacher_cache import TeacherCache, open_teacher_cache
from kdkit.evaluation.classification import ClassificationEvaluator
from kdkit.registry import DATASETS
from kdkit.training.trainer import Trainer
from kdkit.utils.checkpoint import seed_everything


class NoisyDigits(Dataset):
    """64 fixed 16×16 images whose training transform is random (flip and noise from torch's RNG)."""

    def __init__(self, n: int = 64, shift: float = 0.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 1, 16, 16, generator=g) + shift
        self.labels = torch.randint(0, 10, (n,), generator=g)
        self.transform = f"flip + noise(0.3), shift {shift}"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image + 0.3 * torch.randn_like(image), int(self.labels[index])


if "cache_test_noisy" not in DATASETS:
    DATASETS.add("cache_test_noisy", lambda split, spec: NoisyDigits(shift=spec.options.get("shift", 0.0)))

DATA = DataSpec(dataset="cache_test_noisy", image_size=16, batch_size=16, mean=[0.5], std=[0.5], aug_cycle=1)
TRAIN = TrainSpec(epochs=3, lr=1e-3, warmup_epochs=0, clip_grad=1.0, log_every=2, device="cpu")


def distiller(
    teacher_seed: int = 1,
    pairs: Any = ((1, 1), (2, 2)),
    teacher_dtype: str = "float32",
    spec: DistillSpec | None = None,
    data: Any = None,
    amp: str = "none",
) -> Distiller:
    """A tiny Distiller; with `spec` and `data` (a training dataset), with the teacher cache
    `kdkit.run.build.build_distiller` would open for it."""
    teacher = tiny_vit(embed_dim=48, seed=teacher_seed)
    student = tiny_vit(embed_dim=32, seed=2)
    built = layer_pairs(teacher, student, [list(p) for p in pairs])
    cache = None
    if spec is not None:
        spec = dataclasses.replace(spec, teacher_dtype=teacher_dtype)
        taps = {f"feat.{i}": p.teacher for i, p in enumerate(built)}
        cache = open_teacher_cache(spec, data, teacher, taps, amp)
    return Distiller(
        teacher,
        student,
        built,
        adapter="covariance",
        example_input=torch.zeros(2, 1, 16, 16),
        teacher_dtype=teacher_dtype,
        cache=cache,
    )


def train(out: Path, cache_dir: Path | None, data: DataSpec = DATA, **spec: Any) -> tuple[Distiller, int]:
    """Distil for TRAIN.epochs epochs; return the distiller and how many batches the teacher ran on."""
    loader, evals, set_epoch = build_loaders(data, seed=0, eval_splits=())
    dtype = spec.pop("teacher_dtype", "float32")
    d = DistillSpec(cache_dir=str(cache_dir), **spec) if cache_dir is not None else None
    seed_everything(0)
    task = distiller(teacher_dtype=dtype, spec=d, data=loader.dataset, amp=TRAIN.amp)
    calls = []
    task.teacher.register_forward_hook(lambda *_: calls.append(1))
    trainer = Trainer(
        task, TRAIN, loader, evals, ClassificationEvaluator(), out, _NoLog(), "s", set_epoch=set_epoch
    )
    seed_everything(0)
    for epoch in range(TRAIN.epochs):
        trainer.train_one_epoch(epoch)
    task.close()
    return task, len(calls)


class _NoLog:
    def write(self, record: dict) -> None:
        pass


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_results_with_and_without_the_cache_are_identical(tmp_path: Path) -> None:
    live, live_calls = train(tmp_path / "live", None)
    cached, cached_calls = train(tmp_path / "cached", tmp_path / "cache")
    assert same(live.trainable_state_dict(), cached.trainable_state_dict())
    # aug_cycle=1: epochs 2 and 3 replay epoch 1's augmentation, so only epoch 1 runs the teacher.
    assert (live_calls, cached_calls) == (12, 4)
    # A re-run reads everything, epoch 1 included, and still ends with the same weights.
    rerun, rerun_calls = train(tmp_path / "rerun", tmp_path / "cache")
    assert rerun_calls == 0 and same(live.trainable_state_dict(), rerun.trainable_state_dict())


def test_a_half_precision_teacher_is_cached_exactly(tmp_path: Path) -> None:
    live, _ = train(tmp_path / "live", None, teacher_dtype="bfloat16")
    cached, calls = train(tmp_path / "cached", tmp_path / "cache", teacher_dtype="bfloat16")
    assert calls == 4 and same(live.trainable_state_dict(), cached.trainable_state_dict())
    (layout,) = (tmp_path / "cache").glob("*/layout.json")
    assert '"bfloat16"' in layout.read_text()
    (values,) = (tmp_path / "cache").glob("*/slot-00000.bin")
    assert values.stat().st_size == 64 * (10 + 48 + 48) * 2  # 16-bit storage: logits + two class tokens


def test_the_size_bound_falls_back_to_the_live_teacher_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, _ = train(tmp_path / "live", None)
    bounded, calls = train(tmp_path / "bounded", tmp_path / "cache", cache_max_gb=1e-6)
    assert calls == 12 and same(live.trainable_state_dict(), bounded.trainable_state_dict())
    err = capsys.readouterr().err
    assert "distill.cache_max_gb" in err and "teacher runs live" in err
    assert not list((tmp_path / "cache").glob("*/slot-*"))


def test_switched_off_the_cache_writes_nothing(tmp_path: Path) -> None:
    loader, _, _ = build_loaders(DATA, seed=0, eval_splits=())
    task = distiller(spec=DistillSpec(cache=False, cache_dir=str(tmp_path)), data=loader.dataset)
    assert task.cache is None and not any(tmp_path.iterdir())


def test_the_key_changes_with_teacher_weights_taps_precision_and_data(tmp_path: Path) -> None:
    """A stale entry is never read: anything the stored outputs depend on gives a new folder."""
    spec = DistillSpec(cache_dir=str(tmp_path))

    def folder(data: DataSpec = DATA, seed: int = 0, amp: str = "none", **options: Any) -> Path:
        loader, _, _ = build_loaders(data, seed=seed, eval_splits=())
        cache = distiller(spec=spec, data=loader.dataset, amp=amp, **options).cache
        assert cache is not None
        return cache.folder

    base = folder()
    assert folder() == base  # same everything: same entry
    # Batch size, worker count and the student's taps change no teacher output: the same entry.
    assert folder(DataSpec(**{**DATA.__dict__, "batch_size": 8, "num_workers": 1})) == base
    assert folder(pairs=((1, 1), (1, 2))) == base
    changed = [
        folder(teacher_seed=3),
        folder(pairs=((1, 1), (2, 1))),
        folder(teacher_dtype="bfloat16"),
        folder(amp="bf16"),
        folder(seed=1),
        folder(DataSpec(**{**DATA.__dict__, "options": {"shift": 1.0}})),
        folder(DataSpec(**{**DATA.__dict__, "mean": [0.4]})),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_get_returns_only_complete_batches_and_exact_values(tmp_path: Path) -> None:
    cache = TeacherCache(tmp_path, {"k": 1}, num_samples=10, max_bytes=1 << 30)
    keys = torch.tensor([[3, 0], [7, 0]])
    outputs = {"logits": torch.randn(2, 5), "feat.0": torch.randn(2, 4, 3, dtype=torch.float64).float()}
    assert cache.get(keys) is None
    cache.put(keys, outputs)
    got = cache.get(keys)
    assert got is not None and all(torch.equal(got[k], outputs[k]) for k in outputs)
    assert cache.get(torch.tensor([[3, 0], [4, 0]])) is None  # sample 4 is not stored
    assert cache.get(torch.tensor([[3, 1]])) is None  # another augmentation of sample 3
    reopened = TeacherCache(tmp_path, {"k": 1}, num_samples=10, max_bytes=1 << 30)
    again = reopened.get(keys.flip(0))
    assert again is not None and torch.equal(again["logits"], outputs["logits"].flip(0))
    assert (cache.hits, cache.misses) == (2, 5)


def test_seeded_augmentation_replays_an_image_from_its_key() -> None:
    data = SeededAugmentation(NoisyDigits(), seed=0)
    state = torch.get_rng_state()
    first, label, key = data[(5, 2)]
    assert torch.equal(torch.get_rng_state(), state)  # the global random stream is left alone
    assert torch.equal(data[(5, 2)][0], first) and key.tolist() == [5, 2] and label == NoisyDigits().labels[5]
    assert not torch.equal(data[(5, 3)][0], first)  # another slot, another augmentation
    assert not torch.equal(SeededAugmentation(NoisyDigits(), seed=1)[(5, 2)][0], first)


def test_the_epoch_sampler_shares_each_global_batch_between_ranks() -> None:
    single = list(EpochSampler(10, seed=0, aug_cycle=2))
    ranks = [list(EpochSampler(10, seed=0, aug_cycle=2, rank=r, world=2)) for r in range(2)]
    for b in range(3):  # global batch 4 = two per-rank batches of 2
        assert sorted(single[4 * b : 4 * b + 4]) == sorted(
            ranks[0][2 * b : 2 * b + 2] + ranks[1][2 * b : 2 * b + 2]
        )
    sampler = EpochSampler(10, seed=0, aug_cycle=2)
    sampler.set_epoch(3)
    assert {slot for _, slot in sampler} == {1} and [i for i, _ in sampler] != [i for i, _ in single]


def test_a_half_precision_teacher_is_converted_in_place_and_never_builds_a_graph() -> None:
    teacher = tiny_vit(embed_dim=48, seed=1)
    before = list(teacher.parameters())
    student = tiny_vit(embed_dim=32, seed=2)
    pairs = layer_pairs(teacher, student, [[1, 1]])
    task = Distiller(
        teacher, student, pairs, example_input=torch.zeros(2, 1, 16, 16), teacher_dtype="bfloat16"
    )
    after = list(task.teacher.parameters())
    # The same Parameter objects now hold 2-byte storage: no fp32 copy is kept beside them.
    assert all(
        a is b and a.dtype == torch.bfloat16 and not a.requires_grad
        for a, b in zip(after, before, strict=True)
    )
    no_schedule = TrainSpec(scheduler="none", device="cpu")
    trainer = Trainer(task, no_schedule, [], {}, ClassificationEvaluator(), Path("unused"), _NoLog(), "s")
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized and not optimized & {id(p) for p in after}  # no optimizer state for the teacher
    images = torch.randn(4, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.float16):  # the half teacher runs outside autocast
        raw = task._run_teacher(images)
    assert all(v.is_inference() and v.dtype == torch.bfloat16 for v in raw.values())
    out = task(images, torch.tensor([0, 1, 2, 3]))
    out["loss"].backward()
    assert all(p.grad is None for p in after) and student.head.weight.grad is not None
