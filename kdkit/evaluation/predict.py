"""Run a model over a loader in eval mode: the logits and labels every evaluator scores."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from kdkit.data.augment import device_images
from kdkit.evaluation.protocol import Predictions
from kdkit.utils.device import autocast
from kdkit.utils.runlog import progress


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: str = "none",
    description: str = "predict",
) -> Predictions:
    """Run `model` over `loader` in eval mode; return logits and labels in dataset order."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    with progress(len(loader), description, unit="batches") as advance:
        for images, targets in loader:
            with autocast(device, amp):
                out = model(device_images(images, device))
            logits.append(out.float().cpu())
            labels.append(targets.cpu())
            advance()
    model.train(was_training)
    return Predictions(torch.cat(logits), torch.cat(labels).long(), loader.dataset)
