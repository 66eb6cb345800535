"""outputs.py and the commands that write folders: nothing is overwritten without --overwrite."""

from __future__ import annotations

from datetime import datetime

import pytest

from braintumor.cli import main
from braintumor.errors import UserError
from braintumor.utils.outputs import prepare_output_dir


def test_default_is_a_new_time_stamped_folder_each_time(tmp_path):
    now = datetime(2026, 11, 30, 14, 5, 9)
    first = prepare_output_dir(None, tmp_path / "evaluation", now=now)
    second = prepare_output_dir(None, tmp_path / "evaluation", now=now)
    assert first == tmp_path / "evaluation" / "20261130-140509" and first.is_dir()
    assert second == tmp_path / "evaluation" / "20261130-140509-2" and second.is_dir()


def test_an_existing_folder_with_files_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    assert prepare_output_dir(out, "unused") == out  # new: created
    assert prepare_output_dir(out, "unused") == out  # exists but empty: fine
    (out / "report.md").write_text("an earlier report")
    with pytest.raises(UserError, match=r"output folder .*out already holds files \(report.md\); pass --overwrite"):
        prepare_output_dir(out, "unused")
    assert prepare_output_dir(out, "unused", overwrite=True) == out
    assert (out / "report.md").read_text() == "an earlier report"  # reusing does not empty it
    with pytest.raises(UserError, match="is a file, not a folder"):
        prepare_output_dir(out / "report.md", "unused")


@pytest.mark.slow
def test_commands_refuse_to_overwrite_without_the_flag(phantom_dir, tiny_checkpoint, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["audit", str(phantom_dir), "-q"]) == 0
    (default,) = (tmp_path / "audit").iterdir()  # audit/<date-time>/
    assert (default / "audit.md").is_file()
    capsys.readouterr()
    image = phantom_dir / "glioma" / "glioma_0000.png"
    for args in (["audit", str(phantom_dir)], ["explain", str(tiny_checkpoint), str(image)],
                 ["evaluate", str(tiny_checkpoint), str(phantom_dir), "--device", "cpu"]):
        code, err = main([*args, "--out", str(default)]), capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: output folder {default} already holds files") \
            and err.count("\n") == 1, err
    before = (default / "audit.md").stat().st_mtime_ns
    assert main(["audit", str(phantom_dir), "--out", str(default), "--overwrite", "-q"]) == 0
    assert (default / "audit.md").stat().st_mtime_ns != before
