"""Evaluation: metrics, the report, per-image results and the evaluation loop."""
