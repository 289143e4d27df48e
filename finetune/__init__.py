"""Fine-tuning: the training wrapper, the curriculum stages and per-task heads."""
