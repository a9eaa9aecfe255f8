"""Distillation from several teachers at once (`distill.teachers`): one `Distiller` branch per
teacher, sharing the student.

    distiller = SeveralTeachers([Distiller(vit, student, ...), Distiller(cnn, student, ...)],
                                weights=[1.0, 1.0], combine="ensemble")
    out = distiller(images, labels)  # {'loss', 'ce', 'kd', 'kd.t0', 'kd_weight.t0', 'feat', 'feat.t0',
                                     #  'feat.t0.0', ..., 'logits'}

Each branch keeps everything of its teacher: the frozen teacher (eval mode, inference mode, its
dtype), its taps, pairs, adapters, criteria, groups, input conversion and cache. The student runs
once. The loss is ``(1 - alpha) * CE + alpha * kd + beta * feat``: ``kd`` is the
`kdkit.distill.teacher_ensemble.TeacherCombiner` of rule `combine` on the teachers' float32 logits
(with the raw labels: it handles unlabelled samples itself), logged with each teacher's own term
``kd.t<k>`` and its weight ``kd_weight.t<k>``; ``feat`` is the teachers' feature terms
(`Distiller.feature_terms`, logged as ``feat.t<k>``), weighted by their weights normalised over the
teachers that have one. With one teacher, use the `Distiller` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdkit.config.schema import DistillSpec, TrainSpec
from kdkit.distill.distiller import Distiller
from kdkit.distill.losses import labeled_cross_entropy
from kdkit.distill.teacher_ensemble import TeacherCombiner
from kdkit.models.compile import compile_in_place


class SeveralTeachers(nn.Module):
    """Logit and feature distillation from several teachers (`branches`, one `Distiller` each, all
    built around the same student) combined by `combine` with the per-teacher `weights`; `alpha`,
    `tau`, `beta`, `logit_loss`, `logit_options` and `label_smoothing` as the `Distiller`'s."""

    def __init__(
        self,
        branches: Sequence[Distiller],
        weights: Sequence[float],
        combine: str = DistillSpec.teacher_combine,
        alpha: float = DistillSpec.alpha,
        tau: float = DistillSpec.tau,
        beta: float = DistillSpec.beta,
        logit_loss: str = DistillSpec.logit_loss,
        logit_options: dict[str, Any] | None = None,
        label_smoothing: float = TrainSpec.label_smoothing,
    ) -> None:
        super().__init__()
        if len(branches) < 2 or len(weights) != len(branches):
            raise ValueError(
                f"expected 2 or more teachers and one weight each, got {len(branches)} and {weights}"
            )
        if any(b.student is not branches[0].student for b in branches):
            raise ValueError("every teacher's branch needs the same student")
        self.branches = nn.ModuleList(branches)
        self.student = branches[0].student
        self.combiner = TeacherCombiner(combine, logit_loss, logit_options, weights)
        self.weights = [float(w) for w in weights]
        self.alpha, self.tau, self.beta = alpha, tau, beta
        self.label_smoothing = label_smoothing

    @property
    def model(self) -> nn.Module:
        """The network being trained (the student)."""
        return self.student

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Return the named loss terms and the student logits (`keys`: see `Distiller.teacher_outputs`)."""
        teachers = [branch.teacher_outputs(images, keys) for branch in self.branches]
        s_logits = self.student(images)
        s_feats = [branch.student_taps.pop() for branch in self.branches]
        ce = labeled_cross_entropy(s_logits, labels, self.label_smoothing)
        out = {"ce": ce}
        loss = (1.0 - self.alpha) * ce
        if self.alpha > 0:
            t_logits = [t["logits"].float() for t in teachers]
            out.update(self._logit_terms(s_logits.float(), t_logits, labels))
            loss = loss + self.alpha * out["kd"]
        weighted, total = [], 0.0
        for k, (branch, feats, teacher) in enumerate(zip(self.branches, s_feats, teachers, strict=True)):
            terms = branch.feature_terms(feats, teacher)
            out.update({_teacher_term(name, k): value for name, value in terms.items()})
            if "feat" in terms:
                weighted.append(terms["feat"] * self.weights[k])
                total += self.weights[k]
        if weighted and total > 0:
            out["feat"] = torch.stack(weighted).sum() / total
            loss = loss + self.beta * out["feat"]
        out["loss"] = loss
        out["logits"] = s_logits
        return out

    def _logit_terms(
        self, s_logits: torch.Tensor, t_logits: list[torch.Tensor], labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """`kd`, the combined term; and, logged only, `kd.t<k>`, the loss against teacher k alone,
        and `kd_weight.t<k>`, teacher k's weight in `kd` averaged over the batch (per sample under
        `ca_mkd`, so it shows which teacher the rule trusted)."""
        combined = self.combiner(s_logits, t_logits, labels, self.tau)
        terms = {"kd": combined.loss}
        with torch.no_grad():
            each = self.combiner.each(s_logits, t_logits, labels, self.tau)
        for k, term in enumerate(each):
            terms[_teacher_term("kd", k)] = term
            terms[_teacher_term("kd_weight", k)] = combined.weights[:, k].mean()
        return terms

    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory keeps out of weight decay (the student's own list)."""
        return self.branches[0].no_weight_decay()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Student weights, and each teacher's adapters and group methods (`teachers.<k>.adapters...`)."""
        state = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        for k, branch in enumerate(self.branches):
            own = {n: v for n, v in branch.trainable_state_dict().items() if not n.startswith("student.")}
            state.update({f"teachers.{k}.{n}": v for n, v in own.items()})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `trainable_state_dict`."""
        student = {n: v for n, v in state.items() if n.startswith("student.")}
        for k, branch in enumerate(self.branches):
            prefix = f"teachers.{k}."
            own = {n[len(prefix) :]: v for n, v in state.items() if n.startswith(prefix)}
            branch.load_trainable_state_dict({**student, **own})

    def extra_parameters(self) -> int:
        """Trainable parameters every teacher's adapters and group methods add to the student."""
        return sum(branch.extra_parameters() for branch in self.branches)

    def compile_models(self, mode: str = "default") -> None:
        """Compile the student and every teacher in place (see `Distiller.compile_models`)."""
        compile_in_place(self.student, mode)
        for branch in self.branches:
            compile_in_place(branch.teacher, mode)

    def close(self) -> None:
        """Remove every hook and close every cache."""
        for branch in self.branches:
            branch.close()


def _teacher_term(name: str, k: int) -> str:
    """A branch's term `feat`, `feat.i` or `group.j` as teacher k's: `feat.t<k>`, `feat.t<k>.i`, ..."""
    head, _, rest = name.partition(".")
    return f"{head}.t{k}.{rest}" if rest else f"{head}.t{k}"
