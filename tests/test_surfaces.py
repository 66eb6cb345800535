"""Every surface gives the same answer (issue 21): the same slices — a phantom MR slice, its contrast-inverted
copy and a photo-like image, with the model's trust thresholds set so that they are ``ok``, ``atypical`` and
``not_mri`` — through predict (table, CSV, JSON), explain, evaluate, the Python
API (path, PIL, numpy, tensor), the server's JSON, an ONNX and a TorchScript export, and inside a NIfTI volume
and a DICOM series: the same class, calibrated probabilities within 1e-4 (1e-3 on the exported runtimes), the same
trust scores and status. And the stream contract: stdout alone always parses, stderr holds the human lines.

A surface is a function ``(context) -> {slice name: Answer}`` registered in SURFACES; add one there (e.g. a new
endpoint) and the equivalence test covers it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from braintumor.cli import main
from braintumor.synthetic.phantom import make_phantom

SIZE = 64
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


@dataclass
class Answer:
    """What a surface says about one slice (None where the surface does not show it)."""

    predicted_class: str | None
    probabilities: dict[str, float]
    status: str
    not_mri_score: float | None = None
    atypical_score: float | None = None


def slice_pixels() -> dict[str, np.ndarray]:
    """Grayscale (S, S) uint8 slices: so a volume built from them holds exactly the same pixels."""
    rng = np.random.default_rng(0)
    normal = make_phantom("glioma", SIZE, rng=1)
    photo = rng.integers(0, 256, (SIZE // 8, SIZE // 8), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    return {"normal": normal, "inverted": (255 - normal).astype(np.uint8), "photo": photo}


def place_thresholds(path: Path, pixels: dict[str, np.ndarray]) -> dict[str, str]:
    """Rescale the synthetic trust thresholds of the checkpoint at ``path`` so that the photo (the highest
    not-MRI score) is not_mri and, of the two MR slices, the one with the higher atypical score is atypical and
    the other ok. Returns the status each slice should get."""
    from braintumor.inference.classifier import Classifier
    from braintumor.models.checkpoint import load_checkpoint, save_checkpoint

    found = dict(zip(pixels, Classifier.from_checkpoint(path, device="cpu").predict(list(pixels.values()))))
    mr = [name for name in pixels if name != "photo"]
    assert found["photo"].not_mri_score > max(found[n].not_mri_score for n in mr)
    not_mri_scale = (found["photo"].not_mri_score + max(found[n].not_mri_score for n in mr)) / 2
    low, high = sorted(mr, key=lambda n: found[n].atypical_score)
    assert found[low].predicted_class == found[high].predicted_class  # one class threshold separates them
    atypical_scale = (found[low].atypical_score + found[high].atypical_score) / 2
    ckpt = load_checkpoint(path)
    for block in ckpt["trust"]["not_mri"]["blocks"]:
        block["threshold"] *= not_mri_scale
    ckpt["trust"]["atypical"]["thresholds"] = ckpt["trust"]["atypical"]["thresholds"] * atypical_scale
    save_checkpoint(ckpt, path)
    return {"photo": "not_mri", high: "atypical", low: "ok"}


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    """The trusted checkpoint, its exports, the slices as files (in a labelled folder) and as two volumes."""
    from braintumor.inference.classifier import Classifier
    from braintumor.inference.export import export
    from braintumor.synthetic.volumes import write_dicom_series, write_nifti
    from helpers import make_trusted_checkpoint

    root = tmp_path_factory.mktemp("surfaces")
    checkpoint = make_trusted_checkpoint(root / "trusted.pt", image_size=SIZE)
    pixels = slice_pixels()
    expected = place_thresholds(checkpoint, pixels)
    data = root / "data"
    files = {}
    for name, array in pixels.items():
        files[name] = data / "glioma" / f"{name}.png"  # one labelled folder: evaluate reads it too
        files[name].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, mode="L").save(files[name])
    volume = np.stack(list(pixels.values()))  # viewer-ordered (Z, S, S), whole numbers 0..255: read as it is
    return {
        "root": root, "checkpoint": checkpoint, "expected_status": expected, "files": files, "data": data, "names": list(pixels),
        "pixels": pixels, "classifier": Classifier.from_checkpoint(checkpoint, device="cpu"),
        "nifti": write_nifti(root / "slices.nii.gz", volume, spacing=(1.0, 1.0, 1.0)),
        "series": write_dicom_series(root / "series", volume, spacing=(1.0, 1.0, 1.0)),
        "onnx": export(checkpoint, "onnx", root / "trusted.onnx"),
        "torchscript": export(checkpoint, "torchscript", root / "trusted.ts"),
    }


def _from_prediction(p) -> Answer:
    return Answer(p.predicted_class, dict(p.probabilities), p.status, p.not_mri_score, p.atypical_score)


def _from_record(record: dict) -> Answer:
    return Answer(record["predicted_class"], record["probabilities"], record["status"], record["not_mri_score"],
                  record["atypical_score"])


def _number(cell: str) -> float | None:
    return float(cell) if cell else None


def _from_csv_row(row: dict) -> Answer:
    return Answer(row["predicted_class"] or None, {c: float(row[f"p_{c}"]) for c in CLASSES}, row["status"],
                  _number(row["not_mri_score"]), _number(row["atypical_score"]))


def _name(source: str) -> str:
    return Path(source).stem


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------ the surfaces

def python_api(kind: str):
    def surface(ctx, capsys):
        classifier = ctx["classifier"]
        if kind == "path":
            items = [str(ctx["files"][n]) for n in ctx["names"]]
        elif kind == "pil":
            items = [Image.open(ctx["files"][n]) for n in ctx["names"]]
        elif kind == "numpy":  # as a nibabel user has it: H x W, float
            items = [ctx["pixels"][n].astype(np.float64) for n in ctx["names"]]
        else:  # a tensor as torch stores images: C x H x W
            items = [torch.from_numpy(ctx["pixels"][n])[None] for n in ctx["names"]]
        return dict(zip(ctx["names"], map(_from_prediction, classifier.predict(items))))
    return surface


def predict_json(ctx, capsys, model="checkpoint"):
    code, out, _ = run_cli(["predict", ctx[model], *ctx["files"].values(), "--json", "--device", "cpu"], capsys)
    assert code == 0
    return {_name(r["source"]): _from_record(r) for r in json.loads(out)}


def predict_csv(ctx, capsys):
    code, out, _ = run_cli(["predict", ctx["checkpoint"], *ctx["files"].values(), "--csv", "--device", "cpu"], capsys)
    assert code == 0
    return {_name(r["source"]): _from_csv_row(r) for r in csv.DictReader(io.StringIO(out))}


def predict_table(ctx, capsys):
    code, out, _ = run_cli(["predict", ctx["checkpoint"], *ctx["files"].values(), "--device", "cpu"], capsys)
    assert code == 0
    answers = {}
    for line in out.splitlines()[1:]:
        tokens = line.split()
        status, not_mri, atypical = tokens[-3:]
        probabilities = dict(zip(CLASSES, map(float, tokens[-7:-3])))
        shown = " ".join(tokens[1:-7])
        answers[_name(tokens[0])] = Answer(shown if shown in CLASSES else None, probabilities, status,
                                           None if not_mri == "n/a" else float(not_mri),
                                           None if atypical == "n/a" else float(atypical))
    return answers


def python_explain(ctx, capsys):
    explanations = ctx["classifier"].explain([str(ctx["files"][n]) for n in ctx["names"]])
    answers = {}
    for name, e in zip(ctx["names"], explanations):
        assert e.probability == pytest.approx(e.prediction.confidence)  # calibrated, not the raw softmax
        answers[name] = _from_prediction(e.prediction)
    return answers


def evaluate_csv(ctx, capsys):
    out = ctx["root"] / "evaluation"
    code, _, _ = run_cli(["evaluate", ctx["checkpoint"], ctx["data"], "--out", out, "--device", "cpu",
                          "--overwrite"], capsys)
    assert code == 0
    with open(out / "predictions.csv", newline="") as handle:
        return {_name(r["source"]): _from_csv_row(r) for r in csv.DictReader(handle)}


def volume(kind: str):
    def surface(ctx, capsys):
        code, out, _ = run_cli(["predict", ctx["checkpoint"], ctx[kind], "--json", "--device", "cpu"], capsys)
        (record,) = json.loads(out)
        assert code == 0 and record["slices_total"] == len(ctx["names"])
        return {ctx["names"][r["slice_index"]]: _from_record(r) for r in record["slices"]}
    return surface


def exported(kind: str):
    def surface(ctx, capsys):
        return predict_json(ctx, capsys, model=kind)
    return surface


def server_json(ctx, capsys):
    """The server's /api/predict (same fields: the response model is built from the results schema)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from braintumor.serve.app import create_app

    files = [("files", (path.name, path.read_bytes(), "image/png")) for path in ctx["files"].values()]
    with TestClient(create_app(ctx["classifier"])) as client:
        response = client.post("/api/predict", files=files)
    assert response.status_code == 200, response.text
    return {_name(r.get("source") or r["filename"]): _from_record(r) for r in response.json()["results"]}


SURFACES = {  # name -> (surface, probability tolerance)
    "python path": (python_api("path"), 1e-4), "python PIL": (python_api("pil"), 1e-4),
    "python numpy": (python_api("numpy"), 1e-4), "python tensor": (python_api("tensor"), 1e-4),
    "predict --json": (predict_json, 1e-4), "predict --csv": (predict_csv, 1e-4),
    "predict table": (predict_table, 1e-4), "explain": (python_explain, 1e-4),
    "evaluate predictions.csv": (evaluate_csv, 1e-4), "NIfTI volume": (volume("nifti"), 1e-4),
    "DICOM series": (volume("series"), 1e-4), "ONNX export": (exported("onnx"), 1e-3),
    "TorchScript export": (exported("torchscript"), 1e-3), "server JSON": (server_json, 1e-4),
}


@pytest.mark.parametrize("surface", list(SURFACES))
def test_every_surface_gives_the_same_answer(context, capsys, surface):
    reference = python_api("path")(context, capsys)
    function, tolerance = SURFACES[surface]
    answers = function(context, capsys)
    assert set(answers) == set(reference), surface
    # The table rounds probabilities to 4 decimals and scores to 2.
    score_tolerance = 5e-3 if surface == "predict table" else max(tolerance, 1e-4) * 10
    for name, expected in reference.items():
        got = answers[name]
        assert got.status == expected.status, (surface, name, got, expected)
        shown = expected.predicted_class if surface != "predict table" or expected.status in ("ok", "atypical") \
            else None
        assert got.predicted_class == shown, (surface, name)
        for c in CLASSES:
            assert got.probabilities[c] == pytest.approx(expected.probabilities[c], abs=tolerance), (surface, name)
        for score in ("not_mri_score", "atypical_score"):
            ours, theirs = getattr(got, score), getattr(expected, score)
            assert (ours is None) == (theirs is None), (surface, name, score)
            if ours is not None:
                assert ours == pytest.approx(theirs, abs=score_tolerance, rel=1e-3), (surface, name, score)


def test_the_reference_answers_cover_the_statuses(context, capsys):
    """The three slices are ok, atypical and not_mri: the equivalence above compares every status path."""
    reference = python_api("path")(context, capsys)
    assert {name: a.status for name, a in reference.items()} == context["expected_status"]
    assert reference["photo"].not_mri_score > 1
    assert all(math.isclose(sum(a.probabilities.values()), 1.0, abs_tol=1e-5) for a in reference.values())


# ------------------------------------------------------------------ the stream contract

@pytest.fixture(scope="module")
def truncated_folder(context):
    folder = context["root"] / "with_truncated"
    folder.mkdir(exist_ok=True)
    for name, path in context["files"].items():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "truncated.png").write_bytes(context["files"]["normal"].read_bytes()[:200])
    return folder


@pytest.mark.parametrize("fmt", ["--csv", "--json"])
@pytest.mark.parametrize("inputs, extra", [
    (lambda ctx, bad: [ctx["data"]], []),
    (lambda ctx, bad: [ctx["nifti"], ctx["series"]], []),
    (lambda ctx, bad: [ctx["data"], ctx["nifti"]], []),
    (lambda ctx, bad: [bad], []),
    (lambda ctx, bad: [bad], ["--skip-bad"]),
    (lambda ctx, bad: [bad, ctx["nifti"]], ["--skip-bad"]),
])
def test_stdout_alone_always_parses(context, truncated_folder, capsys, fmt, inputs, extra):
    paths = inputs(context, truncated_folder)
    code, out, err = run_cli(["predict", context["checkpoint"], *paths, fmt, "--device", "cpu", "--batch-size",
                              "2", *extra], capsys)
    if fmt == "--json":
        if code == 0:
            records = json.loads(out)
            assert isinstance(records, list) and records
        else:
            assert out == ""  # an error: nothing on stdout, never half a document
    else:
        rows = list(csv.reader(io.StringIO(out)))
        assert rows and rows[0][:3] == ["source", "predicted_class", "confidence"]
        assert all(len(row) == len(rows[0]) for row in rows)  # one header, the same columns on every row
    if truncated_folder in paths and not extra:
        assert code == 2 and err.count("\n") == 1 and "truncated.png" in err and "--skip-bad" in err
    else:
        assert code == 0 and all(not line.startswith(("Traceback", "{", "[")) for line in err.splitlines())
    if extra:
        assert "skipped 1 unreadable file(s)" in err and "truncated.png" in err


def test_volume_verdict_is_data_in_json_and_a_stderr_line_otherwise(context, capsys):
    code, out, err = run_cli(["predict", context["checkpoint"], context["nifti"], "--csv", "--device", "cpu"], capsys)
    assert code == 0 and "volume verdict" in err and "volume verdict" not in out
    code, out, err = run_cli(["predict", context["checkpoint"], context["nifti"], "--json", "--device", "cpu"], capsys)
    (record,) = json.loads(out)
    assert {"verdict", "status", "rule", "evidence", "slices"} <= set(record) and "volume verdict" not in err
    code, out, err = run_cli(["predict", context["checkpoint"], context["nifti"], "--device", "cpu"], capsys)
    [header, row] = out.splitlines()  # the table: one row for the volume, labelled as its key slice's numbers
    assert code == 0 and row.startswith(str(context["nifti"])) and "of its key slice" in err


def test_a_file_given_twice_is_predicted_once(context, capsys):
    normal = context["files"]["normal"]
    code, out, _ = run_cli(["predict", context["checkpoint"], normal, normal.parent, normal, "--csv", "--device",
                            "cpu"], capsys)
    sources = [row["source"] for row in csv.DictReader(io.StringIO(out))]
    assert code == 0 and len(sources) == len(context["names"]) and sources[0] == str(normal)


def test_explain_on_an_export_is_one_stderr_line(context, capsys):
    for model in ("onnx", "torchscript"):
        code, out, err = run_cli(["explain", context[model], context["files"]["normal"], "--out",
                                  context["root"] / f"cam-{model}", "--device", "cpu"], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1 and "PyTorch checkpoint" in err
        assert not (context["root"] / f"cam-{model}").exists()


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(context):
    command = (f"{sys.executable} -m braintumor predict {context['checkpoint']} {context['data']} {context['nifti']} "
               f"--device cpu --batch-size 1 2>{context['root'] / 'pipe-err.txt'} | head -1")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert result.stdout.startswith("image") and result.stdout.count("\n") == 1
    err = (context["root"] / "pipe-err.txt").read_text()
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err
