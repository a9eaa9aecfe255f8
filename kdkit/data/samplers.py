"""The training order: which samples each step draws, fixed by (seed, epoch) and shared out between
DDP ranks (`EpochSampler`), optionally balanced across the training set's sample strata
(`BalancedSampler`, `data.balanced`; the strata come from `sample_strata`).

Sample strata are subsets of the *samples* (e.g. (domain, live/attack) of a FAS frame); they have
nothing to do with the *layer* groups of `distill.groups` (`kdkit.distill.layer_groups`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from kdkit.errors import DataError


class EpochSampler(Sampler[tuple[int, int]]):
    """The training order: a permutation fixed by (seed, epoch), shared out between DDP ranks.

    An epoch is `epoch_size` samples (default `size`): permutations of the data, concatenated and
    cut (a sample may then repeat within an epoch, with the same key).
    Yields `(sample index, augmentation slot)` pairs. The permutation of epoch e depends only on
    (seed, e), so a resumed run, an ablation variant with the same seed and every rank of a
    distributed run see the same order; rank r takes every `world`-th position (the list is padded
    with its first items to a multiple of `world`), so with a per-rank batch of B / world each
    global batch of B samples is exactly the one a single process would draw. The slot is
    e mod `aug_cycle` (or e itself), which picks the sample's augmentation (see `SeededAugmentation`).
    """

    def __init__(
        self,
        size: int,
        seed: int,
        aug_cycle: int | None = None,
        rank: int = 0,
        world: int = 1,
        epoch_size: int | None = None,
    ) -> None:
        self.size, self.seed, self.aug_cycle, self.rank, self.world = size, seed, aug_cycle, rank, world
        self.epoch_size = epoch_size or size
        self.epoch = self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Choose the epoch whose order (and augmentation slot) the next iteration yields, leaving
        out this rank's first `skip` samples (already trained by a run resumed mid-epoch)."""
        self.epoch, self.skip = epoch, skip

    @property
    def slot(self) -> int:
        """The augmentation slot of the current epoch."""
        return self.epoch % self.aug_cycle if self.aug_cycle else self.epoch

    def __len__(self) -> int:
        return -(-self.epoch_size // self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        while len(order) < self.epoch_size:  # `epoch_size` beyond the data: more permutations
            order += torch.randperm(self.size, generator=generator).tolist()
        order = order[: self.epoch_size]
        order += order[: len(self) * self.world - self.epoch_size]
        slot = self.slot
        return iter([(index, slot) for index in order[self.rank :: self.world][self.skip :]])


class BalancedSampler(EpochSampler):
    """`EpochSampler`'s order with every global batch drawing equally from each group (`data.balanced`).

    `groups` holds one hashable per sample, its stratum (e.g. (domain, label); see `sample_strata`);
    with G groups and a global batch of B (a multiple of G), each batch holds B / G samples of
    every group. The epoch keeps EpochSampler's number of steps, ceil(size / B), every batch full:
    each group contributes steps × B / G draws, taken from permutations of its samples fixed by
    (seed, epoch) — a group larger than that is subsampled, a smaller one repeats its samples only
    once its permutation is used up. Ranks share out every global batch as EpochSampler does, and
    yield the same `(sample index, augmentation slot)` pairs (a repeated sample has the same key in
    an epoch).
    """

    def __init__(
        self,
        groups: Sequence[Hashable],
        batch_size: int,
        seed: int,
        aug_cycle: int | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        super().__init__(len(groups), seed, aug_cycle, rank, world)
        members: dict[Hashable, list[int]] = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
        self.members = list(members.values())  # in order of first appearance: fixed by the data
        if batch_size % len(self.members) or batch_size % world:
            raise DataError(
                f"data.batch_size: {batch_size} must be a multiple of the {len(self.members)} groups "
                f"data.balanced draws equally from ({', '.join(map(str, members))}) and divide "
                f"evenly between the {world} processes"
            )
        self.batch_size = batch_size
        self.steps = -(-self.size // batch_size)

    def __len__(self) -> int:
        return self.steps * self.batch_size // self.world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        share = self.batch_size // len(self.members)
        draws = [self._draws(indices, self.steps * share, generator) for indices in self.members]
        order: list[int] = []
        for step in range(self.steps):
            batch = torch.tensor([i for d in draws for i in d[step * share : (step + 1) * share]])
            order += batch[torch.randperm(len(batch), generator=generator)].tolist()
        slot = self.slot
        return iter([(index, slot) for index in order[self.rank :: self.world][self.skip :]])

    @staticmethod
    def _draws(indices: list[int], count: int, generator: torch.Generator) -> list[int]:
        """`count` of `indices`: successive permutations of them, cut at `count`."""
        drawn: list[int] = []
        while len(drawn) < count:
            drawn += [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        return drawn[:count]


def sample_strata(dataset: Dataset) -> list[Hashable]:
    """The stratum of every sample, which `data.balanced` draws equally from: the data set's
    `groups` attribute (e.g. (domain, label) per sample), else its `labels`; a DataError when it has
    neither (or their length is not the data set's)."""
    strata = getattr(dataset, "groups", None)
    strata = getattr(dataset, "labels", None) if strata is None else strata
    if strata is None:
        raise DataError(
            f"data.balanced: the {type(dataset).__name__} training set has neither a `groups` nor a "
            "`labels` attribute to balance batches by; set data.balanced: false"
        )
    strata = list(strata)
    if len(strata) != len(dataset):  # type: ignore[arg-type]
        raise DataError(
            f"data.balanced: the training set has {len(dataset)} samples but {len(strata)} groups"  # type: ignore[arg-type]
        )
    return strata
