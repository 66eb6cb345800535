"""The data path, one concern per module.

- :mod:`~braintumor.data.index`: discover a folder of class folders, check its files, split train/validation.
- :mod:`~braintumor.data.io`: read any supported file (JPEG, PNG, BMP, TIFF, DICOM) into an RGB image.
- :mod:`~braintumor.data.dicom`: DICOM slices (LUTs, colour, decoder plug-ins, inflate guard) for the reader.
- :mod:`~braintumor.data.pixels`: the read error, the per-image memory budget and the 8-bit conversion.
- :mod:`~braintumor.data.dedup`: exact and near duplicate detection (image hashes, their cache, duplicate groups).
- :mod:`~braintumor.data.scan`: one decode per file checks it, hashes it (duplicate groups) and fills the cache.
- :mod:`~braintumor.data.transforms`: preprocessing and augmentation, per image (CPU) and per batch (device).
- :mod:`~braintumor.data.cache`: the decoded-image cache (GPU, host memory or none) and decoding into it.
- :mod:`~braintumor.data.pipeline`: batches for training and evaluation, DataLoader or cache backed.
"""
