"""Training: the loop (`Trainer`), the supervised task, the device and precision, the optimizer."""
