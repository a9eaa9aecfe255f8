"""kdkit.distill.teacher_input: converting the student's batch to the teacher's size and normalisation.

The reference is the direct three-step formula (denormalise with the student's mean/std,
`F.interpolate`, normalise with the teacher's), written out in each test.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from kdkit.distill.teacher_input import (
    InputSpace,
    PretrainedInput,
    TeacherInput,
    check_input_space,
    input_space_from_pretrained_cfg,
    size_problem,
)

HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _batch(size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Pixels in [0, 1] normalised with 0.5/0.5, as the student's loader gives them."""
    pixels = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return (pixels - 0.5) / 0.5


def _manual(
    x: torch.Tensor, student: InputSpace, teacher: InputSpace, mode: str, antialias: bool
) -> torch.Tensor:
    """Denormalise -> F.interpolate -> normalise, step by step."""
    view = (1, -1, 1, 1)
    pixels = x * torch.tensor(student.std).view(view) + torch.tensor(student.mean).view(view)
    if teacher.size is not None:
        align = False if mode in ("bilinear", "bicubic") else None
        pixels = F.interpolate(
            pixels, size=(teacher.size,) * 2, mode=mode, align_corners=align, antialias=antialias
        )
    return (pixels - torch.tensor(teacher.mean).view(view)) / torch.tensor(teacher.std).view(view)


def test_round_trip_to_pixel_space_and_back_is_exact() -> None:
    student = InputSpace(16, HALF, HALF)
    pixel = InputSpace(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    teacher = InputSpace(16, IMAGENET_MEAN, IMAGENET_STD)
    x = _batch(16)
    to_pixels = TeacherInput(student, pixel)
    assert_close(to_pixels(x), x * 0.5 + 0.5)
    assert_close(TeacherInput(pixel, student)(to_pixels(x)), x)
    there = TeacherInput(student, teacher)(x)
    assert_close(TeacherInput(teacher, student)(there), x)


@pytest.mark.parametrize(
    ("size", "target", "mode", "antialias"),
    [
        (48, 32, "bicubic", True),  # downscale: antialiased
        (48, 32, "bicubic", False),
        (48, 32, "bilinear", True),
        (16, 32, "bicubic", False),  # upscale: `F.interpolate`'s antialias is never used
        (16, 32, "bilinear", False),
        (48, 32, "nearest", False),
        (48, 32, "area", False),
        (16, None, "bicubic", False),  # keep the size: normalisation only
    ],
)
def test_equals_manual_denormalise_interpolate_normalise(
    size: int, target: int | None, mode: str, antialias: bool
) -> None:
    student = InputSpace(size, HALF, HALF)
    teacher = InputSpace(target, IMAGENET_MEAN, IMAGENET_STD)
    x = _batch(size)
    convert = TeacherInput(student, teacher, interpolation=mode, antialias=antialias)
    out = convert(x)
    assert out.shape == (2, 3, target or size, target or size)
    assert_close(out, _manual(x, student, teacher, mode, antialias), rtol=1e-5, atol=1e-5)


def test_antialias_applies_when_shrinking_only() -> None:
    student, teacher = InputSpace(None, HALF, HALF), InputSpace(32, IMAGENET_MEAN, IMAGENET_STD)
    on, off = TeacherInput(student, teacher, antialias=True), TeacherInput(student, teacher, antialias=False)
    # PyTorch's antialiased bicubic uses another kernel (a = -0.5) even when enlarging, so passing
    # the flag on an upscale would change the teacher's input.
    small = _batch(16)
    assert_close(on(small), off(small))
    large = _batch(64)
    assert (on(large) - off(large)).abs().max() > 1e-3
    assert_close(on(large), _manual(large, student, teacher, "bicubic", True), rtol=1e-5, atol=1e-5)


def test_identity_returns_the_same_tensor() -> None:
    space = InputSpace(16, HALF, HALF)
    x = _batch(16)
    for teacher in (InputSpace(16, HALF, HALF), InputSpace(None, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])):
        convert = TeacherInput(space, teacher)
        assert convert.is_identity
        assert convert(x) is x
    other_size = TeacherInput(space, InputSpace(32, HALF, HALF))
    assert not other_size.is_identity
    assert other_size(x).shape[-1] == 32
    other_std = TeacherInput(space, InputSpace(16, HALF, (0.25,) * 3))
    assert not other_std.is_identity
    assert_close(other_std(x), x * 2)
    # a batch already at the teacher's size is passed through even when the student's size is unknown
    unknown = TeacherInput(InputSpace(None, HALF, HALF), InputSpace(32, HALF, HALF))
    batch = _batch(32)
    assert not unknown.is_identity and unknown(batch) is batch


def test_folded_affine_equals_the_two_steps() -> None:
    student = InputSpace(8, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    teacher = InputSpace(8, IMAGENET_MEAN, IMAGENET_STD)
    x = _batch(8).double()
    two_steps = _manual(x, student, teacher, "bicubic", False).double()
    out = TeacherInput(student, teacher)(x)
    assert out.dtype == torch.float64
    assert_close(out, two_steps, rtol=1e-6, atol=1e-6)  # scale/shift are stored in float32
    convert = TeacherInput(student, teacher)
    expected_scale = torch.tensor([s / t for s, t in zip(student.std, teacher.std, strict=True)])
    assert_close(convert.scale.flatten(), expected_scale)


def test_no_buffers_reach_a_checkpoint_and_it_runs_in_inference_mode() -> None:
    convert = TeacherInput(InputSpace(16, HALF, HALF), InputSpace(32, IMAGENET_MEAN, IMAGENET_STD))
    assert convert.state_dict() == {}
    with torch.inference_mode():
        assert convert(_batch(16)).shape == (2, 3, 32, 32)


def test_channel_counts_are_checked() -> None:
    grey, rgb = InputSpace(16, (0.5,), (0.5,)), InputSpace(16, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match=r"batch has 3 channels but the student's mean/std .* have 1"):
        TeacherInput(grey, InputSpace(16, (0.4,), (0.3,)))(_batch(16))
    with pytest.raises(
        ValueError, match=r"student's input has 1 channel .* teacher expects 3.*repeat_channels=True"
    ):
        TeacherInput(grey, rgb)
    with pytest.raises(ValueError, match=r"has 3 channels .* teacher expects 1"):
        TeacherInput(rgb, grey, repeat_channels=True)  # no silent RGB -> grey either
    x = _batch(16, channels=1)
    out = TeacherInput(grey, rgb, repeat_channels=True)(x)
    assert_close(out, _manual(x.repeat(1, 3, 1, 1), InputSpace(16, HALF, HALF), rgb, "bicubic", False))
    shrunk = TeacherInput(grey, InputSpace(8, IMAGENET_MEAN, IMAGENET_STD), repeat_channels=True)(x)
    reference = _manual(
        x.repeat(1, 3, 1, 1),
        InputSpace(16, HALF, HALF),
        InputSpace(8, IMAGENET_MEAN, IMAGENET_STD),
        "bicubic",
        True,
    )
    assert_close(shrunk, reference, rtol=1e-5, atol=1e-5)


def test_bad_options_and_batches_are_refused() -> None:
    space = InputSpace(16, HALF, HALF)
    with pytest.raises(ValueError, match=r"interpolation: expected one of .*bicubic.*got 'lanczos'"):
        TeacherInput(space, space, interpolation="lanczos")
    with pytest.raises(ValueError, match=r"antialias: expected true or false, got 'yes'"):
        TeacherInput(space, space, antialias="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"floating-point batch \(B, C, H, W\), got torch.uint8"):
        TeacherInput(space, space)(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_bad_input_spaces_are_named_by_key() -> None:
    where = "distill.teacher_input"
    assert (
        check_input_space({"size": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}, where) == []
    )
    assert check_input_space({"mean": [0.5], "std": [0.5], "interpolation": "bilinear"}, where) == []
    assert check_input_space({"size": 224, "mean": None}, where) == []  # left out: the student's
    assert check_input_space({"mean": [0.5, 0.5], "std": [0.5, 0]}, where) == [
        "distill.teacher_input.std: expected positive numbers, got [0.5, 0]"
    ]
    problems = check_input_space(
        {"size": True, "mean": ["a"], "std": [0.5, 0.5], "interpolaton": "bicubic"}, where
    )
    assert problems[0].startswith("distill.teacher_input.interpolaton: unknown key")
    assert "Did you mean 'interpolation'?" in problems[0]
    assert any(p.startswith("distill.teacher_input.size: expected a positive whole number") for p in problems)
    assert any(p.startswith("distill.teacher_input.mean: expected a list of numbers") for p in problems)
    assert check_input_space({"mean": [0.5, 0.5, 0.5], "std": [0.5]}, where) == [
        "distill.teacher_input.std: expected as many values as distill.teacher_input.mean (one per "
        "channel), got [0.5] for mean [0.5, 0.5, 0.5]"
    ]
    assert check_input_space({"size": 0, "std": [float("nan")]}, where) == [
        "distill.teacher_input.size: expected a positive whole number of pixels (or null to keep the "
        "batch's size), got 0",
        "distill.teacher_input.std: expected positive numbers, got [nan]",
    ]
    assert check_input_space({"mean": [0.5], "std": [0.5], "interpolation": "lanczos"}, where) == [
        "distill.teacher_input.interpolation: expected one of nearest, nearest-exact, bilinear, bicubic, "
        "area, got 'lanczos'"
    ]
    assert check_input_space("imagenet", where) == [
        "distill.teacher_input: expected a mapping with size, mean and std, got 'imagenet'"
    ]
    with pytest.raises(ValueError, match=r"InputSpace.std: expected positive numbers, got \[0.5, 0\]"):
        InputSpace(None, (0.5, 0.5), (0.5, 0))
    with pytest.raises(ValueError, match=r"InputSpace.size: expected a positive whole number"):
        InputSpace(-3, (0.5,), (0.5,))
    with pytest.raises(ValueError, match=r"InputSpace.mean: expected a list of numbers, .* got None"):
        InputSpace(None, None, (0.5,))  # type: ignore[arg-type]


def test_describe_differs_when_any_field_differs() -> None:
    student, teacher = InputSpace(16, HALF, HALF), InputSpace(32, IMAGENET_MEAN, IMAGENET_STD)
    base = TeacherInput(student, teacher)
    assert base.describe() == TeacherInput(InputSpace(16, [0.5] * 3, [0.5] * 3), teacher).describe()
    assert json.loads(json.dumps(base.describe())) == base.describe()
    grey = InputSpace(16, (0.5,), (0.5,))
    variants = [
        TeacherInput(InputSpace(None, HALF, HALF), teacher),
        TeacherInput(InputSpace(16, (0.4, 0.5, 0.5), HALF), teacher),
        TeacherInput(InputSpace(16, HALF, (0.5, 0.5, 0.4)), teacher),
        TeacherInput(student, InputSpace(24, IMAGENET_MEAN, IMAGENET_STD)),
        TeacherInput(student, InputSpace(None, IMAGENET_MEAN, IMAGENET_STD)),
        TeacherInput(student, InputSpace(32, HALF, IMAGENET_STD)),
        TeacherInput(student, InputSpace(32, IMAGENET_MEAN, HALF)),
        TeacherInput(student, teacher, interpolation="bilinear"),
        TeacherInput(student, teacher, antialias=False),
        TeacherInput(grey, teacher, repeat_channels=True),
    ]
    keys = [json.dumps(v.describe(), sort_keys=True) for v in [base, *variants]]
    assert len(set(keys)) == len(keys)


def _tiny_vit(**options: object) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, embed_dim=32, num_heads=2, **options
    )


def test_from_pretrained_cfg_of_a_tiny_vit_takes_its_built_size() -> None:
    vit = _tiny_vit()
    # timm keeps the pretrained weights' size in the cfg (and resolve_data_config reports it);
    # the model only takes the size it was built for.
    assert vit.pretrained_cfg["input_size"] == (3, 224, 224)
    assert timm.data.resolve_data_config({}, model=vit)["input_size"] == (3, 224, 224)
    found = input_space_from_pretrained_cfg(vit)
    assert found == PretrainedInput(InputSpace(32, HALF, HALF), "bicubic")
    space, interpolation = found
    # the converted student batch is what the teacher takes
    convert = TeacherInput(InputSpace(16, IMAGENET_MEAN, IMAGENET_STD), space, interpolation)
    with torch.inference_mode():
        assert vit.eval()(convert(_batch(16))).shape == (2, 1000)

    class Wrapper(nn.Module):  # DistributedDataParallel-like
        def __init__(self) -> None:
            super().__init__()
            self.module = vit

    assert input_space_from_pretrained_cfg(Wrapper()) == found


def test_from_pretrained_cfg_of_a_cnn() -> None:
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3)
    assert input_space_from_pretrained_cfg(resnet) == PretrainedInput(
        InputSpace(224, IMAGENET_MEAN, IMAGENET_STD), "bicubic"
    )
    with pytest.raises(
        ValueError, match=r"first layer takes 1 channel but its pretrained_cfg gives mean/std for 3"
    ):
        input_space_from_pretrained_cfg(timm.create_model("resnet18", pretrained=False, in_chans=1))


def test_from_pretrained_cfg_without_one_or_with_odd_values() -> None:
    assert input_space_from_pretrained_cfg(nn.Linear(2, 2)) is None
    model = nn.Conv2d(3, 4, 3)
    model.pretrained_cfg = {"input_size": (3, 96, 96), "mean": HALF, "std": HALF, "interpolation": "bilinear"}
    assert input_space_from_pretrained_cfg(model) == PretrainedInput(InputSpace(96, HALF, HALF), "bilinear")
    model.pretrained_cfg = {"mean": HALF, "std": HALF, "interpolation": "random"}
    assert input_space_from_pretrained_cfg(model) == PretrainedInput(InputSpace(None, HALF, HALF), "bicubic")
    model.pretrained_cfg = {"input_size": (3, 224, 224)}
    assert input_space_from_pretrained_cfg(model) is None
    with pytest.raises(ValueError, match=r"takes 32x48 inputs; kdkit resizes to squares only"):
        input_space_from_pretrained_cfg(
            timm.create_model(
                "vit_tiny_patch16_224",
                pretrained=False,
                img_size=(32, 48),
                depth=1,
                embed_dim=32,
                num_heads=2,
            )
        )


# ------------------------------------------------------------------ wired into recipes and the Distiller
def _recipe_with_a_32px_teacher(**teacher_input: object) -> dict:
    from conftest import tiny_recipe_dict, vit_options

    data = tiny_recipe_dict()  # 16 px grey digits
    data["models"]["teacher"]["options"] = vit_options(embed_dim=48, depth=2, img_size=32)
    if teacher_input:
        data["distill"]["teacher_input"] = dict(teacher_input)
    return data


def test_a_recipe_teacher_gets_its_own_input_and_the_cache_key_names_it(tmp_path) -> None:
    import torch.nn.functional as F

    from kdkit.config.schema import RecipeError
    from kdkit.config.validation import parse_recipe
    from kdkit.data.datasets import build_loaders
    from kdkit.run.build import build_distiller
    from kdkit.run.checks import check_recipe

    with pytest.raises(RecipeError, match="models.teacher: cannot run on the data's"):
        check_recipe(parse_recipe(_recipe_with_a_32px_teacher()))
    data = _recipe_with_a_32px_teacher(size=32, mean=[0.25], std=[0.5], interpolation="bilinear")
    data["distill"]["cache_dir"] = str(tmp_path)
    recipe = parse_recipe(data)
    check_recipe(recipe)  # the teacher is checked on the converted batch
    stage = recipe.pipeline[1]
    loader, _, _ = build_loaders(recipe.plan.of(stage).data, seed=0, eval_splits=())
    task = build_distiller(recipe, stage, cache_data=loader.dataset)
    images = next(iter(loader))[0][:4]
    pixels = images * 0.5 + 0.5  # the student's data: mean 0.5, std 0.5
    resized = F.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = task.teacher((resized - 0.25) / 0.5)
    torch.testing.assert_close(task.teacher_outputs(images)["logits"], expected, atol=1e-5, rtol=1e-4)
    assert task.cache.key["teacher_input"] == task.teacher_input.describe()
    task.close()


def test_auto_reads_the_teachers_pretrained_cfg_or_says_what_to_give() -> None:
    from kdkit.config.schema import RecipeError
    from kdkit.config.validation import parse_recipe
    from kdkit.run.build import build_distiller

    recipe = parse_recipe({**_recipe_with_a_32px_teacher(), "distill": {"teacher_input": "auto"}})
    with pytest.raises(RecipeError, match="teacher_input: .*channel"):
        build_distiller(recipe, recipe.pipeline[1], example=torch.zeros(2, 1, 16, 16))


@pytest.mark.parametrize(
    "size, options, expected",
    [
        (100000, {}, "100000 px is beyond the 4096 px"),
        (40, {}, "40 is not a multiple of the teacher's patch size 16"),
        (64, {}, "64 px, but the teacher was built for 32 px inputs"),
        (32, {}, ""),
        (64, {"dynamic_img_size": True}, ""),  # a ViT that takes any multiple of its patch
    ],
)
def test_size_problem_names_the_limit_the_size_breaks(size: int, options: dict, expected: str) -> None:
    """Checked before converting (issue 26): 100000 px failed allocating 80 GB, 33 and 64 were
    reported against data.image_size."""
    problem = size_problem(size, _tiny_vit(**options))
    assert (expected in problem) if expected else problem == ""
