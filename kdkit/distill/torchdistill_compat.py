"""Use kdkit's adapters from a torchdistill YAML config.

Importing this module registers the mid-level loss `KDKitFeatureLoss` with torchdistill; add
`kdkit.distill.torchdistill_compat` to the YAML's `dependencies:` and list the tapped paths under
the student's and teacher's `forward_hook:`. See docs/adapters.md for a full snippet.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torchdistill.losses.registry import register_mid_level_loss

from kdkit.config.schema import DistillSpec
from kdkit.distill.adapters import build_adapter
from kdkit.distill.losses import build_feature_criterion
from kdkit.distill.taps import Tap, select_features


@register_mid_level_loss
class KDKitFeatureLoss(nn.Module):
    """criterion(adapter(select(student feature), select(teacher feature))) as a torchdistill loss.

    Features are read from torchdistill's io dicts as `io_dict[path][io]` (element 0 of a tuple), reduced
    by the kdkit selector `select` (default 'all'), mapped by the kdkit `adapter`, and compared with the
    kdkit feature `criterion`. `num_prefix_tokens` (class/register tokens, default 1) is used by the
    `patch` and `mean` selectors. Unknown keyword arguments are a TypeError, so YAML typos fail at build.

    Only adapters without trainable parameters (identity, procrustes, covariance, cka, gram) are
    accepted. torchdistill's `DistillationBox` builds its optimizer from the student model (or
    `module_wise_configs` paths inside the student or teacher) and never from the criterion, nor
    does it move the criterion to the device, so a `projection` adapter here would stay at its
    random initialisation; it is refused rather than left silently untrained. For a learned
    projection, use kdkit's own distiller.
    """

    def __init__(
        self,
        student_module_path: str,
        teacher_module_path: str,
        student_dim: int,
        teacher_dim: int,
        student_module_io: str = "output",
        teacher_module_io: str = "output",
        adapter: str = DistillSpec.adapter,
        adapter_options: dict[str, Any] | None = None,
        criterion: str = DistillSpec.criterion,
        select: str = "all",
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        # Tap validates io and select now rather than at the first training step.
        self.student_tap = Tap(student_module_path, student_module_io, select)
        self.teacher_tap = Tap(teacher_module_path, teacher_module_io, select)
        self.adapter = build_adapter(adapter, student_dim, teacher_dim, **(adapter_options or {}))
        if any(p.requires_grad for p in self.adapter.parameters()):
            raise ValueError(
                f"KDKitFeatureLoss: adapter {adapter!r} has trainable parameters, which "
                "torchdistill's optimizer would never update; use 'procrustes', 'cka', 'gram' or "
                "'identity'"
            )
        self.criterion = build_feature_criterion(criterion)
        self.num_prefix_tokens = num_prefix_tokens

    def _feature(self, io_dict: dict, role: str, tap: Tap) -> Tensor:
        try:
            value = io_dict[tap.path][tap.io]
        except KeyError:
            raise ValueError(
                f"KDKitFeatureLoss: no {tap.io!r} of {role} module {tap.path!r} in torchdistill's "
                f"io_dict; list {tap.path!r} under train.{role}.forward_hook.{tap.io} in the YAML"
            ) from None
        if isinstance(value, (tuple, list)):
            value = value[0]
        return select_features(value, tap.select, self.num_prefix_tokens)

    def forward(
        self, student_io_dict: dict, teacher_io_dict: dict, targets: Any = None, *args: Any, **kwargs: Any
    ) -> Tensor:
        """Feature loss between the student's and the teacher's tapped tensors."""
        s = self._feature(student_io_dict, "student", self.student_tap)
        t = self._feature(teacher_io_dict, "teacher", self.teacher_tap)
        return self.criterion(*self.adapter(s, t))
