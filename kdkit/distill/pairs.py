"""Which student layer learns from which teacher layer: layer pairs and layer groups, and their taps."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from kdkit.config.schema import GroupSpec, PairSpec
from kdkit.config.validation import parse_pair
from kdkit.distill.taps import Tap, block_taps, find_preset
from kdkit.registry import GROUP_METHODS


@dataclass(frozen=True)
class LayerPair:
    """A student tap matched to a teacher tap, with the pair's own options (None: the
    Distiller's; a built Distiller's `pairs` hold every value resolved)."""

    student: Tap
    teacher: Tap
    adapter: str | None = None
    adapter_options: dict[str, Any] | None = dataclasses.field(default=None, hash=False)
    criterion: str | None = None
    criterion_options: dict[str, Any] | None = dataclasses.field(default=None, hash=False)
    weight: float = 1.0


@dataclass(frozen=True)
class LayerGroup:
    """Taps of several student and teacher layers that one layer-group method (`kdkit.distill.layer_groups`)
    compares at once, with its options and weight."""

    method: str
    student: tuple[Tap, ...]
    teacher: tuple[Tap, ...]
    options: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    weight: float = 1.0


class PairError(ValueError):
    """A problem with one layer pair; the message starts with `pairs[i]: `."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"pairs[{index}]: {message}")
        self.index = index


class GroupError(ValueError):
    """A problem with one layer group; the message starts with `groups[i]: `."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"groups[{index}]: {message}")
        self.index = index


def uniform_pairs(student_depth: int, teacher_depth: int, n: int) -> list[list[int]]:
    """`n` layer pairs spread evenly over both depths (1-based block numbers, last block included).

    >>> uniform_pairs(12, 24, 4)
    [[3, 6], [6, 12], [9, 18], [12, 24]]
    """
    if not 1 <= n <= min(student_depth, teacher_depth):
        raise ValueError(
            f"uniform:{n}: expected 1 <= N <= {min(student_depth, teacher_depth)} "
            f"(student depth {student_depth}, teacher depth {teacher_depth})"
        )
    return [[round(i * student_depth / n), round(i * teacher_depth / n)] for i in range(1, n + 1)]


def layer_pairs(
    teacher: nn.Module,
    student: nn.Module,
    pairs: list[Any] | str,
    point: str = "block",
    select: str | None = None,
) -> list[LayerPair]:
    """Turn a recipe's `distill.pairs` into tap pairs.

    Each item is `[student_block, teacher_block]` (1-based block numbers of the architecture's tap
    preset, "the output of block k") or a mapping with `student` and `teacher` (a block number or
    a module path) and optionally `select`, `io`, `adapter`, `adapter_options`, `criterion`,
    `weight` (`kdkit.config.schema.PairSpec`); `'uniform:N'` spreads N pairs evenly over both models'
    depths. A bad item raises `PairError` naming its index.
    """
    if isinstance(pairs, str):
        n = int(pairs.partition(":")[2])
        blocks = uniform_pairs(find_preset(student).depth(student), find_preset(teacher).depth(teacher), n)
        return [_layer_pair(student, teacher, PairSpec(*b), point, select) for b in blocks]
    built = []
    for i, entry in enumerate(pairs):
        problems: list[str] = []
        spec = entry if isinstance(entry, PairSpec) else parse_pair(entry, f"pairs[{i}]", problems)
        if spec is None:
            raise ValueError("; ".join(problems))
        try:
            built.append(_layer_pair(student, teacher, spec, point, select))
        except ValueError as exc:
            raise PairError(i, str(exc)) from None
    return built


def _layer_pair(
    student: nn.Module, teacher: nn.Module, spec: PairSpec, point: str, select: str | None
) -> LayerPair:
    chosen = spec.select or select
    return LayerPair(
        _tap(student, spec.student, point, chosen, spec.io, "student"),
        _tap(teacher, spec.teacher, point, chosen, spec.io, "teacher"),
        spec.adapter,
        spec.adapter_options,
        spec.criterion,
        spec.criterion_options,
        spec.weight,
    )


def layer_groups(
    teacher: nn.Module, student: nn.Module, groups: list[GroupSpec], point: str = "block"
) -> list[LayerGroup]:
    """Turn a recipe's `distill.groups` into taps: each layer a preset block number or a module
    path, with the group's `select`, else the method's (its `select` attribute), else the preset's.
    A bad item raises `GroupError` naming its index."""
    built = []
    for i, spec in enumerate(groups):
        try:
            select = spec.select or getattr(GROUP_METHODS.get(spec.method), "select", None)
            built.append(
                LayerGroup(
                    spec.method,
                    tuple(_tap(student, layer, point, select, "output", "student") for layer in spec.student),
                    tuple(_tap(teacher, layer, point, select, "output", "teacher") for layer in spec.teacher),
                    dict(spec.options),
                    spec.weight,
                )
            )
        except (ValueError, KeyError) as exc:
            raise GroupError(i, str(exc)) from None
    return built


def _tap(model: nn.Module, side: int | str, point: str, select: str | None, io: str, role: str) -> Tap:
    """The tap of one layer: a preset block (its default selector) or a module path ('all')."""
    if isinstance(side, str):
        return Tap(side, io, select or "all")
    try:
        (tap,) = block_taps(model, [side], point, select)
    except ValueError as exc:
        raise ValueError(f"{role}: {exc}") from None
    return dataclasses.replace(tap, io=io)


def feature_taps(pairs: list[LayerPair], groups: list[LayerGroup], side: str) -> dict[str, Tap]:
    """One side's (`'student'` or `'teacher'`) taps, named as the Distiller names their features:
    `feat.i` for pair i, then `group.j.k` for layer k of group j (the teacher-output cache's order)."""
    taps = {f"feat.{i}": getattr(pair, side) for i, pair in enumerate(pairs)}
    for j, group in enumerate(groups):
        taps |= {f"group.{j}.{k}": tap for k, tap in enumerate(getattr(group, side))}
    return taps
