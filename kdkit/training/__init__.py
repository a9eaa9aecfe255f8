"""Training: the loop (`Trainer`), the supervised task, the optimizer and schedule, what the loop prints."""
