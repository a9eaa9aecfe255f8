"""Build what a recipe describes, with no run directory: its evaluator, its models and a distill
stage's `Distiller` (student, teacher, taps, adapters). `kdkit run`, `validate`, `eval`, `bench`
and `ablate` all build through these functions, so they build the same things."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.config.plan import StagePlan, TeacherPlan
from kdkit.config.schema import DataSpec, DistillSpec, Recipe, RecipeError, StageSpec
from kdkit.data.datasets import example_batch
from kdkit.distill.adapters import adapter_min_batch
from kdkit.distill.distiller import Distiller
from kdkit.distill.losses import criterion_min_batch
from kdkit.distill.pairs import GroupError, PairError, feature_taps, layer_groups, layer_pairs
from kdkit.distill.several_teachers import SeveralTeachers
from kdkit.distill.teacher_cache import open_teacher_cache
from kdkit.distill.teacher_input import (
    InputSpace,
    TeacherInput,
    input_space_from_pretrained_cfg,
    size_problem,
)
from kdkit.models.factory import ModelError, build_model, load_state_dict_checked
from kdkit.registry import EVALUATORS
from kdkit.utils.checkpoint import load_file


def make_evaluator(recipe: Recipe) -> Any:
    """The recipe's evaluator instance; bad `evaluator_options` are a recipe error."""
    try:
        return EVALUATORS.get(recipe.evaluator)(**recipe.evaluator_options)
    except (TypeError, ValueError) as exc:
        text = str(exc)
        raise RecipeError(
            [text if text.startswith("evaluator_options") else f"evaluator_options: {text}"]
        ) from None


def model_from_recipe(recipe: Recipe, key: str, where: str) -> nn.Module:
    """The model the recipe names `key` (`recipe.models[key]`, built by `kdkit.models.build_model`),
    its build problems re-raised as recipe errors at `where`."""
    try:
        return build_model(recipe.models[key], where=f"models.{key}")
    except ModelError as exc:  # already names the model's key
        raise RecipeError([str(exc)]) from None
    except ValueError as exc:
        raise RecipeError([f"{where}: {exc}"]) from None


def distill_min_batch(stage: StagePlan) -> int:
    """The smallest batch for which every adapter and feature criterion of a distill stage gives a
    non-zero loss (a trailing batch smaller than it is dropped)."""
    adapters, criteria = stage.adapter_names(), stage.criterion_names()
    return max([*map(adapter_min_batch, adapters), *map(criterion_min_batch, criteria)])


def dry_run_size(stage: StagePlan) -> int:
    """Images in the dry run that sizes the adapters: 2, or more where an adapter needs more (cka)."""
    return max(2, distill_min_batch(stage))


def build_distiller(
    recipe: Recipe,
    stage: StageSpec,
    trained: Mapping[str, Path] | None = None,
    example: torch.Tensor | None = None,
    cache_data: Any = None,
) -> Distiller | SeveralTeachers:
    """Student, teachers, taps and adapters of a distill stage, sized by a dry run on `example`
    (default: two of the stage's training images): a `Distiller` for one teacher, `SeveralTeachers`
    (a `Distiller` branch per teacher) for `distill.teachers` of two or more.

    A teacher trained by an earlier stage gets that stage's weights from `trained` (stage name →
    model.pt); without them (checks, benchmarks) it keeps its initial weights. With `cache_data`
    (the training dataset) and a teacher's `cache` on, its teacher-output cache is opened.
    The student is built first, so that with the same seed it starts from the same weights as a
    `train` stage of the same model (the baseline trained without a teacher)."""
    plan = recipe.plan.of(stage)
    d, where = plan.distill_spec(), f"{plan.key}.distill"
    student = model_from_recipe(recipe, d.student, f"{where}.student")
    if len(plan.teachers) == 1 and not d.teachers:
        return _branch(recipe, plan, plan.teachers[0], student, trained, example, cache_data, where)
    if example is None:  # one batch sizes every teacher's adapters
        try:
            example = example_batch(plan.data, dry_run_size(plan))
        except (ValueError, KeyError) as exc:
            raise _distill_error(where, exc) from None
    branches = [
        _branch(recipe, plan, t, student, trained, example, cache_data, f"{where}.teachers[{k}]")
        for k, t in enumerate(plan.teachers)
    ]
    if len(branches) == 1:  # `teachers` with one entry: that teacher alone
        return branches[0]
    try:
        return SeveralTeachers(
            branches,
            [t.weight for t in plan.teachers],
            combine=d.teacher_combine,
            alpha=d.alpha,
            tau=d.tau,
            beta=d.beta,
            logit_loss=d.logit_loss,
            logit_options=d.logit_options,
            label_smoothing=plan.train.label_smoothing,
        )
    except (ValueError, KeyError) as exc:
        raise _distill_error(where, exc) from None


def _branch(
    recipe: Recipe,
    plan: StagePlan,
    teacher_plan: TeacherPlan,
    student: nn.Module,
    trained: Mapping[str, Path] | None,
    example: torch.Tensor | None,
    cache_data: Any,
    where: str,
) -> Distiller:
    """The `Distiller` of one teacher of a distill stage and `student`, from the teacher's merged
    distill section (`TeacherPlan.distill`); its problems are recipe errors under `where`."""
    d = teacher_plan.distill
    teacher = _teacher(recipe, teacher_plan, trained, where)
    try:
        parsed = (
            teacher_plan.pairs if isinstance(teacher_plan.pairs, str) else list(teacher_plan.pair_specs())
        )
        pairs = layer_pairs(teacher, student, parsed, d.point, d.select) if d.adapter != "none" else []
        groups = layer_groups(teacher, student, d.groups, d.point)
        teacher_input = make_teacher_input(d, plan.data, teacher)
    except (ValueError, KeyError) as exc:
        raise _distill_error(where, exc) from None
    # Keyed by what the Distiller is built from (the teacher as `teacher_dtype` will make it).
    cache = None
    if cache_data is not None:
        taps = feature_taps(pairs, groups, "teacher")
        cache = open_teacher_cache(d, cache_data, teacher, taps, plan.train.amp, teacher_input)
    try:
        if example is None:
            example = example_batch(plan.data, dry_run_size(plan))
        return Distiller(
            teacher,
            student,
            pairs,
            adapter=d.adapter,
            adapter_options=d.adapter_options,
            criterion=d.criterion,
            criterion_options=d.criterion_options,
            groups=groups,
            alpha=d.alpha,
            tau=d.tau,
            beta=d.beta,
            logit_loss=d.logit_loss,
            logit_options=d.logit_options,
            label_smoothing=plan.train.label_smoothing,
            example_input=example,
            teacher_dtype=d.teacher_dtype,
            cache=cache,
            teacher_input=teacher_input,
        )
    except (ValueError, KeyError) as exc:
        raise _distill_error(where, exc) from None


def _teacher(
    recipe: Recipe, teacher_plan: TeacherPlan, trained: Mapping[str, Path] | None, where: str
) -> nn.Module:
    """A distill stage's teacher: built from its model spec, with the weights of the earlier stage
    that trained it when `trained` (stage name → model.pt) has them."""
    teacher = model_from_recipe(recipe, teacher_plan.model, f"{where}.teacher")
    trained_by = teacher_plan.stage
    if trained_by is not None and trained is not None:
        weights = trained[trained_by]
        load_state_dict_checked(teacher, load_file(weights)["model"], f"stage {trained_by!r} model.pt")
    return teacher


def make_teacher_input(d: DistillSpec, data: DataSpec, teacher: nn.Module) -> TeacherInput | None:
    """The conversion of the student's batches (`data`: size, mean, std) into the input the teacher
    expects (`d.teacher_input`: 'auto' from its timm pretrained_cfg, or given); None when the
    teacher takes the student's input as it is."""
    if d.teacher_input is None:
        return None
    student = InputSpace(data.image_size, tuple(data.mean), tuple(data.std))
    if d.teacher_input == "auto":
        try:
            found = input_space_from_pretrained_cfg(teacher)
        except ValueError as exc:
            raise ValueError(f"teacher_input: 'auto': {exc}") from None
        if found is None:
            raise ValueError(
                "teacher_input: 'auto' reads the teacher's timm pretrained_cfg, and it has none with a "
                "mean and std; give teacher_input: {size, mean, std}"
            )
        space, interpolation = found
    else:
        t = d.teacher_input
        problem = "" if t.size is None else size_problem(t.size, teacher)
        if problem:  # before converting: a huge size would fail allocating, far from its key
            raise ValueError(f"teacher_input.size: {problem}")
        space = InputSpace(t.size, tuple(t.mean or data.mean), tuple(t.std or data.std))
        interpolation = t.interpolation
    try:
        conversion = TeacherInput(student, space, interpolation)
    except ValueError as exc:
        raise ValueError(f"teacher_input: {exc}") from None
    return None if conversion.is_identity else conversion


def _distill_error(where: str, exc: Exception) -> RecipeError:
    """A distill stage's build problem as a recipe error; one pair's names its key (`...pairs[1]`)."""
    return RecipeError([f"{where}.{exc}" if isinstance(exc, PairError | GroupError) else f"{where}: {exc}"])


def check_input(
    model: nn.Module, example: torch.Tensor, where: str, size_key: str = "data.image_size"
) -> int:
    """Fail with a recipe error when `model` cannot take the data's images (size, patch, channels);
    return the size of its output's last dimension (the number of classes of a classifier).
    `size_key` names the setting the images' size comes from (a teacher's converted input has its own)."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    size = tuple(example.shape[-2:])
    if patch is not None and any(s % p for s, p in zip(size, patch, strict=True)):
        raise RecipeError(
            [
                f"{where}: {size_key} {size[0]} is not divisible by the patch size "
                f"{patch[0]}; choose an image size that is a multiple of it"
            ]
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(example)
    except Exception as exc:  # any failure here is a model/data mismatch the user must fix
        raise RecipeError(
            [
                f"{where}: cannot run on the data's {tuple(example.shape[1:])} images ({size_key} "
                f"{size[0]}; {type(exc).__name__}: {exc}); check the model options (img_size, in_chans) "
                f"against {size_key} and the data's channels"
            ]
        ) from None
    finally:
        model.train(was_training)
    return int(output.shape[-1])
