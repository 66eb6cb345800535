"""Training: the config, the trainer and its step, the run folder, EMA, distillation, TensorBoard."""
