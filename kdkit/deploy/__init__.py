"""Deployment, the library part: `export` (a model.pt to verified ONNX / TorchScript),
`modelfile` (checkpoints and exports behind one interface, with their metadata), `inputs`
(images and videos to model input, input preparers) and `predict` (files to scores). Their
commands are in `kdkit.cli` (export, predict, eval); nothing in the core imports this package.
"""
