"""Utilities: checkpoints, locks, worker processes, run logging, devices, torch.distributed."""
