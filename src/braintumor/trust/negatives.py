"""Generated images for fitting and measuring the not-MRI tier: things that are not brain MR slices, and MRI-like
variants of real slices that must still pass as MRI.

Two families of non-MRI images, kept apart so that the benchmark is honest:

- :data:`FIT_KINDS` (``fit_negatives``): what ``fit_trust`` may learn from — noise (uniform, Gaussian, salt and
  pepper, smooth), blanks, gradients, random text, random shapes, stripes and checkerboards, dead leaves. Drawn from seeds
  ``FIT_SEED + k``.
- :data:`EVAL_KINDS` (``eval_negatives``, used by ``benchmarks/ood.py`` only): the same procedural families from
  other seeds (``EVAL_SEED + k``) *and* kinds the fit never sees — natural photos shipped inside dependencies
  (matplotlib's ``get_sample_data`` images, scikit-learn's ``load_sample_images``), rendered documents,
  screenshots of a user interface, matplotlib charts, fractals and colour images.

``mri_variants`` turns a real slice into what a scanner export or a viewer could make of it (other windowings,
a 16-bit or DICOM round trip, flips, rotations, crops, JPEG, a small resize): MRI that must not be refused.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FIT_SEED, EVAL_SEED = 1_000, 9_000_000
SIZE = 224
_WORDS = ("patient report findings scan axial study the of and brain tumour image clinic result normal lesion "
          "invoice total amount date page section figure table summary method data model hello world lorem ipsum "
          "dolor sit amet consectetur adipiscing elit sed do eiusmod tempor 2026 12 04 MRI T1 T2 FLAIR").split()


def _font(size: int) -> ImageFont.ImageFont:
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # noqa: BLE001 - any font problem: PIL's built-in bitmap font
        return ImageFont.load_default()


def _colour(rng, gray: bool = False) -> tuple[int, int, int]:
    if gray:
        value = int(rng.integers(0, 256))
        return value, value, value
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _rgb(array: np.ndarray) -> Image.Image:
    array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


# ------------------------------------------------------------------------------------------ procedural kinds


def noise(rng, size: int = SIZE) -> Image.Image:
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return _rgb(rng.integers(0, 256, (size, size, 3)) if rng.random() < 0.5 else rng.integers(0, 256, (size, size)))
    if kind == 1:
        return _rgb(rng.normal(rng.uniform(40, 210), rng.uniform(10, 80), (size, size)))
    if kind == 2:
        return _rgb(np.where(rng.random((size, size)) < rng.uniform(0.05, 0.6), 255, 0))
    small = rng.normal(0, 1, (int(rng.integers(3, 17)),) * 2 + ((3,) if rng.random() < 0.5 else ()))
    field = np.asarray(_rgb(128 + 60 * small).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    return _rgb(field)


def blank(rng, size: int = SIZE) -> Image.Image:
    return Image.new("RGB", (size, size), _colour(rng, gray=rng.random() < 0.6))


def gradient(rng, size: int = SIZE) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
    else:
        cy, cx = rng.uniform(0, 1, 2)
        t = np.hypot(yy - cy, xx - cx)
    t = (t - t.min()) / max(np.ptp(t), 1e-9)
    a, b = np.array(_colour(rng, rng.random() < 0.6)), np.array(_colour(rng, rng.random() < 0.6))
    return _rgb(a + (b - a) * t[..., None])


def text(rng, size: int = SIZE) -> Image.Image:
    dark = rng.random() < 0.4
    image = Image.new("RGB", (size, size), _colour(rng, True) if rng.random() < 0.2 else ("black" if dark else "white"))
    draw, font_size = ImageDraw.Draw(image), int(rng.integers(9, 26))
    font = _font(font_size)
    y = int(rng.integers(0, 12))
    while y < size:
        line = " ".join(rng.choice(_WORDS, int(rng.integers(2, 9))))
        draw.text((int(rng.integers(0, 20)), y), line, fill="white" if dark else "black", font=font)
        y += int(font_size * rng.uniform(1.2, 2.0))
    return image


def shapes(rng, size: int = SIZE) -> Image.Image:
    gray = rng.random() < 0.4
    image = Image.new("RGB", (size, size), _colour(rng, gray))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 25))):
        box = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
        box = [int(box[0][0]), int(box[1][0]), int(box[0][1]) + 2, int(box[1][1]) + 2]
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.rectangle(box, fill=_colour(rng, gray))
        elif shape == 1:
            draw.ellipse(box, fill=_colour(rng, gray))
        else:
            draw.line(box, fill=_colour(rng, gray), width=int(rng.integers(1, 8)))
    return image


def pattern(rng, size: int = SIZE) -> Image.Image:
    period = int(rng.integers(4, 64))
    yy, xx = np.mgrid[0:size, 0:size]
    if rng.random() < 0.5:
        t = ((xx // period + yy // period) % 2).astype(float)
    else:
        angle = rng.uniform(0, np.pi)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
    a, b = np.array(_colour(rng, rng.random() < 0.6)), np.array(_colour(rng, rng.random() < 0.6))
    return _rgb(a + (b - a) * t[..., None])


def dead_leaves(rng, size: int = SIZE) -> Image.Image:
    """The dead-leaves model of natural images (Lee, Mumford & Huang, 2001): occluding discs with power-law radii,
    each with its own shade and a little texture; gray or colour. Photo-like statistics without any photo."""
    gray = rng.random() < 0.5
    image = Image.new("RGB", (size, size), _colour(rng, gray))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(400, 1200))):
        radius = min(size * 0.02 * (1 - rng.random()) ** (-1 / 1.5), size / 2)  # Pareto: many small, a few large
        x, y = rng.uniform(-radius, size + radius, 2)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=_colour(rng, gray))
    array = np.asarray(image, dtype=np.float64) + rng.normal(0, rng.uniform(0, 12), (size, size, 1))
    return _rgb(array).filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5))))


FIT_KINDS: dict[str, Callable] = {"noise": noise, "blank": blank, "gradient": gradient, "text": text,
                                  "shapes": shapes, "pattern": pattern, "dead leaves": dead_leaves}


def fit_negatives(n_per_kind: int = 40, size: int = SIZE, seed: int = FIT_SEED) -> Iterator[tuple[str, Image.Image]]:
    """(kind, image) for fitting: ``n_per_kind`` of each of :data:`FIT_KINDS`, image k of a kind from seed ``seed + k``."""
    for index, (kind, make) in enumerate(FIT_KINDS.items()):
        for k in range(n_per_kind):
            yield kind, make(np.random.default_rng([seed + k, index]), size)


# ------------------------------------------------------------------------------------------ evaluation-only kinds


def sample_photos() -> dict[str, Image.Image]:
    """Natural images shipped inside dependencies: matplotlib's sample data and scikit-learn's sample images.

    matplotlib's ``s1045.ima`` is a sagittal head MRI: it is *not* among these (it is MRI, see ``mri_wrong``).
    """
    from matplotlib import cbook
    from sklearn.datasets import load_sample_images

    photos = {}
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        with cbook.get_sample_data(name) as handle:
            photos[name.split(".")[0]] = Image.open(io.BytesIO(handle.read())).convert("RGB")
    for name in ("jacksboro_fault_dem.npz", "topobathy.npz"):
        data = cbook.get_sample_data(name)  # .npz files come back loaded (an NpzFile)
        data = data if hasattr(data, "files") else np.load(data)
        array = np.asarray(data[data.files[0]], dtype=np.float64)
        photos[name.split(".")[0]] = _rgb(255 * (array - array.min()) / max(np.ptp(array), 1e-9))
    for name, array in zip(("china", "flower"), load_sample_images().images):
        photos[name] = Image.fromarray(array)
    return photos


def photo_variants(rng, photos: dict[str, Image.Image]) -> list[Image.Image]:
    """Each photo as is, in grayscale, centre-cropped square, a random half crop and at 64 px."""
    out = []
    for image in photos.values():
        width, height = image.size
        side = min(width, height)
        x, y = int(rng.integers(0, width - side // 2 + 1)), int(rng.integers(0, height - side // 2 + 1))
        out += [image, image.convert("L").convert("RGB"),
                image.crop(((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)),
                image.crop((x, y, x + side // 2, y + side // 2)), image.resize((64, 64))]
    return out


def document(rng, size: int = SIZE) -> Image.Image:
    """A page: heading, paragraphs of small text, a ruled table."""
    image = Image.new("RGB", (size, int(size * rng.uniform(1.0, 1.4))), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 6), " ".join(rng.choice(_WORDS, 3)).title(), fill="black", font=_font(int(rng.integers(14, 22))))
    font, y = _font(int(rng.integers(7, 12))), 34
    for _ in range(int(rng.integers(4, 12))):
        draw.text((10, y), " ".join(rng.choice(_WORDS, 7)), fill=(40, 40, 40), font=font)
        y += int(rng.integers(10, 16))
    top = y + 6
    for row in range(5):
        draw.line((10, top + 14 * row, size - 10, top + 14 * row), fill="black")
    for col in range(4):
        x = 10 + col * (size - 20) // 3
        draw.line((x, top, x, top + 56), fill="black")
    return image


def screenshot(rng, size: int = SIZE) -> Image.Image:
    """A user interface: title bar, side panel, buttons, text fields."""
    image = Image.new("RGB", (size, size), _colour(rng, True) if rng.random() < 0.5 else (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, size, 18), fill=_colour(rng))
    draw.text((6, 3), "braintumor - " + " ".join(rng.choice(_WORDS, 2)), fill="white", font=_font(10))
    panel = int(rng.integers(40, 90))
    draw.rectangle((0, 18, panel, size), fill=_colour(rng, True))
    for k in range(int(rng.integers(3, 8))):
        y = 30 + 24 * k
        draw.rectangle((panel + 10, y, size - 10, y + 16), outline=(120, 120, 120), fill="white")
        draw.text((panel + 14, y + 3), " ".join(rng.choice(_WORDS, 3)), fill="black", font=_font(9))
        draw.rounded_rectangle((6, y, panel - 6, y + 16), radius=4, fill=_colour(rng))
    return image


def chart(rng, size: int = SIZE) -> Image.Image:
    """A matplotlib chart (line, bar or scatter plot) rendered to pixels."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3, 3), dpi=size / 3)
    axes = figure.add_subplot()
    kind = int(rng.integers(0, 3))
    x = np.arange(20)
    if kind == 0:
        axes.plot(x, np.cumsum(rng.normal(size=20)))
    elif kind == 1:
        axes.bar(x[:8], rng.uniform(1, 10, 8))
    else:
        axes.scatter(rng.normal(size=60), rng.normal(size=60), s=8)
    axes.set_title(" ".join(rng.choice(_WORDS, 2)))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return Image.open(buffer).convert("RGB")


def fractal(rng, size: int = SIZE) -> Image.Image:
    """A Mandelbrot-set zoom (gray or colour-mapped)."""
    cx, cy, span = rng.uniform(-1.5, 0.3), rng.uniform(-0.8, 0.8), rng.uniform(0.05, 2.5)
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    c = (cx + span * x) + 1j * (cy + span * y)
    z, count = np.zeros_like(c), np.zeros(c.shape)
    for _ in range(40):
        inside = np.abs(z) <= 2
        z[inside] = z[inside] ** 2 + c[inside]
        count += inside
    values = count / 40
    if rng.random() < 0.5:
        return _rgb(255 * values)
    import matplotlib

    return _rgb(255 * matplotlib.colormaps["viridis"](values)[..., :3])


def colour_image(rng, size: int = SIZE) -> Image.Image:
    """Smooth colour fields with coloured shapes on top."""
    base = np.asarray(noise(np.random.default_rng(int(rng.integers(0, 2**31)) ), size), dtype=np.float64)
    tint = rng.uniform(0.3, 1.0, 3)
    image = _rgb(base * tint)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, size - 20, 2))
        draw.ellipse((x0, y0, x0 + int(rng.integers(10, 80)), y0 + int(rng.integers(10, 80))), fill=_colour(rng))
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 2))))


EVAL_KINDS = ("photos", "documents", "screenshots", "charts", "fractals", "colour", *FIT_KINDS)


def eval_negatives(n_per_kind: int = 30, size: int = SIZE, seed: int = EVAL_SEED) -> dict[str, list[Image.Image]]:
    """The benchmark's non-MRI sets, kind -> images (never used for fitting; other seeds than ``fit_negatives``)."""
    rng = np.random.default_rng(seed)
    makers = {"documents": document, "screenshots": screenshot, "charts": chart, "fractals": fractal,
              "colour": colour_image, **FIT_KINDS}
    sets = {"photos": photo_variants(rng, sample_photos())}
    for index, (kind, make) in enumerate(makers.items()):
        sets[kind] = [make(np.random.default_rng([seed + k, 100 + index]), size) for k in range(n_per_kind)]
    return sets


# ------------------------------------------------------------------------------------------ MRI-like variants


def _gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def sixteen_bit(image: Image.Image, rng) -> Image.Image:
    """Saved as a 16-bit grayscale PNG (12-bit range plus noise) and read back by braintumor's reader."""
    from braintumor.data.io import read_image

    values = _gray(image) * rng.uniform(4, 16) + rng.normal(0, 2, image.size[::-1]) + rng.uniform(0, 200)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(values, 0, 65535).astype(np.uint16)).save(buffer, "PNG")
    return read_image(buffer.getvalue(), name="slice.png")


def dicom(image: Image.Image, rng, folder: Path) -> Image.Image:
    """Written as an MR DICOM file (int16, rescale slope/intercept) and read back by braintumor's reader."""
    from braintumor.data.io import read_image
    from braintumor.synthetic.volumes import write_dicom_series

    slope, intercept = float(rng.choice([1.0, 0.5, 2.0])), float(rng.choice([0.0, -1024.0]))
    volume = (_gray(image) * rng.uniform(2, 8) + intercept)[None]
    written = write_dicom_series(folder, volume, slope=slope, intercept=intercept)
    path = sorted(written.glob("*.dcm"))[0]
    try:
        return read_image(path)
    finally:
        path.unlink()


def window(image: Image.Image, rng) -> Image.Image:
    """Another display window: gamma, a narrower level/width (saturating the brightest tissue) or a darker one."""
    values = _gray(image) / 255
    kind = int(rng.integers(0, 3))
    if kind == 0:
        values = values ** rng.uniform(0.6, 1.6)
    elif kind == 1:
        low, high = rng.uniform(0, 0.1), rng.uniform(0.6, 0.95)
        values = np.clip((values - low) / (high - low), 0, 1)
    else:
        values = values * rng.uniform(0.6, 0.9)
    return _rgb(255 * values)


def crop(image: Image.Image, rng) -> Image.Image:
    width, height = image.size
    keep = rng.uniform(0.75, 0.95)
    w, h = int(width * keep), int(height * keep)
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return image.crop((x, y, x + w, y + h))


def jpeg(image: Image.Image, rng) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(30, 70)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


VARIANTS: dict[str, Callable] = {
    "window": window,
    "16-bit": sixteen_bit,
    "flip": lambda image, rng: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT if rng.random() < 0.5
                                               else Image.Transpose.FLIP_TOP_BOTTOM),
    "rotate 90/180/270": lambda image, rng: image.rotate(90 * int(rng.integers(1, 4)), expand=True),
    "rotate small": lambda image, rng: image.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR),
    "crop": crop,
    "jpeg": jpeg,
    "resize": lambda image, rng: image.resize((int(rng.integers(48, 96)),) * 2, Image.Resampling.BILINEAR),
}


def mri_variants(image: Image.Image, rng, kinds=None, dicom_folder: Path | None = None) -> list[tuple[str, Image.Image]]:
    """(kind, image) MRI-like variants of one real slice: one of each of ``kinds`` (default all of
    :data:`VARIANTS`, plus "dicom" when ``dicom_folder`` is given)."""
    out = [(kind, VARIANTS[kind](image, rng)) for kind in (kinds or VARIANTS)]
    if dicom_folder is not None:
        out.append(("dicom", dicom(image, rng, dicom_folder)))
    return out
