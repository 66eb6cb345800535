"""The server's JSON, typed for FastAPI and the OpenAPI schema, built from the results schema's dataclasses.

A slice's fields are the fields of the one results schema (``braintumor.inference.classifier.Prediction``):
the same names on every surface. The server adds what only a web page needs (pixel size, preview and
explanation images) and, for a volume, the volume's own result.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from braintumor.inference.results import Prediction, VolumePrediction

PREVIEW_SIZE = 256  # longest side of the preview PNG returned with ?preview=1


_MODELS: dict[tuple[type, str], type[BaseModel]] = {}


def _as_json_type(annotation: Any) -> Any:
    """A dataclass field's type as it appears in JSON: floats may be null (non-finite numbers are sent as null),
    nested dataclasses become their models."""
    if dataclasses.is_dataclass(annotation):
        return model_from_dataclass(annotation)
    if annotation is float:
        return Optional[float]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is None or not args:
        return annotation
    converted = tuple(_as_json_type(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return Union[converted]
    return origin[converted]


def model_from_dataclass(cls: type, name: str | None = None, *, exclude: tuple[str, ...] = (),
                         extra: dict[str, tuple[Any, Any]] | None = None, doc: str | None = None) -> type[BaseModel]:
    """A pydantic model with the dataclass's fields (same names, types, defaults and order) plus ``extra``."""
    name = name or cls.__name__
    key = (cls, name)
    if key in _MODELS:
        return _MODELS[key]
    hints = typing.get_type_hints(cls)
    fields: dict[str, tuple[Any, Any]] = {}
    for item in dataclasses.fields(cls):
        if item.name in exclude:
            continue
        required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        fields[item.name] = (_as_json_type(hints[item.name]), ... if required else None)
    fields.update(extra or {})
    model = create_model(name, __config__=ConfigDict(extra="forbid"), __doc__=doc or cls.__doc__, **fields)
    _MODELS[key] = model
    return model


class ExplanationImage(BaseModel):
    """An explanation of one slice: the method, the class it explains and two PNGs at the preview's size."""

    method: str = Field(description="one of braintumor.visualize.explain.METHODS")
    layer: str | None = Field(None, description="the layer a CAM method read (None: the method's default)")
    mirror: bool = Field(description="whether the map is the mean of the slice's and its mirror's maps")
    target: str = Field(description="the class whose evidence the map shows")
    overlay_png_base64: str = Field(description="the map blended over the slice, PNG (base64)")
    heatmap_png_base64: str = Field(description="the colour-mapped map alone, PNG (base64)")


class ModelInfo(BaseModel):
    arch: str
    classes: list[str]
    image_size: int
    backend: str
    fingerprint: str


SlicePrediction = model_from_dataclass(Prediction)

VolumeSummary = model_from_dataclass(
    VolumePrediction, "VolumeSummary", exclude=("montage",),
    extra={"montage_png_base64": (Optional[str], Field(None, description="explanations of the most suspicious "
                                                                         "slices, PNG (base64), with ?explain=1"))})

FileResult = model_from_dataclass(
    Prediction, "FileResult",
    doc="One uploaded file. A 2-D slice: its prediction. A volume: the prediction of its key (most suspicious) "
        "slice (``volume`` and ``slice_index`` say which), with the volume's own status, verdict and every "
        "slice under ``volume_prediction``.",
    extra={"width": (int, Field(description="the decoded slice's width, pixels")),
           "height": (int, Field(description="the decoded slice's height, pixels")),
           "preview_png_base64": (Optional[str], Field(None, description=f"with ?preview=1: the decoded slice, at "
                                                                       f"most {PREVIEW_SIZE} px, PNG (base64)")),
           "explanation": (Optional[ExplanationImage], Field(None, description="with ?explain=1")),
           "volume_prediction": (Optional[VolumeSummary], Field(None, description="a volume's own result"))})


class PredictResponse(BaseModel):
    """The answer of /api/predict: the model, one result per uploaded file (in upload order), the research note."""

    model: ModelInfo
    results: list[FileResult]  # type: ignore[valid-type]
    note: str
