"""Several teachers in one distill stage (`distill.teachers`, issue 28): the plan, the build, the
loss terms against `TeacherCombiner`, errors by key path, validate's tables, a run end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, tiny_recipe_dict, vit_options

from kdkit.cli import main
from kdkit.config import loading
from kdkit.config.loading import apply_overrides
from kdkit.config.schema import RecipeError
from kdkit.config.validation import parse_recipe
from kdkit.distill.distiller import Distiller
from kdkit.distill.several_teachers import SeveralTeachers
from kdkit.distill.teacher_ensemble import TeacherCombiner, ca_mkd_weights
from kdkit.run.build import build_distiller
from kdkit.run.checks import check_stage_settings
from kdkit.run.stage_cache import stage_inputs, stage_upstream
from kdkit.utils.checkpoint import load_file, seed_everything

TWO_TEACHERS = REPO / "recipes" / "digits-two-teachers.yaml"
# a tiny timm ResNet for 1-channel 16 px images (layer2: a 2×2 map, laid out on the ViT's 4×4 grid)
TINY_RESNET = {"in_chans": 1, "num_classes": 10, "channels": [8, 16, 32, 64], "stem_width": 8}
IMAGES = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 3, -1, 9])  # one unlabelled sample: the combiner handles it


def two_teacher_dict() -> dict[str, Any]:
    """recipes/digits-two-teachers.yaml shrunk to seconds: 16 px, tiny models, 1 epoch of 2 steps."""
    data = yaml.safe_load(TWO_TEACHERS.read_text())
    models = data["models"]
    models["vit_teacher"]["options"] = vit_options(embed_dim=48, depth=6)
    models["cnn_teacher"] = {"name": "resnet10t", "options": TINY_RESNET}
    models["student"]["options"] = vit_options(embed_dim=32, depth=3)
    data["data"].update(image_size=16, batch_size=16)
    data["train"].update(epochs=1, max_steps_per_epoch=2, warmup_epochs=0, log_every=1, device="cpu")
    return data


def _distill_dict(**distill: Any) -> dict[str, Any]:
    """The tiny recipe with a second teacher model; `teachers` replace its `teacher: teacher`."""
    data = tiny_recipe_dict()
    data["models"]["teacher2"] = {"name": "vit_tiny_patch16_224", "options": vit_options(embed_dim=40)}
    if "teachers" in distill:
        del data["distill"]["teacher"]
    data["distill"].update(distill)
    return data


def _problems(data: dict[str, Any]) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    return "\n".join(info.value.problems)


def test_the_recipe_plans_both_teachers_with_their_trained_stages_and_inputs() -> None:
    recipe = parse_recipe(yaml.safe_load(TWO_TEACHERS.read_text()))
    stage = recipe.plan.stage("student_kd")
    assert [(t.model, t.stage, t.weight) for t in stage.teachers] == [
        ("vit_teacher", "vit_teacher", 1.0),
        ("cnn_teacher", "cnn_teacher", 1.0),
    ]
    assert [t.distill.adapter for t in stage.teachers] == ["projection", "procrustes"]
    assert stage_upstream(recipe, stage.spec) == ["vit_teacher", "cnn_teacher"]
    inputs = stage_inputs(recipe, stage.spec)
    assert set(inputs["models"]) == {"student", "vit_teacher", "cnn_teacher"}
    assert inputs["distill"]["teacher_combine"] == "ensemble"


def test_one_teacher_in_teachers_is_the_single_teacher_distiller_bit_for_bit() -> None:
    # projection adapters have weights: their state-dict keys must stay `adapters.N`
    one = parse_recipe(_distill_dict(adapter="projection"))
    # digits-kd.yaml's `teacher: teacher` is the default's value: it may stay beside `teachers`
    listed = parse_recipe(_distill_dict(adapter="projection", teachers=[{"teacher": "teacher"}]))
    outputs, grads = [], []
    for recipe in (one, listed):
        seed_everything(0)
        task = build_distiller(recipe, recipe.plan.stage("student_kd").spec, example=IMAGES)
        assert type(task) is Distiller
        out = task(IMAGES, LABELS)
        out["loss"].backward()
        outputs.append({k: v.detach() for k, v in out.items()})
        grads.append({n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None})
        keys = set(task.trainable_state_dict())
    for name in outputs[0]:
        assert torch.equal(outputs[0][name], outputs[1][name]), name
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert {k.split(".")[0] for k in keys} == {"student", "adapters"}


@pytest.fixture(scope="module")
def two_teachers() -> SeveralTeachers:
    """Two ViT teachers of different widths with weights 3 and 1, one pair each, combined by 'weighted'."""
    data = _distill_dict(
        teacher_combine="weighted",
        teachers=[
            {"teacher": "teacher", "weight": 3.0, "adapter": "projection"},
            {"teacher": "teacher2", "weight": 1.0, "adapter": "procrustes", "pairs": [[2, 2]]},
        ],
    )
    recipe = parse_recipe(data)
    seed_everything(0)
    task = build_distiller(recipe, recipe.plan.stage("student_kd").spec, example=IMAGES)
    assert isinstance(task, SeveralTeachers)
    return task.eval()


def test_two_teachers_logit_term_is_the_combiners_and_features_are_weighted(
    two_teachers: SeveralTeachers,
) -> None:
    task = two_teachers
    out = task(IMAGES, LABELS)
    t_logits = [branch.teacher_outputs(IMAGES)["logits"].float() for branch in task.branches]
    expected = TeacherCombiner("weighted", "kl", {}, [3.0, 1.0])(out["logits"].float(), t_logits, LABELS, 3.0)
    torch.testing.assert_close(out["kd"], expected.loss, rtol=0, atol=0)
    own = [branch(IMAGES, LABELS)["feat"] for branch in task.branches]  # each teacher alone
    torch.testing.assert_close(out["feat.t0"], own[0], rtol=0, atol=0)
    torch.testing.assert_close(out["feat.t1"], own[1], rtol=0, atol=0)
    torch.testing.assert_close(out["feat"], (3 * own[0] + own[1]) / 4)
    assert {"feat.t0.0", "feat.t0.1", "feat.t1.0"} <= out.keys()
    ce = out["ce"]
    torch.testing.assert_close(out["loss"], 0.3 * ce + 0.7 * out["kd"] + 1.0 * out["feat"])


def test_each_teachers_logit_term_and_weight_are_logged(two_teachers: SeveralTeachers) -> None:
    """`kd.t<k>` is the loss against teacher k alone (under 'weighted' the combined term is their
    weighted sum) and `kd_weight.t<k>` its weight; under ca_mkd the weights are the batch's mean."""
    out = two_teachers(IMAGES, LABELS)
    t_logits = [branch.teacher_outputs(IMAGES)["logits"].float() for branch in two_teachers.branches]
    alone = TeacherCombiner("weighted", "kl", {}, [1.0])
    for k, z in enumerate(t_logits):
        torch.testing.assert_close(out[f"kd.t{k}"], alone(out["logits"].float(), [z], LABELS, 3.0).loss)
    torch.testing.assert_close(out["kd"], 0.75 * out["kd.t0"] + 0.25 * out["kd.t1"])
    assert (out["kd_weight.t0"].item(), out["kd_weight.t1"].item()) == (0.75, 0.25)
    assert not out["kd.t0"].requires_grad  # logged, never trained on
    two_teachers.combiner = TeacherCombiner("ca_mkd", "kl")
    try:
        out = two_teachers(IMAGES, LABELS)
    finally:
        two_teachers.combiner = TeacherCombiner("weighted", "kl", {}, [3.0, 1.0])
    expected = ca_mkd_weights(t_logits, LABELS).mean(dim=0)
    torch.testing.assert_close(torch.stack([out["kd_weight.t0"], out["kd_weight.t1"]]), expected)


def test_two_teachers_train_student_and_adapters_only_and_their_state_round_trips(
    two_teachers: SeveralTeachers,
) -> None:
    task = two_teachers
    task.zero_grad()
    task(IMAGES, LABELS)["loss"].backward()
    teachers = [p for b in task.branches for p in b.teacher.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teachers)
    assert task.student.head.weight.grad is not None
    state = task.trainable_state_dict()
    assert {k.split(".")[0] for k in state} == {"student", "teachers"}
    assert any(k.startswith("teachers.0.adapters.") for k in state)
    changed = {k: v + 1 for k, v in state.items()}
    task.load_trainable_state_dict(changed)
    after = task.trainable_state_dict()
    assert all(torch.equal(after[k], changed[k]) for k in changed)
    task.load_trainable_state_dict(state)
    assert task.branches[0].teacher.training is False and task.train().branches[1].teacher.training is False
    task.eval()


def test_a_stages_own_teachers_replace_the_top_level_teacher_and_back() -> None:
    data = _distill_dict(teacher="teacher2")
    data["pipeline"][1]["distill"] = {"teachers": [{"teacher": "teacher"}, {"teacher": "teacher2"}]}
    stage = parse_recipe(data).plan.stage("student_kd")
    assert [t.model for t in stage.teachers] == ["teacher", "teacher2"]
    data["pipeline"][1]["distill"]["teacher"] = "teacher"
    assert "pipeline.student_kd.distill: give either teacher ('teacher') or teachers" in _problems(data)
    data = _distill_dict(teachers=[{"teacher": "teacher"}, {"teacher": "teacher2"}])
    data["pipeline"][1]["distill"] = {"teacher": "teacher2"}  # one teacher for this stage
    assert [t.model for t in parse_recipe(data).plan.stage("student_kd").teachers] == ["teacher2"]


def test_teacher_and_teachers_at_the_top_level_is_refused_even_with_the_default_name() -> None:
    """`teacher: teacher` is the default value, so only the mapping as written shows it was given."""
    data = _distill_dict(teachers=[{"teacher": "teacher"}, {"teacher": "teacher2"}])
    data["distill"]["teacher"] = "teacher"
    assert (
        "distill: give either teacher ('teacher') or teachers (a list), not both; remove distill.teacher"
        in (_problems(data))
    )


@pytest.mark.parametrize(
    ("distill", "expected"),
    [
        (
            {"teacher": "teacher2", "teachers": [{"teacher": "teacher"}]},
            "distill: give either teacher ('teacher2') or teachers",
        ),
        (
            {"teachers": [{"teacher": "teacher"}, {"teacher": "nope"}]},
            "pipeline.student_kd.distill.teachers[1].teacher: expected a model key",
        ),
        (
            {"teachers": [{"teacher": "teacher", "weight": -1}, {"teacher": "teacher2"}]},
            "pipeline.student_kd.distill.teachers[0].weight: expected a value >= 0, got -1",
        ),
        (
            {"teachers": [{"teacher": "teacher"}, {"teacher": "teacher2", "pairs": "uniform:x"}]},
            "pipeline.student_kd.distill.teachers[1].pairs: expected a list of pairs or 'uniform:N'",
        ),
        (
            {"teachers": [{"teacher": "teacher"}, {"teacher": "teacher2", "adaptr": "gram"}]},
            "distill.teachers[1].adaptr: unknown key. Did you mean 'adapter'?",
        ),
        (
            {"teachers": [{"teacher": "teacher"}], "teacher_combine": "ensembel"},
            "pipeline.student_kd.distill.teacher_combine: expected one of ['ca_mkd', 'ensemble', 'weighted']",
        ),
    ],
)
def test_bad_teachers_are_reported_by_key_path(distill: dict[str, Any], expected: str) -> None:
    assert expected in _problems(_distill_dict(**distill))


def test_a_teachers_unknown_adapter_is_reported_under_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _distill_dict(teachers=[{"teacher": "teacher"}, {"teacher": "teacher2", "adapter": "linear"}])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "pipeline.student_kd.distill.teachers[1].adapter: unknown adapter 'linear'" in err


@pytest.mark.parametrize(
    ("distill", "expected"),
    [
        (
            {
                "teacher_combine": "ca_mkd",
                "teachers": [{"teacher": "teacher", "weight": 2}, {"teacher": "teacher2"}],
            },
            "distill.teachers: weights: teacher combiner 'ca_mkd' computes each sample's teacher weights",
        ),
        (
            {
                "teacher_combine": "ca_mkd",
                "logit_loss": "dkd",
                "teachers": [{"teacher": "teacher"}, {"teacher": "teacher2"}],
            },
            "distill.teacher_combine: teacher combiner 'ca_mkd' works with logit loss 'kl' only, got 'dkd'",
        ),
    ],
)
def test_a_combiner_that_cannot_take_the_loss_or_weights_is_refused_before_any_work(
    distill: dict[str, Any], expected: str
) -> None:
    recipe = parse_recipe(_distill_dict(**distill))
    with pytest.raises(RecipeError) as info:
        check_stage_settings(recipe)
    assert any(expected in problem for problem in info.value.problems)


def test_validate_prints_a_tap_table_per_teacher(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(two_teacher_dict(), sort_keys=False))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "stage 'student_kd', teacher 0 'vit_teacher': layer pairs" in out
    assert "stage 'student_kd', teacher 1 'cnn_teacher': layer pairs" in out
    assert "layer2 [grid:4]" in out


@pytest.mark.slow
def test_a_two_teacher_recipe_runs_end_to_end_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    data = two_teacher_dict()
    data["pipeline"] = data["pipeline"][:3]  # the two teachers and the student learning from both
    Path("two.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["run", "two.yaml", "--out", "run"]) == 0
    run = Path("run")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kd_steps = [line for line in lines if line.get("stage") == "student_kd" and "train/kd" in line]
    assert kd_steps and {"train/feat.t0", "train/feat.t1"} <= kd_steps[-1].keys()
    model = load_file(run / "student_kd" / "model.pt")
    assert [t["model"] for t in model["teachers"]] == ["vit_teacher", "cnn_teacher"]
    assert model["teachers"][1]["path"] == str((run / "cnn_teacher" / "model.pt").resolve())
    before = (run / "student_kd" / "model.pt").read_bytes()
    capsys.readouterr()
    # as if interrupted after its last checkpoint: --resume loads last.pt (student, both teachers' adapters)
    (run / "student_kd" / "done.json").unlink()
    assert any(
        k.startswith("teachers.0.adapters.") for k in load_file(run / "student_kd" / "last.pt")["trainable"]
    )
    assert main(["run", "two.yaml", "--out", "run", "--resume"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "[vit_teacher] complete, skipped (resume)" in err
    assert "[student_kd] resumed from run/student_kd/last.pt" in err
    assert (run / "student_kd" / "model.pt").read_bytes() == before  # same seed, same teachers


def test_bench_times_each_teachers_share_of_a_two_teacher_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(two_teacher_dict(), sort_keys=False))
    argv = [
        "bench",
        str(path),
        "--steps",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--batch",
        "4",
        "--no-data",
    ]
    assert main([*argv, "--modes", "student,distill,cached", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "this stage has 2" in report["modes"]["cached"]["unavailable"]  # (c) times one teacher's cache
    teachers = report["teachers"]
    assert [(t["model"], t["stage"]) for t in teachers] == [
        ("vit_teacher", "vit_teacher"),
        ("cnn_teacher", "cnn_teacher"),
    ]
    assert all(t["forward_ms"] > 0 and t["share_of_distill_step"] > 0 for t in teachers)
    flops = report["forward_gflops_per_image"]
    assert flops["teacher"] == pytest.approx(sum(t["forward_gflops_per_image"] for t in teachers))
    assert flops["teachers"][0] != flops["teachers"][1]  # a ViT and a ResNet, each counted
    distill = report["modes"]["distill"]
    assert distill["tflops_per_s"] == pytest.approx(
        (3 * flops["student"] + flops["teacher"]) * distill["img_per_s"] / 1000
    )
    assert main([*argv, "--modes", "distill"]) == 0
    out = capsys.readouterr().out
    assert "teacher 1 cnn_teacher (stage cnn_teacher): forward" in out and "of (b)'s step" in out


def test_an_override_of_one_teacher_form_replaces_the_other(capsys: pytest.CaptureFixture[str]) -> None:
    """`--set distill.teachers=[...]` on a recipe that names its `teacher` (a `--vary` of teachers,
    say) replaces it with a note; setting both at once is still refused."""
    loading._note_once.cache_clear()  # notes print once per process
    data = apply_overrides(_distill_dict(), ["distill.teachers=[{teacher: teacher}, {teacher: teacher2}]"])
    assert "teacher" not in data["distill"] and len(data["distill"]["teachers"]) == 2
    assert "note: distill.teachers replaces its teacher" in capsys.readouterr().err
    assert [t.model for t in parse_recipe(data).plan.stage("student_kd").teachers] == ["teacher", "teacher2"]
    back = apply_overrides(data, ["distill.teacher=teacher2"])
    assert "teachers" not in back["distill"] and back["distill"]["teacher"] == "teacher2"
    both = apply_overrides(
        _distill_dict(), ["distill.teachers=[{teacher: teacher2}]", "distill.teacher=teacher"]
    )
    assert "distill: give either teacher ('teacher') or teachers" in _problems(both)


def test_a_resolved_two_teacher_recipe_parses_back_to_itself() -> None:
    """A run's recipe.yaml (`Recipe.to_dict`) names the teachers in one form, so resume reads it."""
    recipe = parse_recipe(_distill_dict(teachers=[{"teacher": "teacher"}, {"teacher": "teacher2"}]))
    assert "teacher" not in recipe.to_dict()["distill"]
    assert parse_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe
