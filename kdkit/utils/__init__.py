"""Utilities: checkpoints, locks, worker processes, run logging, devices, peak memory, torch.distributed."""
