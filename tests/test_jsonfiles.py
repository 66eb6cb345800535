"""utils/jsonfiles.py: the one JSON writer: plain types only, always parses, written whole or not at all."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from braintumor.utils.jsonfiles import json_safe, to_json, write_json


def test_json_safe_gives_plain_types():
    value = {1: np.float32(0.5), "nan": float("nan"), "inf": -math.inf, "n": np.int64(3), "flag": np.bool_(True),
             "tensor": torch.tensor(2.5), "array": np.array([[1, 2], [3, 4]]), "scalar array": np.array(2.5), "tuple": (np.float64("nan"), "a"),
             "path": Path("runs") / "x.pt", "none": None, "nested": [{"k": np.float16(1.5)}]}
    safe = json_safe(value)
    assert safe == {"1": 0.5, "nan": None, "inf": None, "n": 3, "flag": True, "tensor": 2.5,
                    "array": [[1, 2], [3, 4]], "scalar array": 2.5, "tuple": [None, "a"], "path": str(Path("runs") / "x.pt"),
                    "none": None, "nested": [{"k": 1.5}]}
    assert type(safe["n"]) is int and type(safe["flag"]) is bool and type(safe["tensor"]) is float


    class Thing:
        def __str__(self):
            return "a thing"

    assert json_safe({"other": Thing()}) == {"other": "a thing"}  # any other object: its str, never an error


def test_to_json_always_parses_and_ends_in_a_newline():
    text = to_json({"a": float("nan"), "b": [np.float32(1.25)]}, indent=None)
    assert text == '{"a": null, "b": [1.25]}\n'
    assert json.loads(to_json({"name": "caf\udce9.png"})) == {"name": "caf\udce9.png"}  # surrogate-escaped names


def test_write_json_writes_indented_json(tmp_path):
    path = tmp_path / "deep" / "result.json"
    assert write_json(path, {"x": np.float64(0.25), "y": float("inf")}) == path
    assert json.loads(path.read_text()) == {"x": 0.25, "y": None}
    assert path.read_text().endswith("}\n") and "\n  " in path.read_text()  # indented
    write_json(path, [1, 2], indent=1)
    assert path.read_text() == "[\n 1,\n 2\n]\n"


def test_a_value_that_cannot_be_serialised_leaves_the_previous_file(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"kept": True})
    circular: list = []
    circular.append(circular)
    with pytest.raises(RecursionError):
        write_json(path, {"bad": circular})
    assert json.loads(path.read_text()) == {"kept": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary file left


def test_emit_report_prints_json_or_the_rendering_and_saves_the_file(tmp_path, capsys):
    from braintumor.utils.jsonfiles import emit_report

    result = {"rows": {"a": float("nan")}, "n": np.int64(2)}
    render = lambda value: f"table of {value['n']} rows"  # noqa: E731
    assert emit_report(result, "-", render) == 0
    assert json.loads(capsys.readouterr().out) == {"rows": {"a": None}, "n": 2}  # JSON only: no table on stdout
    assert emit_report(result, tmp_path / "r.json", render) == 0
    assert capsys.readouterr().out == "table of 2 rows\n"
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 2
    assert emit_report(result, None, lambda value: "already ends\n") == 0
    assert capsys.readouterr().out == "already ends\n"
