"""The teacher-output cache: a teacher's logits and tapped features, stored once, reused many times.

A training sample is identified by its key `(sample index, augmentation slot)` (see
`kdkit.data.datasets.SeededAugmentation`: the same key always gives the same augmented image). The first
time the teacher sees a key, its outputs for it are written to a memory-mapped file; later epochs
that replay the augmentation (`data.aug_cycle`), re-runs and ablation variants with the same
teacher read them back instead of running the teacher.

Layout of one entry, ``<cache_dir>/<key>/``::

    key.json          what the entry depends on (teacher weights hash, taps, precision, data)
    layout.json       the stored fields: name, per-sample shape, dtype; storage dtype and width
    slot-00003.bin    (samples × width) values of augmentation slot 3, a sparse memory-mapped file
    slot-00003.done   (samples,) uint8 flags: 1 once the sample's row is written

The key is a SHA-256 of everything the outputs depend on, so a stale entry is never read; the
values are stored in the teacher's own output precision (fp16/bf16 for a half-precision teacher,
fp32 otherwise), so training reads exactly what the live teacher would give: results are identical
with and without the cache. Only selected features are stored (class tokens, pooled features),
never whole token maps unless a tap selects them. See docs/performance.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdkit import CACHE_KEYS_VERSION
from kdkit.config.schema import DistillSpec
from kdkit.data.datasets import SeededAugmentation
from kdkit.distill.taps import Tap, prefix_tokens
from kdkit.utils import distributed
from kdkit.utils.checkpoint import as_newly_created, atomic_write_text
from kdkit.utils.runlog import console

FORMAT = 1
GB = 1024**3
# numpy has no bfloat16: its values are stored as their 16 raw bits.
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheError(ValueError):
    """A cache entry that does not match what it is opened for."""


def default_cache_dir() -> Path:
    """`$KDKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/kdkit/teacher-outputs` (`~/.cache/...`)."""
    if os.environ.get("KDKIT_CACHE_DIR"):
        return Path(os.environ["KDKIT_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kdkit" / "teacher-outputs"


def teacher_cache_dir(spec: DistillSpec) -> Path:
    """Where a distill stage keeps its teacher outputs: `spec.cache_dir`, else `default_cache_dir()`."""
    return Path(spec.cache_dir).expanduser() if spec.cache_dir else default_cache_dir()


def weights_digest(module: nn.Module, dtype: torch.dtype | None = None) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes of every tensor), as it is or,
    with `dtype`, as `module.to(dtype)` would make it (floating-point tensors converted)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass(frozen=True)
class Field:
    """One stored output: its name, its shape for one sample and its dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def width(self) -> int:
        """Values per sample."""
        return math.prod(self.shape)


class _Slot:
    """The memory-mapped values and done-flags of one augmentation slot."""

    def __init__(self, values: np.memmap, done: np.memmap) -> None:
        self.values, self.done = values, done

    def flush(self) -> None:
        self.values.flush()  # values before flags: a flag never announces an unwritten row
        self.done.flush()


class TeacherCache:
    """Teacher outputs per (sample index, augmentation slot) in memory-mapped files under `folder`.

    `get(keys, device)` returns the outputs of a batch when every key is stored (else None);
    `put(keys, outputs)` stores the rows not stored yet. The stored fields are fixed by the first
    `put` (written to layout.json). Adding a slot that would take the cache directory `root`
    beyond `max_bytes` (or the disk beyond its free space) prints one warning and leaves that
    slot unstored: the teacher then runs live for it, which gives the same results.
    """

    def __init__(self, root: Path, key: dict[str, Any], num_samples: int, max_bytes: int) -> None:
        self.root = Path(root)
        self.key = key
        text = json.dumps(key, sort_keys=True, default=str)
        self.folder = self.root / hashlib.sha256(text.encode()).hexdigest()[:24]
        self.num_samples = num_samples
        self.max_bytes = max_bytes
        self.fields: list[Field] | None = None
        self.storage, self.width = torch.float32, 0  # set with the fields
        self.slots: dict[int, _Slot | None] = {}  # None: not stored (size bound)
        self.hits = self.misses = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "key.json").exists():
            atomic_write_text(
                json.dumps(key, indent=2, sort_keys=True, default=str), self.folder / "key.json"
            )
        self._read_layout()

    # ------------------------------------------------------------------ layout
    def _read_layout(self) -> None:
        path = self.folder / "layout.json"
        if not path.exists():
            return
        layout = json.loads(path.read_text())
        if layout.get("format") != FORMAT or layout.get("num_samples") != self.num_samples:
            raise CacheError(
                f"teacher cache {self.folder}: written for {layout.get('num_samples')} samples "
                f"(format {layout.get('format')}), opened for {self.num_samples} (format {FORMAT}); "
                "delete the folder"
            )
        self.fields = [Field(f["name"], tuple(f["shape"]), f["dtype"]) for f in layout["fields"]]
        # One dtype per row: the fields' own when they share a 16-bit one, else float32 (exact for all).
        dtypes = {f.dtype for f in self.fields}
        self.storage = _TORCH[dtypes.pop()] if dtypes in ({"float16"}, {"bfloat16"}) else torch.float32
        self.width = sum(f.width for f in self.fields)  # stored values per sample

    def _set_layout(self, outputs: dict[str, torch.Tensor]) -> None:
        fields = [
            Field(name, tuple(t.shape[1:]), str(t.dtype).removeprefix("torch."))
            for name, t in outputs.items()
        ]
        if self.fields is not None:
            if fields != self.fields:
                raise CacheError(
                    f"teacher cache {self.folder}: stored fields {self.fields} differ from the "
                    f"teacher's outputs {fields}; delete the folder"
                )
            return
        layout = {"format": FORMAT, "num_samples": self.num_samples, "fields": [asdict(f) for f in fields]}
        if not (self.folder / "layout.json").exists():
            atomic_write_text(json.dumps(layout, indent=2), self.folder / "layout.json")
        self._read_layout()  # whoever wrote it first wins; a different layout is an error above
        self._set_layout(outputs)

    def slot_bytes(self) -> int:
        """Disk size of one full slot (values and flags)."""
        return self.num_samples * (self.width * self.storage.itemsize + 1)

    # ------------------------------------------------------------------ slot files
    def _slot(self, slot: int, create: bool) -> _Slot | None:
        if slot in self.slots:
            return self.slots[slot]
        if self.fields is None:
            return None
        values_path = self.folder / f"slot-{slot:05d}.bin"
        done_path = self.folder / f"slot-{slot:05d}.done"
        if not done_path.exists():
            if not create:
                return None
            if not self._room_for_slot(slot):
                self.slots[slot] = None
                return None
            _create_sparse(values_path, self.num_samples * self.width * self.storage.itemsize)
            _create_sparse(done_path, self.num_samples)  # after the values: done implies values
        shape = (self.num_samples, self.width)
        values = np.memmap(values_path, dtype=_NUMPY[self.storage], mode="r+", shape=shape)
        done = np.memmap(done_path, dtype=np.uint8, mode="r+", shape=(self.num_samples,))
        self.slots[slot] = _Slot(values, done)
        return self.slots[slot]

    def _room_for_slot(self, slot: int) -> bool:
        need = self.slot_bytes()
        used = _cache_size(self.root)
        free = shutil.disk_usage(self.root).free
        if used + need <= self.max_bytes and need < free:
            return True
        if distributed.is_main():
            console.print(
                f"[yellow]teacher cache: storing augmentation slot {slot} needs {need / GB:.2f} GB more; "
                f"{self.root} holds {used / GB:.2f} GB of at most {self.max_bytes / GB:.2f} GB "
                f"(distill.cache_max_gb), {free / GB:.2f} GB free on disk. The teacher runs live for "
                "this slot (same results, no speed-up). Delete old entries in that folder, raise "
                "distill.cache_max_gb, or set data.aug_cycle to reuse fewer slots.[/yellow]",
                soft_wrap=True,
            )
        return False

    # ------------------------------------------------------------------ reads and writes
    def get(self, keys: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor] | None:
        """The stored outputs of a batch with `keys` (B, 2), or None unless every row is stored."""
        keys = keys.cpu()
        index, slots = keys[:, 0].numpy(), keys[:, 1].numpy()
        if self.fields is None:  # nothing stored yet
            self.misses += len(index)
            return None
        rows = np.empty((len(index), self.width), dtype=_NUMPY[self.storage])
        for slot in np.unique(slots):
            mine = slots == slot
            store = self._slot(int(slot), create=False)
            if store is None or not store.done[index[mine]].all():
                self.misses += len(index)
                return None
            rows[mine] = store.values[index[mine]]
        self.hits += len(index)
        return self._unpack(torch.from_numpy(rows), torch.device(device))

    def put(self, keys: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        """Store the rows of `outputs` (name → (B, ...) tensors) whose keys are not stored yet."""
        self._set_layout(outputs)
        keys = keys.cpu()
        index, slots = keys[:, 0].numpy(), keys[:, 1].numpy()
        packed = None
        for slot in np.unique(slots):
            store = self._slot(int(slot), create=True)
            if store is None:
                continue
            mine = slots == slot
            new = mine & ~store.done[index].astype(bool)
            if not new.any():
                continue
            if packed is None:
                packed = self._pack(outputs)
            store.values[index[new]] = packed[new]
            store.done[index[new]] = 1

    def _pack(self, outputs: dict[str, torch.Tensor]) -> np.ndarray:
        assert self.fields is not None
        storage = self.storage
        parts = [outputs[f.name].detach().reshape(len(outputs[f.name]), -1).to(storage) for f in self.fields]
        row = torch.cat(parts, dim=1).cpu()
        return (row.view(torch.int16) if storage == torch.bfloat16 else row).numpy()

    def _unpack(self, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        assert self.fields is not None
        if self.storage == torch.bfloat16:
            rows = rows.view(torch.bfloat16)
        if device.type == "cuda":
            rows = rows.pin_memory()
        rows = rows.to(device, non_blocking=True)
        out, start = {}, 0
        for f in self.fields:
            value = rows[:, start : start + f.width].reshape(len(rows), *f.shape)
            out[f.name] = value.to(_TORCH[f.dtype])
            start += f.width
        return out

    def flush(self) -> None:
        """Write every open slot to disk."""
        for store in self.slots.values():
            if store is not None:
                store.flush()

    def close(self) -> None:
        """Flush, release the files and report how many samples were served from the cache."""
        self.flush()
        self.slots.clear()
        total = self.hits + self.misses
        if total and distributed.is_main():
            console.print(
                f"teacher cache {self.folder}: {self.hits}/{total} samples served from the cache "
                f"({100 * self.hits / total:.0f} %)",
                markup=False,
                soft_wrap=True,
            )


def _create_sparse(path: Path, size: int) -> None:
    """Create a zero-filled file of `size` bytes atomically (other processes may race to do the same)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.ftruncate(fd, size)
        os.close(fd)
        as_newly_created(tmp)  # teammates may share a cache folder
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process created it first: use theirs
    finally:
        Path(tmp).unlink(missing_ok=True)


def _cache_size(root: Path) -> int:
    """Bytes the slot files under `root` take when full (their logical size)."""
    return sum(p.stat().st_size for p in root.glob("*/slot-*") if p.is_file())


def teacher_cache_key(
    teacher: nn.Module,
    taps: dict[str, Tap],
    teacher_dtype: str,
    amp: str,
    dataset: SeededAugmentation,
    teacher_input: Any = None,
) -> dict[str, Any]:
    """What a teacher's stored outputs depend on: its weights (a hash of its tensors, as they are
    once converted to `teacher_dtype`), its `taps` by feature name (the teacher side of the layer pairs
    and groups), its
    precision and the autocast mode `amp` (ignored for a half-precision teacher, which runs outside
    autocast), and the training data as `SeededAugmentation.describe()` reports it (data settings,
    seed, transform, file fingerprint), and the conversion of the batch into the teacher's input
    (`kdkit.distill.teacher_input.TeacherInput.describe()`; absent when there is none, so the keys of
    teachers that see the student's input are those of earlier versions)."""
    dtype = _TORCH[teacher_dtype]
    key = {
        "format": FORMAT,
        "kdkit": CACHE_KEYS_VERSION,
        "teacher": type(teacher).__name__,
        "teacher_sha256": weights_digest(teacher, dtype),
        "teacher_dtype": str(dtype),
        "amp": amp if dtype == torch.float32 else "none",
        # with the names of their features: two methods tapping the same layers store them apart
        "taps": [{"name": name, **asdict(tap)} for name, tap in taps.items()],
        "num_prefix_tokens": prefix_tokens(teacher),
        "data": dataset.describe(),
    }
    if teacher_input is not None:
        key["teacher_input"] = teacher_input.describe()
    return key


def open_teacher_cache(
    spec: DistillSpec,
    dataset: Any,
    teacher: nn.Module,
    taps: dict[str, Tap],
    amp: str = "none",
    teacher_input: Any = None,
) -> TeacherCache | None:
    """The cache of a distill stage's teacher outputs (key: `teacher_cache_key` with
    `spec.teacher_dtype`), or None when `spec.cache` is off or `dataset` has no sample keys.
    `taps` are the teacher's taps by feature name (`kdkit.distill.distiller.feature_taps`); `teacher_input`
    the conversion of its input (or None)."""
    if not spec.cache or not isinstance(dataset, SeededAugmentation):
        return None
    key = teacher_cache_key(teacher, taps, spec.teacher_dtype, amp, dataset, teacher_input)
    cache = TeacherCache(teacher_cache_dir(spec), key, len(dataset), int(spec.cache_max_gb * GB))
    if distributed.is_main():
        stored = sorted(cache.folder.glob("slot-*.done"))
        console.print(
            f"teacher cache: {cache.folder} ({len(stored)} augmentation slot(s) stored so far)",
            markup=False,
            soft_wrap=True,
        )
    return cache
