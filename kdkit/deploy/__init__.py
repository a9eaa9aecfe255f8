"""Deployment: `kdkit export` (ONNX / TorchScript), `kdkit predict` (files → scores) and `kdkit eval`.

Modules: `calibration` (decision thresholds an evaluator fixed), `modelfile` (checkpoints and
exports behind one interface, with their metadata), `inputs` (images and videos → model input),
and one module per command. Nothing here is imported by training.
"""
