"""The data package: discovery and its errors, (grouped) splits, CPU transforms, the Dataset, LoaderBatches,
one decode per file (data.scan)"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from braintumor.data.index import discover, stratified_split
from braintumor.data.io import ImageReadError
from braintumor.data.pipeline import ImageFolderDataset
from braintumor.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform
from braintumor.errors import UserError

EXTENSIONS_HINT = ".bmp, .dcm, .jpeg, .jpg, .png, .tif, .tiff"


def write_image(path, value=128, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint8)).save(path, format="PNG")
    return path


# --- discover ---------------------------------------------------------------------------------------------------


def test_discover_sorted_classes_hidden_entries_and_mixed_case_extensions(tmp_path):
    write_image(tmp_path / "b_class" / "z.png")
    write_image(tmp_path / "b_class" / "A.PNG")
    write_image(tmp_path / "b_class" / "patient1" / "deep.Jpg")  # nested folders count for their class
    write_image(tmp_path / "b_class" / ".hidden.png")
    write_image(tmp_path / "b_class" / ".ipynb_checkpoints" / "copy.png")
    (tmp_path / "b_class" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "a_class" / "one.Tiff")
    write_image(tmp_path / ".ipynb_checkpoints" / "x.png")  # a hidden folder is not a class
    write_image(tmp_path / ".trash" / "y.png")
    write_image(tmp_path / "loose.png")  # files directly in the root belong to no class

    index = discover(tmp_path)

    assert index.root == tmp_path
    assert index.classes == ["a_class", "b_class"]
    assert [p.relative_to(tmp_path).as_posix() for p in index.paths] == [
        "a_class/one.Tiff",
        "b_class/A.PNG",
        "b_class/patient1/deep.Jpg",
        "b_class/z.png",
    ]
    assert index.labels == [0, 1, 1, 1]


def test_discover_missing_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError) as error:
        discover(missing)
    assert str(error.value) == f"data folder not found: {missing}"
    assert error.value.exit_code == 2


def test_discover_root_is_a_file(tmp_path):
    file = write_image(tmp_path / "image.png")
    with pytest.raises(UserError) as error:
        discover(file)
    assert str(error.value) == f"data path is not a directory: {file}"


def test_discover_single_class(tmp_path):
    write_image(tmp_path / "glioma" / "a.png")
    write_image(tmp_path / ".hidden" / "a.png")
    with pytest.raises(UserError) as error:
        discover(tmp_path)
    assert str(error.value) == f"need at least 2 class folders in {tmp_path}, found 1: glioma"


def test_discover_no_class_folders(tmp_path):
    write_image(tmp_path / "a.png")
    with pytest.raises(UserError) as error:
        discover(tmp_path)
    assert str(error.value) == f"need at least 2 class folders in {tmp_path}, found 0"


def test_discover_empty_class_folder(tmp_path):
    write_image(tmp_path / "glioma" / "a.png")
    (tmp_path / "notumor").mkdir()
    (tmp_path / "notumor" / "readme.txt").write_text("x")
    write_image(tmp_path / "notumor" / ".hidden.png")
    with pytest.raises(UserError) as error:
        discover(tmp_path)
    assert str(error.value) == f"class folder 'notumor' in {tmp_path} has no images ({EXTENSIONS_HINT})"


def test_discover_with_given_classes_uses_their_indices_and_allows_a_subset(tmp_path):
    write_image(tmp_path / "pituitary" / "p.png")
    write_image(tmp_path / "glioma" / "g.png")
    classes = ["notumor", "pituitary", "meningioma", "glioma"]
    index = discover(tmp_path, classes=classes)
    assert index.classes == classes
    assert [p.parent.name for p in index.paths] == ["glioma", "pituitary"]
    assert index.labels == [3, 1]

    single = tmp_path / "single"
    write_image(single / "glioma" / "g.png")
    assert discover(single, classes=classes).labels == [3]  # an evaluation folder may hold one class


def test_discover_with_given_classes_rejects_unknown_folders(tmp_path):
    write_image(tmp_path / "glioma" / "g.png")
    write_image(tmp_path / "zebra" / "z.png")
    write_image(tmp_path / "cat" / "c.png")
    with pytest.raises(UserError) as error:
        discover(tmp_path, classes=["glioma", "notumor"])
    assert str(error.value) == (
        f"class folders in {tmp_path} are not among the model's classes: cat, zebra (known: glioma, notumor)"
    )

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as error:
        discover(empty, classes=["glioma", "notumor"])
    assert str(error.value) == f"no class folders in {empty}: expected sub-folders named glioma, notumor"


# --- stratified_split -------------------------------------------------------------------------------------------


def test_stratified_split_is_seeded_stratified_disjoint_and_complete():
    labels = [0] * 40 + [1] * 20 + [2] * 7 + [3] * 2 + [4] * 1
    rng = np.random.default_rng(0)
    labels = list(rng.permutation(labels))

    train, val = stratified_split(labels, 0.25, seed=3)

    assert sorted(train + val) == list(range(len(labels)))
    assert not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    val_counts = Counter(labels[i] for i in val)
    # round-half-up of n * 0.25, at least one on each side for n >= 2, a singleton class stays in train.
    assert val_counts == {0: 10, 1: 5, 2: 2, 3: 1}
    assert stratified_split(labels, 0.25, seed=3) == (train, val)
    assert stratified_split(labels, 0.25, seed=4) != (train, val)


def test_stratified_split_keeps_one_on_each_side():
    labels = [0] * 10 + [1] * 10
    _, val = stratified_split(labels, 0.01, seed=0)
    assert Counter(labels[i] for i in val) == {0: 1, 1: 1}
    train, _ = stratified_split(labels, 0.99, seed=0)
    assert Counter(labels[i] for i in train) == {0: 1, 1: 1}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_stratified_split_rejects_bad_fraction(fraction):
    with pytest.raises(UserError) as error:
        stratified_split([0, 1, 0, 1], fraction, seed=0)
    assert str(error.value) == f"validation fraction must be between 0 and 1 (exclusive), got {fraction}"


def test_grouped_split_never_straddles_and_stays_roughly_stratified():
    rng = np.random.default_rng(1)
    labels, groups = [], []
    for group in range(120):
        label = group % 3
        size = int(rng.integers(1, 5))
        labels += [label] * size
        groups += [f"g{group}"] * size
    # A mixed group: its majority label (2) decides where it is stratified.
    labels += [2, 2, 0]
    groups += ["mixed"] * 3

    train, val = stratified_split(labels, 0.2, seed=7, groups=groups)

    assert sorted(train + val) == list(range(len(labels)))
    side = {}
    for i in train:
        assert side.setdefault(groups[i], "train") == "train"
    for i in val:
        assert side.setdefault(groups[i], "val") == "val", f"group {groups[i]} is on both sides"
    counts = Counter(labels)
    val_counts = Counter(labels[i] for i in val)
    for label in range(3):
        # Greedy whole-group filling lands within one group (<= 4 images) of round(n * 0.2).
        assert abs(val_counts[label] - round(counts[label] * 0.2)) <= 4
    assert stratified_split(labels, 0.2, seed=7, groups=groups) == (train, val)


def test_grouped_split_with_few_groups_keeps_each_class_on_both_sides():
    labels = [0] * 6 + [1] * 6
    groups = ["a"] * 5 + ["b"] + ["c"] * 3 + ["d"] * 3  # class 0: groups of 5 and 1; class 1: 3 and 3
    train, val = stratified_split(labels, 0.3, seed=0, groups=groups)
    assert {groups[i] for i in val} & {"a", "b"} and {groups[i] for i in train} & {"a", "b"}
    assert {groups[i] for i in val} & {"c", "d"} and {groups[i] for i in train} & {"c", "d"}
    # Class 0's target is 2 images: the 1-image group gets closer to it than the 5-image one.
    assert {groups[i] for i in val} & {"a", "b"} == {"b"}


def test_grouped_split_single_group_class_stays_in_train():
    labels = [0, 0, 0, 1, 1, 1, 1]
    groups = [1, 1, 1, 2, 3, 4, 5]
    train, val = stratified_split(labels, 0.5, seed=0, groups=groups)
    assert {0, 1, 2} <= set(train)
    assert len([i for i in val if labels[i] == 1]) == 2


# --- transforms -------------------------------------------------------------------------------------------------


def asymmetric_image(size=8):
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[:, : size // 4] = 255  # bright left quarter: a flip moves it to the right
    return Image.fromarray(array)


def test_eval_transform_shape_dtype_normalization_and_determinism():
    image = Image.fromarray(np.full((30, 50, 3), 51, dtype=np.uint8))
    transform = eval_transform(16)
    out = transform(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    expected = (51 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-6, rtol=0)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    assert torch.equal(transform(noisy), transform(noisy))


def test_eval_transform_resize_matches_pil_bilinear():
    array = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    out = eval_transform(20, mean=(0, 0, 0), std=(1, 1, 1))(image)
    reference = np.asarray(image.resize((20, 20), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    torch.testing.assert_close(out, torch.from_numpy(reference).permute(2, 0, 1), atol=1e-6, rtol=0)


def test_train_transform_flips_about_half_the_time():
    torch.manual_seed(0)
    transform = train_transform(8, rotation=0, mean=(0, 0, 0), std=(1, 1, 1))
    image = asymmetric_image()
    flips = 0
    trials = 400
    for _ in range(trials):
        out = transform(image)
        assert out.shape == (3, 8, 8) and out.dtype == torch.float32
        left, right = out[:, :, :2].mean().item(), out[:, :, -2:].mean().item()
        assert {left, right} == {0.0, 1.0}  # rotation=0: only the identity or the mirror image
        flips += right == 1.0
    assert abs(flips / trials - 0.5) < 4 * (0.25 / trials) ** 0.5


def test_train_transform_rotates_within_range():
    torch.manual_seed(0)
    array = np.zeros((33, 33, 3), dtype=np.uint8)
    array[16, 28] = 255  # a dot 12 px right of the centre
    image = Image.fromarray(array)
    transform = train_transform(33, rotation=20, mean=(0, 0, 0), std=(1, 1, 1))
    angles = []
    for _ in range(200):
        out = transform(image)[0]
        ys, xs = torch.nonzero(out > 0, as_tuple=True)
        weights = out[ys, xs]
        x = (xs.float() * weights).sum() / weights.sum() - 16
        y = (ys.float() * weights).sum() / weights.sum() - 16
        angles.append(np.degrees(np.arctan2(-y.item(), abs(x.item()))))  # counter-clockwise, flip-invariant
    angles = np.array(angles)
    assert angles.min() > -21 and angles.max() < 21
    assert angles.min() < -15 and angles.max() > 15  # the range is used, not only a narrow centre
    assert abs(angles.mean()) < 3


def test_transforms_reject_bad_sizes():
    with pytest.raises(UserError, match="image size must be a positive integer, got 0"):
        eval_transform(0)
    with pytest.raises(UserError, match="rotation must be between 0 and 180 degrees, got -5"):
        train_transform(32, rotation=-5)


# --- dataset ----------------------------------------------------------------------------------------------------


def test_image_folder_dataset_reads_and_transforms(tmp_path):
    gray = write_image(tmp_path / "a.png", value=200, size=(12, 10))
    rgb = tmp_path / "b.jpg"
    Image.fromarray(np.full((9, 9, 3), (10, 20, 30), dtype=np.uint8)).save(rgb, quality=100)
    dataset = ImageFolderDataset([gray, rgb], [1, 0], eval_transform(6, mean=(0, 0, 0), std=(1, 1, 1)))
    assert len(dataset) == 2
    image, label = dataset[0]
    assert label == 1 and image.shape == (3, 6, 6)
    torch.testing.assert_close(image, torch.full((3, 6, 6), 200 / 255), atol=1e-6, rtol=0)
    image, label = dataset[1]
    assert label == 0
    assert torch.allclose(image.mean(dim=(1, 2)), torch.tensor([10, 20, 30]) / 255, atol=3 / 255)

    raw = ImageFolderDataset([gray], [0], None)[0][0]
    assert isinstance(raw, Image.Image) and raw.mode == "RGB"


def test_image_folder_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="2 paths but 1 labels"):
        ImageFolderDataset(["a.png", "b.png"], [0], None)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ImageReadError):
        ImageFolderDataset([bad], [0], None)[0]


def test_grouped_split_is_deterministic_for_a_split_seed():
    labels = [k % 2 for k in range(40)]
    groups = [k // 2 for k in range(40)]  # pairs share a group (and a label parity pattern mixes them)
    first = stratified_split(labels, 0.25, seed=5, groups=groups)
    assert stratified_split(labels, 0.25, seed=5, groups=groups) == first
    assert stratified_split(labels, 0.25, seed=6, groups=groups) != first
    assert not {groups[i] for i in first[0]} & {groups[i] for i in first[1]}


# --- the loader-backed batches --------------------------------------------------------------------------------


def _loader(paths, labels, seed=3, rotation=15.0, rank=0, world_size=1, training=True, batch_size=4):
    from braintumor.data.pipeline import LoaderBatches
    from braintumor.training.distributed import DistInfo

    return LoaderBatches(paths, labels, transform=train_transform(24, rotation) if training else eval_transform(24),
                         batch_size=batch_size, shuffle=training, seed=seed, workers=0,
                         dist=DistInfo(rank=rank, world_size=world_size), pin_memory=False, training=training)


def _epoch(batches, epoch):
    from braintumor.utils.seeding import seed_epoch

    seed_epoch(0, epoch, 0)  # the trainer's global seeding: workers=0 draws from the global generator
    batches.set_epoch(epoch)
    return [(images.clone(), labels.clone()) for images, labels in batches]


def test_loader_batches_shapes_determinism_per_epoch_and_shared_order(phantom_dir):
    from braintumor.data.pipeline import CachedBatches

    index = discover(phantom_dir)
    batches = _loader(index.paths, index.labels)
    epoch0 = _epoch(batches, 0)
    assert len(epoch0) == len(batches) == 6 and all(x.shape == (4, 3, 24, 24) for x, _ in epoch0)
    assert epoch0[0][0].dtype == torch.float32 and epoch0[0][1].dtype == torch.int64
    again = _epoch(_loader(index.paths, index.labels), 0)  # a fresh process (a resumed run) sees the same
    assert all(torch.equal(a, b) and torch.equal(y, z) for (a, y), (b, z) in zip(epoch0, again))
    epoch1 = _epoch(batches, 1)
    assert not torch.equal(torch.cat([y for _, y in epoch0]), torch.cat([y for _, y in epoch1]))
    # Both data paths order an epoch by shard_indices: the same labels in the same order.
    cached = CachedBatches(torch.zeros(len(index.paths), 3, 8, 8, dtype=torch.uint8), index.labels, 4,
                           shuffle=True, seed=3, augment=True)
    cached.set_epoch(1)
    assert torch.cat([y for _, y in cached]).tolist() == torch.cat([y for _, y in epoch1]).tolist()


def test_loader_batches_shard_training_padded_and_evaluation_exactly_once(phantom_dir):
    index = discover(phantom_dir)
    paths, labels = index.paths[:10], list(range(10))
    shards = [torch.cat([y for _, y in _epoch(_loader(paths, labels, rank=r, world_size=3, batch_size=2), 0)])
              for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4] and set(torch.cat(shards).tolist()) == set(range(10))
    evaluation = [torch.cat([y for _, y in _epoch(_loader(paths, labels, rank=r, world_size=3, training=False), 0)])
                  for r in range(3)]
    assert sorted(torch.cat(evaluation).tolist()) == list(range(10))


# --- one pass over the files ------------------------------------------------------------------------------------


def _count_decodes(monkeypatch):
    """Full decodes per file: PIL's (ImageFile.load with pixel data left to read) and torchvision's."""
    from PIL import ImageFile

    import braintumor.data.cache as cache

    counts = Counter()
    load, decode_image = ImageFile.ImageFile.load, cache.decode_image

    def counting_load(self):
        if self.tile:
            counts[Path(self.filename).name] += 1
        return load(self)

    def counting_decode(data, *args, **kwargs):
        counts["torchvision"] += 1
        return decode_image(data, *args, **kwargs)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    monkeypatch.setattr(cache, "decode_image", counting_decode)
    return counts


@pytest.mark.parametrize("data_cache", ["memory", "none"])
def test_a_run_decodes_each_file_once_to_check_hash_and_cache_it(phantom_dir, tmp_path, monkeypatch, data_cache):
    from braintumor.training.config import TrainConfig
    from braintumor.data.index import prepare_split
    from braintumor.data.pipeline import build_batches
    from braintumor.training.distributed import DistInfo

    monkeypatch.setenv("BRAINTUMOR_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrainConfig(data=str(phantom_dir), image_size=32, device="cpu", workers=0, data_cache=data_cache)
    for run in ("cold hash cache", "warm hash cache"):
        counts = _count_decodes(monkeypatch)
        split = prepare_split(cfg, False, device=torch.device("cpu"), keep_images=True)
        build_batches(split, cfg, torch.device("cpu"), DistInfo(), False)
        files = [p.name for p in split.train_paths + split.val_paths]
        assert counts["torchvision"] == 0
        # Before the data package: a check, a hash and a cache decode, 3 per file. Now the check and the hash
        # share one decode, which also fills the cache; the next run's check reads the hash cache.
        expected = 1 if data_cache == "memory" or run == "cold hash cache" else 0
        assert [counts[name] for name in files] == [expected] * len(files), run
        monkeypatch.undo()
        monkeypatch.setenv("BRAINTUMOR_CACHE_DIR", str(tmp_path / "cache"))


def test_the_cache_holds_the_evaluation_preprocessing_bit_for_bit(phantom_dir, tmp_path):
    from braintumor.data.cache import decode_to_tensor
    from braintumor.data.io import read_image
    from braintumor.data.scan import scan_files
    from braintumor.data.transforms import normalize_batch

    paths = discover(phantom_dir).paths[:6]
    jpeg = tmp_path / "slice.jpg"
    read_image(paths[0]).save(jpeg, quality=85)
    paths.append(jpeg)
    expected = torch.stack([eval_transform(40)(read_image(p)) for p in paths])
    scanned = scan_files(paths, sizes=[40]).images[40]
    assert torch.equal(normalize_batch(scanned), expected)
    assert torch.equal(normalize_batch(decode_to_tensor(paths, 40)), expected)


def test_the_split_and_the_batches_take_explicit_settings(phantom_dir):
    """data/ never reads the training config: prepare_split and build_batches take small frozen settings, which
    TrainConfig builds (the split seed resolved: --split-seed, else --seed)."""
    from braintumor.data.augment import Augmentation
    from braintumor.data.index import SplitSettings, prepare_split
    from braintumor.data.pipeline import BatchSettings, build_batches
    from braintumor.training.config import TrainConfig
    from braintumor.training.distributed import DistInfo

    settings = SplitSettings(data=str(phantom_dir), val_split=0.25, split_seed=5, group_split=False)
    split = prepare_split(settings, progress=False)
    cfg = TrainConfig(data=str(phantom_dir), val_split=0.25, seed=5, group_split=False, rotation=7.0)
    assert cfg.split_settings().split_seed == 5 and TrainConfig(data="x", seed=5, split_seed=9).split_settings() \
        .split_seed == 9
    assert prepare_split(cfg.split_settings(), progress=False).val_paths == split.val_paths
    assert prepare_split(cfg, progress=False).val_paths == split.val_paths  # a config still works (builds them)
    batches = BatchSettings(batch_size=4, seed=0, workers=0, image_size=32, inference_image_size=32,
                            augmentation=Augmentation(rotation=7.0))
    assert cfg.batch_settings().augmentation == Augmentation(rotation=7.0)
    train, val, mode = build_batches(split, batches, torch.device("cpu"), DistInfo(), False)
    images, labels = next(iter(train))
    assert mode == "none" and images.shape == (4, 3, 32, 32) and len(val) == 2
    with pytest.raises(TypeError, match="SplitSettings"):
        prepare_split({"data": str(phantom_dir)}, progress=False)
