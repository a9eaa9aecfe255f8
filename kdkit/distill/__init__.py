"""Distillation: taps, pairs, adapters, losses, layer groups, teacher input, Distiller, teacher cache."""
