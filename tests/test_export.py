"""ONNX and TorchScript export: same numbers as PyTorch, dynamic batch, metadata round trip, clear errors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from braintumor.models.checkpoint import load_checkpoint
from braintumor.errors import UserError
from braintumor.inference.runtimes import load_onnx_session, load_torchscript
from braintumor.utils.devices import available_cores
from braintumor.inference.export import export, export_onnx, export_torchscript, quantize_onnx
from braintumor.utils.fingerprint import file_fingerprint
from braintumor.data.inputs import expand_inputs
from braintumor.inference.classifier import Classifier


@pytest.fixture(scope="module")
def onnx_path(tiny_checkpoint, tmp_path_factory):
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def classifiers(tiny_checkpoint, onnx_path):
    return Classifier.from_checkpoint(tiny_checkpoint), Classifier.from_checkpoint(onnx_path, backend="onnx")


def random_batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_onnx_probabilities_match_pytorch_for_batches_of_three_and_one(classifiers, phantom_dir):
    eager, onnx_backend = classifiers
    assert onnx_backend.backend == "onnx" and onnx_backend.model is None
    paths = expand_inputs([phantom_dir])[:3]
    for inputs in (paths, paths[:1]):  # the batch axis is dynamic: 3 and 1 through the same graph
        expected = eager.predict(inputs)
        actual = onnx_backend.predict(inputs)
        assert [p.predicted_class for p in actual] == [p.predicted_class for p in expected]
        for got, want in zip(actual, expected):
            assert got.probabilities.keys() == want.probabilities.keys()
            for name in want.probabilities:
                assert got.probabilities[name] == pytest.approx(want.probabilities[name], abs=1e-4)


def test_onnx_logits_match_pytorch(classifiers, onnx_path):
    # Logits, not only probabilities: an untrained model's near-uniform softmax would hide larger errors.
    eager, _ = classifiers
    session, _ = load_onnx_session(onnx_path)
    for n in (3, 1):
        batch = random_batch(n, seed=n)
        (logits,) = session.run(None, {"input": batch.numpy()})
        with torch.no_grad():
            reference = eager.model(batch).numpy()
        assert logits.shape == (n, 4)
        np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)


def test_onnx_graph_names_opset_and_metadata(tiny_checkpoint, onnx_path):
    model = onnx.load(str(onnx_path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    props = {p.key: p.value for p in model.metadata_props}
    ckpt = load_checkpoint(tiny_checkpoint)
    assert json.loads(props["classes"]) == ckpt["classes"]
    assert json.loads(props["source_fingerprint"]) == file_fingerprint(tiny_checkpoint)


def test_metadata_round_trips(tiny_checkpoint, onnx_path, classifiers):
    import braintumor

    ckpt = load_checkpoint(tiny_checkpoint)
    _, meta = load_onnx_session(onnx_path)
    assert meta == {"classes": ckpt["classes"], "image_size": ckpt["image_size"], "mean": list(ckpt["mean"]),
                    "std": list(ckpt["std"]), "arch": ckpt["arch"], "braintumor_version": braintumor.__version__,
                    "source_fingerprint": file_fingerprint(tiny_checkpoint), "tta": False}
    _, onnx_backend = classifiers
    assert (onnx_backend.classes, onnx_backend.image_size, onnx_backend.mean, onnx_backend.std,
            onnx_backend.arch) == (meta["classes"], 64, meta["mean"], meta["std"], "resnet18")


def test_session_threads(onnx_path):
    session, _ = load_onnx_session(onnx_path, threads=1)
    assert session.get_session_options().intra_op_num_threads == 1
    session, _ = load_onnx_session(onnx_path)
    assert session.get_session_options().intra_op_num_threads == available_cores()


@pytest.mark.slow
def test_torchscript_equals_eager(tiny_checkpoint, tmp_path, classifiers):
    eager, _ = classifiers
    path = export_torchscript(tiny_checkpoint, tmp_path / "model.ts")
    module, meta = load_torchscript(path)
    assert meta["classes"] == eager.classes and meta["image_size"] == 64 and meta["arch"] == "resnet18"
    assert meta["source_fingerprint"] == file_fingerprint(tiny_checkpoint)
    for n in (3, 1):
        batch = random_batch(n, seed=10 + n)
        with torch.no_grad():
            torch.testing.assert_close(module(batch), eager.model(batch), rtol=1e-6, atol=1e-6)


def test_export_dispatcher(tiny_checkpoint, tmp_path):
    written = export(tiny_checkpoint, "onnx", tmp_path / "sub" / "m.onnx")
    assert written == tmp_path / "sub" / "m.onnx" and written.is_file()
    assert [p.name for p in written.parent.iterdir()] == ["m.onnx"]  # no temporary file left behind
    with pytest.raises(UserError, match="onnx, torchscript"):
        export(tiny_checkpoint, "tflite", tmp_path / "m.tflite")
    with pytest.raises(UserError, match="checkpoint itself"):
        export(tiny_checkpoint, "onnx", tiny_checkpoint)
    with pytest.raises(UserError, match="checkpoint not found"):
        export(tmp_path / "missing.pt", "onnx", tmp_path / "x.onnx")


def test_bad_files_raise_user_error(tmp_path, onnx_path):
    with pytest.raises(UserError, match="not found"):
        load_onnx_session(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf at all" * 10)
    with pytest.raises(UserError, match="not a readable ONNX model"):
        load_onnx_session(garbage)
    with pytest.raises(UserError, match="not found"):
        Classifier.from_checkpoint(tmp_path / "missing.onnx", backend="onnx")

    # A valid ONNX model from elsewhere: loads in onnxruntime, but has no braintumor metadata.
    node = helper.make_node("Identity", ["input"], ["logits"])
    graph = helper.make_graph([node], "foreign", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])])
    foreign = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    foreign.ir_version = 8
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(UserError, match="not a braintumor export"):
        load_onnx_session(tmp_path / "foreign.onnx")

    corrupt = onnx.load(str(onnx_path))
    for prop in corrupt.metadata_props:
        if prop.key == "classes":
            prop.value = "[not json"
    onnx.save(corrupt, str(tmp_path / "corrupt.onnx"))
    with pytest.raises(UserError, match="corrupt braintumor metadata"):
        load_onnx_session(tmp_path / "corrupt.onnx")

    with pytest.raises(UserError, match="not a braintumor export"):
        load_torchscript(_foreign_torchscript(tmp_path))
    with pytest.raises(UserError, match="cannot load TorchScript"):
        load_torchscript(garbage)


@pytest.mark.slow
def test_int8_quantization_stays_close_and_keeps_metadata(onnx_path, phantom_dir, tmp_path):
    paths = expand_inputs([phantom_dir])
    quantized = quantize_onnx(onnx_path, tmp_path / "int8.onnx", paths[::2])
    ops = {node.op_type for node in onnx.load(str(quantized)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    session, meta = load_onnx_session(quantized)
    _, fp32_meta = load_onnx_session(onnx_path)
    assert meta.pop("quantization") == {"type": "int8 static QDQ, per-channel weights",
                                        "calibration_images": len(paths[::2])}
    assert meta == fp32_meta
    fp32_session, _ = load_onnx_session(onnx_path)
    reader = Classifier.from_checkpoint(onnx_path)
    batch = torch.stack([reader.preprocess(reader.load(p)) for p in paths[1::2]]).numpy()
    (expected,) = fp32_session.run(None, {"input": batch})
    (actual,) = session.run(None, {"input": batch})
    # int8 is approximate by design: close, not equal (a broken scale would be off by far more).
    assert np.corrcoef(expected.ravel(), actual.ravel())[0, 1] > 0.99
    assert np.abs(actual - expected).max() < 0.1 * (expected.max() - expected.min())
    assert not np.array_equal(actual, expected)
    with pytest.raises(UserError, match="calibration images"):
        quantize_onnx(onnx_path, tmp_path / "none.onnx", [])


def _foreign_torchscript(tmp_path):
    path = tmp_path / "foreign.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    return path


# ------------------------------------------------------------------------------ both trust tiers in every export


@pytest.fixture(scope="module")
def trusted_files(tmp_path_factory):
    """A 32 px checkpoint with both trust tiers (synthetic, thresholds at the median score) and its two exports."""
    from helpers import make_trusted_checkpoint

    folder = tmp_path_factory.mktemp("trusted-exports")
    checkpoint = make_trusted_checkpoint(folder / "trusted.pt", image_size=32)
    return {"checkpoint": checkpoint, "onnx": export(checkpoint, "onnx", folder / "trusted.onnx"),
            "torchscript": export(checkpoint, "torchscript", folder / "trusted.ts")}


def statuses(logits: np.ndarray, scores: np.ndarray, temperature: float) -> list[str]:
    from braintumor.trust.status import status_of
    from braintumor.trust.temperature import softmax

    confidence = softmax(logits, temperature).max(axis=1)
    return [status_of(float(c), float(s[0]), float(s[1])) for c, s in zip(confidence, scores)]


@pytest.mark.slow
def test_exports_keep_the_temperature_and_both_tiers_with_equal_scores_and_statuses(trusted_files):
    from braintumor.inference.runtimes import open_model

    opened = {name: open_model(path) for name, path in trusted_files.items()}
    assert {name: o.runtime.name for name, o in opened.items()} == {
        "checkpoint": "torch", "onnx": "onnx", "torchscript": "torchscript"}
    batch = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    batch[3] = float("nan")  # non-finite input: +inf scores, status not_mri, in every runtime
    results = {}
    for name, o in opened.items():
        assert o.runtime.tiers == ("not_mri", "atypical") and o.runtime.missing is None, name
        assert o.spec.temperature == pytest.approx(1.7), name
        logits, scores = o.runtime.run(batch)
        assert logits.shape == (12, 4) and scores.shape == (12, 2) and scores.dtype == np.float32, name
        results[name] = logits, scores, statuses(logits, scores, o.spec.temperature)
    reference_logits, reference_scores, reference_statuses = results["checkpoint"]
    assert len(set(reference_statuses)) >= 2 and reference_statuses[3] == "not_mri"
    assert np.isinf(reference_scores[3]).all()
    finite = np.isfinite(reference_scores)
    for name in ("onnx", "torchscript"):
        logits, scores, found = results[name]
        assert found == reference_statuses, name
        assert (np.isfinite(scores) == finite).all(), name
        np.testing.assert_allclose(scores[finite], reference_scores[finite], atol=1e-3, rtol=0, err_msg=name)
        ok = np.isfinite(reference_logits).all(axis=1)
        np.testing.assert_allclose(logits[ok], reference_logits[ok], atol=1e-3, rtol=0, err_msg=name)


def test_torchscript_export_is_a_trace_with_both_outputs_and_its_metadata(trusted_files):
    module, meta = load_torchscript(trusted_files["torchscript"])
    assert meta["trust"]["tiers"] == ["not_mri", "atypical"] and meta["trust"]["temperature"] == pytest.approx(1.7)
    assert meta["trust"]["n_train"] == 16 and meta["classes"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert "not_mri" in meta["trust"] and "center" not in meta["trust"]["not_mri"]  # a summary: no tensors
    with torch.no_grad():
        for n, size in ((1, 32), (5, 48)):  # the trace keeps the batch and image size free
            logits, scores = module(torch.randn(n, 3, size, size))
            assert logits.shape == (n, 4) and scores.shape == (n, 2)


def test_onnx_export_has_logits_and_trust_scores(trusted_files):
    model = onnx.load(str(trusted_files["onnx"]))
    assert [o.name for o in model.graph.output] == ["logits", "trust_scores"]
    trust = json.loads({p.key: p.value for p in model.metadata_props}["trust"])
    assert trust["tiers"] == ["not_mri", "atypical"] and trust["temperature"] == pytest.approx(1.7)


@pytest.mark.slow
def test_legacy_one_tier_checkpoint_exports_its_atypical_tier(tmp_path):
    from braintumor.inference.runtimes import open_model

    from helpers import make_trusted_checkpoint

    legacy = make_trusted_checkpoint(tmp_path / "legacy.pt", image_size=32, legacy=True)
    batch = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = open_model(legacy).runtime.run(batch)[1]
    assert (expected[:, 0] == 0).all()
    for fmt, name in (("onnx", "legacy.onnx"), ("torchscript", "legacy.ts")):
        opened = open_model(export(legacy, fmt, tmp_path / name))
        assert opened.runtime.tiers == ("atypical",) and "no not-MRI tier" in opened.runtime.missing
        np.testing.assert_allclose(opened.runtime.run(batch)[1], expected, atol=1e-4)


def test_openvino_runs_the_onnx_export_with_both_tiers(trusted_files):
    pytest.importorskip("openvino")
    from braintumor.inference.runtimes import open_model

    batch = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    expected_logits, expected_scores = open_model(trusted_files["checkpoint"]).runtime.run(batch)
    opened = open_model(trusted_files["onnx"], backend="openvino")
    assert opened.runtime.name == "openvino" and opened.runtime.tiers == ("not_mri", "atypical")
    logits, scores = opened.runtime.run(batch)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-3)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-3)
