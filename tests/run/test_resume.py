"""Which stages a resumed run with a changed recipe keeps (`kdkit.run.resume`): no training here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe_dict

from kdkit.config.loading import apply_overrides
from kdkit.config.validation import parse_recipe
from kdkit.run.resume import plan_resume, stages_to_rerun

BASE = parse_recipe(tiny_recipe_dict())  # teacher → student_kd (learns from it) → student_alone → test


def rerun(*overrides: str) -> dict[str, str]:
    return stages_to_rerun(BASE, parse_recipe(apply_overrides(tiny_recipe_dict(), list(overrides))))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # the teacher's schedule: the teacher, the student that learns from it, and the table
        (["pipeline.teacher.train.epochs=3"], ["teacher", "student_kd", "test"]),
        # the student model: both students (baseline and distilled), not the teacher
        (["models.student.options.depth=1"], ["student_kd", "student_alone", "test"]),
        (["pipeline.student_alone.train.lr=0.01"], ["student_alone", "test"]),
        (["distill.select=mean"], ["student_kd", "test"]),
        (["pipeline.test.split=val"], ["test"]),
        (["train.seed=3"], ["teacher", "student_kd", "student_alone", "test"]),
        (["name=renamed", "plugins=[]"], []),  # nothing any stage reads
    ],
)
def test_a_change_reruns_the_stages_that_depend_on_it(overrides: list[str], expected: list[str]) -> None:
    assert list(rerun(*overrides)) == expected


def test_the_reasons_name_the_keys_and_the_stage_read() -> None:
    assert rerun("pipeline.teacher.train.epochs=3") == {
        "teacher": "its inputs changed at train.epochs",
        "student_kd": "it reads teacher, which runs again",
        "test": "it reads teacher, student_kd, which run again",
    }


def test_a_new_and_a_removed_stage(tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(BASE.to_dict()))
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "done.json").write_text("{}")
    data = tiny_recipe_dict()
    data["pipeline"] = [
        data["pipeline"][0],
        {"name": "kd2", "do": "distill"},
        {"name": "test", "do": "evaluate", "runs": ["teacher", "kd2"], "split": "test"},
    ]
    plan = plan_resume(tmp_path, parse_recipe(data))
    assert plan.kept == ["teacher"]
    assert plan.rerun == {"kd2": "a new stage", "test": "its inputs changed at baseline, runs"}
    assert plan.dropped == ["student_kd", "student_alone"]
