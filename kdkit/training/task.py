"""The supervised task: plain training of one model (a teacher, or a student without a teacher)."""

from __future__ import annotations

import torch
from torch import nn

from kdkit.distill.losses import labeled_cross_entropy
from kdkit.models.compile import compile_in_place
from kdkit.models.info import no_weight_decay_names


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
        ce = labeled_cross_entropy(logits, labels, self.label_smoothing)
        return {"loss": ce, "ce": ce, "logits": logits}

    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory keeps out of weight decay."""
        return no_weight_decay_names(self.model, "model.")

    def compile_models(self, mode: str = "default") -> None:
        """Compile the model's forward in place (`nn.Module.compile`: same module, same weights)."""
        compile_in_place(self.model, mode)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights to checkpoint (the model)."""
        return self.state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `trainable_state_dict`."""
        self.load_state_dict(state)
