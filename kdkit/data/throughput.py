"""How many training images per second one loader worker makes: `worker_throughput(dataset)`.

A DataLoader worker is one process running `dataset[i]` in a loop on one core, so timing that loop
in this process, with torch limited to one thread as in a worker, gives the rate of one worker;
W workers on W idle cores make about W times as many. `kdkit bench` reports it for the recipe's
training data (and, for a data set served by a frame store, for the same data decoded from its
files: `dataset.without_store()`); `benchmarks/loader_throughput.py` compares image formats.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def innermost(dataset: Any) -> Any:
    """The data set under its wrappers (`SeededAugmentation`, `Subset`, ...: each a `.dataset`)."""
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


def worker_throughput(dataset: Any, items: int = 256, warmup: int = 8) -> float:
    """Items per second of `dataset[i]` (decode, augment, to tensor) in one thread, over `items`
    items cycled from the start of the data set (after `warmup` untimed ones)."""
    count = len(dataset)
    if count == 0:
        raise ValueError("the data set is empty: nothing to time")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        for i in range(warmup):
            dataset[i % count]
        start = time.perf_counter()
        for i in range(items):
            dataset[(warmup + i) % count]
        return items / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def loader_throughput(dataset: Any, items: int = 256) -> dict[str, Any]:
    """One worker's images/s on `dataset` as it is, and on the same data read from its files when
    a frame store serves it (`served_from_store`, `without_store()`: the FAS frame data sets)."""
    stored = int(getattr(dataset, "served_from_store", 0))
    report: dict[str, Any] = {"items": items, "served_from_store": stored, "size": len(dataset)}
    report["worker_img_per_s"] = worker_throughput(dataset, items)
    if stored and hasattr(dataset, "without_store"):
        report["files_worker_img_per_s"] = worker_throughput(dataset.without_store(), items)
    return report
