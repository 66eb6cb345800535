"""The network (ResNet-N + head), the checkpoint and its ModelSpec, and model-file formats."""
