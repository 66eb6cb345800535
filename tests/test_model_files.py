"""Everything read from a model file is validated: a bad checkpoint or export is one error line (exit 2), never a
traceback, and never NaN passed off as a prediction. The bad-file cases of the bad-input matrix live here."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from braintumor.cli import main
from braintumor.errors import UserError
from braintumor.inference.runtimes import (TORCHSCRIPT_META, encode_onnx_metadata, open_model, read_onnx,
                                           spec_from_metadata)
from braintumor.models.checkpoint import MAX_IMAGE_SIZE, ModelSpec, load_checkpoint, save_checkpoint
from braintumor.models.network import build_model

from helpers import make_checkpoint, make_trusted_checkpoint

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
SIZE = 32


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(code, out, err, expected):
    assert code == 2, err
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and expected in err, err


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "slice.png"
    Image.fromarray((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 251).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", image_size=SIZE)


@pytest.fixture(scope="module")
def trusted(tmp_path_factory):
    return make_trusted_checkpoint(tmp_path_factory.mktemp("trusted") / "trusted.pt", image_size=SIZE)


def edited(source, path, **changes):
    """A copy of a checkpoint with top-level or trust entries changed (``trust__temperature=...``)."""
    ckpt = load_checkpoint(source)
    version = changes.pop("format_version", None)
    for key, value in changes.items():
        if key.startswith("trust__"):
            ckpt.setdefault("trust", {})[key[len("trust__"):]] = value
        else:
            ckpt[key] = value
    ckpt.pop("format_version", None)
    save_checkpoint(ckpt, path)
    if version is not None:  # save_checkpoint writes the current version: put the bad one in by hand
        raw = torch.load(path, weights_only=True)
        raw["format_version"] = version
        torch.save(raw, path)
    return path


# ------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name, changes, expected", [
    ("version-string", {"format_version": "1"}, "format_version must be a whole number, got '1'"),
    ("version-float", {"format_version": 1.5}, "format_version must be a whole number"),
    ("temperature-word", {"trust__temperature": "hot"}, "trust.temperature must be a finite number above 0"),
    ("temperature-zero", {"trust__temperature": 0.0}, "trust.temperature must be a finite number above 0"),
    ("temperature-negative", {"trust__temperature": -1.5}, "trust.temperature must be a finite number above 0"),
    ("temperature-nan", {"trust__temperature": float("nan")}, "trust.temperature must be a finite number above 0"),
    ("temperature-bool", {"trust__temperature": True}, "trust.temperature must be a finite number above 0"),
    ("ood-wrong-keys", {"trust__ood": {"mean": 1}}, "trust entry is malformed"),
    ("ood-string", {"trust__ood": "x"}, "trust.ood must be a dict"),
    ("not-mri-list", {"trust__not_mri": [1, 2]}, "trust.not_mri must be a dict"),
    ("trust-list", {"trust": [1, 2]}, "trust must be a dict"),
    ("image-size-huge", {"image_size": 200000}, f"image_size must be a whole number from 1 to {MAX_IMAGE_SIZE}"),
    ("image-size-zero", {"image_size": 0}, "image_size must be a whole number"),
    ("image-size-text", {"image_size": "64"}, "image_size must be a whole number"),
])
def test_bad_checkpoint_fields_are_one_line(checkpoint, image, tmp_path, capsys, name, changes, expected):
    bad = edited(checkpoint, tmp_path / f"{name}.pt", **changes)
    assert_one_line(*run(["predict", bad, image], capsys), expected)


@pytest.mark.slow
def test_bad_trust_tensors_are_one_line(trusted, image, tmp_path, capsys):
    ckpt = load_checkpoint(trusted)
    atypical = ckpt["trust"]["atypical"]
    cases = {
        "wrong-shape": {**ckpt["trust"], "atypical": {**atypical, "centers": torch.zeros(4, 3)}},
        "nan-threshold": {**ckpt["trust"], "atypical": {**atypical,
                                                        "thresholds": torch.full_like(atypical["thresholds"], math.nan)}},
        "nan-tensor": {**ckpt["trust"], "atypical": {**atypical,
                                                     "centers": torch.full_like(atypical["centers"], math.nan)}},
        "text-tensor": {**ckpt["trust"], "atypical": {**atypical, "whitening": "x"}},
        "not-mri-empty": {**ckpt["trust"], "not_mri": {"method": "gaussian-statistics"}},
    }
    for name, trust in cases.items():
        bad = edited(trusted, tmp_path / f"{name}.pt", trust=trust)
        code, out, err = run(["predict", bad, image], capsys)
        assert_one_line(code, out, err, "trust entry")
        assert "refit" in err or "NaN" in err, name


@pytest.mark.slow
def test_nan_weights_are_refused_at_load(checkpoint, image, tmp_path, capsys):
    # The choice: refuse at load (a NaN weight makes every prediction NaN; no status would make it useful).
    ckpt = load_checkpoint(checkpoint)
    for value in (float("nan"), float("inf")):
        weights = dict(ckpt["model"])
        weights["fc.3.bias"] = torch.full_like(weights["fc.3.bias"], value)
        bad = edited(checkpoint, tmp_path / f"w{value}.pt", model=weights)
        assert_one_line(*run(["predict", bad, image], capsys), "weights hold NaN or infinite values (fc.3.bias)")


def test_a_typo_of_reference_or_of_a_file_is_suggested(checkpoint, image, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(checkpoint.parent)
    assert_one_line(*run(["predict", "refrence", image], capsys),
                    "checkpoint not found: refrence; did you mean 'reference'?")
    assert_one_line(*run(["predict", "tiny.tp", image], capsys), "did you mean 'tiny.pt'?")
    assert_one_line(*run(["predict", checkpoint.parent / "tiny.p", image], capsys),
                    f"did you mean '{checkpoint.parent / 'tiny.pt'}'?")
    code, out, err = run(["predict", tmp_path / "nothing-like-it.pt", image], capsys)
    assert_one_line(code, out, err, "checkpoint not found")
    assert "did you mean" not in err
    assert_one_line(*run(["predict", tmp_path, image], capsys), "is a folder without best.pt or last.pt")


class Foreign:  # any class: torch's weights_only loader refuses it
    pass


def test_weights_file_errors_do_not_repeat_torchs_advice(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"conv1.weight": Foreign()}, evil)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    for path in (evil, text):
        with pytest.raises(UserError) as caught:
            build_model("resnet18", 4, path)
        message = str(caught.value)
        assert "weights_only" not in message and "\n" not in message and str(path) in message


def test_model_spec_checks_every_field_and_bound():
    good = dict(arch="resnet18", classes=("a", "b"), image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    assert ModelSpec(**good, trust={"temperature": 2}).temperature == 2.0
    assert ModelSpec(**{**good, "image_size": MAX_IMAGE_SIZE}).image_size == MAX_IMAGE_SIZE
    for bad in ({"image_size": MAX_IMAGE_SIZE + 1}, {"trust": {"temperature": math.inf}},
                {"trust": {"temperature": None}}, {"trust": {1: 2}}, {"trust": {"atypical": 3}}):
        with pytest.raises(ValueError):
            ModelSpec(**{**good, **bad})


# ------------------------------------------------------------------------------------------- ONNX


def tiny_onnx(path, *, classes: int = 4, meta_classes=None, trust_output: str | None = None, weight=None,
              bomb: bool = False, trust: dict | None = None, external: bool = False):
    """A braintumor-looking ONNX file in a few hundred bytes: global average pool -> MatMul -> logits (B, C)."""
    weight = np.ones((3, classes), np.float32) if weight is None else weight
    initializers = [numpy_helper.from_array(weight, "weight")]
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "weight"], ["raw"])]
    if bomb:  # 2^17 x 2^17 float32 ones: 64 GiB from a few bytes
        initializers.append(numpy_helper.from_array(np.array([2 ** 17, 2 ** 17], np.int64), "shape"))
        nodes += [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                                   value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
                  helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
                  helper.make_node("Add", ["raw", "total"], ["logits"])]
    else:
        nodes.append(helper.make_node("Identity", ["raw"], ["logits"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])]
    if trust_output == "ood_score":  # an export from before the two tiers: one (B,) score
        nodes.append(helper.make_node("ReduceMax", ["flat"], ["ood_score"], axes=[1], keepdims=0))
        outputs.append(helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["batch"]))
    elif trust_output == "trust_scores":
        initializers.append(numpy_helper.from_array(np.full((3, 2), 0.5, np.float32), "trust_weight"))
        nodes.append(helper.make_node("MatMul", ["flat", "trust_weight"], ["trust_scores"]))
        outputs.append(helper.make_tensor_value_info("trust_scores", TensorProto.FLOAT, ["batch", 2]))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            ["batch", 3, SIZE, SIZE])],
                              outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"classes": (meta_classes or CLASSES)[:classes] if meta_classes is None else meta_classes,
            "image_size": SIZE, "mean": [0.0] * 3, "std": [1.0] * 3, "arch": "resnet18",
            "braintumor_version": "0", "source_fingerprint": "0" * 12}
    if trust is not None:
        meta["trust"] = trust
    for key, value in encode_onnx_metadata(meta).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    if external:
        model.graph.initializer[0].data_location = TensorProto.EXTERNAL
        entry = model.graph.initializer[0].external_data.add()
        entry.key, entry.value = "location", "/etc/hostname"
    path.write_bytes(model.SerializeToString())
    return path


def test_a_tiny_onnx_export_reads_back(tmp_path):
    opened = open_model(tiny_onnx(tmp_path / "ok.onnx"))
    logits, scores = opened.runtime.run(torch.ones(2, 3, SIZE, SIZE))
    assert logits.shape == (2, 4) and scores is None and opened.runtime.tiers == ()


def test_onnx_class_list_shorter_than_the_output_is_refused_at_load(tmp_path, image, capsys):
    bad = tiny_onnx(tmp_path / "fewer.onnx", meta_classes=CLASSES[:3])
    with pytest.raises(UserError, match="metadata lists 3 classes but the graph outputs 4 logits"):
        read_onnx(bad)
    code, out, err = run(["predict", bad, image, "--csv"], capsys)
    assert_one_line(code, out, err, "metadata lists 3 classes")  # nothing on stdout, not even the CSV header


def test_onnx_graph_bomb_is_refused_before_onnxruntime_allocates(tmp_path, image, capsys):
    bomb = tiny_onnx(tmp_path / "bomb.onnx", bomb=True)
    assert bomb.stat().st_size < 1500
    code, out, err = run(["predict", bomb, image], capsys)
    assert_one_line(code, out, err, "is refused: its graph allocates 64 GiB for one tensor")


def test_onnx_nan_weights_and_external_data_are_refused(tmp_path, image, capsys):
    nan_weight = np.ones((3, 4), np.float32)
    nan_weight[1, 2] = np.nan
    assert_one_line(*run(["predict", tiny_onnx(tmp_path / "nan.onnx", weight=nan_weight), image], capsys),
                    "weights hold NaN or infinite values (weight)")
    assert_one_line(*run(["predict", tiny_onnx(tmp_path / "ext.onnx", external=True), image], capsys),
                    "keeps weights in external files")


def test_onnx_metadata_out_of_bounds_is_one_line(tmp_path, image, capsys):
    path = tiny_onnx(tmp_path / "big.onnx")
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "image_size":
            prop.value = "200000"
    onnx.save(model, str(path))
    assert_one_line(*run(["predict", path, image], capsys), "corrupt braintumor metadata (image_size must be")
    temperature = tiny_onnx(tmp_path / "hot.onnx", trust={"temperature": "hot", "tiers": []})
    assert_one_line(*run(["predict", temperature, image], capsys), "trust.temperature must be a finite number")


def test_legacy_and_two_tier_onnx_outputs_become_two_columns(tmp_path):
    legacy = open_model(tiny_onnx(tmp_path / "legacy.onnx", trust_output="ood_score",
                                  trust={"temperature": 1.5}))
    batch = torch.arange(2 * 3 * SIZE * SIZE, dtype=torch.float32).reshape(2, 3, SIZE, SIZE) / 1000
    logits, scores = legacy.runtime.run(batch)
    assert legacy.runtime.tiers == ("atypical",) and "no not-MRI tier" in legacy.runtime.missing
    assert scores.shape == (2, 2) and (scores[:, 0] == 0).all()
    np.testing.assert_allclose(scores[:, 1], batch.mean(dim=(2, 3)).max(dim=1).values.numpy(), rtol=1e-5)
    assert legacy.spec.temperature == 1.5
    both = open_model(tiny_onnx(tmp_path / "two.onnx", trust_output="trust_scores",
                                trust={"temperature": 1.5, "tiers": ["not_mri", "atypical"]}))
    assert both.runtime.tiers == ("not_mri", "atypical") and both.runtime.missing is None
    assert both.runtime.run(batch)[1].shape == (2, 2)
    plain = open_model(tiny_onnx(tmp_path / "plain.onnx"))
    assert plain.runtime.tiers == () and "no trust tiers" in plain.runtime.missing


# ------------------------------------------------------------------------------------------- TorchScript


class TinyNet(torch.nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.fc = torch.nn.Linear(3, classes)

    def forward(self, images):
        return self.fc(images.mean(dim=(2, 3)))


def tiny_torchscript(path, meta_classes=CLASSES, classes: int = 4, nan: bool = False, trust=None):
    """An old-style TorchScript export (logits only) with braintumor metadata inside."""
    net = TinyNet(classes)
    if nan:
        with torch.no_grad():
            net.fc.weight[0, 0] = float("nan")
    meta = {"classes": meta_classes, "image_size": SIZE, "mean": [0.0] * 3, "std": [1.0] * 3, "arch": "resnet18",
            "braintumor_version": "0", "source_fingerprint": "0" * 12, **({"trust": trust} if trust else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(net), str(path), _extra_files={TORCHSCRIPT_META: json.dumps(meta)})
    return path


def test_old_torchscript_exports_load_and_say_what_they_lack(tmp_path):
    opened = open_model(tiny_torchscript(tmp_path / "old.ts", trust={"temperature": 2.0}))
    logits, scores = opened.runtime.run(torch.zeros(3, 3, SIZE, SIZE))
    assert logits.shape == (3, 4) and scores is None
    assert opened.runtime.tiers == () and "no trust tiers" in opened.runtime.missing
    assert opened.spec.temperature == 2.0


def test_bad_torchscript_exports_are_one_line(tmp_path, image, capsys):
    assert_one_line(*run(["predict", tiny_torchscript(tmp_path / "few.ts", CLASSES[:3]), image], capsys),
                    "metadata lists 3 classes but the model returns logits of shape (1, 4)")
    assert_one_line(*run(["predict", tiny_torchscript(tmp_path / "nan.ts", nan=True), image], capsys),
                    "weights hold NaN or infinite values (fc.weight)")
    assert_one_line(*run(["predict", tiny_torchscript(tmp_path / "hot.ts", trust={"temperature": -1}), image],
                         capsys), "trust.temperature must be a finite number")


def test_spec_from_metadata_is_the_model_spec_check():
    with pytest.raises(ValueError, match="image_size"):
        spec_from_metadata({"classes": CLASSES, "image_size": 4096, "mean": [0] * 3, "std": [1] * 3,
                            "arch": "resnet18"})


# ------------------------------------------------------------------------------------------- export


@pytest.mark.slow
def test_export_refuses_to_overwrite_without_the_flag(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.ts"
    out.write_bytes(b"precious")
    code, stdout, err = run(["export", checkpoint, "--format", "torchscript", "--out", out], capsys)
    assert_one_line(code, stdout, err, f"{out} already exists; pass --overwrite")
    assert out.read_bytes() == b"precious"
    code, stdout, err = run(["export", checkpoint, "--format", "torchscript", "--out", out, "--overwrite"], capsys)
    assert code == 0 and stdout == f"wrote {out}\n" and out.read_bytes() != b"precious", err
    # int8: the float32 companion file is checked too, before anything is written
    onnx_out = tmp_path / "model.onnx"
    (tmp_path / "model.fp32.onnx").write_bytes(b"precious")
    code, stdout, err = run(["export", checkpoint, "--out", onnx_out, "--int8-calibration", tmp_path], capsys)
    assert_one_line(code, stdout, err, "model.fp32.onnx already exists")
    assert not onnx_out.exists()


@pytest.mark.slow
def test_a_graph_that_allocates_by_batch_size_fails_in_one_line_within_the_arena(tmp_path):
    """Shape inference cannot size a tensor that grows with the batch: the capped ONNX Runtime arena stops it.
    In a subprocess, because the arena's cap is set once per process."""
    import subprocess
    import sys

    path = tiny_onnx(tmp_path / "grows.onnx")
    model = onnx.load(str(path))
    graph = model.graph
    graph.node[-1].output[0] = "plain"  # Identity(raw) -> plain; logits = plain + sum(ones(batch * 2^14, 2^10))
    for name, value in (("zero", 0), ("one", 1), ("rows_per_image", 2 ** 14), ("columns", 2 ** 10)):
        graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    graph.node.extend([
        helper.make_node("Shape", ["input"], ["input_shape"]),
        helper.make_node("Slice", ["input_shape", "zero", "one"], ["batch"]),
        helper.make_node("Mul", ["batch", "rows_per_image"], ["rows"]),
        helper.make_node("Concat", ["rows", "columns"], ["shape"], axis=0),
        helper.make_node("ConstantOfShape", ["shape"], ["big"],
                         value=helper.make_tensor("one_value", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Add", ["plain", "total"], ["logits"])])
    onnx.save(model, str(path))
    script = f"""
import torch
from braintumor.errors import UserError
from braintumor.inference import runtimes
runtimes.MAX_ONNX_ARENA_BYTES = 200 * 2 ** 20
runtime = runtimes.open_model({str(path)!r}).runtime  # passes the static check: the size depends on the batch
print(runtime.run(torch.zeros(1, 3, {SIZE}, {SIZE}))[0].shape)  # 64 MiB: within the arena
try:
    runtime.run(torch.zeros(8, 3, {SIZE}, {SIZE}))  # 512 MiB: beyond it
except UserError as err:
    print("refused:", err)
print(runtime.run(torch.zeros(2, 3, {SIZE}, {SIZE}))[0].shape)  # and the session still works
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "(1, 4)" and lines[2] == "(2, 4)", result.stdout
    assert lines[1].startswith("refused: onnx failed to run the model:") and "\n" not in lines[1]
    assert result.stderr == ""
