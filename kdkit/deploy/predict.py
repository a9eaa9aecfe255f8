"""Score image and video files with an opened model (`kdkit.deploy.modelfile.open_model`).

`Predictor(model, threshold, preparer, frames)(path)` reads an image, or K evenly sampled frames
of a video, prepares them (a face crop, say), runs the model in batches and returns a
`Prediction`: `score` = P(class 1), averaged over frames, and the decision at the threshold.
`kdkit predict` (kdkit.cli.predict) is its command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdkit.deploy.inputs import InputError, Preparer, read_frames, to_batch
from kdkit.deploy.modelfile import DeployedModel

BATCH = 32  # frames per forward pass


@dataclass
class Prediction:
    """The outcome for one input; `error` is set (and `score` None) when it could not be scored."""

    path: str
    score: float | None = None  # P(class 1), mean over the frames used
    decision: str | None = None
    frames: int = 0  # frames scored (a video's frames without a face, say, are not)
    threshold: float | None = None
    error: str | None = None


class Predictor:
    """Scores files with an opened model: read frames, prepare, batch, run, average, decide."""

    def __init__(
        self, model: DeployedModel, threshold: float | None, preparer: Preparer | None, frames: int
    ) -> None:
        meta = model.metadata
        self.model, self.threshold, self.preparer, self.frames = model, threshold, preparer, frames
        self.names = meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]

    def __call__(self, path: Path) -> Prediction:
        """Score one image or video file; problems with the file come back in `error`."""
        try:
            frames = read_frames(path, self.frames)
            if self.preparer is not None:
                frames = [f for f in map(self.preparer, frames) if f is not None]
                if not frames:
                    raise InputError("the input preparer found nothing to score (e.g. no face) in any frame")
            return self._decide(str(path), *self._score(frames))
        except (InputError, OSError) as exc:
            return Prediction(str(path), error=str(exc))

    def _score(self, frames: list[np.ndarray]) -> tuple[float, np.ndarray, int]:
        scores, probs = [], []
        for start in range(0, len(frames), BATCH):
            outputs = self.model.run(to_batch(frames[start : start + BATCH], self.model.metadata))
            scores.append(outputs["score"])
            probs.append(torch.softmax(torch.from_numpy(outputs["logits"]).float(), dim=1).numpy())
        return float(np.concatenate(scores).mean()), np.concatenate(probs).mean(axis=0), len(frames)

    def _decide(self, path: str, score: float, probs: np.ndarray, n: int) -> Prediction:
        if self.threshold is None:  # more than two classes: the most probable one
            decision = self.names[int(probs.argmax())]
        else:
            decision = self.names[1] if score >= self.threshold else self.names[0]
        return Prediction(path, score, decision, n, self.threshold)
