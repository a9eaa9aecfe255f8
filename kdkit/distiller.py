"""The Distiller: a frozen teacher, a student, stage pairs, one adapter per pair, loss weights.

    distiller = Distiller(teacher, student, pairs=stage_pairs(teacher, student, [[3, 6], [6, 12]]),
                          adapter="covariance", example_input=images[:2])
    out = distiller(images, labels)      # {'loss', 'ce', 'kd', 'feat', 'feat.0', ..., 'logits'}
    out["loss"].backward()

The total loss is ``(1 - alpha) * CE + alpha * tau² * KL + beta * mean_i feature_i`` (as in the
HaTFAS code: the feature term is the mean over stage pairs, so beta does not scale with their number).
The teacher runs in eval mode under `torch.inference_mode()`, so it never builds an autograd
graph; only the student and the adapters are trainable (`trainable_state_dict`). With
`teacher_dtype` bfloat16/float16 its weights are converted in place (no fp32 copy is kept) and it
runs outside autocast. With a `cache` (`kdkit.cache.TeacherCache`) and the batch's sample `keys`,
stored teacher outputs replace the teacher's forward pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdkit.adapters import build_adapter
from kdkit.losses import build_feature_criterion, cross_entropy, kd_loss
from kdkit.taps import Tap, TapRecorder, find_preset, stage_taps

if TYPE_CHECKING:
    from kdkit.cache import TeacherCache

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class StagePair:
    """A student tap matched to a teacher tap."""

    student: Tap
    teacher: Tap


def uniform_stages(student_depth: int, teacher_depth: int, n: int) -> list[list[int]]:
    """`n` stage pairs spread evenly over both depths (1-based block numbers, last block included).

    >>> uniform_stages(12, 24, 4)
    [[3, 6], [6, 12], [9, 18], [12, 24]]
    """
    if not 1 <= n <= min(student_depth, teacher_depth):
        raise ValueError(
            f"uniform:{n}: expected 1 <= N <= {min(student_depth, teacher_depth)} "
            f"(student depth {student_depth}, teacher depth {teacher_depth})"
        )
    return [[round(i * student_depth / n), round(i * teacher_depth / n)] for i in range(1, n + 1)]


def stage_pairs(
    teacher: nn.Module,
    student: nn.Module,
    stages: list[Any] | str,
    point: str = "block",
    select: str | None = None,
) -> list[StagePair]:
    """Turn recipe stages into tap pairs.

    Each stage is `[student_block, teacher_block]` (1-based block numbers of the architecture's
    tap preset, "the output of block k") or `{student: path, teacher: path, select: ..., io: ...}`
    with explicit module paths; `'uniform:N'` spreads N pairs evenly over both models' depths.
    """
    if isinstance(stages, str):
        n = int(stages.partition(":")[2])
        stages = uniform_stages(find_preset(student).depth(student), find_preset(teacher).depth(teacher), n)
    pairs = []
    for stage in stages:
        if isinstance(stage, dict):
            sel = stage.get("select", select or "all")
            io = stage.get("io", "output")
            pairs.append(StagePair(Tap(stage["student"], io, sel), Tap(stage["teacher"], io, sel)))
        else:
            s_index, t_index = stage
            (s_tap,) = stage_taps(student, [s_index], point, select)
            (t_tap,) = stage_taps(teacher, [t_index], point, select)
            pairs.append(StagePair(s_tap, t_tap))
    return pairs


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
    """Logit + multi-stage feature distillation from a frozen teacher into a student."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        pairs: list[StagePair] | None = None,
        adapter: str = "covariance",
        adapter_options: dict[str, Any] | None = None,
        criterion: str = "mse",
        alpha: float = 0.7,
        tau: float = 3.0,
        beta: float = 1.0,
        label_smoothing: float = 0.0,
        example_input: torch.Tensor | None = None,
        teacher_dtype: str = "float32",
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
        self.cache: TeacherCache | None = None
        self.student = student
        self.alpha, self.tau, self.beta = alpha, tau, beta
        self.label_smoothing = label_smoothing
        self.pairs = list(pairs or []) if adapter != "none" else []
        self.adapter_name = adapter
        self.criterion = build_feature_criterion(criterion)
        self.teacher_taps = TapRecorder(teacher, {str(i): p.teacher for i, p in enumerate(self.pairs)})
        self.student_taps = TapRecorder(student, {str(i): p.student for i, p in enumerate(self.pairs)})
        self.adapters = nn.ModuleList()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        if self.pairs or example_input is not None:
            if example_input is None:
                raise ValueError("example_input (a batch of 1-2 inputs) is needed to size the adapters")
            self._dry_run(example_input, adapter_options or {})

    @property
    def model(self) -> nn.Module:
        """The network being trained (the student)."""
        return self.student

    @torch.no_grad()
    def _dry_run(self, example: torch.Tensor, adapter_options: dict[str, Any]) -> None:
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
            try:
                adapter = build_adapter(self.adapter_name, s.shape[-1], t.shape[-1], **adapter_options)
                adapter = adapter.to(device=s.device)
                s_out, t_out = adapter(s.float(), t.float())
            except ValueError as exc:
                raise ValueError(
                    f"stage pair {i} (student {pair.student.path} {tuple(s.shape)} ↔ teacher "
                    f"{pair.teacher.path} {tuple(t.shape)}): {exc}"
                ) from None
            if s_out.shape != t_out.shape:
                raise ValueError(
                    f"stage pair {i}: adapter {self.adapter_name!r} returned shapes "
                    f"{tuple(s_out.shape)} and {tuple(t_out.shape)}; they must be equal"
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
            out["kd"] = kd_loss(s_logits, teacher["logits"].to(s_logits.dtype), self.tau)
            loss = loss + self.alpha * out["kd"]
        if self.pairs:
            terms = []
            for i, adapter in enumerate(self.adapters):
                s_mapped, t_target = adapter(s_feats[str(i)].float(), teacher[f"feat.{i}"].float())
                terms.append(self.criterion(s_mapped, t_target))
                out[f"feat.{i}"] = terms[-1]
            out["feat"] = torch.stack(terms).mean()
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
