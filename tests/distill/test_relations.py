"""Relation criteria (kdkit.distill.relations): rkd and at against torchdistill 1.1.5's RKDLoss and ATLoss
(values and gradients), their invariances, ViT tokens, and refused options and shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close
from torchdistill.losses.mid_level import ATLoss, RKDLoss

import kdkit.distill.relations  # noqa: F401  (registers rkd and at)
from kdkit.distill.losses import OptionError, criterion_same_shape, resolve_feature_criterion
from kdkit.distill.relations import at, attention_map, pairwise_distances, rkd
from kdkit.registry import FEATURE_CRITERIA


def _leaf(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()


def _ours_and_grads(fn, a, b, **options):
    loss = fn(a, b, **options)
    grad_a, grad_b = torch.autograd.grad(loss, (a, b), allow_unused=True)
    return loss, grad_a, grad_b


def _rkdloss(a, b, distance_weight, angle_weight, cls=RKDLoss):
    """torchdistill's RKDLoss, built and called as its trainer does (module paths, io_dicts)."""
    loss_module = cls(
        student_output_path="student",
        teacher_output_path="teacher",
        dist_factor=distance_weight,
        angle_factor=angle_weight,
        reduction="mean",
    )
    return loss_module({"student": {"output": a}}, {"teacher": {"output": b}})


def _atloss(a, b, mode):
    """torchdistill's ATLoss with one pair of weight 1, called with io_dicts."""
    pair = {"student": {"io": "output", "path": "s"}, "teacher": {"io": "output", "path": "t"}, "weight": 1}
    loss_module = ATLoss({"pair": pair}, mode=mode)
    return loss_module({"s": {"output": a}}, {"t": {"output": b}})


RKD_SHAPES = [
    ((6, 5), (6, 9)),  # embeddings of different widths
    ((5, 3, 4), (5, 2, 7)),  # tokens: different counts and widths
    ((4, 3, 2, 2), (4, 10)),  # a CNN map against an embedding
]
RKD_WEIGHTS = [(1.0, 2.0), (25.0, 50.0), (1.0, 0.0), (0.0, 2.0)]


@pytest.mark.parametrize(("shape_a", "shape_b"), RKD_SHAPES)
@pytest.mark.parametrize(("distance_weight", "angle_weight"), RKD_WEIGHTS)
def test_rkd_equals_torchdistill_rkdloss(shape_a, shape_b, distance_weight, angle_weight):
    a, b = _leaf(*shape_a, seed=0), _leaf(*shape_b, seed=1)
    loss, grad_a, grad_b = _ours_and_grads(
        rkd, a, b, distance_weight=distance_weight, angle_weight=angle_weight
    )
    ref = _rkdloss(a, b, distance_weight, angle_weight)
    ref_grad_a, ref_grad_b = torch.autograd.grad(ref, (a, b), allow_unused=True)
    assert loss.item() > 0
    assert_close(loss, ref)
    assert_close(grad_a, ref_grad_a)
    # the teacher's relations are constants in both: no gradient reaches b
    assert grad_b is None and ref_grad_b is None


class _SquaredRKDLoss(RKDLoss):
    """RKDLoss whose distances are its own pdist's squared ones with eps 1e-3 (it has no option
    for them: its distance term always calls pdist(squared=False) with the default eps)."""

    @staticmethod
    def pdist(e, squared=False, eps=1e-12):
        return RKDLoss.pdist(e, squared=True, eps=1e-3)


def test_rkd_squared_and_eps_are_rkdloss_pdists_options():
    a, b = _leaf(5, 4, seed=2), _leaf(5, 6, seed=3)
    loss, grad_a, _ = _ours_and_grads(rkd, a, b, angle_weight=0.0, squared=True, eps=1e-3)
    ref = _rkdloss(a, b, 1.0, 0.0, cls=_SquaredRKDLoss)
    assert_close(loss, ref)
    assert_close(grad_a, torch.autograd.grad(ref, a)[0])
    # and squared distances are a different loss (the option is not ignored)
    assert not torch.allclose(loss, rkd(a, b, angle_weight=0.0))


def test_pairwise_distances_are_euclidean_with_a_zero_diagonal():
    z = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([[0, 5, 1], [5, 0, math.sqrt(18)], [1, math.sqrt(18), 0]], dtype=torch.float64)
    assert_close(pairwise_distances(z), expected)
    assert_close(pairwise_distances(z, squared=True), expected**2)


def _rotation(n: int, seed: int) -> torch.Tensor:
    """A random orthogonal n x n matrix."""
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]


def test_rkd_distance_term_ignores_scale_translation_and_rotation_of_the_features():
    a, b = _leaf(6, 5, seed=4), _leaf(6, 3, seed=5)
    rotation, teacher_rotation = _rotation(5, seed=6), _rotation(3, seed=23)
    moved = 7.5 * a @ rotation + 3.0
    # distances are divided by their mean: a scale of the student or the teacher leaves the loss alone
    assert_close(rkd(moved, b, angle_weight=0.0), rkd(a, b, angle_weight=0.0))
    assert_close(rkd(a, 0.1 * b, angle_weight=0.0), rkd(a, b, angle_weight=0.0))
    # angles are invariant to the same transforms
    assert_close(rkd(moved, b, distance_weight=0.0), rkd(a, b, distance_weight=0.0))
    # a student that is the teacher moved so has nothing left to learn...
    assert rkd(2.0 * b @ teacher_rotation + 1.0, b).item() < 1e-12
    # ...but one whose samples are swapped does: the relations are between particular samples
    assert rkd(b[[1, 0, 2, 3, 4, 5]], b).item() > 1e-3


def test_rkd_batch_of_two_is_zero_and_one_sample_is_refused():
    a, b = _leaf(2, 4, seed=7), _leaf(2, 3, seed=8)
    assert rkd(a, b).item() == 0.0
    assert rkd.min_batch == 3
    with pytest.raises(ValueError, match=r"^rkd: needs batches of at least 2 samples"):
        rkd(a[:1], b[:1])


def test_rkd_is_finite_for_identical_samples():
    # two equal rows: their distance is clamped to sqrt(eps), not 0, and the angle to a zero vector is 0
    a = _leaf(4, 3, seed=9)
    twins = torch.cat([a[:1], a[:1], a[1:3]]).detach().requires_grad_()
    loss = rkd(twins, _leaf(4, 5, seed=10))
    (grad,) = torch.autograd.grad(loss, twins)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


AT_SHAPES = [
    ((3, 4, 5, 5), (3, 7, 5, 5)),  # different channel counts
    ((2, 1, 3, 4), (2, 6, 3, 4)),  # one student channel, a non-square map
]


@pytest.mark.parametrize(("shape_a", "shape_b"), AT_SHAPES)
@pytest.mark.parametrize("mode", ["code", "paper"])
def test_at_equals_torchdistill_atloss(shape_a, shape_b, mode):
    a, b = _leaf(*shape_a, seed=11), _leaf(*shape_b, seed=12)
    loss, grad_a, grad_b = _ours_and_grads(at, a, b, mode=mode)
    ref = _atloss(a, b, mode)
    ref_grad_a, ref_grad_b = torch.autograd.grad(ref, (a, b))
    assert loss.item() > 0
    assert_close(loss, ref)
    assert_close(grad_a, ref_grad_a)
    assert_close(grad_b, ref_grad_b)  # ATLoss does not detach the teacher either


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_at_on_tokens_is_atloss_on_the_tokens_as_a_one_column_map(mode):
    # (B, N, D) tokens are a map of N positions with D channels: (B, D, N, 1) for ATLoss
    a, b = _leaf(3, 5, 4, seed=13), _leaf(3, 5, 9, seed=14)
    loss, grad_a, grad_b = _ours_and_grads(at, a, b, mode=mode)
    ref = _atloss(a.transpose(1, 2).unsqueeze(-1), b.transpose(1, 2).unsqueeze(-1), mode)
    ref_grad_a, ref_grad_b = torch.autograd.grad(ref, (a, b))
    assert_close(loss, ref)
    assert_close(grad_a, ref_grad_a)
    assert_close(grad_b, ref_grad_b)


def test_at_on_tokens_by_hand():
    # sample 0: student tokens (1, 1), (0, 2) -> mean of x²: (1, 2) -> (1, 2)/√5; teacher (2, 0), (0, 0)
    # -> (2, 0) -> (1, 0). Sample 1: student = teacher. Squared difference of sample 0: 2 - 2/√5.
    a = torch.tensor([[[1.0, 1.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    b = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    assert_close(attention_map(a)[0], torch.tensor([1.0, 2.0], dtype=torch.float64) / math.sqrt(5))
    sq = 2 - 2 / math.sqrt(5)
    assert_close(at(a, b), torch.tensor(sq / 4, dtype=torch.float64))  # mean over 2 samples x 2 tokens
    assert_close(at(a, b, mode="paper"), torch.tensor(math.sqrt(sq) / 2, dtype=torch.float64))
    # p = 1: mean of |x| gives (1, 1)/√2 against (1, 0): squared difference 2 - √2
    assert_close(at(a, b, p=1), torch.tensor((2 - math.sqrt(2)) / 4, dtype=torch.float64))


def test_at_ignores_the_order_and_scale_of_channels_but_not_of_positions():
    a, b = _leaf(2, 6, 3, 3, seed=15), _leaf(2, 4, 3, 3, seed=16)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(17))
    assert_close(at(a[:, perm], b), at(a, b))
    assert_close(at(3.0 * a, b, p=3), at(a, b, p=3))
    # a teacher with the student's channels reordered: the same attention, nothing to learn
    assert at(a, a[:, perm].detach()).item() < 1e-20
    # moving the student's attention to other positions is a difference
    assert at(a.flip(-1), a.detach()).item() > 1e-4
    # tokens: reordering the features of each token changes nothing either
    tokens, teacher_tokens = _leaf(2, 5, 6, seed=18), _leaf(2, 5, 3, seed=24)
    assert_close(at(tokens[..., perm], teacher_tokens), at(tokens, teacher_tokens))


def test_at_gradient_is_finite_at_zero_features():
    a = torch.relu(_leaf(2, 3, 2, 2, seed=19)).detach()
    a[1] = 0.0  # a sample whose map is all 0 (normalised to 0, not 0/0)
    a.requires_grad_()
    for p in (1.0, 2.0):
        loss = at(a, _leaf(2, 5, 2, 2, seed=20).detach(), p=p)
        (grad,) = torch.autograd.grad(loss, a)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize(
    ("shape_a", "shape_b", "message"),
    [
        (
            (2, 3, 4, 4),
            (2, 3, 2, 2),
            r"^at: the spatial sizes \(H, W\) differ: \(2, 3, 4, 4\) and \(2, 3, 2, 2\)",
        ),
        ((2, 5, 8), (2, 4, 8), r"^at: the token counts N differ: \(2, 5, 8\) and \(2, 4, 8\)"),
        ((2, 4, 2, 2), (2, 4, 6), r"^at: expected both CNN maps .* got \(2, 4, 2, 2\) and \(2, 4, 6\)"),
        ((2, 8), (2, 8), r"^at: expected both CNN maps"),
        ((2, 3, 4), (3, 3, 4), r"^at: expected two batches of the same size"),
    ],
)
def test_at_refuses_features_it_cannot_compare(shape_a, shape_b, message):
    with pytest.raises(ValueError, match=message):
        at(torch.randn(*shape_a), torch.randn(*shape_b))


def test_rkd_refuses_different_batch_sizes():
    with pytest.raises(
        ValueError, match=r"^rkd: expected two batches of the same size.*\(4, 3\) and \(5, 3\)"
    ):
        rkd(torch.randn(4, 3), torch.randn(5, 3))


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("rkd", {"angle_weight": -1}, r"^angle_weight: expected a number >= 0 .*got -1$"),
        ("rkd", {"distance_weight": "1"}, r"^distance_weight: expected a number >= 0"),
        ("rkd", {"distance_weight": True}, r"^distance_weight: expected a number >= 0"),
        ("rkd", {"squared": 1}, r"^squared: expected true or false"),
        ("rkd", {"eps": 0}, r"^eps: expected a number > 0"),
        ("rkd", {"dist_factor": 1.0}, r"^dist_factor: unknown option of feature criterion 'rkd'"),
        ("at", {"p": 0.5}, r"^p: expected a number >= 1 .*got 0.5"),
        ("at", {"p": -2}, r"^p: expected a number >= 1"),
        ("at", {"mode": "Paper"}, r"^mode: expected 'code' or 'paper' .*got 'Paper'"),
    ],
)
def test_bad_options_are_refused_before_any_work(name, options, message):
    with pytest.raises(OptionError, match=message):
        resolve_feature_criterion(name, options)


def test_both_are_registered_as_criteria_of_different_shapes():
    assert FEATURE_CRITERIA.get("rkd") is rkd and FEATURE_CRITERIA.get("at") is at
    for name, options in (("rkd", {"angle_weight": 0.0}), ("at", {"mode": "paper"})):
        assert not criterion_same_shape(FEATURE_CRITERIA.get(name))
        assert not criterion_same_shape(resolve_feature_criterion(name, options))
    # bound options are used: rkd without its angle term is its distance term alone
    a, b = _leaf(4, 3, seed=21), _leaf(4, 5, seed=22)
    assert_close(resolve_feature_criterion("rkd", {"angle_weight": 0.0})(a, b), rkd(a, b, angle_weight=0.0))
