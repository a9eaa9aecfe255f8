"""A hand-written PyTorch distillation step: the yardstick `kdkit bench` measures kdkit against.

One step does exactly what a kdkit `distill` step does, written as plainly as possible with
no kdkit code (only torch): the frozen teacher under `torch.inference_mode()` (in its own
precision, outside autocast when it is half precision), forward hooks on the tapped blocks, the
token selector, the feature adapter, `(1 - alpha)·CE + alpha·tau²·KL + beta·mean(feature losses)`,
backward, gradient clipping, AdamW with timm's weight-decay groups and a per-step cosine learning
rate. (kdkit's step time) / (this step time) is what kdkit's hooks, adapters and bookkeeping cost.

    loop = ReferenceLoop(teacher, student, taps=[("blocks.0", "blocks.1", "cls")], adapter="covariance")
    loss = loop.step(images, labels)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def select(x: Tensor, how: str, prefix_tokens: int) -> Tensor:
    """The token selectors kdkit's taps offer, for (B, N, D) tokens and (B, C, H, W) maps."""
    if isinstance(x, (tuple, list)):
        x = x[0]
    if how == "all" or (how == "tokens" and x.ndim == 3):
        return x
    if x.ndim == 4:
        return x.mean(dim=(2, 3)) if how == "mean" else x.flatten(2).transpose(1, 2)
    if how == "cls":
        return x[:, 0]
    if how.startswith("index:"):
        return x[:, int(how[6:])]
    patch = x[:, prefix_tokens:]
    return patch.mean(dim=1) if how == "mean" else patch


def feature_loss(name: str, a: Tensor, b: Tensor) -> Tensor:
    """mse, smooth_l1 or cosine, mean-reduced."""
    if name == "mse":
        return F.mse_loss(a, b)
    if name == "smooth_l1":
        return F.smooth_l1_loss(a, b)
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


class ReferenceLoop:
    """Teacher, student, hooks, adapters, losses and an AdamW step, by hand.

    `taps` lists `(student path, teacher path, selector)` per layer pair (block outputs).
    `adapter` is covariance, projection, identity or gram; projection layers are created here
    (`self.projections`), sized by a dry run on `example`.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        taps: Sequence[tuple[str, str, str]],
        adapter: str = "covariance",
        adapter_options: dict[str, Any] | None = None,
        criterion: str = "mse",
        alpha: float = 0.7,
        tau: float = 3.0,
        beta: float = 1.0,
        label_smoothing: float = 0.0,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        clip_grad: float | None = None,
        amp: str = "none",
        teacher_dtype: torch.dtype = torch.float32,
        schedule: tuple[int, int, float, float] | None = None,
        example: Tensor | None = None,
    ) -> None:
        if adapter not in ("covariance", "projection", "identity", "gram"):
            raise ValueError(f"the reference loop has no adapter {adapter!r}")
        self.options = dict(adapter_options or {})
        known = {
            "covariance": {"eps", "detach_covariance"},
            "projection": {"bias"},
            "gram": {"p"},
            "identity": set(),
        }[adapter]
        if set(self.options) - known:
            raise ValueError(
                f"the reference loop does not implement {adapter} options {sorted(self.options)}"
            )
        self.teacher = teacher.eval().requires_grad_(False).to(teacher_dtype)
        self.student, self.taps, self.adapter, self.criterion = student, list(taps), adapter, criterion
        self.alpha, self.tau, self.beta, self.label_smoothing = alpha, tau, beta, label_smoothing
        self.clip_grad, self.amp, self.teacher_dtype = clip_grad, amp, teacher_dtype
        self.lr, self.schedule, self.steps = lr, schedule, 0
        self.t_prefix = getattr(teacher, "num_prefix_tokens", 1)
        self.s_prefix = getattr(student, "num_prefix_tokens", 1)
        self.t_out: dict[str, Tensor] = {}
        self.s_out: dict[str, Tensor] = {}
        for s_path, t_path, _ in self.taps:
            self._hook(teacher, t_path, self.t_out)
            self._hook(student, s_path, self.s_out)
        self.projections = nn.ModuleList()
        if adapter == "projection":
            if example is None:
                raise ValueError("the projection adapter needs an example batch to size its layers")
            with torch.no_grad():
                student.eval()
                student(example)
                student.train()
                self.teacher(example.to(teacher_dtype))
            for s_path, t_path, how in self.taps:
                s_dim = select(self.s_out[s_path], how, self.s_prefix).shape[-1]
                t_dim = select(self.t_out[t_path], how, self.t_prefix).shape[-1]
                self.projections.append(nn.Linear(s_dim, t_dim, bias=self.options.get("bias", True)))
        self.projections.to(next(student.parameters()).device)
        self.params = [p for p in [*student.parameters(), *self.projections.parameters()] if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self._groups(weight_decay), lr=lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

    @staticmethod
    def _hook(model: nn.Module, path: str, store: dict[str, Tensor]) -> None:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            store[path] = output

        model.get_submodule(path).register_forward_hook(hook)

    def _groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """timm's groups: no decay for 1-d parameters, biases and the model's no_weight_decay() names."""
        skip = self.student.no_weight_decay() if hasattr(self.student, "no_weight_decay") else set()
        named = [*self.student.named_parameters(), *self.projections.named_parameters(prefix="projections")]
        decay, no_decay = [], []
        for name, p in named:
            if p.requires_grad:
                no = p.ndim <= 1 or name.endswith(".bias") or name in skip
                (no_decay if no else decay).append(p)
        return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]

    def _lr(self) -> float:
        """timm's per-step cosine schedule: linear warm-up, then cosine decay over all `total` steps
        (warm-up included), then `min_lr`; constant without a schedule."""
        if self.schedule is None:
            return self.lr
        warmup, total, warmup_lr, min_lr = self.schedule
        t = self.steps
        if t < warmup:
            return warmup_lr + t * (self.lr - warmup_lr) / warmup
        if t >= total:
            return min_lr
        return min_lr + 0.5 * (self.lr - min_lr) * (1 + math.cos(math.pi * t / total))

    def _map(self, i: int, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if self.adapter == "projection":
            return self.projections[i](s), t
        if self.adapter == "identity":
            return s, t
        if self.adapter == "gram":
            p = self.options.get("p", 2.0)
            s, t = s.flatten(1), t.flatten(1)
            return F.normalize(s @ s.T, p=p, dim=1), F.normalize(t @ t.T, p=p, dim=1)
        eps = self.options.get("eps", 1e-12)
        s_hat = F.normalize(s.reshape(-1, s.shape[-1]), dim=1, eps=eps)
        t_hat = F.normalize(t.reshape(-1, t.shape[-1]), dim=1, eps=eps)
        left = s_hat.detach() if self.options.get("detach_covariance", True) else s_hat
        return (s_hat @ (left.T @ t_hat)).reshape(t.shape), t_hat.reshape(t.shape)

    def step(self, images: Tensor, labels: Tensor) -> Tensor:
        """One optimisation step; returns the (detached) total loss."""
        device_type = images.device.type
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        amp = (
            torch.autocast(device_type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)
            if self.amp != "none"
            else contextlib.nullcontext()
        )
        teacher_precision = (
            torch.autocast(device_type, enabled=False)
            if self.teacher_dtype != torch.float32
            else contextlib.nullcontext()
        )
        with amp:
            with torch.inference_mode(), teacher_precision:
                t_logits = self.teacher(images.to(self.teacher_dtype))
                t_feats = [select(self.t_out[t_path], how, self.t_prefix) for _, t_path, how in self.taps]
            # Inference tensors cannot be saved for backward: use copies.
            t_logits, t_feats = t_logits.clone(), [t.clone() for t in t_feats]
            s_logits = self.student(images)
            loss = (1 - self.alpha) * F.cross_entropy(s_logits, labels, label_smoothing=self.label_smoothing)
            if self.alpha > 0:
                log_p = F.log_softmax(s_logits / self.tau, dim=-1)
                q = F.softmax(t_logits.to(s_logits.dtype) / self.tau, dim=-1)
                loss = loss + self.alpha * F.kl_div(log_p, q, reduction="batchmean") * self.tau**2
            if self.taps:
                terms = []
                for i, (s_path, _, how) in enumerate(self.taps):
                    s = select(self.s_out[s_path], how, self.s_prefix).float()
                    terms.append(feature_loss(self.criterion, *self._map(i, s, t_feats[i].float())))
                loss = loss + self.beta * torch.stack(terms).mean()
            self.s_out.clear()
            self.t_out.clear()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.steps += 1
        return loss.detach()
