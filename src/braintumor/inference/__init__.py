"""Inference: the Classifier, the runtimes, exports, writers and the volume verdict."""
