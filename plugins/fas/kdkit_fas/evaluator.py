"""The FAS evaluator plugged into kdkit's trainer.

It turns class-1 probabilities into P(live) scores, fixes the threshold at the dev ('val') set's
EER point and reports the test metrics there — never a threshold or a checkpoint chosen on test.
Video-level results (mean frame score per video) are the headline numbers when the data set
knows its videos; frame-level ones are reported beside them with a `frame_` prefix. APCER is the
worst PAI species (`<split>/apcer`), with every species and instrument beside it
(`<split>/apcer_species.<name>`, `<split>/apcer_instrument.<name>`).

When the data set knows each sample's domain (`fas_domains`: the data set it came from), every
test domain is also reported on its own (`<split>/<domain>/hter`, ...) at the same threshold, beside
the pooled numbers. `threshold_source` says which data fixed the threshold (e.g.
`val (source dev: O, I)`).

`<split>/optimistic_hter` is the HTER at the split's own EER threshold, as most published FAS code
reports it: kdkit logs it (and the trainer records the epoch it would pick, `optimistic_monitor`)
only for comparison with published numbers; nothing is ever selected by it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.evaluation.protocol import Predictions
from kdkit.evaluation.stats import DRAWS, SEED, Replicates
from kdkit.utils.checkpoint import atomic_write_text
from kdkit_fas.metrics import ScoreSet, bootstrap, eer_threshold, evaluate_scores, plot_roc_det

HEADLINE = (
    "hter",
    "acer",
    "apcer",
    "bpcer",
    "eer",
    "auc",
    "bpcer_at_apcer_1pct",
    "tpr_at_fpr_1pct",
    "tpr_at_fpr_0.1pct",
    "threshold",
    "optimistic_hter",
)
# reported per domain: the headline metrics but the threshold, which is the pooled one (from dev)
PER_DOMAIN = tuple(k for k in HEADLINE if k != "threshold")


def score_set(pred: Predictions) -> ScoreSet:
    """P(live) scores with labels, attack types, video and subject ids from the dataset's `meta`."""
    if pred.logits.ndim != 2 or pred.logits.shape[1] != 2:
        raise ValueError(
            f"the FAS evaluator needs 2-class logits (attack, live), got shape {tuple(pred.logits.shape)}"
        )
    scores = torch.softmax(pred.logits.float(), dim=1)[:, 1].numpy()
    meta = getattr(pred.dataset, "meta", None)
    attack_types = videos = subjects = None
    if meta is not None and len(meta) == len(scores):
        attack_types = [str(m.get("attack_type", "attack")) for m in meta]
        videos = [str(m["video"]) for m in meta] if all("video" in m for m in meta) else None
        subjects = [str(m["subject"]) for m in meta] if all(m.get("subject") for m in meta) else None
    return ScoreSet(scores, pred.labels.numpy(), attack_types, videos, subjects)


def domains(pred: Predictions) -> np.ndarray | None:
    """The domain of every sample from the dataset's `meta`, or None when it does not give them all."""
    meta = getattr(pred.dataset, "meta", None)
    if meta is None or len(meta) != len(pred.labels) or not all(m.get("domain") for m in meta):
        return None
    return np.asarray([str(m["domain"]) for m in meta], dtype=object)


class FasEvaluator:
    """HTER/ACER/APCER/BPCER/EER/AUC at the dev-EER threshold; best checkpoint = lowest dev EER."""

    mode = "min"
    num_classes = 2  # logit 1 = live (the scores are its softmax probability)
    summary_keys = ["test/hter", "test/acer", "test/eer", "test/auc"]
    # Numbers to set beside published ones, never used to choose anything: HTER at the test set's
    # own EER threshold (optimistic, = test EER) and ROC points with bona fide as the positive class.
    paper_keys = ["test/optimistic_hter", "test/tpr_at_fpr_1pct", "test/tpr_at_fpr_0.1pct"]
    optimistic_monitor = "test/optimistic_hter"  # the epoch published code would keep; only reported

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
        origin = getattr(predictions["val"].dataset, "origin", "") or "dev split"
        metrics: dict[str, Any] = {
            "val/eer": eer_threshold(dev_main.scores, dev_main.labels)[0],
            "val/frame_eer": eer_threshold(dev.scores, dev.labels)[0],
            "threshold_source": f"val ({origin})",
        }
        for split, test in sets.items():
            if split == "val" and len(sets) > 1:  # dev fixes the threshold; reported itself only when asked
                continue
            result = evaluate_scores(test, dev)
            main = result.get(self.level, result["frame"])
            metrics.update({f"{split}/{k}": float(main[k]) for k in HEADLINE})
            metrics.update({f"{split}/frame_{k}": float(result["frame"][k]) for k in HEADLINE})
            for by in ("species", "instrument"):
                per = main[f"apcer_per_{by}"]
                metrics.update({f"{split}/apcer_{by}.{name}": float(v) for name, v in per.items()})
            metrics.update(self._per_domain(split, test, domains(predictions[split]), dev))
            if out_dir is not None:
                self._write(out_dir, split, test, dev, result, main["threshold"])
        return metrics

    def bootstrap(
        self, predictions: dict[str, Predictions], split: str, draws: int = DRAWS, seed: int = SEED
    ) -> Replicates:
        """Replicates of HTER, ACER, APCER, BPCER, EER, AUC and TPR@FPR on `split` (the headline
        level), the threshold fixed at the dev EER; resampling subjects where known, else videos."""
        test, dev = self._level(score_set(predictions[split])), self._level(score_set(predictions["val"]))
        replicates = bootstrap(test, eer_threshold(dev.scores, dev.labels)[1], draws, seed)
        replicates.values = {f"{split}/{k}": v for k, v in replicates.values.items()}
        return replicates

    def _per_domain(
        self, split: str, test: ScoreSet, tags: np.ndarray | None, dev: ScoreSet
    ) -> dict[str, float]:
        """`<split>/<domain>/<metric>` for each domain of `tags` (none without tags), at the dev threshold."""
        metrics = {}
        for domain in [] if tags is None else sorted(set(tags)):
            result = evaluate_scores(test.subset(tags == domain), dev)
            main = result.get(self.level, result["frame"])
            metrics.update({f"{split}/{domain}/{k}": float(main[k]) for k in PER_DOMAIN})
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
    """`score,label,attack_type,video[,subject]` rows — the input format of `kdkit fas metrics`
    (the subject column when subjects are known: the unit its intervals resample)."""
    n = len(scores.scores)
    types = scores.attack_types if scores.attack_types is not None else ["attack"] * n
    columns = {
        "score": [f"{s:.8f}" for s in scores.scores],
        "label": [int(y) for y in scores.labels],
        "attack_type": [a if y == 0 else "live" for a, y in zip(types, scores.labels, strict=True)],
        "video": scores.videos if scores.videos is not None else [""] * n,
    }
    if scores.subjects is not None:
        columns["subject"] = scores.subjects
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*columns.values(), strict=True))
    atomic_write_text(buffer.getvalue(), path)
