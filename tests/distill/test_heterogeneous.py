"""Teachers of another architecture: CNN (timm ResNet, ConvNeXt, MobileNet) ↔ ViT layer pairs,
compared as vectors (a pooled map ↔ a class token) or position by position (`grid`, `grid:S`),
built from a recipe as `kdkit run` builds them, and shown by `kdkit validate`."""

from __future__ import annotations

import re
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, tiny_recipe_dict, tiny_vit, vit_options

from kdkit.cli import main
from kdkit.config.schema import RecipeError
from kdkit.config.validation import parse_recipe
from kdkit.distill.distiller import Distiller
from kdkit.distill.pairs import layer_pairs
from kdkit.distill.relations import at
from kdkit.distill.taps import Tap, block_taps, find_preset, select_features
from kdkit.run.build import build_distiller

# tiny timm CNNs for 1-channel 32 px images: at 32 px ResNet's layer1 is an 8×8 map, layer2 4×4
RESNET = {
    "name": "resnet10t",
    "options": {"in_chans": 1, "num_classes": 10, "channels": [8, 16, 32, 64], "stem_width": 8},
}
CONVNEXT = {
    "name": "convnext_atto",
    "options": {"in_chans": 1, "num_classes": 10, "dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]},
}
# 32 px in 8-pixel patches: a 4×4 grid of tokens after the class token
VIT = {"name": "vit_tiny_patch16_224", "options": vit_options(32, 2, img_size=32, patch_size=8)}
IMAGES = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 3, 7, 9])
WIDTH_BRIDGES = ("projection", "mlp", "orthogonal", "procrustes", "covariance", "cka", "gram")


def hetero_recipe(teacher: dict[str, Any], student: dict[str, Any], **distill: Any) -> dict[str, Any]:
    """The tiny digits recipe at 32 px with these models and distill settings."""
    data = tiny_recipe_dict()
    data["data"]["image_size"] = 32
    data["models"] = {"teacher": teacher, "student": student}
    data["distill"].update(distill)
    return data


def distiller_of(data: dict[str, Any]) -> Distiller:
    """The distill stage's Distiller, sized on IMAGES (no data set is built)."""
    recipe = parse_recipe(data)
    return build_distiller(recipe, recipe.pipeline[1], example=IMAGES)


def build_problem(data: dict[str, Any]) -> str:
    """The one problem building the distill stage reports."""
    with pytest.raises(RecipeError) as info:
        distiller_of(data)
    (problem,) = info.value.problems
    return problem


# ------------------------------------------------------------------------------ vectors
DIRECTIONS = {
    # ViT blocks 1, 2 (class token) learn from ResNet layer2, layer4 (averaged)
    "resnet->vit": (RESNET, VIT, [[1, 2], [2, 4]], [((4, 32), (4, 16)), ((4, 32), (4, 64))]),
    # ConvNeXt stages 2, 4 (averaged) learn from ViT blocks 1, 2 (class token)
    "vit->convnext": (VIT, CONVNEXT, [[2, 1], [4, 2]], [((4, 16), (4, 32)), ((4, 64), (4, 32))]),
}


@pytest.mark.parametrize("adapter", WIDTH_BRIDGES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_a_pooled_map_and_a_class_token_bridge_with_every_width_adapter(direction: str, adapter: str) -> None:
    teacher, student, pairs, shapes = DIRECTIONS[direction]
    task = distiller_of(hetero_recipe(teacher, student, adapter=adapter, pairs=pairs))
    try:
        assert task.shapes == shapes  # no `select`: each model's own default, cls or mean
        selects = {(p.student.select, p.teacher.select) for p in task.pairs}
        assert selects == {("cls", "mean")} if direction == "resnet->vit" else {("mean", "cls")}
        out = task(IMAGES, LABELS)
        assert torch.isfinite(out["feat"]) and out["feat"] > 0
        out["feat"].backward()  # the feature term alone reaches the student's first block
        first = task.student.blocks[0] if direction == "resnet->vit" else task.student.stages[0]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())
    finally:
        task.close()


def test_a_class_token_asked_of_a_cnn_names_the_tap_and_the_selectors_that_fit() -> None:
    problem = build_problem(hetero_recipe(RESNET, VIT, adapter="projection", pairs=[[1, 2]], select="cls"))
    assert problem.startswith("pipeline.student_kd.distill: tap 'feat.0' (layer2, output): selector 'cls'")
    assert "(4, 16, 4, 4)" in problem and "'grid'" in problem and "Leave select unset" in problem


@pytest.fixture(scope="module")
def mobilenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mobilenetv3_small_050", in_chans=1, num_classes=10).eval()


def test_efficientnet_family_preset_taps_its_stages(mobilenet: torch.nn.Module) -> None:
    preset = find_preset(mobilenet)
    assert preset.name == "efficientnet" and preset.depth(mobilenet) == len(mobilenet.blocks)
    assert block_taps(mobilenet, [1, preset.depth(mobilenet)]) == [
        Tap("blocks.0", select="mean"),
        Tap(f"blocks.{preset.depth(mobilenet) - 1}", select="mean"),
    ]
    vit = tiny_vit(img_size=32, patch_size=8)
    task = Distiller(
        vit, mobilenet, layer_pairs(vit, mobilenet, [[2, 1]]), "procrustes", example_input=IMAGES
    )
    try:
        (student_shape, teacher_shape) = task.shapes[0]
        assert student_shape[0] == teacher_shape[0] == 4 and len(student_shape) == 2
        assert torch.isfinite(task(IMAGES, LABELS)["feat"])
    finally:
        task.close()


# ------------------------------------------------------------------------------ positions: the selector
def test_grid_lays_a_cnn_map_out_as_tokens_and_drops_a_vits_prefix_tokens() -> None:
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(select_features(x, "grid"), x.flatten(2).transpose(1, 2))
    tokens = torch.randn(2, 2 + 16, 3)
    torch.testing.assert_close(select_features(tokens, "grid", num_prefix_tokens=2), tokens[:, 2:])


def test_grid_s_averages_the_cells_it_shrinks_row_by_row() -> None:
    cells = torch.arange(16.0).reshape(1, 1, 4, 4)  # one channel: cell (r, c) holds 4r + c
    pooled = select_features(cells, "grid:2")
    assert pooled.shape == (1, 4, 1)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # e.g. mean of 0, 1, 4, 5
    # ViT patch tokens on the same grid (a class token in front) give the same tokens
    vit_tokens = torch.cat([torch.full((1, 1, 1), -100.0), cells.flatten(2).transpose(1, 2)], dim=1)
    torch.testing.assert_close(select_features(vit_tokens, "grid:2"), pooled)


def test_grid_s_interpolates_bilinearly_when_it_grows() -> None:
    x = torch.randn(2, 3, 2, 2)
    grown = select_features(x, "grid:4")
    expected = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(grown, expected.flatten(2).transpose(1, 2))
    torch.testing.assert_close(select_features(x, "grid:2"), select_features(x, "grid"))  # same size


@pytest.mark.parametrize(
    ("select", "shape", "words"),
    [
        ("grid:0", (2, 17, 3), "must be >= 1"),
        ("grid:x", (2, 17, 3), "S in 'grid:S' must be an integer"),
        ("grid:2", (2, 1 + 6, 3), "the 6 patch tokens of (2, 7, 3) form no square grid"),
        ("patch", (2, 3, 4, 4), "'grid' or 'grid:S' (one token per position"),
    ],
)
def test_grid_refuses_what_has_no_grid(select: str, shape: tuple[int, ...], words: str) -> None:
    with pytest.raises(ValueError) as info:
        select_features(torch.randn(shape), select)
    assert words in str(info.value)


# ------------------------------------------------------------------------------ positions: in a recipe
@pytest.mark.parametrize(
    ("adapter", "criterion"), [("projection", "mse"), ("procrustes", "mse"), ("raw", "at"), ("gram", "mse")]
)
def test_an_8x8_cnn_map_and_a_4x4_patch_grid_compare_position_by_position(
    adapter: str, criterion: str
) -> None:
    """ResNet layer1 (8×8) teaches ViT block 1 (4×4 patches): `grid:4` averages the map's 2×2 cells."""
    data = hetero_recipe(RESNET, VIT, adapter=adapter, criterion=criterion, pairs=[[1, 1]], select="grid:4")
    task = distiller_of(data)
    try:
        assert task.shapes == [((4, 16, 32), (4, 16, 8))]
        maps = []
        hook = task.teacher.layer1.register_forward_hook(lambda _m, _i, out: maps.append(out))
        teacher = task.teacher_outputs(IMAGES)["feat.0"]
        hook.remove()
        assert maps[0].shape == (4, 8, 8, 8)
        torch.testing.assert_close(teacher, F.avg_pool2d(maps[0], 2).flatten(2).transpose(1, 2))
        assert torch.isfinite(task(IMAGES, LABELS)["feat"])  # the criterion takes the adapter's outputs
    finally:
        task.close()


def test_grids_that_differ_are_refused_naming_the_pair_both_shapes_and_grid_s() -> None:
    problem = build_problem(hetero_recipe(RESNET, VIT, adapter="projection", pairs=[[1, 1]], select="grid"))
    assert problem.startswith("pipeline.student_kd.distill.pairs[0]: student blocks.0 (4, 16, 32)")
    assert "teacher layer1 (4, 64, 8)" in problem and "select 'grid:S'" in problem


def test_attention_maps_of_a_cnn_and_a_vit_align_on_one_grid() -> None:
    """`at` compares the attention of each position: on a shared grid a CNN map and ViT tokens that
    carry the same energy per position match exactly, whatever their widths."""
    energy = torch.rand(2, 1, 8, 8) + 0.1
    cnn = energy.expand(2, 5, 8, 8)  # 5 channels, each the energy
    tokens = F.avg_pool2d(energy, 2).flatten(2).transpose(1, 2).expand(2, 16, 7)
    vit = torch.cat([torch.randn(2, 1, 7), tokens], dim=1)  # the class token is dropped by grid
    # the map's |x|² averaged over 2×2 cells differs from (its mean)², so compare p=1 energies
    loss = at(select_features(cnn, "grid:4"), select_features(vit, "grid:4"), p=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


# ------------------------------------------------------------------------------ kdkit validate
def test_validate_shows_the_shipped_cnn_to_vit_recipes_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    """recipes/digits-cnn-vit.yaml is valid; its table shows each tap as captured and as selected,
    and what the adapter hands the criterion."""
    assert main(["validate", str(REPO / "recipes" / "digits-cnn-vit.yaml")]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
        for line in out.splitlines()
        if "│" in line
    }
    assert rows["0"] == [
        "blocks.0 [grid:4]",
        "(2, 17, 48) → (2, 16, 48)",
        "layer1 [grid:4]",
        "(2, 64, 8, 8) → (2, 16, 64)",
        "(2, 16, 64)",
        "procrustes",
        "mse",
        "1",
    ]
    assert rows["2"][:5] == [
        "blocks.2 [cls]",
        "(2, 17, 48) → (2, 48)",
        "layer4 [mean]",
        "(2, 512, 1, 1) → (2, 512)",
        "(2, 512)",
    ]
    assert "shape: as captured → as selected; compared: the adapter's outputs" in out
    assert "digits-cnn-vit.yaml: valid (4 stages)" in out


def test_the_docs_cnn_to_vit_snippet_is_the_shipped_recipes() -> None:
    """docs/adapters.md quotes recipes/digits-cnn-vit.yaml's models and pairs: they must agree."""
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "docs" / "adapters.md").read_text(), flags=re.S)
    (snippet,) = [yaml.safe_load(b) for b in blocks if "grid:4" in b]
    shipped = yaml.safe_load((REPO / "recipes" / "digits-cnn-vit.yaml").read_text())
    assert snippet["models"] == shipped["models"]
    assert snippet["distill"].items() <= shipped["distill"].items()
