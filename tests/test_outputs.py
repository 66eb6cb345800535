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
    assert main(["explain", str(tiny_checkpoint), str(image), "-q"]) == 0
    (explained,) = (tmp_path / "explanations").iterdir()  # explanations/<date-time>/, named for any method
    assert any(explained.glob("*.png"))
    before = (default / "audit.md").stat().st_mtime_ns
    assert main(["audit", str(phantom_dir), "--out", str(default), "--overwrite", "-q"]) == 0
    assert (default / "audit.md").stat().st_mtime_ns != before


# ---------------------------------------------------------------- all or nothing: staged_output_dir

class Failed(Exception):
    pass


def test_a_failed_command_leaves_no_folder_and_no_parents_it_made(tmp_path):
    from braintumor.utils.outputs import staged_output_dir

    with pytest.raises(Failed):
        with staged_output_dir(None, tmp_path / "evaluation", now=datetime(2026, 12, 4)) as staged:
            (staged.path / "predictions.csv").write_text("path,predicted_class\na.png,gli")  # partial
            raise Failed
    assert list(tmp_path.iterdir()) == []  # no evaluation/, no stamped folder, no staging folder
    with pytest.raises(Failed):
        with staged_output_dir(tmp_path / "a" / "b" / "out", "unused"):
            raise Failed
    assert list(tmp_path.iterdir()) == []


def test_a_finished_command_renames_its_staged_folder_into_place(tmp_path):
    import os
    import stat

    from braintumor.utils.outputs import staged_output_dir

    target = tmp_path / "out"
    with staged_output_dir(target, "unused") as staged:
        assert staged.path.parent == tmp_path and staged.path.name.startswith(".out.") and not target.exists()
        written = staged.path / "sub" / "report.md"
        written.parent.mkdir()
        written.write_text("new")
    assert staged.target == target and staged.final(written) == target / "sub" / "report.md"
    assert (target / "sub" / "report.md").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's private 0700


def test_overwrite_replaces_files_only_when_the_command_finishes(tmp_path):
    from braintumor.utils.outputs import staged_output_dir

    target = tmp_path / "out"
    target.mkdir()
    (target / "report.md").write_text("old report")
    (target / "notes.txt").write_text("mine")
    with pytest.raises(Failed):
        with staged_output_dir(target, "unused", overwrite=True) as staged:
            (staged.path / "report.md").write_text("half a rep")
            raise Failed
    assert (target / "report.md").read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with staged_output_dir(target, "unused", overwrite=True) as staged:
        (staged.path / "report.md").write_text("new report")
    assert (target / "report.md").read_text() == "new report" and (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(UserError, match="already holds files"):  # the rules are prepare_output_dir's
        with staged_output_dir(target, "unused"):
            pass


def test_failed_evaluate_and_audit_leave_nothing_behind(tiny_checkpoint, phantom_dir, tmp_path, capsys, monkeypatch):
    from braintumor.data import audit as audit_module

    work = tmp_path / "work"  # (tmp_path also holds this test's hash cache)
    (work / "empty").mkdir(parents=True)
    monkeypatch.chdir(work)
    assert main(["evaluate", str(tiny_checkpoint), str(work / "empty"), "--device", "cpu",
                 "--out", str(work / "ev")]) == 2
    assert main(["evaluate", str(tiny_checkpoint), str(work / "empty"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.count("\n") == 2

    def full_disk(report, out_dir):
        (out_dir / "audit.json").write_text('{"half": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit_module, "write_audit", full_disk)
    assert main(["audit", str(phantom_dir), "--out", str(work / "au"), "-q"]) == 2
    assert sorted(p.name for p in work.iterdir()) == ["empty"]  # no ev/, evaluation/, au/ or staging


def test_explain_prints_the_final_paths_and_a_failed_explain_leaves_nothing(tiny_checkpoint, phantom_dir, tmp_path,
                                                                           capsys, monkeypatch):
    from pathlib import Path

    from braintumor.visualize import explain as explain_module

    image = phantom_dir / "glioma" / "glioma_0000.png"
    out = tmp_path / "work" / "cams"
    assert main(["explain", str(tiny_checkpoint), str(image), "--out", str(out), "-q"]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert printed and all(path.parent == out and path.is_file() for path in printed)
    original = explain_module.write_explanations

    def fails_after_writing(classifier, paths, out_dir, **options):
        original(classifier, paths, out_dir, **options)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(explain_module, "write_explanations", fails_after_writing)
    assert main(["explain", str(tiny_checkpoint), str(image), "--out", str(tmp_path / "work" / "new"), "-q"]) == 2
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["cams"]


def test_refuse_overwrites_names_the_flag_and_skips_stdout_and_unset(tmp_path):
    from braintumor.utils.outputs import refuse_overwrite, refuse_overwrites

    taken = tmp_path / "report.json"
    taken.write_text("{}")
    dangling = tmp_path / "link.json"
    dangling.symlink_to(tmp_path / "nowhere")
    refuse_overwrites({"--json": "-", "--markdown": None, "--save-maps": tmp_path / "free.npz"}, False)
    with pytest.raises(UserError, match=r"report.json already exists; pass --overwrite to replace it, or choose "
                                        r"another --json$"):
        refuse_overwrites({"--markdown": None, "--json": taken}, False)
    with pytest.raises(UserError, match="another --out$"):
        refuse_overwrites([("--out", tmp_path / "free.onnx"), ("--out", dangling)], False)  # a dangling link counts
    refuse_overwrites([("--json", taken), ("--out", dangling)], True)
    refuse_overwrite(taken, True)
    assert taken.read_text() == "{}"  # checking never writes


def test_refusals_name_the_flag_that_gave_the_folder(tmp_path):
    from braintumor.utils.outputs import staged_output_dir

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "old.md").write_text("kept")
    with pytest.raises(UserError, match=r"choose another --report$"):
        with staged_output_dir(tmp_path / "report", tmp_path, option="--report"):
            pass
    with pytest.raises(UserError, match=r"choose another --out \(without --out a new time-stamped folder is made\)$"):
        with staged_output_dir(tmp_path / "report", tmp_path):
            pass
    assert (tmp_path / "report" / "old.md").read_text() == "kept"
