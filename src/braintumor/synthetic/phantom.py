"""Synthetic MRI-like axial brain slices ("phantoms") for the demo and the tests.

No third-party scans ship with the project, so the demo trains on these. Each phantom looks like a T1
post-contrast axial slice: dark background, bright scalp/skull ring of varying thickness, a thin dark CSF gap
with sulci, grey/white matter with smooth texture, two lateral ventricles, a falx, a dark basal cistern, a
smooth coil bias field and Rician noise. Per class a lesion with its typical look and place:

- glioma: irregular, lobulated, heterogeneous intra-axial mass (often with a necrotic core) in an edema
  halo, mostly darker than white matter (T1), sometimes a little brighter (FLAIR-like);
- meningioma: round, sharply bounded, homogeneous bright extra-axial mass against the inner skull;
- pituitary: small bright midline mass at the skull base (lower centre of the head);
- notumor: none.

All random draws for the anatomy come before the lesion's, so one integer seed with two labels gives the
same head, differing only around the lesion (handy for explanation tests).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
from PIL import Image

from braintumor.errors import UserError
from braintumor.utils.atomic import atomic_write

PHANTOM_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")

MIN_SIZE, MAX_SIZE = 32, 2048
# Tissue intensities before contrast and gamma (T1 with contrast: fat and enhancing lesions bright, CSF dark).
_WHITE_MATTER, _GREY_MATTER, _CSF = 0.62, 0.42, 0.07
_FLOAT = np.float32  # halves the time of every full-image operation; 8-bit output needs no more


@dataclass
class _Phantom:
    """One rendered slice with the region maps that the tests check."""

    image: np.ndarray  # uint8 (H, W)
    lesion: np.ndarray  # bool: the tumour itself
    edema: np.ndarray  # bool: glioma halo (empty otherwise)
    brain: np.ndarray  # bool: parenchyma with ventricles, inside the CSF gap
    skull: np.ndarray  # bool: scalp + skull ring
    head: np.ndarray  # bool: everything inside the outer head outline
    center: tuple[float, float]  # head centre (x, y) in pixels
    angle: float  # head rotation in radians, clockwise on screen (image rows grow downwards)


@dataclass
class _Head:
    """Head geometry shared by the anatomy and the lesion painters; lengths in image units ([-1, 1] span)."""

    x: np.ndarray  # head-aligned, isotropic coordinates of every pixel (y points to the skull base)
    y: np.ndarray
    radius: np.ndarray  # elliptical radius: 1 on the outer head outline
    half_width: float
    half_height: float
    skull_inner_at: Callable  # polar angle -> elliptical radius of the inner skull surface
    skull_inner: np.ndarray
    parenchyma_edge: np.ndarray
    brain_alpha: np.ndarray
    cistern_y: float
    white_matter: float
    pixel: float

    def soft(self, signed_distance, width_px: float = 1.0) -> np.ndarray:
        """Anti-aliased inside-ness from a signed distance in image units (positive inside)."""
        return np.clip(0.5 + signed_distance / (width_px * self.pixel), 0.0, 1.0)

    @property
    def mean_axis(self) -> float:
        return 0.5 * (self.half_width + self.half_height)


def check_label(label: str) -> int:
    """The index of a phantom class name in PHANTOM_CLASSES (a UserError for any other name)."""
    if label not in PHANTOM_CLASSES:
        raise UserError(f"unknown phantom class {label!r}: choose one of {', '.join(PHANTOM_CLASSES)}")
    return PHANTOM_CLASSES.index(label)


def _check_whole(value, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise UserError(f"{what} must be a whole number, got {value!r}") from None


def _check_size(size) -> int:
    size = _check_whole(size, "phantom size")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"phantom size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    return size


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur through the FFT (it wraps at the border, which is background anyway)."""
    height, width = image.shape
    freq_y = np.fft.fftfreq(height).astype(_FLOAT)[:, None]
    freq_x = np.fft.rfftfreq(width).astype(_FLOAT)[None, :]
    transfer = np.exp(-2.0 * np.pi**2 * sigma_px**2 * (freq_x**2 + freq_y**2))
    return np.fft.irfft2(np.fft.rfft2(image) * transfer, s=image.shape).astype(_FLOAT)


def _partial_volume(image: np.ndarray, sigma_px: float = 0.5) -> np.ndarray:
    """Small separable Gaussian blur in real space: strictly local, so a lesion changes only its neighbourhood."""
    taps = np.arange(-2, 3)
    weights = np.exp(-0.5 * (taps / sigma_px) ** 2)
    weights = (weights / weights.sum()).astype(_FLOAT)
    size = image.shape[0]
    padded = np.pad(image, 2, mode="edge")
    rows = sum(float(w) * padded[2 + t: 2 + t + size, :] for t, w in zip(taps, weights))
    return sum(float(w) * rows[:, 2 + t: 2 + t + size] for t, w in zip(taps, weights))


def _smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-std blurred white noise: texture with no structure of its own."""
    field = _blur(rng.standard_normal((size, size), dtype=_FLOAT), sigma_px)
    return (field - field.mean()) / (field.std() + 1e-6)


def _harmonics(rng: np.random.Generator, orders, amplitude: float) -> Callable:
    """A random sum of cosines of the polar angle, as a function: wobbles a radius into an irregular outline."""
    terms = [(order, rng.uniform(0.0, amplitude), rng.uniform(0.0, 2.0 * np.pi)) for order in orders]

    def wobble(angle):
        return sum(weight * np.cos(order * angle + phase) for order, weight, phase in terms)

    return wobble


def _blend(image: np.ndarray, alpha: np.ndarray, value) -> np.ndarray:
    return image + alpha * (value - image)


def _render(label: str, size: int = 128, rng: np.random.Generator | int | None = None) -> _Phantom:
    """Draw one phantom and keep its region maps; make_phantom is the public face."""
    check_label(label)
    size = _check_size(size)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    draws = _draw_anatomy(rng, size)  # every anatomy and acquisition draw first: the lesion's never shift them
    head, frame = _head_geometry(draws, size)
    image, head_alpha, skull_alpha = _paint_head(head, frame, draws)
    image = _paint_ventricles(head, draws, image)
    lesion, edema = np.zeros((size, size), dtype=bool), np.zeros((size, size), dtype=bool)
    if label != "notumor":
        image, lesion, edema = _LESION_PAINTERS[label](head, rng, image, draws.lesion_texture)
    image = _acquire(image, frame, draws)
    return _Phantom(
        image=np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8),
        lesion=lesion,
        edema=edema,
        brain=head.brain_alpha > 0.5,
        skull=(head_alpha > 0.5) & (skull_alpha <= 0.5),
        head=head_alpha > 0.5,
        center=((draws.center_x + 1.0) / head.pixel - 0.5, (draws.center_y + 1.0) / head.pixel - 0.5),
        angle=draws.rotation,
    )


def _draw_anatomy(rng: np.random.Generator, size: int) -> SimpleNamespace:
    """Every random draw of the head and the acquisition, in a fixed order (the lesion draws come after)."""
    d = SimpleNamespace()
    d.half_width = rng.uniform(0.58, 0.70)
    d.half_height = min(d.half_width * rng.uniform(1.12, 1.28), 0.88)  # axial heads are longer front to back
    d.center_x, d.center_y = (float(v) for v in rng.uniform(-0.04, 0.04, size=2))
    d.rotation = float(np.deg2rad(np.clip(rng.normal(0.0, 6.0), -15.0, 15.0)))
    d.outer_wobble = _harmonics(rng, (2, 3, 5), 0.012)
    d.ring_base, d.ring_wobble = rng.uniform(0.09, 0.13), _harmonics(rng, (1, 2, 3), 0.2)
    d.csf_gap = rng.uniform(0.03, 0.045)
    d.sulcus_count, d.sulcus_phase = int(rng.integers(14, 22)), rng.uniform(0.0, 2.0 * np.pi)
    d.sulcus_depth = rng.uniform(0.05, 0.09)
    d.grey_base, d.grey_wobble = rng.uniform(0.07, 0.10), _harmonics(rng, (7, 11), 0.25)
    d.scalp_brightness, d.bone_darkness = rng.uniform(0.82, 0.95), rng.uniform(0.22, 0.38)
    d.white_matter = _WHITE_MATTER * rng.uniform(0.93, 1.07)
    d.grey_matter = _GREY_MATTER * rng.uniform(0.93, 1.07)
    ventricle_scale = rng.uniform(0.75, 1.2)
    d.ventricle_offset = rng.uniform(0.075, 0.1)
    d.ventricle_y = rng.uniform(-0.12, 0.0) * d.half_height
    d.ventricle_tilt = float(np.deg2rad(rng.uniform(4.0, 14.0)))
    d.ventricle_width = rng.uniform(0.05, 0.07) * ventricle_scale
    d.ventricle_length = rng.uniform(0.2, 0.27) * ventricle_scale
    d.plexus_present = rng.uniform(size=2) < 0.6  # choroid plexus: normal enhancing dots in the ventricles
    d.cistern_y = rng.uniform(0.55, 0.66) * d.half_height
    d.cistern_radius = rng.uniform(0.045, 0.07)
    d.texture_blobs = [(rng.uniform(-0.6, 0.6, size=2), rng.uniform(0.12, 0.35), rng.normal(0.0, 0.07))
                       for _ in range(6)]
    d.fine_texture = _smooth_noise(rng, size, sigma_px=size / 64.0) * rng.uniform(0.025, 0.045)
    d.bias_direction, d.bias_strength = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.0, 0.12)
    d.gamma, d.brightness = rng.uniform(0.8, 1.25), rng.uniform(0.88, 1.0)
    d.noise_sigma = rng.uniform(0.015, 0.035)
    d.noise_real = rng.standard_normal((size, size), dtype=_FLOAT)
    d.noise_imaginary = rng.standard_normal((size, size), dtype=_FLOAT)
    d.lesion_texture = _smooth_noise(rng, size, sigma_px=size / 48.0)
    return d


def _head_geometry(d: SimpleNamespace, size: int) -> tuple[_Head, SimpleNamespace]:
    """The head in head-aligned coordinates, and the image frame (pixel grid, polar angle, rotation)."""
    pixel = 2.0 / size
    coords = ((np.arange(size, dtype=_FLOAT) + 0.5) * pixel - 1.0).astype(_FLOAT)
    grid_x, grid_y = coords[None, :] - d.center_x, coords[:, None] - d.center_y  # y grows downwards, as rows
    cos_r, sin_r = float(np.cos(d.rotation)), float(np.sin(d.rotation))
    head_x = cos_r * grid_x + sin_r * grid_y
    head_y = -sin_r * grid_x + cos_r * grid_y
    radius = np.hypot(head_x / d.half_width, head_y / d.half_height)
    polar = np.arctan2(head_y / d.half_height, head_x / d.half_width)

    def skull_inner_at(angle):
        return 1.0 + d.outer_wobble(angle) - d.ring_base * (1.0 + d.ring_wobble(angle))

    skull_inner = skull_inner_at(polar)
    # sulci: narrow notches of CSF cut into the cortex; the grey/white border follows them (gyri)
    notch = np.maximum(np.cos(d.sulcus_count * polar + d.sulcus_phase), 0.0)
    for _ in range(4):  # notch ** 16, by squaring (a float power is slow)
        notch = notch * notch
    parenchyma_edge = skull_inner - d.csf_gap - d.sulcus_depth * notch
    head = _Head(x=head_x, y=head_y, radius=radius, half_width=d.half_width, half_height=d.half_height,
                 skull_inner_at=skull_inner_at, skull_inner=skull_inner, parenchyma_edge=parenchyma_edge,
                 brain_alpha=None, cistern_y=d.cistern_y, white_matter=d.white_matter, pixel=pixel)
    frame = SimpleNamespace(coords=coords, grid_x=grid_x, grid_y=grid_y, polar=polar, cos_r=cos_r, sin_r=sin_r)
    return head, frame


def _paint_head(head: _Head, frame: SimpleNamespace, d: SimpleNamespace):
    """Scalp, bone, CSF gap and textured grey/white matter, from the outside in; sets ``head.brain_alpha``."""
    radius, polar, mean_axis = head.radius, frame.polar, head.mean_axis
    outer = 1.0 + d.outer_wobble(polar)
    ring_thickness = d.ring_base * (1.0 + d.ring_wobble(polar))
    head_alpha = head.soft((outer - radius) * mean_axis)
    image = head_alpha * d.scalp_brightness
    bone_center = head.skull_inner + 0.45 * ring_thickness  # cortical bone: a darker band inside the bright ring
    bone_alpha = np.exp(-np.square((radius - bone_center) / (0.18 * ring_thickness)))
    image = _blend(image, bone_alpha * head_alpha, d.bone_darkness)
    skull_alpha = head.soft((head.skull_inner - radius) * mean_axis)
    image = _blend(image, skull_alpha, _CSF)
    head.brain_alpha = head.soft((head.parenchyma_edge - radius) * mean_axis)
    grey_thickness = d.grey_base * (1.0 + d.grey_wobble(polar))
    white_alpha = head.soft((head.parenchyma_edge - grey_thickness - radius) * mean_axis, width_px=2.5)
    low_frequency = d.fine_texture
    coords, cos_r, sin_r = frame.coords, frame.cos_r, frame.sin_r
    for (blob_x, blob_y), width, amplitude in d.texture_blobs:
        # a round blob is the same in image axes: rotate its centre back and build it separably (cheap)
        column = d.center_x + cos_r * float(blob_x) - sin_r * float(blob_y)
        row = d.center_y + sin_r * float(blob_x) + cos_r * float(blob_y)
        profile_x = np.exp(np.square(coords - column) / (-2 * width**2))
        profile_y = np.exp(np.square(coords - row) / (-2 * width**2))
        low_frequency = low_frequency + amplitude * (profile_y[:, None] * profile_x[None, :])
    tissue = (d.grey_matter + (d.white_matter - d.grey_matter) * white_alpha) * (1.0 + low_frequency)
    return _blend(image, head.brain_alpha, tissue), head_alpha, skull_alpha


def _paint_ventricles(head: _Head, d: SimpleNamespace, image: np.ndarray) -> np.ndarray:
    """Two lateral ventricles (with choroid plexus), the falx and the basal cistern."""
    brain_alpha = head.brain_alpha
    ventricle_alpha = np.zeros_like(image)
    plexus_alpha = np.zeros_like(image)
    for side, plexus in zip((-1.0, 1.0), d.plexus_present):
        # ")(" pair: an ellipse whose lateral side is carved by the caudate head, tilted so the horns diverge
        tilt = side * d.ventricle_tilt
        local_x = head.x - side * d.ventricle_offset
        local_y = head.y - d.ventricle_y
        cos_t, sin_t = float(np.cos(tilt)), float(np.sin(tilt))
        along, across = cos_t * local_y - sin_t * local_x, sin_t * local_y + cos_t * local_x
        width, length = d.ventricle_width, d.ventricle_length
        body = 1.0 - np.hypot(across / width, along / length)
        carve = np.hypot((across - side * 1.5 * width) / (1.1 * width), along / (0.75 * length)) - 1.0
        ventricle_alpha = np.maximum(ventricle_alpha, head.soft(np.minimum(body, carve) * width))
        if plexus:
            dot = np.hypot(across + side * 0.25 * width, along - 0.7 * length)
            plexus_alpha = np.maximum(plexus_alpha, head.soft(0.35 * width - dot))
    image = _blend(image, ventricle_alpha * brain_alpha, _CSF)
    image = _blend(image, plexus_alpha * ventricle_alpha * brain_alpha, 0.75 * d.white_matter)
    # the falx: a thin dark midline line in front of and behind the ventricles
    reach = d.ventricle_length + 0.05
    span = (head.y < d.ventricle_y - reach) | (head.y > d.ventricle_y + reach)
    falx_alpha = np.exp(-np.square(head.x / (0.6 * head.pixel))) * span * brain_alpha
    image = _blend(image, 0.7 * falx_alpha, _CSF)
    cistern_distance = np.hypot(head.x / 1.3, head.y - d.cistern_y)
    return _blend(image, head.soft(d.cistern_radius - cistern_distance, width_px=2.0) * brain_alpha, 1.5 * _CSF)


def _acquire(image: np.ndarray, frame: SimpleNamespace, d: SimpleNamespace) -> np.ndarray:
    """Acquisition: partial-volume blur, coil bias field, contrast and gamma, Rician noise."""
    image = _partial_volume(image)
    gradient = float(np.cos(d.bias_direction)) * frame.grid_x + float(np.sin(d.bias_direction)) * frame.grid_y
    image = image * (1.0 + d.bias_strength * gradient)
    image = d.brightness * np.clip(image, 0.0, 1.0) ** d.gamma
    return np.hypot(image + d.noise_sigma * d.noise_real, d.noise_sigma * d.noise_imaginary)


def _paint_glioma(head: _Head, rng, image, texture):
    """Lobulated, heterogeneous intra-axial mass in the deep white matter, inside an edema halo."""
    lesion_radius = rng.uniform(0.11, 0.2)
    # keep the mass and a rim of halo inside the parenchyma: bound the offset from the head centre
    deepest_edge = float(np.min(head.parenchyma_edge)) * min(head.half_width, head.half_height)
    max_offset = max(deepest_edge - 1.35 * lesion_radius - 0.07, 0.0)
    offset = max_offset * np.sqrt(rng.uniform())
    direction = rng.uniform(0.0, 2.0 * np.pi)
    local_x = head.x - float(offset * np.cos(direction))
    local_y = head.y - float(offset * np.sin(direction))
    rho, theta = np.hypot(local_x, local_y), np.arctan2(local_y, local_x)
    outline = lesion_radius * np.clip(1.0 + _harmonics(rng, (2, 3, 4, 5), 0.12)(theta), 0.7, 1.35)
    halo = outline * rng.uniform(1.5, 1.9) * (1.0 + _harmonics(rng, (2, 3), 0.08)(theta))
    intensity = rng.uniform(0.9, 1.0)
    necrosis, core_fraction, core_value = rng.uniform() < 0.6, rng.uniform(0.3, 0.45), rng.uniform(0.3, 0.45)
    dark_halo = rng.uniform() < 0.75  # T1-dark vasogenic edema, or the brighter look of a FLAIR-like contrast
    halo_shade = rng.uniform(0.55, 0.72) if dark_halo else rng.uniform(1.12, 1.18)
    if not dark_halo:  # keep the mass clearly above a bright halo: solid (no dark core) and at full brightness
        necrosis, intensity = False, 1.0
    halo_value = head.white_matter * halo_shade
    halo_alpha = head.soft(halo - rho, width_px=2.5) * head.brain_alpha
    image = _blend(image, halo_alpha, halo_value)
    lesion_alpha = head.soft(outline - rho) * head.brain_alpha
    mass = intensity * (1.0 + 0.12 * texture)
    if necrosis:
        mass = _blend(mass, head.soft(core_fraction * outline - rho, width_px=2.0), core_value)
    image = _blend(image, lesion_alpha, mass)
    lesion = lesion_alpha > 0.5
    return image, lesion, (halo_alpha > 0.5) & ~lesion


def _paint_meningioma(head: _Head, rng, image, texture):
    """Round, sharply bounded, homogeneous bright mass on the convexity, flattened against the inner skull."""
    lesion_radius = rng.uniform(0.12, 0.21)
    # anywhere on the rim except the skull base at the bottom (polar angle +pi/2), where the sella is
    direction = rng.uniform(-np.pi / 2 - 2.2, -np.pi / 2 + 2.2)
    rim = float(head.skull_inner_at(direction))
    rim_x = head.half_width * rim * np.cos(direction)
    rim_y = head.half_height * rim * np.sin(direction)
    normal = np.array([np.cos(direction) / head.half_width, np.sin(direction) / head.half_height])
    normal /= np.linalg.norm(normal)
    depth = rng.uniform(0.5, 0.8) * lesion_radius  # centre inside the skull: a broad dural base
    rho = np.hypot(head.x - float(rim_x - depth * normal[0]), head.y - float(rim_y - depth * normal[1]))
    intracranial = head.soft((head.skull_inner - head.radius) * head.mean_axis)
    cleft_alpha = head.soft(lesion_radius + 1.5 * head.pixel - rho) * intracranial
    image = _blend(image, 0.6 * cleft_alpha, _CSF)  # thin CSF cleft: the brain is pushed, not invaded
    lesion_alpha = head.soft(lesion_radius - rho) * intracranial
    image = _blend(image, lesion_alpha, rng.uniform(0.86, 1.0) * (1.0 + 0.03 * texture))
    return image, lesion_alpha > 0.5, np.zeros(image.shape, dtype=bool)


def _paint_pituitary(head: _Head, rng, image, texture):
    """Small bright midline mass at the sella, in the lower centre of the head."""
    lesion_radius = rng.uniform(0.06, 0.095)
    mass_x = rng.uniform(-0.015, 0.015)
    mass_y = head.cistern_y + rng.uniform(-0.02, 0.03)
    rho = np.hypot((head.x - mass_x) / rng.uniform(1.0, 1.3), head.y - mass_y)
    lesion_alpha = head.soft(lesion_radius - rho) * head.brain_alpha
    image = _blend(image, lesion_alpha, rng.uniform(0.85, 1.0) * (1.0 + 0.06 * texture))
    return image, lesion_alpha > 0.5, np.zeros(image.shape, dtype=bool)


_LESION_PAINTERS = {"glioma": _paint_glioma, "meningioma": _paint_meningioma, "pituitary": _paint_pituitary}


def make_phantom(label: str, size: int = 128, rng: np.random.Generator | int | None = None, *,
                 return_mask: bool = False):
    """Return one synthetic axial slice of class `label` as uint8 (size, size), or (image, lesion mask).

    `rng` is a numpy Generator (advanced in place), a seed, or None for fresh entropy. The mask marks the
    tumour's pixels (not the edema) and is empty for "notumor".
    """
    phantom = _render(label, size, rng)
    return (phantom.image, phantom.lesion) if return_mask else phantom.image


def write_phantom_set(out_dir: str | os.PathLike, per_class: int, size: int = 128, seed: int = 0,
                      classes=PHANTOM_CLASSES) -> Path:
    """Write `per_class` grayscale PNGs per class to out_dir/<class>/<class>_<i:04d>.png; returns out_dir.

    Image i of a class is seeded from (seed, the class's index in PHANTOM_CLASSES, i), so a set is
    reproducible, and asking for more images or fewer classes leaves the other images unchanged.
    """
    per_class = _check_whole(per_class, "images per class")
    if per_class < 1:
        raise UserError(f"images per class must be at least 1, got {per_class}")
    size = _check_size(size)
    seed = _check_whole(seed, "phantom seed")
    if seed < 0:
        raise UserError(f"phantom seed must be >= 0, got {seed}")
    classes = (classes,) if isinstance(classes, str) else tuple(classes)
    if not classes:
        raise UserError(f"no phantom classes given: choose from {', '.join(PHANTOM_CLASSES)}")
    class_indices = [check_label(name) for name in classes]
    out_dir = Path(out_dir)
    try:
        with removed_on_failure(out_dir):
            for name, class_index in zip(classes, class_indices):
                class_dir = out_dir / name
                class_dir.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    rng = np.random.default_rng(np.random.SeedSequence([seed, class_index, i]))
                    image = Image.fromarray(make_phantom(name, size, rng))
                    atomic_write(class_dir / f"{name}_{i:04d}.png", lambda handle: image.save(handle, "PNG"))
    except OSError as exc:
        raise UserError(f"cannot write phantoms to {out_dir}: {exc.strerror or exc}") from None
    return out_dir


@contextmanager
def removed_on_failure(out_dir: str | os.PathLike) -> Iterator[None]:
    """On any failure inside, remove what the block created under ``out_dir`` (files, then folders, then
    ``out_dir`` and the parents it needed), so a failed writer leaves no empty class folder or partial set;
    files and folders that were there before are kept."""
    out_dir = Path(out_dir)
    first_new = out_dir
    while not first_new.parent.exists() and first_new.parent != first_new:
        first_new = first_new.parent
    before = set(out_dir.rglob("*")) if out_dir.is_dir() else set()
    existed = out_dir.exists()
    try:
        yield
    except BaseException:
        created = [p for p in (out_dir.rglob("*") if out_dir.is_dir() else []) if p not in before]
        for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
            try:
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
            except OSError:
                pass  # best effort: the original error is what the user needs to see
        if not existed:
            folder = out_dir
            while True:
                try:
                    folder.rmdir()
                except OSError:
                    break
                if folder == first_new:
                    break
                folder = folder.parent
        raise
