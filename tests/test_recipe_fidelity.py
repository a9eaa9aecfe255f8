"""Recipes that claim to follow a paper do what the authors' code does: batch, layers, tapped tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_vit

from kdkit.config.loading import load_recipe
from kdkit.distill.pairs import layer_pairs
from kdkit.distill.taps import TapRecorder
from kdkit.run.variants import read_variants, resolve

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# HaTFAS's run: `--s-id 4 6 8 --t-id 4 6 8`, indices into a 0-based list with one class token per block
HATFAS_AUTHORS_IDS = [4, 6, 8]


def test_hatfas_recipe_has_the_authors_batch_and_taps_the_blocks_their_indices_name() -> None:
    recipe = load_recipe(RECIPES / "hatfas.yaml", ["data.root=/unused"])
    assert recipe.data.batch_size == 128
    assert recipe.train.lr == 5e-4 * 128 / 512  # main.py scales the lr by batch/512
    distill = recipe.distill
    # the block layout of ViT-B/16 and DeiT-Ti/16 (12 blocks, one class token), at a tiny size
    teacher, student = tiny_vit(embed_dim=48, depth=12).eval(), tiny_vit(embed_dim=32, depth=12).eval()
    pairs = layer_pairs(teacher, student, distill.pairs, distill.point, distill.select)
    assert [p.student.path for p in pairs] == [f"blocks.{i}.attn" for i in HATFAS_AUTHORS_IDS]
    assert [p.teacher.path for p in pairs] == [f"blocks.{i}.attn" for i in HATFAS_AUTHORS_IDS]

    # the tapped tensor: the class token of `blk.attn(blk.norm1(x))`, x being the block's real input
    block_inputs: dict[int, torch.Tensor] = {}
    hooks = [
        student.blocks[i].register_forward_pre_hook(
            lambda _m, args, i=i: block_inputs.__setitem__(i, args[0].detach())
        )
        for i in HATFAS_AUTHORS_IDS
    ]
    taps = {f"s{i}": pair.student for i, pair in zip(HATFAS_AUTHORS_IDS, pairs, strict=True)}
    with TapRecorder(student, taps) as recorder, torch.no_grad():
        student(torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
        captured = recorder.pop()
        for i in HATFAS_AUTHORS_IDS:
            block = student.blocks[i]
            expected = block.attn(block.norm1(block_inputs[i]))[:, 0]
            torch.testing.assert_close(captured[f"s{i}"], expected)
    for hook in hooks:
        hook.remove()


def test_hatfas_recipe_uses_the_authors_feature_loss() -> None:
    distill = load_recipe(RECIPES / "hatfas.yaml", ["data.root=/unused"]).distill
    assert (distill.adapter, distill.criterion, distill.select) == ("covariance", "mse", "cls")
    assert distill.adapter_options == {"detach_covariance": False}  # gradient through C, as theirs
    assert (distill.alpha, distill.tau, distill.beta) == (0.7, 3.0, 1.0)


def test_the_kdfas_recipe_with_the_documented_procrustes_overrides_changes_only_the_bridge() -> None:
    """README and recipes/kdfas.yaml give two --set options for the paper's recipe with the sound bridge."""
    paper = load_recipe(RECIPES / "kdfas.yaml", ["data.root=/unused"])
    fixed = load_recipe(
        RECIPES / "kdfas.yaml",
        ["data.root=/unused", "distill.adapter=procrustes", "distill.adapter_options={}"],
    )
    assert (fixed.distill.adapter, fixed.distill.adapter_options) == ("procrustes", {})
    assert fixed.distill.pairs == paper.distill.pairs == [[3, 6], [6, 12], [9, 18], [12, 24]]
    assert (fixed.data, fixed.train, fixed.models) == (paper.data, paper.train, paper.models)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path: Path) -> None:
    assert load_recipe(path).plan.stages


def test_the_teachers_ablation_compares_what_its_variant_names_say() -> None:
    """recipes/variants/teachers.yaml (docs/methods.md's measured table): each variant distils from
    the teachers its name says, combined by the rule it names, and nothing else differs."""
    base = yaml.safe_load((RECIPES / "digits-teachers.yaml").read_text())
    variants = read_variants(RECIPES / "variants" / "teachers.yaml")
    stages = {v.slug: resolve(base, v, 0, "digits-teachers.yaml").plan.stage("student_kd") for v in variants}
    teachers = {name: [t.model for t in stage.teachers] for name, stage in stages.items()}
    assert teachers == {
        "vit-teacher": ["teacher"],
        "cnn-teacher": ["cnn_teacher"],
        "both-ensemble": ["teacher", "cnn_teacher"],
        "both-ca_mkd": ["teacher", "cnn_teacher"],
    }
    assert stages["both-ca_mkd"].distill.teacher_combine == "ca_mkd"
    assert stages["both-ensemble"].distill.teacher_combine == "ensemble"
    alone = [s.distill for name, s in stages.items() if name != "both-ca_mkd"]
    assert all(d.adapter == "none" and (d.alpha, d.tau, d.logit_loss) == (0.7, 3.0, "kl") for d in alone)
