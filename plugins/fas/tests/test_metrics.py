"""Tests for kdkit_fas.metrics and the ``kdkit fas metrics`` command, cross-checked with scikit-learn."""

from __future__ import annotations

import argparse
import json
import math
import re

import matplotlib.image
import numpy as np
import pytest
from kdkit_fas import metrics_cli
from kdkit_fas.metrics import (
    ScoreSet,
    apcer_bpcer,
    auc,
    bpcer_at_apcer,
    eer_threshold,
    evaluate_scores,
    far_frr,
    hter,
    mean_std_over_folds,
    oulu_species,
    plot_roc_det,
    video_level,
)
from sklearn.metrics import roc_auc_score, roc_curve


def _tied_scores(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping classes with scores rounded to 1 decimal, so many ties across classes."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(int)
    scores = np.round(rng.normal(labels * 1.0, 0.8), 1)
    return scores, labels


def _roc_rates(scores, labels):
    """FAR, FRR and thresholds from sklearn's ROC (live positive), without the +inf start point."""
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    return fpr[1:], 1 - tpr[1:], thr[1:]


@pytest.mark.parametrize("seed", range(5))
def test_eer_matches_roc_curve_with_ties(seed):
    scores, labels = _tied_scores(seed)
    far, frr, thr = _roc_rates(scores, labels)
    gap = np.abs(far - frr)
    best = np.flatnonzero(np.isclose(gap, gap.min(), rtol=0, atol=1e-12))
    i = best[np.argmin(thr[best])]  # documented tie-break: smallest threshold
    eer, t = eer_threshold(scores, labels)
    assert t == thr[i]
    assert eer == pytest.approx((far[i] + frr[i]) / 2, abs=1e-12)
    assert np.array_equal(np.sort(thr), np.unique(scores))  # candidates are exactly the unique scores


def test_eer_tie_break_and_unbounded_scores():
    # At 20: FAR 1/2, FRR 0; at 30: FAR 1/2, FRR 1. |FAR-FRR| = 1/2 at both: the smaller threshold wins.
    scores = np.array([-5.0, 20.0, 30.0])
    labels = np.array([0, 1, 0])
    eer, t = eer_threshold(scores, labels)
    assert t == 20.0
    assert eer == 0.25  # (1/2 + 0) / 2; the other tied point would give 0.75
    # Logits far outside [0, 1] work (a fixed [0, 1] grid would not find this threshold).
    eer, t = eer_threshold(np.array([-300.0, -200.0, 100.0, 250.0]), np.array([0, 0, 1, 1]))
    assert (eer, t) == (0.0, 100.0)


def test_far_frr_and_hter_by_hand_with_tie_at_threshold():
    live = [0.9, 0.8, 0.4, 0.5]
    attack = [0.1, 0.5, 0.6, 0.3]
    scores, labels = np.array(live + attack), np.array([1] * 4 + [0] * 4)
    # threshold 0.5: live 0.4 rejected (FRR 1/4); attacks 0.5 (tie -> accepted) and 0.6 accepted (FAR 2/4)
    assert far_frr(scores, labels, 0.5) == (0.5, 0.25)
    assert hter(scores, labels, 0.5) == 0.375
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    k = np.flatnonzero(thr == 0.5)[0]
    assert (fpr[k], 1 - tpr[k]) == (0.5, 0.25)


@pytest.mark.parametrize("seed", range(3))
def test_auc_matches_sklearn_with_ties(seed):
    scores, labels = _tied_scores(seed)
    assert auc(scores, labels) == roc_auc_score(labels, scores)
    assert auc(scores, labels) != pytest.approx(roc_auc_score(1 - labels, scores))  # live is the positive


def test_apcer_per_type_is_max_over_types_not_pooled():
    scores = np.array([0.9, 0.7, 0.6, 0.2, 0.1, 0.1, 0.1, 0.9])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    types = ["print", "print", "replay", "replay", "replay", "replay", "ignored", "anything"]
    r = apcer_bpcer(scores, labels, 0.5, types)
    assert r["apcer_per_type"] == {"print": 1.0, "replay": 0.25}
    assert r["apcer"] == 1.0 and r["apcer_pooled"] is False
    assert r["bpcer"] == 0.5 and r["acer"] == 0.75
    assert r["n_attack_per_type"] == {"print": 2, "replay": 4}
    pooled = apcer_bpcer(scores, labels, 0.5)
    assert pooled["apcer"] == pytest.approx(3 / 6) and pooled["apcer_pooled"] is True
    assert pooled["apcer_per_type"] == {}
    assert pooled["apcer"] == far_frr(scores, labels, 0.5)[0]


@pytest.mark.parametrize("seed", range(5))
def test_bpcer_at_apcer_pooled_matches_roc(seed):
    scores, labels = _tied_scores(seed, n=400)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    for target in (0.0, 0.01, 0.05, 0.2):
        assert bpcer_at_apcer(scores, labels, target) == pytest.approx(1 - tpr[fpr <= target].max())


def test_bpcer_at_apcer_with_types_uses_worst_type():
    # 100 print attacks at low scores, 1 replay attack at 0.95; live spread over [0.5, 1).
    scores = np.concatenate([np.linspace(0.0, 0.4, 100), [0.95], np.linspace(0.5, 0.99, 50)])
    labels = np.array([0] * 101 + [1] * 50)
    types = ["print"] * 100 + ["replay"] + [""] * 50
    # pooled: 1/101 attacks accepted at 0.95 is <= 1%, so the threshold can sit at the lowest live score
    assert bpcer_at_apcer(scores, labels, 0.01) == 0.0
    # per type: replay's APCER is 100% unless the threshold is above 0.95
    live = scores[labels == 1]
    assert bpcer_at_apcer(scores, labels, 0.01, types) == pytest.approx(np.mean(live <= 0.95))
    # nothing feasible below +inf when a target of 0 meets an attack above every live score
    assert bpcer_at_apcer([0.1, 0.9], [1, 0], 0.0) == 1.0


def test_dev_threshold_is_applied_to_test():
    dev = ScoreSet([0.1, 0.2, 0.3, 0.6, 0.7, 0.8], [0, 0, 0, 1, 1, 1])
    test = ScoreSet([0.1, 0.35, 0.65, 0.4, 0.55, 0.9], [0, 0, 0, 1, 1, 1])
    dev_eer, dev_t = eer_threshold(dev.scores, dev.labels)
    test_eer, test_t = eer_threshold(test.scores, test.labels)
    assert dev_t != test_t
    r = evaluate_scores(test, dev)
    assert r["threshold_source"] == "dev"
    frame = r["frame"]
    assert frame["threshold"] == dev_t == 0.6
    assert frame["dev_eer"] == dev_eer == 0.0
    # at 0.6: attack 0.65 accepted (FAR 1/3); live 0.4, 0.55 rejected (FRR 2/3)
    assert frame["hter"] == pytest.approx(0.5) == hter(test.scores, test.labels, 0.6)
    # the test set's own EER point is 0.55 (FAR = FRR = 1/3), an optimistic 1/3
    assert (test_eer, test_t) == (pytest.approx(1 / 3), 0.55)
    assert frame["eer"] == test_eer and frame["hter"] != pytest.approx(test_eer)
    assert frame["apcer"] == pytest.approx(1 / 3) and frame["bpcer"] == pytest.approx(2 / 3)
    assert "video" not in r
    json.dumps(r)  # JSON-serialisable


def test_threshold_from_test_is_recorded():
    test = ScoreSet([0.1, 0.35, 0.5, 0.4, 0.55, 0.9], [0, 0, 0, 1, 1, 1])
    r = evaluate_scores(test)
    assert r["threshold_source"] == "test"
    assert r["frame"]["threshold"] == r["frame"]["eer_threshold"]
    assert r["frame"]["hter"] == r["frame"]["eer"]  # why a test-set threshold is optimistic
    assert "dev_eer" not in r["frame"]


def test_video_level_averages_frames():
    v = video_level(
        scores=[0.2, 0.4, 0.9, 0.7, 0.8, 0.3],
        labels=[0, 0, 1, 1, 1, 0],
        videos=["a", "a", "b", "b", "b", "c"],
        attack_types=["print", "print", "", "", "", "replay"],
    )
    assert list(v.videos) == ["a", "b", "c"]
    np.testing.assert_allclose(v.scores, [0.3, 0.8, 0.3])
    assert list(v.labels) == [0, 1, 0]
    assert list(v.attack_types) == ["print", "", "replay"]


def test_video_level_metrics_in_evaluate_scores():
    test = ScoreSet(
        [0.1, 0.9, 0.45, 0.45, 0.6, 0.2], [0, 0, 1, 1, 1, 1], videos=["a1", "a1", "l1", "l1", "l2", "l2"]
    )
    r = evaluate_scores(test)
    # per video: a1 -> 0.5 (attack), l1 -> 0.45, l2 -> 0.4 (live): the attack out-scores every live video
    assert r["video"]["auc"] == 0.0
    assert r["video"]["n_bona_fide"] == 2 and r["video"]["n_attack"] == 1
    assert r["frame"]["n_bona_fide"] == 4
    with pytest.raises(ValueError, match="dev scores do not"):
        evaluate_scores(test, ScoreSet([0.1, 0.9], [0, 1]))


def test_video_level_rejects_mixed_labels_and_types():
    with pytest.raises(ValueError, match="'v'.*label"):
        video_level([0.1, 0.9, 0.5], [0, 1, 0], ["v", "v", "w"])
    with pytest.raises(ValueError, match="attack type"):
        video_level([0.1, 0.2, 0.9], [0, 0, 1], ["v", "v", "w"], ["print", "replay", ""])


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, float("nan")], [0, 1], "finite"),
        ([0.1, float("inf")], [0, 1], "finite"),
        ([0.1, 0.2], [0, 2], "0 \\(attack\\) or 1"),
        ([0.1, 0.2], [-1, 1], "0 \\(attack\\) or 1"),
        ([0.1, 0.2], [1, 1], "both classes"),
        ([0.1, 0.2, 0.3], [0, 1], "length mismatch"),
        ([], [], "empty"),
        ([[0.1, 0.9], [0.8, 0.2]], [0, 1], "1-D"),
        ([0.1, 0.2], ["0", "1"], "numeric"),
    ],
)
def test_bad_input_raises(scores, labels, match):
    for fn in (lambda: eer_threshold(scores, labels), lambda: ScoreSet(scores, labels)):
        with pytest.raises(ValueError, match=match):
            fn()


def test_bad_threshold_and_missing_attack_type():
    with pytest.raises(ValueError, match="NaN"):
        hter([0.1, 0.9], [0, 1], float("nan"))
    with pytest.raises(ValueError, match="attack types missing at index 0"):
        apcer_bpcer([0.1, 0.9], [0, 1], 0.5, [None, "print"])


def test_oulu_species():
    assert [oulu_species(c) for c in (2, 3, "4", 5)] == ["print", "print", "replay", "replay"]
    assert oulu_species("print/2") == "print" and oulu_species("video_replay/1") == "replay"
    for bad in (1, "1", 6, "mask"):
        with pytest.raises(ValueError, match="OULU"):
            oulu_species(bad)


def test_mean_std_over_folds_uses_sample_std():
    folds = [{"acer": a, "per": {"print": a / 2}, "src": "dev"} for a in (0.1, 0.2, 0.6)]
    r = mean_std_over_folds(folds)
    assert r["n_folds"] == 3 and "ddof=1" in r["std_estimator"]
    assert r["metrics"]["acer"]["mean"] == pytest.approx(0.3)
    assert r["metrics"]["acer"]["std"] == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert r["metrics"]["per"]["print"]["std"] == pytest.approx(np.std([0.05, 0.1, 0.3], ddof=1))
    assert r["metrics"]["src"] == "dev"
    with pytest.raises(ValueError, match="at least 2"):
        mean_std_over_folds(folds[:1])
    with pytest.raises(ValueError, match="keys"):
        mean_std_over_folds([{"acer": 0.1}, {"bpcer": 0.1}])


def test_mean_std_over_folds_of_evaluate_scores():
    folds = [evaluate_scores(ScoreSet(*_tied_scores(seed))) for seed in range(3)]
    r = mean_std_over_folds(folds)
    hters = [f["frame"]["hter"] for f in folds]
    assert r["metrics"]["frame"]["hter"]["mean"] == pytest.approx(np.mean(hters))
    assert r["metrics"]["threshold_source"] == "test"


def _png_ok(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_roc_det_writes_png(tmp_path):
    test = ScoreSet(*_tied_scores(0))
    dev = ScoreSet(*_tied_scores(1))
    species = np.where(np.arange(test.labels.size) % 2, "print", "replay")
    test.attack_types = np.where(test.labels == 0, species, "")
    out = plot_roc_det(test, dev, tmp_path / "curves.png")
    assert _png_ok(out)
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temp file left behind
    assert matplotlib.image.imread(out).ndim == 3


# ---------------------------------------------------------------- CLI


def _write_csv(path, scores, labels, types=None, videos=None, extra=True):
    header = ["score", "label"] + (["attack_type"] if types is not None else [])
    header += (["video"] if videos is not None else []) + (["note"] if extra else [])
    lines = [",".join(header)]
    for i, (s, y) in enumerate(zip(scores, labels, strict=True)):
        row = [repr(float(s)), str(int(y))]
        row += [types[i]] if types is not None else []
        row += [videos[i]] if videos is not None else []
        row += ["x"] if extra else []
        lines.append(",".join(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    metrics_cli.add_arguments(parser)
    return metrics_cli.run(parser.parse_args(list(argv)))


def test_cli_json_matches_library(tmp_path, capsys):
    ts, tl = _tied_scores(0)
    ds, dl = _tied_scores(1)
    types = ["print" if (i // 4) % 2 else "replay" for i in range(tl.size)]  # one type per video
    videos = [f"v{i // 4}_{tl[i]}" for i in range(tl.size)]  # a video never mixes labels
    test_csv = _write_csv(tmp_path / "test.csv", ts, tl, types, videos)
    dev_videos = [f"d{i // 4}_{dl[i]}" for i in range(dl.size)]
    dev_csv = _write_csv(tmp_path / "dev.csv", ds, dl, videos=dev_videos)
    assert _cli("--scores", str(test_csv), "--dev", str(dev_csv), "--json") == 0
    out, err = capsys.readouterr()
    got = json.loads(out)
    want = evaluate_scores(
        ScoreSet(ts, tl, np.where(tl == 0, types, ""), videos), ScoreSet(ds, dl, videos=dev_videos)
    )
    assert got == want
    assert set(got["frame"]["apcer_per_type"]) == {"print", "replay"}
    assert "notice" not in err


def test_cli_table_and_notice_without_dev(tmp_path, capsys):
    ts, tl = _tied_scores(2)
    test_csv = _write_csv(tmp_path / "test.csv", ts, tl)
    plot = tmp_path / "out" / "curves.png"
    assert _cli("--scores", str(test_csv), "--plot", str(plot)) == 0
    out, err = capsys.readouterr()
    assert "threshold" in err and "test set" in err and "optimistic" in err
    for row in ("APCER (all attacks pooled", "BPCER", "ACER", "HTER", "EER (test)", "AUC", "BPCER@APCER=1%"):
        assert row in out
    assert _png_ok(plot)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("score,label\n0.1,0\n0.x,1\n", r"bad\.csv, line 3, column 'score'"),
        ("score,label\n0.1,0\n0.9,yes\n", r"bad\.csv, line 3, column 'label'"),
        ("score,label\n0.1,0\nnan,1\n", r"line 3, column 'score': must be finite"),
        ("score,label\n0.1,0\n0.9\n", r"line 3, column 'label': empty"),
        ("0.1,0\n0.9,1\n", r"bad\.csv, line 1: missing column"),
        ("score,label,attack_type\n0.1,0,\n0.9,1,\n", r"line 2, column 'attack_type'"),
        ("score,label\n0.1,1\n0.9,1\n", r"bad\.csv: both classes"),
        ("", r"missing column"),
    ],
)
def test_cli_bad_csv_exits_2(tmp_path, capsys, text, match):
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    assert _cli("--scores", str(bad), "--json") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    assert re.search(match, err), err


def test_cli_missing_file_exits_2(tmp_path, capsys):
    assert _cli("--scores", str(tmp_path / "nope.csv")) == 2
    assert "nope.csv" in capsys.readouterr().err


def test_result_has_no_nan():
    r = evaluate_scores(ScoreSet(*_tied_scores(4)))
    assert all(math.isfinite(v) for v in r["frame"].values() if isinstance(v, float))
