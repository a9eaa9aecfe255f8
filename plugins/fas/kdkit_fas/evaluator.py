"""The FAS evaluator plugged into kdkit's trainer.

It turns class-1 probabilities into P(live) scores, fixes the threshold at the dev ('val') set's
EER point and reports the test metrics there — never a threshold or a checkpoint chosen on test.
Video-level results (mean frame score per video) are the headline numbers when the data set
knows its videos; frame-level ones are reported beside them with a `frame_` prefix.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch

from kdkit.checkpoint import atomic_write_text
from kdkit.evaluation import Predictions
from kdkit_fas.metrics import ScoreSet, eer_threshold, evaluate_scores, plot_roc_det

HEADLINE = ("hter", "acer", "apcer", "bpcer", "eer", "auc", "bpcer_at_apcer_1pct", "threshold")


def score_set(pred: Predictions) -> ScoreSet:
    """P(live) scores with labels, attack types and video ids from the dataset's `meta`."""
    if pred.logits.ndim != 2 or pred.logits.shape[1] != 2:
        raise ValueError(
            f"the FAS evaluator needs 2-class logits (attack, live), got shape {tuple(pred.logits.shape)}"
        )
    scores = torch.softmax(pred.logits.float(), dim=1)[:, 1].numpy()
    meta = getattr(pred.dataset, "meta", None)
    attack_types = videos = None
    if meta is not None and len(meta) == len(scores):
        attack_types = [str(m.get("attack_type", "attack")) for m in meta]
        videos = [str(m["video"]) for m in meta] if all("video" in m for m in meta) else None
    return ScoreSet(scores, pred.labels.numpy(), attack_types, videos)


class FasEvaluator:
    """HTER/ACER/APCER/BPCER/EER/AUC at the dev-EER threshold; best checkpoint = lowest dev EER."""

    mode = "min"
    summary_keys = ["test/hter", "test/acer", "test/eer", "test/auc"]

    def __init__(self, level: str = "video") -> None:
        if level not in ("video", "frame"):
            raise ValueError(f"evaluator_options.level: expected 'video' or 'frame', got {level!r}")
        self.level = level
        self.monitor = "val/eer"

    def __call__(self, predictions: dict[str, Predictions], out_dir: Path | None = None) -> dict[str, Any]:
        """Flat metrics per split; with `out_dir`, also scores CSVs, metrics.json and ROC/DET plots."""
        if "val" not in predictions:
            raise ValueError("the FAS evaluator needs the dev split ('val') to fix the threshold")
        sets = {split: score_set(pred) for split, pred in predictions.items()}
        dev = sets["val"]
        dev_main = self._level(dev)
        metrics: dict[str, Any] = {
            "val/eer": eer_threshold(dev_main.scores, dev_main.labels)[0],
            "val/frame_eer": eer_threshold(dev.scores, dev.labels)[0],
        }
        for split, test in sets.items():
            if split == "val":
                continue
            result = evaluate_scores(test, dev)
            main = result.get(self.level, result["frame"])
            metrics.update({f"{split}/{k}": float(main[k]) for k in HEADLINE})
            metrics.update({f"{split}/frame_{k}": float(result["frame"][k]) for k in HEADLINE})
            if out_dir is not None:
                self._write(out_dir, split, test, dev, result, main["threshold"])
        return metrics

    def _level(self, scores: ScoreSet) -> ScoreSet:
        return scores.per_video() if self.level == "video" and scores.videos is not None else scores

    def _write(
        self,
        out_dir: Path,
        split: str,
        test: ScoreSet,
        dev: ScoreSet,
        result: dict[str, Any],
        threshold: float,
    ) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, scores in (("val", dev), (split, test)):
            write_scores_csv(scores, out_dir / f"scores_{name}.csv")
        atomic_write_text(json.dumps(result, indent=2), out_dir / f"metrics_{split}.json")
        plot_roc_det(
            self._level(test),
            self._level(dev),
            out_dir / f"roc_det_{split}.png",
            threshold,
            title=f"{split} ({self.level} level, threshold from dev EER)",
        )


def write_scores_csv(scores: ScoreSet, path: Path) -> None:
    """`score,label,attack_type,video` rows — the input format of `kdkit fas metrics`."""
    n = len(scores.scores)
    types = scores.attack_types if scores.attack_types is not None else ["attack"] * n
    videos = scores.videos if scores.videos is not None else [""] * n
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["score", "label", "attack_type", "video"])
    for s, y, a, v in zip(scores.scores, scores.labels, types, videos, strict=True):
        writer.writerow([f"{s:.8f}", int(y), a if y == 0 else "live", v])
    atomic_write_text(buffer.getvalue(), path)
