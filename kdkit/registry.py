"""A tiny name → object registry, and the registries kdkit and its plugins fill.

Everything a recipe can name by string (models, adapters, datasets, evaluators, tap presets,
feature criteria, logit losses, teacher combiners, CLI subcommands, `kdkit predict` input
preparers) lives in one of these. Plugins add entries; the core never names a plugin.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate registry name. The message lists the valid names."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


def did_you_mean(name: str, choices: list[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    """Maps names to objects (classes, factories, functions).

    >>> ADAPTERS = Registry("adapter")
    >>> @ADAPTERS.register("identity")
    ... class Identity: ...
    >>> ADAPTERS.get("identity") is Identity
    True
    """

    def __init__(self, kind: str, builtins: str | tuple[str, ...] = (), plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"  # in messages: "logit losses", not "logit losss"
        self._entries: dict[str, T] = {}
        # the kdkit modules that register the built-in entries, imported on first use (so that
        # `import kdkit` stays light and a registry is never seen without its built-ins)
        self._builtins = (builtins,) if isinstance(builtins, str) else builtins

    def _load_builtins(self) -> None:
        modules, self._builtins = self._builtins, ()  # cleared first: the imports add entries
        for module in modules:
            importlib.import_module(module)

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering an object under `name` (default: its `__name__`)."""

        def decorator(obj: T) -> T:
            self.add(name or obj.__name__, obj)  # type: ignore[attr-defined]
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Register `obj` under `name`; a name may be registered only once."""
        self._load_builtins()
        if name in self._entries:
            raise RegistryError(
                f"{self.kind} {name!r} is already registered (by {self._entries[name]!r}); "
                f"registered {self.plural}: {', '.join(self.names())}"
            )
        self._entries[name] = obj

    def get(self, name: str) -> T:
        """Return the entry named `name`, or raise `RegistryError` listing the valid names."""
        self._load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{did_you_mean(name, self.names())} "
                f"Registered {self.plural}: {', '.join(self.names()) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self._load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load_builtins()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


@dataclass
class Registries:
    """The registries handed to a plugin's `register(registries)` entry point."""

    models: Registry[Callable[..., Any]] = field(default_factory=lambda: MODELS)
    adapters: Registry[Callable[..., Any]] = field(default_factory=lambda: ADAPTERS)
    datasets: Registry[Callable[..., Any]] = field(default_factory=lambda: DATASETS)
    evaluators: Registry[Callable[..., Any]] = field(default_factory=lambda: EVALUATORS)
    tap_presets: Registry[Any] = field(default_factory=lambda: TAP_PRESETS)
    commands: Registry[Callable[..., Any]] = field(default_factory=lambda: COMMANDS)
    input_preparers: Registry[Callable[..., Any]] = field(default_factory=lambda: INPUT_PREPARERS)
    feature_criteria: Registry[Callable[..., Any]] = field(default_factory=lambda: FEATURE_CRITERIA)
    logit_losses: Registry[Callable[..., Any]] = field(default_factory=lambda: LOGIT_LOSSES)
    group_methods: Registry[Callable[..., Any]] = field(default_factory=lambda: GROUP_METHODS)
    teacher_combiners: Registry[Callable[..., Any]] = field(default_factory=lambda: TEACHER_COMBINERS)


MODELS: Registry[Callable[..., Any]] = Registry("model")
ADAPTERS: Registry[Callable[..., Any]] = Registry("adapter", builtins="kdkit.distill.adapters")
DATASETS: Registry[Callable[..., Any]] = Registry("dataset", builtins="kdkit.data.digits_set")
EVALUATORS: Registry[Callable[..., Any]] = Registry("evaluator", builtins="kdkit.evaluation.classification")
TAP_PRESETS: Registry[Any] = Registry("tap preset", builtins="kdkit.distill.taps")
# feature losses, `criterion(s_mapped, t_target, **options) -> scalar tensor` (built-ins in
# kdkit.distill.losses: mse, smooth_l1, cosine; kdkit.distill.relations: rkd, at)
FEATURE_CRITERIA: Registry[Callable[..., Any]] = Registry(
    "feature criterion",
    builtins=("kdkit.distill.losses", "kdkit.distill.relations"),
    plural="feature criteria",
)
# logit losses, `fn(student_logits, teacher_logits, labels, tau, **options) -> scalar tensor`, options
# keyword-only (built-ins in kdkit.distill.losses: kl, dkd, dist)
LOGIT_LOSSES: Registry[Callable[..., Any]] = Registry(
    "logit loss", builtins="kdkit.distill.losses", plural="logit losses"
)
# methods that compare several layers at once, `cls(student_shapes, teacher_shapes, **options)` ->
# nn.Module, `module(student_feats, teacher_feats) -> scalar tensor` (built-ins in
# kdkit.distill.layer_groups: vitkd)
GROUP_METHODS: Registry[Callable[..., Any]] = Registry(
    "layer group method", builtins="kdkit.distill.layer_groups"
)
# how several teachers' logits combine into one KD term, `rule(student_logits, teacher_logits, labels,
# tau, weights, term) -> CombinedKD` (built-ins in kdkit.distill.teacher_ensemble: ensemble, weighted,
# ca_mkd)
TEACHER_COMBINERS: Registry[Callable[..., Any]] = Registry(
    "teacher combiner", builtins="kdkit.distill.teacher_ensemble"
)
COMMANDS: Registry[Callable[..., Any]] = Registry("command")
# `kdkit predict`: factory(**options) -> prepare(rgb: uint8 HxWx3 array) -> uint8 array, or None when
# the frame holds nothing to score (e.g. no face). A data set factory names the preparer its frames
# were made with in an `input_preparer` attribute (and may give its options for a DataSpec in an
# `input_preparer_options(spec) -> dict` attribute); without one, the whole image is used.
INPUT_PREPARERS: Registry[Callable[..., Any]] = Registry("input preparer")
