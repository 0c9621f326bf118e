"""Evaluation: task metrics, efficiency and reports for a base model and its adapters."""
