"""kdkit.run.build.model_from_recipe: a recipe's model by its key (kdkit 0.2 called it
`build_recipe_model`, a name too close to `kdkit.models.build_model`)."""

from __future__ import annotations

import pytest
from conftest import tiny_recipe_dict

from kdkit.config.loading import apply_overrides
from kdkit.config.schema import RecipeError
from kdkit.config.validation import parse_recipe
from kdkit.run.build import model_from_recipe


def test_model_from_recipe_builds_the_keyed_model_and_names_the_key_of_a_bad_one() -> None:
    recipe = parse_recipe(tiny_recipe_dict())
    student = model_from_recipe(recipe, "student", "pipeline.student_alone.model")
    assert student.embed_dim == 32  # the recipe's `student`, not its teacher (48 wide)
    bad = parse_recipe(apply_overrides(tiny_recipe_dict(), ["models.student.options.no_such_option=1"]))
    with pytest.raises(RecipeError, match=r"models\.student"):
        model_from_recipe(bad, "student", "pipeline.student_alone.model")


def test_its_0_2_name_still_imports_from_the_0_2_path() -> None:
    from kdkit.build import build_recipe_model

    assert build_recipe_model is model_from_recipe
