"""Face anti-spoofing metrics (ISO/IEC 30107-3 APCER/BPCER/ACER, EER, HTER, AUC, BPCER@APCER).

Conventions (docs/fas.md, "Metrics"):

- label 1 = bona fide (live), 0 = attack; a score is P(live) or any "live-likeness", higher = more live.
- A sample is accepted as bona fide iff ``score >= threshold`` (ties are accepted).
- An attack type is ``species/instrument`` (``print/1``) or a bare ``species`` (``print``). APCER is
  computed per PAI species, each species pooling its instruments, and the worst species is reported
  (ISO/IEC 30107-3 as Idiap applies it to OULU-NPU: print = files 2, 3; replay = files 4, 5); the
  per-instrument values are reported beside it. When no types are given all attacks are pooled
  (that is FAR, not ISO APCER) and results say ``apcer_pooled: True``.
- FAR = pooled APCER, FRR = BPCER; HTER = (FAR + FRR) / 2 at a threshold fixed beforehand (the dev EER
  threshold); EER candidates are the unique scores, so unbounded scores work.
- TPR@FPR: bona fide is the positive class, FPR is the share of all attacks accepted (FLIP's
  convention; SSAN and CelebA-Spoof use the opposite one, see docs/fas.md).
- Uncertainty: `resampled_metrics` recomputes HTER, ACER, APCER, BPCER, EER and AUC on bootstrap
  resamples given as integer weights (see `kdkit.evaluation.stats`), at the same fixed threshold.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from kdkit.evaluation.stats import DRAWS, SEED, Replicates
from kdkit.evaluation.stats import bootstrap as resample
from kdkit.utils.checkpoint import atomic_open

TIE_CONVENTION = "score >= threshold is accepted as bona fide"
BPCER_AT_APCER_CONVENTION = (
    "smallest BPCER over thresholds whose worst-species APCER <= 1%; with attack types pooled this is "
    "1 - TPR at FPR <= 1% with bona fide as the positive class"
)
TPR_AT_FPR_CONVENTION = (
    "bona fide is the positive class: TPR = 1 - BPCER, FPR = share of all attacks accepted (pooled APCER); "
    "the largest TPR over thresholds with FPR <= the target (FLIP's tpr[fpr <= 0.01][-1])"
)
FPR_TARGETS = {"1pct": 0.01, "0.1pct": 0.001}
_POOLED = "all attacks"


def _validate(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores as float64, labels as int64) after checking them; raise ValueError otherwise."""
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"scores must be numeric: {e}") from None
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(
            f"scores and labels must be 1-D (one score per sample), got shapes {s.shape} and {y.shape}"
        )
    if s.size == 0:
        raise ValueError("empty input: no scores given")
    if s.size != y.size:
        raise ValueError(f"length mismatch: {s.size} scores but {y.size} labels")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ValueError(f"scores must be finite; index {bad[0]} holds {s[bad[0]]} ({bad.size} bad in all)")
    if y.dtype.kind not in "biuf":
        raise ValueError(f"labels must be numeric 0 (attack) or 1 (bona fide), got dtype {y.dtype}")
    bad = np.flatnonzero(~np.isin(y, (0, 1)))
    if bad.size:
        raise ValueError(f"labels must be 0 (attack) or 1 (bona fide); index {bad[0]} holds {y[bad[0]]!r}")
    y = y.astype(np.int64)
    if y.min() == y.max():
        present = "bona fide (1)" if y[0] == 1 else "attack (0)"
        raise ValueError(f"both classes are needed, but every sample is {present}")
    return s, y


def _validate_tags(tags: Any, labels: np.ndarray, name: str, rows: np.ndarray) -> np.ndarray:
    """Return ``tags`` as a str array; every row where ``rows`` is True must have a non-empty tag."""
    t = np.asarray(["" if v is None else str(v) for v in tags], dtype=object)
    if t.size != labels.size:
        raise ValueError(f"length mismatch: {t.size} {name} but {labels.size} labels")
    missing = np.flatnonzero(rows & (t == ""))
    if missing.size:
        raise ValueError(f"{name} missing at index {missing[0]} ({missing.size} rows in all)")
    return t


@dataclass
class ScoreSet:
    """Scores of one evaluation set; validated and converted to numpy arrays on construction.

    ``attack_types`` (``species/instrument`` per row; ignored on bona fide rows), ``videos`` (video
    id per row, for video-level scoring) and ``subjects`` (subject id per row, the independent unit
    of the bootstrap) are optional.
    """

    scores: Any
    labels: Any
    attack_types: Any = None
    videos: Any = None
    subjects: Any = None

    def __post_init__(self) -> None:
        self.scores, self.labels = _validate(self.scores, self.labels)
        y = self.labels
        every = np.ones(y.size, bool)
        if self.attack_types is not None:
            self.attack_types = _validate_tags(self.attack_types, y, "attack types", y == 0)
        if self.videos is not None:
            self.videos = _validate_tags(self.videos, y, "video ids", every)
        if self.subjects is not None:
            self.subjects = _validate_tags(self.subjects, y, "subject ids", every)

    def per_video(self) -> ScoreSet:
        """Video-level scores (mean frame score per video); see :func:`video_level`."""
        if self.videos is None:
            raise ValueError("no video ids given, so video-level scores cannot be formed")
        return video_level(self.scores, self.labels, self.videos, self.attack_types, self.subjects)

    def subset(self, mask: np.ndarray) -> ScoreSet:
        """The rows where `mask` (boolean, one per row) is true."""
        pick = [
            None if tags is None else tags[mask] for tags in (self.attack_types, self.videos, self.subjects)
        ]
        return ScoreSet(self.scores[mask], self.labels[mask], *pick)

    def units(self) -> tuple[list[str], str]:
        """The independent unit of each row for the bootstrap and its kind: the subject where known,
        else the video, else the row itself."""
        if self.subjects is not None:
            return [str(v) for v in self.subjects], "subject"
        if self.videos is not None:
            return [str(v) for v in self.videos], "video"
        return [str(i) for i in range(self.scores.size)], "sample"


def _accepted(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of (ascending) scores accepted, i.e. >= each threshold."""
    return sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="left")


def species_of(attack_type: str) -> str:
    """The PAI species of an attack type: the part before '/' (``print/2`` -> ``print``)."""
    return str(attack_type).split("/", 1)[0]


def _attack_groups(
    s: np.ndarray, y: np.ndarray, attack_types: Any, by: str = "species"
) -> dict[str, np.ndarray]:
    """Sorted attack scores per species (or per instrument, the whole type), or one pooled group
    when types are unknown."""
    attacks = s[y == 0]
    if attack_types is None:
        return {_POOLED: np.sort(attacks)}
    types = _validate_tags(attack_types, y, "attack types", y == 0)[y == 0]
    if by == "species":
        types = np.array([species_of(t) for t in types], dtype=object)
    return {t: np.sort(attacks[types == t]) for t in sorted(set(types))}


def _threshold(threshold: float) -> float:
    t = float(threshold)
    if np.isnan(t):
        raise ValueError("threshold must not be NaN")
    return t


def apcer_bpcer(scores: Any, labels: Any, threshold: float, attack_types: Any = None) -> dict[str, Any]:
    """ISO/IEC 30107-3 error rates at ``threshold`` (accept as bona fide iff score >= threshold).

    Returns ``apcer`` (the worst APCER over the PAI species present, each species pooling its
    instruments), ``apcer_per_species`` and ``apcer_per_instrument`` (empty when types are
    unknown), ``apcer_pooled`` (True when no types were given: ``apcer`` is then the APCER of all
    attacks pooled, i.e. FAR), ``bpcer``, ``acer`` = (apcer + bpcer) / 2 and the sample counts.
    The attack type of bona fide rows is ignored.
    """
    s, y = _validate(scores, labels)
    t = np.array([_threshold(threshold)])
    pooled = attack_types is None
    rates, counts = {}, {}
    for by in ("species", "instrument"):
        groups = _attack_groups(s, y, attack_types, by)
        rates[by] = {k: float(_accepted(v, t)[0] / v.size) for k, v in groups.items()}
        counts[by] = {k: int(v.size) for k, v in groups.items()}
    live = s[y == 1]
    bpcer = float(np.count_nonzero(live < t[0]) / live.size)
    apcer = max(rates["species"].values())
    return {
        "apcer": apcer,
        "apcer_per_species": {} if pooled else rates["species"],
        "apcer_per_instrument": {} if pooled else rates["instrument"],
        "apcer_pooled": pooled,
        "bpcer": bpcer,
        "acer": (apcer + bpcer) / 2,
        "n_bona_fide": int(live.size),
        "n_attack": int(s.size - live.size),
        "n_attack_per_species": {} if pooled else counts["species"],
        "n_attack_per_instrument": {} if pooled else counts["instrument"],
    }


def far_frr(scores: Any, labels: Any, threshold: float) -> tuple[float, float]:
    """(FAR, FRR) at ``threshold``: share of all attacks accepted, share of bona fide rejected."""
    s, y = _validate(scores, labels)
    t = _threshold(threshold)
    return float(np.mean(s[y == 0] >= t)), float(np.mean(s[y == 1] < t))


def hter(scores: Any, labels: Any, threshold: float) -> float:
    """Half total error rate (FAR + FRR) / 2 at a threshold fixed beforehand (normally the dev EER one)."""
    far, frr = far_frr(scores, labels, threshold)
    return (far + frr) / 2


def eer_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """Equal error rate and its threshold: ``(eer, threshold)``.

    Candidate thresholds are the unique scores (so any score range works). The chosen threshold
    minimises |FAR - FRR| (compared exactly, in integer counts); ties go to the smallest candidate
    threshold (the first in ascending order, as ``np.argmin`` over an ascending grid). The EER is
    (FAR + FRR) / 2 at that threshold.
    """
    s, y = _validate(scores, labels)
    attacks, live = np.sort(s[y == 0]), np.sort(s[y == 1])
    candidates = np.unique(s)
    false_accepts = _accepted(attacks, candidates)
    false_rejects = np.searchsorted(live, candidates, side="left")
    # |FA/n_att - FR/n_live| scaled by n_att * n_live: exact integers, so ties are real ties.
    gap = np.abs(false_accepts * live.size - false_rejects * attacks.size)
    i = int(np.argmin(gap))
    eer = (false_accepts[i] / attacks.size + false_rejects[i] / live.size) / 2
    return float(eer), float(candidates[i])


def auc(scores: Any, labels: Any) -> float:
    """ROC AUC with bona fide (label 1) as the positive class and the score as P(live)."""
    s, y = _validate(scores, labels)
    return float(roc_auc_score(y, s))


def bpcer_at_apcer(scores: Any, labels: Any, apcer_target: float = 0.01, attack_types: Any = None) -> float:
    """Smallest BPCER over all thresholds at which the worst-species APCER is <= ``apcer_target``.

    With ``attack_types=None`` all attacks are pooled, and the value equals 1 - TPR at FPR <=
    ``apcer_target`` with bona fide as the positive class (FLIP's ``tpr[fpr <= 0.01][-1]``
    convention); it is not the SSAN/CelebA-Spoof "TPR@FPR", which is 1 - APCER at a fixed BPCER.
    With types, every species' APCER must meet the target. Candidates are the unique scores and
    +inf (reject everything, APCER 0), so a feasible threshold always exists.
    """
    s, y = _validate(scores, labels)
    if not 0 <= apcer_target <= 1:
        raise ValueError(f"apcer_target must lie in [0, 1], got {apcer_target}")
    candidates = np.append(np.unique(s), np.inf)
    feasible = np.ones(candidates.size, dtype=bool)
    for group in _attack_groups(s, y, attack_types).values():
        feasible &= _accepted(group, candidates) / group.size <= apcer_target
    # BPCER grows with the threshold, so the smallest feasible threshold gives the smallest BPCER.
    live = np.sort(s[y == 1])
    t = candidates[np.argmax(feasible)]
    return float(np.searchsorted(live, t, side="left") / live.size)


def tpr_at_fpr(scores: Any, labels: Any, fpr_target: float) -> float:
    """Largest TPR (bona fide accepted) over thresholds whose FPR (share of all attacks accepted) is
    <= ``fpr_target``; see ``TPR_AT_FPR_CONVENTION``."""
    return 1.0 - bpcer_at_apcer(scores, labels, fpr_target)


def _video_tag(tags: np.ndarray, inverse: np.ndarray, k: int, ids: list[str], what: str) -> str:
    found = set(tags[inverse == k])
    if len(found) > 1:
        raise ValueError(f"frames of video {ids[k]!r} disagree on the {what}: {sorted(found)}")
    return found.pop()


def video_level(
    scores: Any, labels: Any, videos: Any, attack_types: Any = None, subjects: Any = None
) -> ScoreSet:
    """Average the frame scores of each video; returns one row per video (ids sorted).

    Raises if the frames of one video disagree on the label, on the subject, or (for attack videos)
    on the attack type.
    """
    s, y = _validate(scores, labels)
    v = _validate_tags(videos, y, "video ids", np.ones(y.size, bool))
    unique_ids, inverse = np.unique(v.astype(str), return_inverse=True)
    ids = unique_ids.tolist()  # plain str, for messages and JSON
    counts = np.bincount(inverse)
    mean_scores = np.bincount(inverse, weights=s) / counts
    video_labels = np.bincount(inverse, weights=y) / counts
    mixed = np.flatnonzero((video_labels != 0) & (video_labels != 1))
    if mixed.size:
        raise ValueError(f"frames of video {ids[mixed[0]]!r} disagree on the label")
    video_labels = video_labels.astype(np.int64)
    video_types = video_subjects = None
    if attack_types is not None:
        types = _validate_tags(attack_types, y, "attack types", y == 0)
        video_types = [""] * len(ids)
        for k in np.flatnonzero(video_labels == 0):
            video_types[k] = _video_tag(types, inverse, k, ids, "attack type")
    if subjects is not None:
        tags = _validate_tags(subjects, y, "subject ids", np.ones(y.size, bool))
        video_subjects = [_video_tag(tags, inverse, k, ids, "subject") for k in range(len(ids))]
    return ScoreSet(mean_scores, video_labels, video_types, ids, video_subjects)


def _level_metrics(test: ScoreSet, threshold: float) -> dict[str, Any]:
    """All test metrics of one level (frame or video) at a given threshold."""
    s, y = test.scores, test.labels
    eer, eer_thr = eer_threshold(s, y)
    far, frr = far_frr(s, y, threshold)
    return {
        "threshold": threshold,
        **apcer_bpcer(s, y, threshold, test.attack_types),
        "far": far,
        "frr": frr,
        "hter": (far + frr) / 2,
        "eer": eer,
        "eer_threshold": eer_thr,
        "auc": auc(s, y),
        "bpcer_at_apcer_1pct": bpcer_at_apcer(s, y, 0.01, test.attack_types),
        **{f"tpr_at_fpr_{name}": tpr_at_fpr(s, y, target) for name, target in FPR_TARGETS.items()},
        # Threshold chosen on this very set, as most published FAS code does: only for comparison
        # with published numbers, never for selection (it equals the EER by construction).
        "optimistic_hter": hter(s, y, eer_thr),
    }


def evaluate_scores(test: ScoreSet, dev: ScoreSet | None = None) -> dict[str, Any]:
    """Frame-level and (when ``test.videos`` is set) video-level metrics; JSON-serialisable.

    The threshold is the dev set's EER threshold, computed separately per level. Without ``dev`` it
    is the test set's own EER threshold and ``threshold_source`` is ``"test"``: HTER is then
    optimistic (it equals the test EER). Video-level scoring with a dev set needs dev video ids.
    """
    if dev is not None and test.videos is not None and dev.videos is None:
        raise ValueError("test scores have video ids but dev scores do not; video-level needs both")
    levels = {"frame": (test, dev)}
    if test.videos is not None:
        levels["video"] = (test.per_video(), None if dev is None else dev.per_video())
    result: dict[str, Any] = {
        "threshold_source": "test" if dev is None else "dev",
        "threshold_criterion": "eer",
        "tie_convention": TIE_CONVENTION,
        "bpcer_at_apcer_convention": BPCER_AT_APCER_CONVENTION,
        "tpr_at_fpr_convention": TPR_AT_FPR_CONVENTION,
    }
    for name, (t, d) in levels.items():
        ref = t if d is None else d
        dev_eer, threshold = eer_threshold(ref.scores, ref.labels)
        result[name] = _level_metrics(t, threshold)
        if d is not None:
            result[name]["dev_eer"] = dev_eer
    return result


_CHUNK = 4_000_000  # weights held at once while resampling (draws x rows), about 32 MB


def resampled_metrics(
    test: ScoreSet, threshold: float, counts: np.ndarray, inverse: np.ndarray
) -> dict[str, np.ndarray]:
    """HTER, ACER, APCER (worst species), BPCER at the fixed ``threshold``, EER, AUC and TPR@FPR of
    every bootstrap resample; one ``(draws,)`` array each, NaN where a resample lacks a class.

    A resample is given as unit counts: ``counts[b, u]`` is how often unit u was drawn in resample
    b and ``inverse[i]`` the unit of row i (``kdkit.evaluation.stats.unit_counts``); row i then weighs
    ``counts[b, inverse[i]]``. With every weight 1 the values equal the point metrics exactly.
    """
    counts = np.asarray(counts)
    step = max(1, _CHUNK // max(1, test.scores.size))
    parts = [
        _weighted_metrics(test, _threshold(threshold), counts[i : i + step][:, inverse].astype(np.float64))
        for i in range(0, counts.shape[0], step)
    ]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def bootstrap(test: ScoreSet, threshold: float, draws: int = DRAWS, seed: int = SEED) -> Replicates:
    """`resampled_metrics` of `test` under `draws` cluster-bootstrap resamples of its units
    (subjects, else videos, else rows; see `ScoreSet.units`), the threshold held fixed."""
    units, kind = test.units()
    return resample(
        units, kind, lambda counts, inverse: resampled_metrics(test, threshold, counts, inverse), draws, seed
    )


def _weighted_metrics(test: ScoreSet, threshold: float, w: np.ndarray) -> dict[str, np.ndarray]:
    """`resampled_metrics` for one chunk of per-row weights ``w`` (draws x rows)."""
    s, live = test.scores, test.labels == 1
    accepted = s >= threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        bpcer = (w @ (live & ~accepted)) / (w @ live)
        far = (w @ (~live & accepted)) / (w @ ~live)
        apcer = far
        if test.attack_types is not None:
            species = np.array([species_of(t) for t in test.attack_types], dtype=object)
            per_species = []
            for name in sorted(set(species[~live])):
                rows = ~live & (species == name)
                per_species.append((w @ (rows & accepted)) / (w @ rows))
            apcer = np.fmax.reduce(np.stack(per_species), axis=0)  # worst species present (NaN-aware)
        curve = _weighted_curve(s, live, w)
    return {"hter": (far + bpcer) / 2, "acer": (apcer + bpcer) / 2, "apcer": apcer, "bpcer": bpcer, **curve}


def _weighted_curve(s: np.ndarray, live: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """EER (as `eer_threshold`: candidates the unique scores, ties to the smaller threshold), AUC
    (ties count one half) and TPR@FPR (as `tpr_at_fpr`) under per-row weights ``w`` (draws x rows)."""
    order = np.argsort(s, kind="stable")
    sorted_scores = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ordered = w[:, order]
    live_w = np.add.reduceat(ordered * live[order], starts, axis=1)  # (draws, unique scores)
    attack_w = np.add.reduceat(ordered * ~live[order], starts, axis=1)
    n_live, n_attack = live_w.sum(1, keepdims=True), attack_w.sum(1, keepdims=True)
    attacks_below = np.cumsum(attack_w, 1) - attack_w
    false_rejects = np.cumsum(live_w, 1) - live_w  # live scores below each candidate threshold
    false_accepts = n_attack - attacks_below  # attacks at or above it
    area = (live_w * (attacks_below + attack_w / 2)).sum(1) / (n_live * n_attack)[:, 0]
    # Integer weights: the scaled gap is exact, so ties are real ties (as in `eer_threshold`).
    best = np.argmin(np.abs(false_accepts * n_live - false_rejects * n_attack), axis=1)
    rows = np.arange(w.shape[0])
    eer = (false_accepts[rows, best] / n_attack[:, 0] + false_rejects[rows, best] / n_live[:, 0]) / 2
    curve = {"eer": eer, "auc": area}
    for name, target in FPR_TARGETS.items():
        # The smallest threshold whose FPR meets the target has the largest TPR; none: reject all.
        feasible = false_accepts / n_attack <= target
        first = np.argmax(feasible, axis=1)
        tpr = 1 - false_rejects[rows, first] / n_live[:, 0]
        curve[f"tpr_at_fpr_{name}"] = np.where(feasible.any(axis=1), tpr, 0.0)
    return curve


def _aggregate(values: list[Any], where: str) -> Any:
    """Mean and sample std of numeric leaves; identical non-numeric leaves pass through."""
    first = values[0]
    if isinstance(first, dict):
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
            raise ValueError(f"folds disagree on the keys of {where or 'the top level'}")
        return {k: _aggregate([v[k] for v in values], f"{where}.{k}".lstrip(".")) for k in first}
    numeric = [isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in values]
    if all(numeric):
        a = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"non-finite value in {where} across folds: {values}")
        return {"mean": float(a.mean()), "std": float(a.std(ddof=1))}
    if any(numeric) or any(v != first for v in values):
        raise ValueError(f"folds disagree on {where}: {values}")
    return first


def mean_std_over_folds(fold_results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over folds (e.g. OULU-NPU P3/P4), each fold evaluated with its own dev threshold.

    Every numeric leaf of the (nested) metric dicts becomes ``{"mean", "std"}``; std is the **sample**
    standard deviation (ddof=1). Non-numeric leaves must agree across folds and are kept. Returns
    ``{"n_folds", "std_estimator", "metrics"}``. Needs at least 2 folds with the same keys.
    """
    if len(fold_results) < 2:
        raise ValueError(f"need at least 2 folds for a sample std, got {len(fold_results)}")
    return {
        "n_folds": len(fold_results),
        "std_estimator": "sample (ddof=1)",
        "metrics": _aggregate(list(fold_results), ""),
    }


def plot_roc_det(
    test: ScoreSet, dev: ScoreSet | None, path: Path, threshold: float | None = None, title: str | None = None
) -> Path:
    """Write one PNG with the ROC curve and the DET curve (APCER vs BPCER, probit axes); returns ``path``.

    Test curves are solid (per PAI species too, on the DET, when types are known), dev curves dashed.
    The operating point at ``threshold`` (default: dev EER threshold, else test EER threshold) is
    marked on the test curves. The file is written atomically.
    """
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state
    from scipy.stats import norm

    if threshold is None:
        ref = test if dev is None else dev
        threshold = eer_threshold(ref.scores, ref.labels)[1]
    lo, hi = 5e-4, 0.995  # probit axes cannot show 0 or 1: clip into the visible range

    def probit(p: np.ndarray) -> np.ndarray:
        return norm.ppf(np.clip(p, lo, hi))

    fig = Figure(figsize=(11, 5))
    roc_ax, det_ax = fig.subplots(1, 2)
    for name, ss, style in (("test", test, "-"), ("dev", dev, "--")):
        if ss is None:
            continue
        fpr, tpr, _ = roc_curve(ss.labels, ss.scores, drop_intermediate=False)
        roc_ax.plot(fpr, tpr, style, label=f"{name} (AUC {auc(ss.scores, ss.labels):.4f})")
        det_ax.plot(probit(fpr), probit(1 - tpr), style, label=f"{name}, all attacks")
    if test.attack_types is not None:
        species_per_row = np.array([species_of(t) for t in test.attack_types], dtype=object)
        for species in _attack_groups(test.scores, test.labels, test.attack_types):
            keep = (test.labels == 1) | ((test.labels == 0) & (species_per_row == species))
            fpr, tpr, _ = roc_curve(test.labels[keep], test.scores[keep], drop_intermediate=False)
            det_ax.plot(probit(fpr), probit(1 - tpr), ":", linewidth=1, label=f"test, {species}")
    far, frr = far_frr(test.scores, test.labels, threshold)
    point = f"operating point, threshold {threshold:.6g}"
    roc_ax.plot([far], [1 - frr], "ko", label=point)
    det_ax.plot(probit(np.array([far])), probit(np.array([frr])), "ko", label=point)
    roc_ax.set(xlabel="APCER (attacks pooled) = FPR", ylabel="1 - BPCER = TPR (bona fide positive)")
    roc_ax.set_title("ROC")
    ticks = np.array([0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 0.99])
    labels = [f"{100 * p:g}%" for p in ticks]
    det_ax.set(xlim=probit(np.array([lo, hi])), ylim=probit(np.array([lo, hi])), title="DET (probit axes)")
    det_ax.set(xlabel="APCER", ylabel="BPCER")
    det_ax.set_xticks(norm.ppf(ticks), labels)
    det_ax.set_yticks(norm.ppf(ticks), labels)
    for ax in (roc_ax, det_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    return Path(path)
