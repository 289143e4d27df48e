"""Evaluation: medical VQA tasks, batched generation, metrics and reports."""
