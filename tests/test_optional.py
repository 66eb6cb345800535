"""Optional dependencies (the extras of pyproject.toml): a missing one is one line naming the extra to install,
and the core (predicting a slice) imports none of them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from braintumor.errors import UserError
from braintumor.utils.optional import EXTRA_OF, MissingExtra, require

ROOT = Path(__file__).resolve().parents[1]


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # None in sys.modules: import raises ImportError
    with pytest.raises(MissingExtra) as caught:
        require("onnxruntime", "onnx", "running an ONNX model")
    message = str(caught.value)
    assert message == ("running an ONNX model needs the onnxruntime package, which is not installed: "
                       "pip install 'braintumor[onnx]'")
    assert "\n" not in message and caught.value.exit_code == 2
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ImportError)


def test_every_extra_named_in_code_exists_in_pyproject():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRA_OF.values()) <= set(extras)
    listed = " ".join(" ".join(extras[name]) for name in set(EXTRA_OF.values()))
    for module in EXTRA_OF:
        assert module.replace("_", "-") in listed, module
    assert "braintumor[all]" in extras["test"]


def test_volumes_without_nibabel(monkeypatch, tmp_path):
    from braintumor.data.volumes import read_volume

    monkeypatch.setitem(sys.modules, "nibabel", None)
    (tmp_path / "scan.nii.gz").write_bytes(b"\x1f\x8b" + bytes(100))  # exists: reading it needs nibabel
    with pytest.raises(MissingExtra, match=r"pip install 'braintumor\[volumes\]'"):
        read_volume(tmp_path / "scan.nii.gz")


def test_onnx_without_onnxruntime(monkeypatch, tmp_path):
    from braintumor.inference.runtimes import load_onnx_session

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtra, match=r"pip install 'braintumor\[onnx\]'"):
        load_onnx_session(tmp_path / "model.onnx")


def test_serve_without_fastapi(monkeypatch):
    for name in [name for name in sys.modules if name.startswith("braintumor.serve")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(MissingExtra, match=r"^braintumor serve needs the fastapi package.*'braintumor\[serve\]'$"):
        import braintumor.serve  # noqa: F401


@pytest.mark.slow
def test_core_predicts_without_any_extra(tiny_checkpoint, phantom_dir):
    """A fresh process where every extra's module fails to import still predicts a slice."""
    blocked = sorted({*EXTRA_OF, "pylibjpeg", "openjpeg"})
    slice_path = sorted(Path(phantom_dir).rglob("*.png"))[0]
    script = textwrap.dedent(f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None
        from braintumor import Classifier
        classifier = Classifier.from_checkpoint({str(tiny_checkpoint)!r}, device="cpu")
        prediction = classifier.predict({str(slice_path)!r})
        print(len(prediction.probabilities) == len(classifier.classes))
        print(sorted(name for name in {blocked!r} if sys.modules.get(name) is not None))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "[]"]
