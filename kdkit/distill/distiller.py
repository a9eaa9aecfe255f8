"""The Distiller: a frozen teacher, a student, layer pairs, one adapter per pair, loss weights.

    distiller = Distiller(teacher, student, pairs=layer_pairs(teacher, student, [[3, 6], [6, 12]]),
                          adapter="covariance", example_input=images[:2])
    out = distiller(images, labels)      # {'loss', 'ce', 'kd', 'feat', 'feat.0', ..., 'logits'}
    out["loss"].backward()

The total loss is ``(1 - alpha) * CE + alpha * kd + beta * sum_i w_i * feature_i / n`` over
the n layer pairs and layer groups, with their weights w_i (1 by default: the mean over pairs, as
in the HaTFAS code, so beta does not scale with their number). ``kd`` is the logit loss `logit_loss` with its
`logit_options` (`kdkit.registry.LOGIT_LOSSES`: ``kl``, tau² · KL, by default; ``dkd``,
``dist``). Each pair may name its own adapter, adapter options, criterion and weight; the
Distiller's own settings fill in the rest.
The teacher runs in eval mode under `torch.inference_mode()`, so it never builds an autograd
graph; only the student and the adapters are trainable (`trainable_state_dict`). With
`teacher_dtype` bfloat16/float16 its weights are converted in place (no fp32 copy is kept) and it
runs outside autocast. With a `cache` (`kdkit.distill.teacher_cache.TeacherCache`, opened for
this teacher, its taps and precision by `kdkit.distill.teacher_cache.open_teacher_cache`) and the
batch's sample `keys`, stored teacher outputs replace the teacher's forward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdkit.config.schema import DistillSpec, TrainSpec
from kdkit.data.datasets import UNLABELED
from kdkit.distill.adapters import build_adapter
from kdkit.distill.losses import (
    OptionError,
    criterion_same_shape,
    labeled_cross_entropy,
    resolve_feature_criterion,
    resolve_logit_loss,
)
from kdkit.distill.pairs import GroupError, LayerGroup, LayerPair, PairError, feature_taps
from kdkit.distill.taps import TapRecorder
from kdkit.models.compile import compile_in_place
from kdkit.models.info import no_weight_decay_names
from kdkit.registry import GROUP_METHODS

if TYPE_CHECKING:
    from kdkit.distill.teacher_cache import TeacherCache

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Distiller(nn.Module):
    """Logit + multi-layer feature distillation from a frozen teacher into a student.

    `adapter`, `adapter_options` and `criterion` apply to every pair that does not name its own
    (a pair with its own adapter gets its own `adapter_options`, default none); after
    construction `pairs` holds each pair's resolved settings. `adapter="none"` drops every pair
    (logit KD only). `logit_loss`: the logit term, logged as `kd`, a name of
    `kdkit.registry.LOGIT_LOSSES` taking `logit_options` (an unknown name or option fails here).
    `cache`: the teacher-output cache opened for this teacher (or None). `criterion_options`: the
    options of `criterion`, for the pairs that use it. `groups`: layer groups (`layer_groups`),
    each compared by its method (`kdkit.registry.GROUP_METHODS`); their terms join the pairs' in
    the feature term. `teacher_input`: a module converting each batch into the teacher's input
    (`kdkit.distill.teacher_input.TeacherInput`), or None. Samples labelled
    `kdkit.data.datasets.UNLABELED` add no cross-entropy; the logit losses that need a class get
    the teacher's prediction for them.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        pairs: list[LayerPair] | None = None,
        # the defaults are the recipe's (`DistillSpec`, `TrainSpec`): one place for each
        adapter: str = DistillSpec.adapter,
        adapter_options: dict[str, Any] | None = None,
        criterion: str = DistillSpec.criterion,
        criterion_options: dict[str, Any] | None = None,
        groups: list[LayerGroup] | None = None,
        alpha: float = DistillSpec.alpha,
        tau: float = DistillSpec.tau,
        beta: float = DistillSpec.beta,
        logit_loss: str = DistillSpec.logit_loss,
        logit_options: dict[str, Any] | None = None,
        label_smoothing: float = TrainSpec.label_smoothing,
        example_input: torch.Tensor | None = None,
        teacher_dtype: str = DistillSpec.teacher_dtype,
        cache: TeacherCache | None = None,
        teacher_input: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0 or tau <= 0 or beta < 0:
            raise ValueError(
                f"expected 0 <= alpha <= 1, tau > 0, beta >= 0; got alpha={alpha}, tau={tau}, beta={beta}"
            )
        if teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype: expected one of {list(TEACHER_DTYPES)}, got {teacher_dtype!r}")
        self.teacher_dtype = TEACHER_DTYPES[teacher_dtype]
        # In place: the fp32 weights are released, not kept beside the half-precision ones.
        self.teacher = teacher.eval().requires_grad_(False).to(self.teacher_dtype)
        self.cache = cache  # public: a benchmark may hand it a filled one
        self.student = student
        self.alpha, self.tau, self.beta = alpha, tau, beta
        self.logit_loss = logit_loss
        self.logit_options = dict(logit_options or {})
        self._logit_loss = resolve_logit_loss(logit_loss, self.logit_options)
        self.label_smoothing = label_smoothing
        self.adapter_name = adapter  # the default of the pairs that name none
        given = list(pairs or []) if adapter != "none" else []
        defaults = (adapter, adapter_options or {}, criterion, criterion_options or {})
        self.pairs = [_resolved(i, p, *defaults) for i, p in enumerate(given)]
        self.criteria = [_criterion(i, p) for i, p in enumerate(self.pairs)]
        self.groups = list(groups or [])
        # the input conversion the teacher needs (kdkit.distill.teacher_input.TeacherInput), or None
        self.teacher_input = teacher_input
        self.teacher_taps = TapRecorder(teacher, feature_taps(self.pairs, self.groups, "teacher"))
        self.student_taps = TapRecorder(student, feature_taps(self.pairs, self.groups, "student"))
        self.adapters = nn.ModuleList()
        self.group_methods = nn.ModuleList()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # pair i's (student, teacher)
        self.group_shapes: list[tuple[list[tuple[int, ...]], list[tuple[int, ...]]]] = []
        if self.pairs or self.groups or example_input is not None:
            if example_input is None:
                raise ValueError("example_input (a batch of 2 or more inputs) is needed to size the adapters")
            self._dry_run(example_input)

    @property
    def model(self) -> nn.Module:
        """The network being trained (the student)."""
        return self.student

    @torch.no_grad()
    def _dry_run(self, example: torch.Tensor) -> None:
        """Run both models once to learn every tap's shape, then build the adapters from them."""
        was_training = self.student.training
        self.student.eval()
        try:
            s_logits = self.student(example)
            s_feats = self.student_taps.pop()
            t_feats = self._run_teacher(example)
        finally:
            self.student.train(was_training)
        t_logits = t_feats["logits"]
        if s_logits.shape[-1] != t_logits.shape[-1]:
            raise ValueError(
                f"teacher and student disagree on the number of classes: teacher outputs "
                f"{t_logits.shape[-1]}, student {s_logits.shape[-1]}"
            )
        for i, pair in enumerate(self.pairs):
            s, t = s_feats[f"feat.{i}"], t_feats[f"feat.{i}"]
            assert pair.adapter is not None and pair.adapter_options is not None  # resolved
            try:
                adapter = build_adapter(pair.adapter, s.shape[-1], t.shape[-1], **pair.adapter_options)
                adapter = adapter.to(device=s.device)
                s_out, t_out = adapter(s.float(), t.float())
            except ValueError as exc:
                raise PairError(
                    i,
                    f"student {pair.student.path} {tuple(s.shape)} ↔ teacher {pair.teacher.path} "
                    f"{tuple(t.shape)}: {exc}",
                ) from None
            if s_out.shape != t_out.shape and criterion_same_shape(self.criteria[i]):
                raise PairError(
                    i,
                    f"adapter {pair.adapter!r} returned shapes {tuple(s_out.shape)} and "
                    f"{tuple(t_out.shape)}, and criterion {pair.criterion!r} compares equal shapes; "
                    "use an adapter that maps the widths, or a criterion that compares relations (rkd, at)",
                )
            self.adapters.append(adapter)
            self.shapes.append((tuple(s.shape), tuple(t.shape)))
        for j, group in enumerate(self.groups):
            s_list, t_list = _group_features(j, group, s_feats), _group_features(j, group, t_feats)
            try:
                method = GROUP_METHODS.get(group.method)(
                    [tuple(f.shape) for f in s_list], [tuple(f.shape) for f in t_list], **group.options
                )
                method = method.to(device=s_list[0].device)
                method([f.float() for f in s_list], [f.float() for f in t_list])
            except (ValueError, TypeError, KeyError) as exc:
                raise GroupError(j, f"method {group.method!r}: {exc}") from None
            self.group_methods.append(method)
            self.group_shapes.append(([tuple(f.shape) for f in s_list], [tuple(f.shape) for f in t_list]))

    def train(self, mode: bool = True) -> Distiller:
        """Switch the student and adapters; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _run_teacher(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's logits and tapped features (`feat.i` for pair i), as inference tensors."""
        # A half-precision teacher runs as it is; autocast would cast its weights again every step.
        precision = (
            torch.autocast(images.device.type, enabled=False)
            if self.teacher_dtype != torch.float32
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), precision:
            if self.teacher_input is not None:
                images = self.teacher_input(images)
            logits = self.teacher(images.to(self.teacher_dtype))
            feats = self.teacher_taps.pop()
        return {"logits": logits, **feats}

    def teacher_outputs(
        self, images: torch.Tensor, keys: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Teacher logits and features of a batch: stored ones when the cache holds every sample of
        `keys`, else computed now (and stored). The tensors are ordinary ones (no autograd graph)."""
        if self.cache is not None and keys is not None:
            cached = self.cache.get(keys, images.device)
            if cached is not None:
                return cached
        outputs = self._run_teacher(images)
        if self.cache is not None and keys is not None:
            self.cache.put(keys, outputs)
        # Inference tensors cannot be saved for backward; the clones are small (logits, selected tokens).
        return {name: value.clone() for name, value in outputs.items()}

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Return the named loss terms and the student logits (`keys`: see `teacher_outputs`)."""
        teacher = self.teacher_outputs(images, keys)
        s_logits = self.student(images)
        s_feats = self.student_taps.pop()

        ce = labeled_cross_entropy(s_logits, labels, self.label_smoothing)
        out = {"ce": ce}
        loss = (1.0 - self.alpha) * ce
        if self.alpha > 0:
            t_logits = teacher["logits"].to(s_logits.dtype)
            # an unlabelled sample's class, for the logit losses that split off the target class,
            # is the teacher's prediction
            kd_labels = torch.where(labels == UNLABELED, t_logits.argmax(dim=-1), labels)
            out["kd"] = self._logit_loss(s_logits, t_logits, kd_labels, self.tau, **self.logit_options)
            loss = loss + self.alpha * out["kd"]
        out.update(self.feature_terms(s_feats, teacher))
        if "feat" in out:
            loss = loss + self.beta * out["feat"]
        out["loss"] = loss
        out["logits"] = s_logits
        return out

    def feature_terms(
        self, s_feats: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Each pair's (`feat.i`) and group's (`group.j`) term, and `feat`, their weighted mean
        (absent without pairs and groups), from the student's tapped features and `teacher_outputs`."""
        out: dict[str, torch.Tensor] = {}
        weighted = []
        for i, (adapter, criterion) in enumerate(zip(self.adapters, self.criteria, strict=True)):
            s_mapped, t_target = adapter(s_feats[f"feat.{i}"].float(), teacher[f"feat.{i}"].float())
            out[f"feat.{i}"] = criterion(s_mapped, t_target)
            weighted.append(out[f"feat.{i}"] * self.pairs[i].weight)
        for j, (group, method) in enumerate(zip(self.groups, self.group_methods, strict=True)):
            s_list, t_list = _group_features(j, group, s_feats), _group_features(j, group, teacher)
            out[f"group.{j}"] = method([f.float() for f in s_list], [f.float() for f in t_list])
            weighted.append(out[f"group.{j}"] * group.weight)
        if weighted:
            # sum w l / n over pairs and groups; with every w = 1 exactly the mean (x * 1.0 is exact)
            out["feat"] = torch.stack(weighted).mean()
        return out

    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory keeps out of weight decay (the student's own list)."""
        return no_weight_decay_names(self.student, "student.")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Student and adapter weights (never the teacher's)."""
        return {
            **{f"student.{k}": v for k, v in self.student.state_dict().items()},
            **{f"adapters.{k}": v for k, v in self.adapters.state_dict().items()},
            **{f"group_methods.{k}": v for k, v in self.group_methods.state_dict().items()},
        }

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `trainable_state_dict`."""
        self.student.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("student.")})
        self.adapters.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("adapters.")})
        prefix = "group_methods."
        self.group_methods.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )

    def extra_parameters(self) -> int:
        """Trainable parameters the adapters and layer-group methods add on top of the student."""
        modules = [*self.adapters.parameters(), *self.group_methods.parameters()]
        return sum(p.numel() for p in modules if p.requires_grad)

    def compile_models(self, mode: str = "default") -> None:
        """Compile the student's and the teacher's forward in place (`nn.Module.compile`: same
        modules, same state_dict keys). The taps' hooks were registered when the Distiller was
        built, so compiled graphs include them; a tap that stops firing fails in `TapRecorder.pop`.
        The teacher's graph is traced under inference mode, where it always runs."""
        compile_in_place(self.student, mode)
        compile_in_place(self.teacher, mode)

    def close(self) -> None:
        """Remove all hooks and close the cache (call when done with the distiller)."""
        self.teacher_taps.remove()
        self.student_taps.remove()
        if self.cache is not None:
            self.cache.close()
            self.cache = None


def _resolved(
    index: int,
    pair: LayerPair,
    adapter: str,
    adapter_options: dict[str, Any],
    criterion: str,
    criterion_options: dict[str, Any],
) -> LayerPair:
    """`pair` with its unset options taken from the Distiller's: a pair naming its own adapter (or
    criterion) gets its own options for it (default none), since another one's would not fit it."""
    if pair.weight < 0:
        raise PairError(index, f"weight: expected a value >= 0, got {pair.weight}")
    return dataclasses.replace(
        pair,
        adapter=pair.adapter or adapter,
        adapter_options=_own_options(pair.adapter, pair.adapter_options, adapter, adapter_options),
        criterion=pair.criterion or criterion,
        criterion_options=_own_options(pair.criterion, pair.criterion_options, criterion, criterion_options),
    )


def _own_options(
    name: str | None, options: dict[str, Any] | None, default: str, default_options: dict[str, Any]
) -> dict[str, Any]:
    if options is not None:
        return dict(options)
    return {} if name is not None and name != default else dict(default_options)


def _criterion(index: int, pair: LayerPair) -> Any:
    """The pair's feature criterion with its options bound (a bad one raises `PairError`)."""
    assert pair.criterion is not None  # resolved
    try:
        return resolve_feature_criterion(pair.criterion, pair.criterion_options)
    except (ValueError, KeyError) as exc:
        raise PairError(
            index, f"criterion_options.{exc}" if isinstance(exc, OptionError) else str(exc)
        ) from None


def _group_features(index: int, group: LayerGroup, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Group `index`'s layers' features in order (named by `feature_taps`)."""
    return [features[f"group.{index}.{k}"] for k in range(len(group.student))]
