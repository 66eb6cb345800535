"""data/cache.py (decode_to_tensor) on the CPU, against read_image + eval_transform's resize (the PIL pipeline)
as the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import braintumor.data.cache as cache
from braintumor.data.cache import decode_to_tensor
from braintumor.data.io import ImageReadError, read_image
from braintumor.data.transforms import eval_transform, normalize_batch
from braintumor.synthetic.phantom import make_phantom

# torchvision 0.29 deprecates its decoders in favour of TorchCodec (not a dependency); the warning is expected.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


@pytest.fixture()
def image_files(tmp_path):
    paths = []
    for i, (label, size) in enumerate([("glioma", 96), ("notumor", 64), ("pituitary", 50), ("meningioma", 40)]):
        array = make_phantom(label, size, i)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(array).save(paths[-1])
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(array).save(paths[-1], quality=90)
    colour = Image.fromarray(make_phantom("glioma", 80, 9)).convert("RGB").resize((100, 70))
    paths.append(tmp_path / "wide.png")
    colour.save(paths[-1])
    return paths


def resized_reference(path, size):
    return to_uint8_tensor(v2.Resize((size, size), antialias=True)(read_image(path)))


def test_decode_to_tensor_matches_the_pil_pipeline(image_files, monkeypatch):
    fallback_calls = []
    monkeypatch.setattr(cache, "read_image", lambda p: fallback_calls.append(p) or read_image(p))
    out = decode_to_tensor(image_files, 40, "cpu", num_threads=2)
    assert out.shape == (len(image_files), 3, 40, 40) and out.dtype == torch.uint8
    assert fallback_calls == []  # 8-bit PNG and JPEG take torchvision's decoder
    for path, decoded in zip(image_files, out):
        difference = (decoded.int() - resized_reference(path, 40).int()).abs()
        assert difference.float().mean() < 0.5 and difference.max() <= 2, path.name
    # Normalized, the cache gives eval_transform's tensors.
    expected = torch.stack([eval_transform(40)(read_image(p)) for p in image_files])
    assert (normalize_batch(out) - expected).abs().mean() < 2 / 255


def test_decode_to_tensor_falls_back_for_formats_torchvision_reads_differently(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray((rng.integers(1000, 3000, (24, 24))).astype(np.uint16)).save(sixteen)  # min-max scaled
    palette = tmp_path / "palette.png"
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).convert("P").save(palette)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(rng.integers(0, 256, (24, 24, 4), dtype=np.uint8)).save(rgba)
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).convert("CMYK").save(cmyk)
    bmp = tmp_path / "image.bmp"
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(bmp)
    paths = [sixteen, palette, rgba, cmyk, bmp]

    fallback_calls = []
    monkeypatch.setattr(cache, "read_image", lambda p: fallback_calls.append(p) or read_image(p))
    out = decode_to_tensor(paths, 24, "cpu")
    assert sorted(fallback_calls) == sorted(paths)  # the thread pool may call in any order
    for path, decoded in zip(paths, out):
        assert torch.equal(decoded, to_uint8_tensor(read_image(path))), path.name
    assert out[0].min() == 0 and out[0].max() == 255  # 16-bit scaled min-max, not clipped


def test_decode_to_tensor_reports_unreadable_files(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ImageReadError, match="bad.png"):
        decode_to_tensor([good, bad], 8, "cpu")


def test_decode_to_tensor_pin_memory_is_harmless_without_cuda(image_files):
    out = decode_to_tensor(image_files[:2], 16, "cpu", pin_memory=True)
    assert out.shape == (2, 3, 16, 16)
    assert out.is_pinned() == torch.cuda.is_available()
