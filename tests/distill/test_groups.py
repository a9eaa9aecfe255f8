"""kdkit.distill.layer_groups: ViTKD against the authors' loss (values and gradients), its mask, options
and shape checks, and that training the student lowers it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

import kdkit.registry
from kdkit.distill.layer_groups import GROUP_METHODS, ViTKD

GEN = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


# --- Reference: the authors' ViTKD loss, transcribed from yzd-v/cls_KD,
# mmcls/models/dis_losses/vitkd.py at commit 1e5d48f36957ee460d39d7ebc592c6cc7f8f3d66 (only the
# mmcls registry decorator and the unused `name`/`use_this` arguments removed). It takes exactly two
# mimicked layers, stacked as (B, 2, N, D), and the generated layer (B, N, D).
class AuthorsViTKDLoss(nn.Module):
    def __init__(
        self,
        student_dims,
        teacher_dims,
        alpha_vitkd=0.00003,
        beta_vitkd=0.000003,
        lambda_vitkd=0.5,
    ):
        super().__init__()
        self.alpha_vitkd = alpha_vitkd
        self.beta_vitkd = beta_vitkd
        self.lambda_vitkd = lambda_vitkd

        if student_dims != teacher_dims:
            self.align2 = nn.ModuleList([nn.Linear(student_dims, teacher_dims, bias=True) for i in range(2)])
            self.align = nn.Linear(student_dims, teacher_dims, bias=True)
        else:
            self.align2 = None
            self.align = None

        self.mask_token = nn.Parameter(torch.zeros(1, 1, teacher_dims))

        self.generation = nn.Sequential(
            nn.Conv2d(teacher_dims, teacher_dims, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_dims, teacher_dims, kernel_size=3, padding=1),
        )

    def forward(self, preds_S, preds_T):
        low_s = preds_S[0]
        low_t = preds_T[0]
        high_s = preds_S[1]
        high_t = preds_T[1]

        B = low_s.shape[0]
        loss_mse = nn.MSELoss(reduction="sum")

        """ViTKD: Mimicking"""
        if self.align2 is not None:
            for i in range(2):
                if i == 0:
                    xc = self.align2[i](low_s[:, i]).unsqueeze(1)
                else:
                    xc = torch.cat((xc, self.align2[i](low_s[:, i]).unsqueeze(1)), dim=1)
        else:
            xc = low_s

        loss_lr = loss_mse(xc, low_t) / B * self.alpha_vitkd

        """ViTKD: Generation"""
        if self.align is not None:  # noqa: SIM108  (the authors' code as written)
            x = self.align(high_s)
        else:
            x = high_s

        # Mask tokens
        B, N, D = x.shape
        x, mat, ids, ids_masked = self.random_masking(x, self.lambda_vitkd)
        mask_tokens = self.mask_token.repeat(B, N - x.shape[1], 1)
        x_ = torch.cat([x, mask_tokens], dim=1)
        x = torch.gather(x_, dim=1, index=ids.unsqueeze(-1).repeat(1, 1, D))
        mask = mat.unsqueeze(-1)

        hw = int(N**0.5)
        x = x.reshape(B, hw, hw, D).permute(0, 3, 1, 2)
        x = self.generation(x).flatten(2).transpose(1, 2)

        loss_gen = loss_mse(torch.mul(x, mask), torch.mul(high_t, mask))
        loss_gen = loss_gen / B * self.beta_vitkd / self.lambda_vitkd

        return loss_lr + loss_gen

    def random_masking(self, x, mask_ratio):
        N, L, D = x.shape  # batch, length, dim
        len_keep = int(L * (1 - mask_ratio))

        noise = torch.rand(N, L, device=x.device)  # noise in [0, 1]

        # sort noise for each sample
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)

        # keep the first subset
        ids_keep = ids_shuffle[:, :len_keep]
        ids_masked = ids_shuffle[:, len_keep:L]

        x_keep = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))

        # generate the binary mask: 0 is keep, 1 is remove
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        # unshuffle to get the binary mask
        mask = torch.gather(mask, dim=1, index=ids_restore)

        return x_keep, mask, ids_restore, ids_masked


def features(batch: int, tokens: int, dim: int, layers: int = 3) -> list[torch.Tensor]:
    return [randn(batch, tokens, dim) for _ in range(layers)]


def shapes(feats: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(f.shape) for f in feats]


def copy_into_reference(ours: ViTKD, ref: AuthorsViTKDLoss) -> None:
    """Give the reference our weights (a random mask token, so that using it is tested too)."""
    with torch.no_grad():
        ours.mask_token.copy_(randn(*ours.mask_token.shape))
        ref.mask_token.copy_(ours.mask_token)
        ref.generation.load_state_dict(ours.generator.state_dict())
        if ref.align is not None:
            for i in range(2):
                ref.align2[i].load_state_dict(ours.mimic_align[i].state_dict())
            ref.align.load_state_dict(ours.gen_align.state_dict())


@pytest.mark.parametrize(("ds", "dt"), [(6, 10), (8, 8)])
@pytest.mark.parametrize("options", [{}, {"alpha": 0.7, "beta": 1.3, "mask_ratio": 0.3}])
def test_vitkd_matches_the_authors_loss_and_gradients(ds, dt, options):
    b, n = 3, 16
    s_feats = [f.requires_grad_() for f in features(b, n, ds)]
    t_feats = features(b, n, dt)
    ours = ViTKD(shapes(s_feats), shapes(t_feats), **options)
    ref = AuthorsViTKDLoss(
        ds,
        dt,
        **{f"{k}_vitkd": v for k, v in {"alpha": 0.7, "beta": 1.3, "lambda": 0.3}.items() if options},
    )
    copy_into_reference(ours, ref)

    torch.manual_seed(123)  # the same mask for both
    loss = ours(s_feats, t_feats)
    grads = torch.autograd.grad(loss, [*s_feats, *ours.parameters()])
    torch.manual_seed(123)
    stacked_s = [torch.stack(s_feats[:2], dim=1), s_feats[2]]  # the authors' (B, 2, N, D) + (B, N, D)
    ref_loss = ref(stacked_s, [torch.stack(t_feats[:2], dim=1), t_feats[2]])
    ref_grads = torch.autograd.grad(ref_loss, [*s_feats, *ref.parameters()])

    assert loss.ndim == 0 and loss > 0
    assert_close(loss, ref_loss)
    ours_names = [name for name, _ in ours.named_parameters()]
    ref_names = [name for name, _ in ref.named_parameters()]
    # the same parameters in the same order: student features, then (maps,) mask token, generator
    assert len(ours_names) == len(ref_names) == (5 if ds == dt else 11)
    ours_by_name = dict(zip(["s0", "s1", "s2", *ours_names], grads, strict=True))
    ref_by_name = dict(zip(["s0", "s1", "s2", *ref_names], ref_grads, strict=True))
    renamed = {"mask_token": "mask_token", "s0": "s0", "s1": "s1", "s2": "s2"}
    renamed |= {f"generator.{i}.{p}": f"generation.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    renamed |= {f"mimic_align.{i}.{p}": f"align2.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    renamed |= {f"gen_align.{p}": f"align.{p}" for p in ("weight", "bias")}
    for name, grad in ours_by_name.items():
        assert_close(grad, ref_by_name[renamed[name]], msg=name)
        assert grad.abs().sum() > 0, name  # every part of the loss is trained


def test_vitkd_with_more_layers_mimics_all_but_the_last():
    """Four layers: the first three are each mimicked through their own map, the last generated."""
    s_feats, t_feats = features(2, 9, 4, layers=4), features(2, 9, 5, layers=4)
    method = ViTKD(shapes(s_feats), shapes(t_feats), alpha=1.0, beta=0.0)
    assert len(method.mimic_align) == 3
    mimicked = zip(method.mimic_align, s_feats[:3], t_feats[:3], strict=True)
    expected = sum((align(s) - t).pow(2).sum() for align, s, t in mimicked) / 2
    assert_close(method(s_feats, t_feats), expected)


def test_vitkd_mask_matches_the_authors_and_follows_the_global_seed():
    method = ViTKD([(2, 16, 4)] * 2, [(2, 16, 4)] * 2, mask_ratio=0.3)
    torch.manual_seed(7)
    mask = method.random_mask(5, 16, torch.device("cpu"))
    ref = AuthorsViTKDLoss(4, 4)  # built before seeding: its layers' initialisation draws numbers
    torch.manual_seed(7)
    _, ref_mask, _, _ = ref.random_masking(randn(5, 16, 4), 0.3)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, ref_mask.bool())
    assert mask.sum(dim=1).tolist() == [16 - int(16 * 0.7)] * 5  # 5 of 16 tokens, in every sample
    torch.manual_seed(7)
    assert torch.equal(method.random_mask(5, 16, torch.device("cpu")), mask)
    assert not torch.equal(method.random_mask(5, 16, torch.device("cpu")), mask)  # the next draw differs


def test_vitkd_generation_only_compares_the_masked_tokens():
    s_feats, t_feats = features(2, 16, 6), features(2, 16, 6)
    method = ViTKD(shapes(s_feats), shapes(t_feats), alpha=0.0, beta=1.0)
    torch.manual_seed(0)
    masked = method.random_mask(2, 16, torch.device("cpu"))
    torch.manual_seed(0)
    loss = method(s_feats, t_feats)
    changed = t_feats[-1].clone()
    changed[~masked] += 100.0  # the teacher's visible tokens are not targets
    torch.manual_seed(0)
    assert_close(method(s_feats, [*t_feats[:-1], changed]), loss)
    changed[masked] += 1.0
    torch.manual_seed(0)
    assert method(s_feats, [*t_feats[:-1], changed]) > loss + 1


def test_vitkd_accepts_teacher_features_made_under_inference_mode():
    s_feats = [f.requires_grad_() for f in features(2, 4, 3)]
    with torch.inference_mode():
        t_feats = [f.clone() for f in features(2, 4, 5)]
    method = ViTKD(shapes(s_feats), shapes(t_feats))
    method(s_feats, t_feats).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s_feats)


def test_vitkd_builds_for_one_batch_size_and_runs_on_any():
    method = ViTKD([(1, 4, 3)] * 3, [(1, 4, 5)] * 3)
    assert method(features(7, 4, 3), features(7, 4, 5)).ndim == 0


def test_vitkd_registry_attributes_and_extra_parameters():
    assert GROUP_METHODS.get("vitkd") is ViTKD
    assert kdkit.registry.GROUP_METHODS is GROUP_METHODS  # one registry, the one the Distiller uses
    assert ViTKD.select == "patch" and ViTKD.min_layers == 2
    ds, dt = 6, 10
    linear, conv = ds * dt + dt, dt * dt * 9 + dt
    assert ViTKD([(2, 16, ds)] * 3, [(2, 16, dt)] * 3).extra_parameters() == 3 * linear + dt + 2 * conv
    assert ViTKD([(2, 16, dt)] * 3, [(2, 16, dt)] * 3).extra_parameters() == dt + 2 * conv  # no maps


@pytest.mark.parametrize(
    ("student", "teacher", "message"),
    [
        (
            [(2, 16, 4)] * 3,
            [(2, 16, 8)] * 2,
            r"as many student as teacher layers; got 3 student layers \[\(2, 16, 4\).*2 teacher layers",
        ),
        ([(2, 16, 4)], [(2, 16, 8)], r"needs at least 2 layers per model; got 1: student \[\(2, 16, 4\)\]"),
        (
            [(2, 16, 4), (2, 17, 4)],
            [(2, 16, 8), (2, 17, 8)],
            r"layer 1: the generated layer's 17 tokens are not a square patch grid \(student \(2, 17, 4\), "
            r"teacher \(2, 17, 8\)\); select the patch tokens only",
        ),
        (
            [(2, 16, 4), (2, 16, 4)],
            [(2, 16, 8), (2, 25, 8)],
            r"layer 1: student \(2, 16, 4\) and teacher \(2, 25, 8\) have different token counts "
            r"\(16 vs 25\)",
        ),
        (
            [(2, 4), (2, 16, 4)],
            [(2, 8), (2, 16, 8)],
            r"layer 0: expected token features \(B, N, D\); got student \(2, 4\), teacher \(2, 8\)",
        ),
    ],
)
def test_vitkd_refuses_bad_shapes_when_built(student, teacher, message):
    with pytest.raises(ValueError, match=message):
        ViTKD(student, teacher)


def test_vitkd_refuses_features_it_was_not_built_for():
    method = ViTKD([(2, 16, 4)] * 3, [(2, 16, 8)] * 3)
    s, t = features(2, 16, 4), features(2, 16, 8)
    with pytest.raises(ValueError, match=r"built for 3 layers per model; got 2 student and 3 teacher"):
        method(s[:2], t)
    with pytest.raises(ValueError, match=r"layer 2: built for student \(B, 16, 4\), teacher \(B, 16, 8\); "):
        method([*s[:2], randn(2, 16, 5)], t)
    wrong_tokens = r"layer 1: built for .* got student \(2, 16, 4\), teacher \(2, 9, 8\)$"
    with pytest.raises(ValueError, match=wrong_tokens):
        method(s, [t[0], randn(2, 9, 8), t[2]])
    wrong_batch = r"layer 1: batch sizes differ: student \(3, 16, 4\), teacher \(2, 16, 8\)"
    with pytest.raises(ValueError, match=wrong_batch):
        method([s[0], randn(3, 16, 4), s[2]], t)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"alpha": -1.0}, r"^alpha: expected a number >= 0, got -1.0"),
        ({"alpha": True}, r"^alpha: expected a number >= 0, got True"),
        ({"beta": "3e-6"}, r"^beta: expected a number >= 0, got '3e-6'"),
        ({"beta": float("nan")}, r"^beta: expected a number >= 0, got nan"),
        ({"mask_ratio": 0.0}, r"^mask_ratio: expected a number in \(0, 1\), got 0.0"),
        ({"mask_ratio": 1}, r"^mask_ratio: expected a number in \(0, 1\), got 1"),
        ({"mask_ratio": 1e-17}, r"^mask_ratio: 1e-17 masks none of the 16 tokens"),  # 1 - 1e-17 == 1.0
    ],
)
def test_vitkd_validates_its_options(options, message):
    with pytest.raises(ValueError, match=message):
        ViTKD([(2, 16, 4)] * 2, [(2, 16, 4)] * 2, **options)


def test_vitkd_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="lambda_vitkd"):
        ViTKD([(2, 16, 4)] * 2, [(2, 16, 4)] * 2, lambda_vitkd=0.5)


def test_training_the_student_lowers_the_vitkd_loss():
    """A tiny student (a linear map per layer of fixed inputs) and the method's own parameters,
    trained on a fixed teacher: the loss at a fixed mask falls well below its start."""
    torch.manual_seed(0)
    b, n, ds, dt = 4, 9, 4, 6
    inputs = features(b, n, 5)
    teacher = [torch.tanh(x @ randn(5, dt)) for x in inputs]
    student = nn.ModuleList(nn.Linear(5, ds) for _ in inputs)
    method = ViTKD([(b, n, ds)] * 3, [(b, n, dt)] * 3, alpha=1.0, beta=1.0)
    optimizer = torch.optim.Adam([*student.parameters(), *method.parameters()], lr=0.03)

    def loss_at(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return method([layer(x) for layer, x in zip(student, inputs, strict=True)], teacher)

    with torch.no_grad():
        start = np.mean([loss_at(seed).item() for seed in range(3)])
    for step in range(60):
        optimizer.zero_grad()
        loss_at(100 + step).backward()  # a new mask every step, as in training
        optimizer.step()
    with torch.no_grad():
        end = np.mean([loss_at(seed).item() for seed in range(3)])
    assert end < 0.5 * start
