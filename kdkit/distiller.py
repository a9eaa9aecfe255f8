"""The Distiller: a frozen teacher, a student, layer pairs, one adapter per pair, loss weights.

    distiller = Distiller(teacher, student, pairs=layer_pairs(teacher, student, [[3, 6], [6, 12]]),
                          adapter="covariance", example_input=images[:2])
    out = distiller(images, labels)      # {'loss', 'ce', 'kd', 'feat', 'feat.0', ..., 'logits'}
    out["loss"].backward()

The total loss is ``(1 - alpha) * CE + alpha * kd + beta * sum_i w_i * feature_i / n`` over
the n layer pairs, with the pair weights w_i (1 by default: the mean over pairs, as in the HaTFAS
code, so beta does not scale with their number). ``kd`` is the logit loss `logit_loss` with its
`logit_options` (`kdkit.registry.LOGIT_LOSSES`: ``kl``, tau² · KL, by default; ``dkd``,
``dist``). Each pair may name its own adapter, adapter options, criterion and weight; the
Distiller's own settings fill in the rest.
The teacher runs in eval mode under `torch.inference_mode()`, so it never builds an autograd
graph; only the student and the adapters are trainable (`trainable_state_dict`). With
`teacher_dtype` bfloat16/float16 its weights are converted in place (no fp32 copy is kept) and it
runs outside autocast. With a `cache` (`kdkit.cache.TeacherCache`, opened for this teacher, its
taps and precision by `kdkit.cache.open_teacher_cache`) and the batch's sample `keys`, stored
teacher outputs replace the teacher's forward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdkit.adapters import build_adapter
from kdkit.losses import build_feature_criterion, cross_entropy, resolve_logit_loss
from kdkit.recipe import PairSpec, parse_pair
from kdkit.taps import Tap, TapRecorder, block_taps, find_preset

if TYPE_CHECKING:
    from kdkit.cache import TeacherCache

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LayerPair:
    """A student tap matched to a teacher tap, with the pair's own options (None: the
    Distiller's; a built Distiller's `pairs` hold every value resolved)."""

    student: Tap
    teacher: Tap
    adapter: str | None = None
    adapter_options: dict[str, Any] | None = dataclasses.field(default=None, hash=False)
    criterion: str | None = None
    weight: float = 1.0


class PairError(ValueError):
    """A problem with one layer pair; the message starts with `pairs[i]: `."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"pairs[{index}]: {message}")
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
    `weight` (`kdkit.recipe.PairSpec`); `'uniform:N'` spreads N pairs evenly over both models'
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
    return LayerPair(
        _tap(student, spec.student, spec, point, select, "student"),
        _tap(teacher, spec.teacher, spec, point, select, "teacher"),
        spec.adapter,
        spec.adapter_options,
        spec.criterion,
        spec.weight,
    )


def _tap(model: nn.Module, side: int | str, spec: PairSpec, point: str, select: str | None, role: str) -> Tap:
    """The tap of one side of a pair: a preset block (its default selector) or a module path ('all')."""
    chosen = spec.select or select
    if isinstance(side, str):
        return Tap(side, spec.io, chosen or "all")
    try:
        (tap,) = block_taps(model, [side], point, chosen)
    except ValueError as exc:
        raise ValueError(f"{role}: {exc}") from None
    return dataclasses.replace(tap, io=spec.io)


def _no_weight_decay(model: nn.Module, prefix: str) -> set[str]:
    """The model's own no-weight-decay names (timm: pos_embed, cls_token, ...) under `prefix`."""
    names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return {f"{prefix}{name}" for name in names}


class SupervisedTask(nn.Module):
    """Plain supervised training of one model (a teacher, or a student without KD)."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Return `{'loss', 'ce', 'logits'}` (`keys` is accepted for the trainer and unused)."""
        logits = self.model(images)
        ce = cross_entropy(logits, labels, self.label_smoothing)
        return {"loss": ce, "ce": ce, "logits": logits}

    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory keeps out of weight decay."""
        return _no_weight_decay(self.model, "model.")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights to checkpoint (the model)."""
        return self.state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `trainable_state_dict`."""
        self.load_state_dict(state)


class Distiller(nn.Module):
    """Logit + multi-layer feature distillation from a frozen teacher into a student.

    `adapter`, `adapter_options` and `criterion` apply to every pair that does not name its own
    (a pair with its own adapter gets its own `adapter_options`, default none); after
    construction `pairs` holds each pair's resolved settings. `adapter="none"` drops every pair
    (logit KD only). `logit_loss`: the logit term, logged as `kd`, a name of
    `kdkit.registry.LOGIT_LOSSES` taking `logit_options` (an unknown name or option fails here).
    `cache`: the teacher-output cache opened for this teacher (or None).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        pairs: list[LayerPair] | None = None,
        adapter: str = "covariance",
        adapter_options: dict[str, Any] | None = None,
        criterion: str = "mse",
        alpha: float = 0.7,
        tau: float = 3.0,
        beta: float = 1.0,
        logit_loss: str = "kl",
        logit_options: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        example_input: torch.Tensor | None = None,
        teacher_dtype: str = "float32",
        cache: TeacherCache | None = None,
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
        self.pairs = [_resolved(i, p, adapter, adapter_options or {}, criterion) for i, p in enumerate(given)]
        self.criteria = [build_feature_criterion(p.criterion) for p in self.pairs]
        self.teacher_taps = TapRecorder(teacher, {str(i): p.teacher for i, p in enumerate(self.pairs)})
        self.student_taps = TapRecorder(student, {str(i): p.student for i, p in enumerate(self.pairs)})
        self.adapters = nn.ModuleList()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        if self.pairs or example_input is not None:
            if example_input is None:
                raise ValueError("example_input (a batch of 1-2 inputs) is needed to size the adapters")
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
            t_out = self._run_teacher(example)
        finally:
            self.student.train(was_training)
        t_logits = t_out["logits"]
        t_feats = {str(i): t_out[f"feat.{i}"] for i in range(len(self.pairs))}
        if s_logits.shape[-1] != t_logits.shape[-1]:
            raise ValueError(
                f"teacher and student disagree on the number of classes: teacher outputs "
                f"{t_logits.shape[-1]}, student {s_logits.shape[-1]}"
            )
        for i, pair in enumerate(self.pairs):
            s, t = s_feats[str(i)], t_feats[str(i)]
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
            if s_out.shape != t_out.shape:
                raise PairError(
                    i,
                    f"adapter {pair.adapter!r} returned shapes {tuple(s_out.shape)} and "
                    f"{tuple(t_out.shape)}; they must be equal",
                )
            self.adapters.append(adapter)
            self.shapes.append((tuple(s.shape), tuple(t.shape)))

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
            logits = self.teacher(images.to(self.teacher_dtype))
            feats = self.teacher_taps.pop()
        return {"logits": logits, **{f"feat.{i}": feats[str(i)] for i in range(len(self.pairs))}}

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

        ce = cross_entropy(s_logits, labels, self.label_smoothing)
        out = {"ce": ce}
        loss = (1.0 - self.alpha) * ce
        if self.alpha > 0:
            t_logits = teacher["logits"].to(s_logits.dtype)
            out["kd"] = self._logit_loss(s_logits, t_logits, labels, self.tau, **self.logit_options)
            loss = loss + self.alpha * out["kd"]
        if self.pairs:
            weighted = []
            for i, (adapter, criterion) in enumerate(zip(self.adapters, self.criteria, strict=True)):
                s_mapped, t_target = adapter(s_feats[str(i)].float(), teacher[f"feat.{i}"].float())
                out[f"feat.{i}"] = criterion(s_mapped, t_target)
                weighted.append(out[f"feat.{i}"] * self.pairs[i].weight)
            # sum_i w_i l_i / n; with every w_i = 1 exactly the mean of the terms (x * 1.0 is exact)
            out["feat"] = torch.stack(weighted).mean()
            loss = loss + self.beta * out["feat"]
        out["loss"] = loss
        out["logits"] = s_logits
        return out

    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory keeps out of weight decay (the student's own list)."""
        return _no_weight_decay(self.student, "student.")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Student and adapter weights (never the teacher's)."""
        return {
            **{f"student.{k}": v for k, v in self.student.state_dict().items()},
            **{f"adapters.{k}": v for k, v in self.adapters.state_dict().items()},
        }

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `trainable_state_dict`."""
        self.student.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("student.")})
        self.adapters.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("adapters.")})

    def extra_parameters(self) -> int:
        """Trainable parameters the adapters add on top of the student."""
        return sum(p.numel() for p in self.adapters.parameters() if p.requires_grad)

    def close(self) -> None:
        """Remove all hooks and close the cache (call when done with the distiller)."""
        self.teacher_taps.remove()
        self.student_taps.remove()
        if self.cache is not None:
            self.cache.close()
            self.cache = None


def _resolved(
    index: int, pair: LayerPair, adapter: str, adapter_options: dict[str, Any], criterion: str
) -> LayerPair:
    """`pair` with its unset options taken from the Distiller's: a pair naming its own adapter gets
    its own adapter options (default none), since another adapter's options would not fit it."""
    if pair.weight < 0:
        raise PairError(index, f"weight: expected a value >= 0, got {pair.weight}")
    own = pair.adapter is not None and pair.adapter != adapter
    options = pair.adapter_options if pair.adapter_options is not None else ({} if own else adapter_options)
    return dataclasses.replace(
        pair,
        adapter=pair.adapter or adapter,
        adapter_options=dict(options),
        criterion=pair.criterion or criterion,
    )
