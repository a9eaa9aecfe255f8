"""Distillation: taps, pairs, adapters, losses, layer groups, teacher input, ensembles, Distiller, cache."""
