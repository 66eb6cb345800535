"""What a user may choose, and the bounds on it, known without importing torch.

The CLI's parser (``braintumor --help``, argument errors, ``--version``) is built from these; the modules that
implement each choice import them from here and check at import that they implement exactly these.
"""

from __future__ import annotations

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
OPTIMIZERS = ("ranger", "radam", "adam", "adamw", "sgd")
STEP_MODES = ("auto", "eager", "compile", "compile-step", "cuda-graphs")
PRECISIONS = ("auto", "bf16", "fp32")
# The largest input side a model may declare (training's --image-size bound too): ResNet-152 at 1024 px already
# needs tens of GB per batch of 32, and a larger image_size read from a file would only allocate.
MAX_IMAGE_SIZE = 1024
# The model shipped inside the package (see MODEL_CARD.md); "reference" names it wherever a checkpoint is expected.
REFERENCE_NAME = "reference"
