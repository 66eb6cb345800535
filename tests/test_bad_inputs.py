"""The command line's bad-input matrix: every case ends with exit 2, one stderr line, no traceback, no leftovers.

Each case builds what it needs in a fresh work folder, runs ``braintumor`` in-process (one real subprocess at the
end checks that no traceback reaches a real terminal), and asserts that the command left no new file behind
except those listed as legitimate (e.g. the config.yaml of a run that diverged).
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from braintumor.utils import atomic
from braintumor.data import pixels
from braintumor.cli import main
from helpers import make_checkpoint

TINY_TRAIN = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
              "--device", "cpu", "--workers", "0", "--no-progress"]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:  # argparse's flag errors
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- what each case needs -------------------------------------------------------------------------------------


def data(work: Path, phantom_dir: Path) -> Path:
    return phantom_dir


def yaml_file(text: str):
    def make(work: Path, phantom_dir: Path) -> Path:
        path = work / "options.yaml"
        path.write_text(text.replace("DATA", str(phantom_dir)))
        return path
    return make


def checkpoint(work: Path, phantom_dir: Path) -> Path:
    return make_checkpoint(work / "model.pt")


def text_file(name: str):
    def make(work: Path, phantom_dir: Path) -> Path:
        (work / name).write_text("this is text, not a model\n")
        return work / name
    return make


class Foreign:  # any class: torch's weights_only loader refuses it
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def evil_pickle(work: Path, phantom_dir: Path) -> Path:
    path = work / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"model": Foreign()}, handle)
    return path


def foreign_torch_file(work: Path, phantom_dir: Path) -> Path:
    path = work / "foreign.pt"
    torch.save({"net": torch.nn.Linear(2, 2)}, path)
    return path


def arch_mismatch(work: Path, phantom_dir: Path) -> Path:
    """A checkpoint whose 'arch' says resnet34 but whose weights are resnet18's."""
    path = make_checkpoint(work / "m.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["arch"] = "resnet34"
    torch.save(ckpt, path)
    return path


def class_count_mismatch(work: Path, phantom_dir: Path) -> Path:
    path = make_checkpoint(work / "m.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["classes"] = ["a", "b", "c"]
    torch.save(ckpt, path)
    return path


def fake_run(epoch: int = 1, epochs: int = 2, report: bool = False):
    """A run folder as training leaves it, without training (the checks come before any work)."""
    def make(work: Path, phantom_dir: Path) -> Path:
        run = work / "run"
        run.mkdir()
        make_checkpoint(run / "last.pt", image_size=32)
        ckpt = torch.load(run / "last.pt", weights_only=True)
        ckpt.update(epoch=epoch, best_epoch=epoch, config={
            "data": str(phantom_dir), "arch": "resnet18", "optimizer": "ranger", "epochs": epochs, "image_size": 32,
            "batch_size": 8, "weights": "none", "device": "cpu", "workers": 0, "progress": False})
        torch.save(ckpt, run / "last.pt")
        os.link(run / "last.pt", run / "best.pt")
        if report:
            (run / "report.json").write_text("{}")
        return run
    return make


def bad_image_folder(work: Path, phantom_dir: Path) -> Path:
    folder = work / "scans"
    folder.mkdir()
    Image.new("L", (40, 40), 90).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return folder


def newline_name(work: Path, phantom_dir: Path) -> Path:
    path = work / "bad\nname.png"
    path.write_bytes(b"not a png")
    return path


def gif_file(work: Path, phantom_dir: Path) -> Path:
    Image.new("P", (40, 40)).save(work / "slice.gif")
    return work / "slice.gif"


def gif_named_png(work: Path, phantom_dir: Path) -> Path:
    buffer = io.BytesIO()
    Image.new("P", (40, 40)).save(buffer, format="GIF")
    (work / "slice.png").write_bytes(buffer.getvalue())
    return work / "slice.png"


def png16_bomb(work: Path, phantom_dir: Path) -> Path:
    """A 16-bit PNG over the per-image decode budget (the budget is lowered for the test, not the image raised)."""
    values = np.zeros((300, 300), dtype=np.uint16)
    Image.fromarray(values).save(work / "bomb.png")
    return work / "bomb.png"


def symlink_loop(work: Path, phantom_dir: Path) -> Path:
    folder = work / "flat"
    folder.mkdir()
    (folder / "loop.png").symlink_to(folder / "loop.png")
    return folder


def one_image_folder(work: Path, phantom_dir: Path) -> Path:
    folder = work / "one"
    (folder / "a").mkdir(parents=True)
    return folder


def full_disk_for(name: str):
    """Make every write of a file called ``name`` fail with ENOSPC after a few bytes."""
    def patch(monkeypatch):
        original = atomic._WriteErrors.write

        def write(self, payload):
            if self.target.name == name:
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(self, payload)

        monkeypatch.setattr(atomic._WriteErrors, "write", write)
    return patch


def small_decode_budget(monkeypatch):
    monkeypatch.setattr(pixels, "MAX_DECODED_BYTES", 100_000)


# Each case: id, argument list ({name} placeholders filled from `needs`), needs, message part, allowed leftovers,
# and an optional patch (e.g. a full disk).
CASES = [
    # train: every numeric option out of range, from flags
    ("image-size-huge", ["train", "{data}", "--image-size", "100000"], {"data": data},
     "--image-size must be at least 32 and at most 1024"),
    ("image-size-small", ["train", "{data}", "--image-size", "8"], {"data": data}, "--image-size must be at least"),
    ("batch-size-0", ["train", "{data}", "--batch-size", "0"], {"data": data}, "--batch-size must be at least 1"),
    ("batch-size-negative", ["train", "{data}", "--batch-size", "-4"], {"data": data}, "--batch-size"),
    ("workers-negative", ["train", "{data}", "--workers", "-1"], {"data": data}, "--workers must be between"),
    ("lr-inf", ["train", "{data}", "--lr", "inf"], {"data": data}, "--lr must be positive and finite"),
    ("lr-nan", ["train", "{data}", "--lr", "nan"], {"data": data}, "--lr must be positive and finite"),
    ("weight-decay-nan", ["train", "{data}", "--weight-decay", "nan"], {"data": data}, "--weight-decay"),
    ("lookahead-k-0", ["train", "{data}", "--lookahead-k", "0"], {"data": data}, "--lookahead-k must be at least 1"),
    ("lookahead-alpha-nan", ["train", "{data}", "--lookahead-alpha", "nan"], {"data": data}, "--lookahead-alpha"),
    ("lookahead-alpha-big", ["train", "{data}", "--lookahead-alpha", "1.5"], {"data": data}, "in (0, 1]"),
    ("warmup-inf", ["train", "{data}", "--warmup-epochs", "inf"], {"data": data}, "--warmup-epochs"),
    ("seed-negative", ["train", "{data}", "--seed", "-1"], {"data": data}, "--seed must be between"),
    ("epochs-0", ["train", "{data}", "--epochs", "0"], {"data": data}, "--epochs must be at least 1"),
    ("rotation-nan", ["train", "{data}", "--rotation", "nan"], {"data": data}, "--rotation"),
    ("lr-text", ["train", "{data}", "--lr", "fast"], {"data": data}, "--lr"),
    # train: the same keys from YAML, with type checks
    ("yaml-seed-float", ["train", "--config", "{cfg}"], {"cfg": yaml_file("data: DATA\nseed: 1.5\n")},
     "seed in"),
    ("yaml-data-int", ["train", "--config", "{cfg}"], {"cfg": yaml_file("data: 123\n")}, "data in"),
    ("yaml-image-size-float", ["train", "--config", "{cfg}"], {"cfg": yaml_file("data: DATA\nimage_size: 64.5\n")},
     "image_size in"),
    ("yaml-skip-bad-maybe", ["train", "--config", "{cfg}"], {"cfg": yaml_file("data: DATA\nskip_bad: maybe\n")},
     "skip_bad in"),
    ("yaml-batch-size-float", ["train", "--config", "{cfg}"], {"cfg": yaml_file("data: DATA\nbatch_size: 4.5\n")},
     "batch_size in"),
    ("yaml-lr-word", ["train", "--config", "{cfg}"], {"cfg": yaml_file("data: DATA\nlr: 1e-5x\n")}, "lr in"),
    ("yaml-lr-string-then-range", ["train", "--config", "{cfg}"], {"cfg": yaml_file("data: DATA\nlr: -1e-5\n")},
     "--lr must be positive"),
    ("yaml-image-size-huge", ["train", "--config", "{cfg}"], {"cfg": yaml_file("data: DATA\nimage-size: 1e5\n")},
     "--image-size must be at least 32 and at most 1024"),
    ("yaml-unknown-key", ["train", "--config", "{cfg}"], {"cfg": yaml_file("data: DATA\nlearning_rate: 1\n")},
     "unknown option"),
    ("yaml-not-yaml", ["train", "--config", "{cfg}"], {"cfg": yaml_file("data: [unclosed\n")}, "not valid YAML"),
    ("data-missing", ["train", "{work}/nowhere"], {}, "data folder not found"),
    # resume: mismatched options, finished runs
    ("resume-missing", ["train", "--resume", "{work}/nowhere"], {}, "nothing to resume"),
    ("resume-other-arch", ["train", "--resume", "{run}", "--arch", "resnet34"], {"run": fake_run()},
     "so --arch cannot be given"),
    ("resume-other-optimizer", ["train", "--resume", "{run}", "--optimizer", "sgd"], {"run": fake_run()},
     "so --optimizer cannot be given"),
    ("resume-finished", ["train", "--resume", "{run}"], {"run": fake_run(epoch=2, epochs=2, report=True)},
     "already finished"),
    # checkpoints that are not ours, or damaged
    ("ckpt-missing", ["predict", "{work}/none.pt", "{data}"], {"data": data}, "checkpoint not found"),
    ("ckpt-text", ["predict", "{ckpt}", "{data}"], {"ckpt": text_file("model.pt"), "data": data},
     "not a PyTorch checkpoint file"),
    ("ckpt-evil-pickle", ["predict", "{ckpt}", "{data}"], {"ckpt": evil_pickle, "data": data},
     "will not unpickle"),
    ("ckpt-foreign", ["evaluate", "{ckpt}", "{data}", "--out", "{work}/eval"],
     {"ckpt": foreign_torch_file, "data": data}, "not a braintumor checkpoint"),
    ("ckpt-arch-mismatch", ["predict", "{ckpt}", "{data}"], {"ckpt": arch_mismatch, "data": data},
     "do not fit a resnet34 with 4 classes"),
    ("ckpt-class-count", ["evaluate", "{ckpt}", "{data}", "--out", "{work}/eval"],
     {"ckpt": class_count_mismatch, "data": data}, "do not fit a resnet18 with 3 classes"),
    ("export-text-onnx", ["export", "{ckpt}", "--out", "{work}/m.onnx"], {"ckpt": text_file("model.onnx")},
     "is named as an ONNX export"),
    # predict and evaluate
    ("predict-bad-image", ["predict", "{ckpt}", "{scans}"], {"ckpt": checkpoint, "scans": bad_image_folder},
     "--skip-bad"),
    ("predict-newline-name", ["predict", "{ckpt}", "{bad}"], {"ckpt": checkpoint, "bad": newline_name},
     "bad\\nname.png"),
    ("predict-gif", ["predict", "{ckpt}", "{gif}"], {"ckpt": checkpoint, "gif": gif_file},
     "unsupported file type '.gif'"),
    ("predict-gif-named-png", ["predict", "{ckpt}", "{gif}"], {"ckpt": checkpoint, "gif": gif_named_png},
     "unsupported image format GIF"),
    ("predict-16bit-over-budget", ["predict", "{ckpt}", "{bomb}"], {"ckpt": checkpoint, "bomb": png16_bomb},
     "over the limit", (), small_decode_budget),
    ("predict-batch-size-0", ["predict", "{ckpt}", "{data}", "--batch-size", "0"], {"ckpt": checkpoint, "data": data},
     "--batch-size"),
    ("evaluate-workers-negative", ["evaluate", "{ckpt}", "{data}", "--workers", "-1"],
     {"ckpt": checkpoint, "data": data}, "--workers"),
    ("evaluate-bad-image", ["evaluate", "{ckpt}", "{scans}", "--out", "{work}/eval"],
     {"ckpt": checkpoint, "scans": bad_image_folder}, "class folders"),
    # export, audit, serve, phantoms, demo
    ("export-full-disk", ["export", "{ckpt}", "--out", "{work}/m.onnx"], {"ckpt": checkpoint},
     "cannot write", (), full_disk_for("m.onnx")),
    ("audit-missing", ["audit", "{work}/nowhere", "--out", "{work}/audit"], {}, "not found"),
    ("audit-threshold", ["audit", "{data}", "--threshold", "99"], {"data": data}, "--threshold"),
    ("audit-full-disk", ["audit", "{flat}", "--out", "{work}/audit"], {"flat": symlink_loop}, "audit.json",
     ("audit",), full_disk_for("audit.json")),
    ("serve-port", ["serve", "{ckpt}", "--port", "70000"], {"ckpt": checkpoint}, "--port"),
    ("serve-max-files-0", ["serve", "{ckpt}", "--max-files", "0"], {"ckpt": checkpoint}, "--max-files"),
    ("serve-max-file-mb-0", ["serve", "{ckpt}", "--max-file-mb", "0"], {"ckpt": checkpoint}, "--max-file-mb"),
    ("phantoms-per-class-0", ["make-phantoms", "{work}/ph", "--per-class", "0"], {}, "--per-class"),
    ("phantoms-size-huge", ["make-phantoms", "{work}/ph", "--size", "100000"], {}, "argument --size: must be between"),
    ("demo-epochs-0", ["demo", "--out", "{work}/demo", "--epochs", "0"], {}, "--epochs"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, phantom_dir, tmp_path, capsys, monkeypatch):
    name, args, needs, message, *rest = case
    allowed_new = rest[0] if rest else ()
    patch = rest[1] if len(rest) > 1 else None
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    values = {"work": str(work), **{key: str(make(work, phantom_dir)) for key, make in needs.items()}}
    before = files_under(work)
    if patch is not None:
        patch(monkeypatch)
    code, _, err = run_cli([arg.format(**values) for arg in args], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and message in lines[0], err
    new = {path for path in files_under(work) - before if not path.startswith(tuple(allowed_new))}
    assert not new, f"left behind: {sorted(new)}"
    assert not [p for p in work.rglob("*.tmp")], "temporary files left behind"


def test_full_disk_during_a_checkpoint_names_it_and_keeps_nothing_torn(phantom_dir, tmp_path, capsys, monkeypatch):
    full_disk_for("last.pt")(monkeypatch)
    code, _, err = run_cli(["train", phantom_dir, *TINY_TRAIN, "--out", tmp_path / "run"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "cannot write" in lines[0] and "last.pt" in lines[0], err
    assert not (tmp_path / "run" / "last.pt").exists() and not list((tmp_path / "run").glob(".*.tmp"))


def test_full_disk_keeps_the_previous_audit(phantom_dir, tmp_path, capsys, monkeypatch):
    assert run_cli(["audit", phantom_dir, "--out", tmp_path / "audit"], capsys)[0] == 0
    before = (tmp_path / "audit" / "audit.json").read_text()
    full_disk_for("audit.json")(monkeypatch)
    code, _, err = run_cli(["audit", phantom_dir, "--out", tmp_path / "audit"], capsys)
    assert code == 2 and "audit.json" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "audit" / "audit.json").read_text() == before


def test_diverging_run_stops_at_the_first_non_finite_loss(phantom_dir, tmp_path, capsys):
    code, _, err = run_cli(["train", phantom_dir, *TINY_TRAIN, "--optimizer", "sgd", "--lr", "1e30",
                            "--out", tmp_path / "run"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "non-finite at epoch 1, step" in lines[0] and "no checkpoint had been written yet" in lines[0]
    assert not (tmp_path / "run" / "last.pt").exists() and not list((tmp_path / "run").glob(".*.tmp"))


def test_skip_bad_predicts_the_rest_and_lists_what_it_skipped(tmp_path, capsys):
    folder = bad_image_folder(tmp_path, tmp_path)
    ckpt = make_checkpoint(tmp_path / "m.pt")
    code, out, err = run_cli(["predict", ckpt, folder, "--skip-bad", "--csv"], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 2 and "a.png" in out
    assert "skipped 1 unreadable file(s)" in err and "b.png" in err


def test_predictions_stream_out_before_a_bad_file(tmp_path, capsys):
    folder = bad_image_folder(tmp_path, tmp_path)
    Image.new("L", (40, 40), 10).save(folder / "c.png")
    ckpt = make_checkpoint(tmp_path / "m.pt")
    code, out, err = run_cli(["predict", ckpt, folder, "--csv", "--batch-size", "1"], capsys)
    assert code == 2 and "b.png" in err and "after 1 prediction(s)" in err
    assert "a.png" in out and "c.png" not in out  # a.png was written before b.png stopped the run


def test_yaml_number_strings_are_read_as_numbers(phantom_dir, tmp_path):
    from braintumor.training.config import read_config_file, resolve_config

    path = tmp_path / "c.yaml"
    path.write_text(f"data: {phantom_dir}\nlr: 1e-5\nweight_decay: 5e-4\nepochs: 3.0\n")
    cfg = resolve_config(read_config_file(path), {})
    assert cfg.lr == 1e-5 and cfg.weight_decay == 5e-4 and cfg.epochs == 3 and isinstance(cfg.epochs, int)


@pytest.mark.slow
def test_a_real_process_prints_no_traceback(tmp_path):
    script = textwrap.dedent("""
        import sys
        from braintumor.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    bad = tmp_path / "bad\nname.pt"
    bad.write_text("text")
    result = subprocess.run([sys.executable, "-c", script, "predict", str(bad), str(tmp_path)], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


# --- data-side cases of issue 25: CSVs, truncated JPEGs, file names, audit and phantom messages -----------------


def one_error_line(code: int, err: str, part: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and part in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("text, part", [
    ('path,group\n"glioma/a.png,P1\nglioma/b.png,P2\n', "not a readable CSV: unexpected end of data"),
    ("path,group\nglioma/a.png\n", "line 2: every row needs a path and a group"),
])
def test_a_broken_groups_csv_is_one_line(phantom_dir, tmp_path, capsys, text, part):
    (tmp_path / "groups.csv").write_text(text)
    code, _, err = run_cli(["audit", phantom_dir, "--groups", tmp_path / "groups.csv", "--out", tmp_path / "a"],
                           capsys)
    one_error_line(code, err, part)


def test_a_groups_csv_naming_missing_files_is_refused_or_counted(phantom_dir, tmp_path, capsys):
    """None of its paths exists: exit 2 (it belongs elsewhere). Some missing: a counted warning, then the audit."""
    (tmp_path / "none.csv").write_text("path,group\nglioma/nowhere.png,P1\nglioma/gone.png,P2\n")
    code, _, err = run_cli(["audit", phantom_dir, "--groups", tmp_path / "none.csv", "--out", tmp_path / "a"], capsys)
    one_error_line(code, err, "none of its 2 paths exists")
    existing = sorted((phantom_dir / "glioma").iterdir())[0].relative_to(phantom_dir)
    (tmp_path / "some.csv").write_text(f"path,group\n{existing},P1\nglioma/gone.png,P2\n")
    code, _, err = run_cli(["audit", phantom_dir, "--groups", tmp_path / "some.csv", "--out", tmp_path / "b"], capsys)
    assert code == 0 and "warning: 1 of 2 paths in groups file" in err and "'glioma/gone.png'" in err, err


def truncated_jpeg(path: Path, side: int = 9400) -> Path:
    """A JPEG whose header claims side x side pixels, cut to 1 KB and closed with an end-of-image marker (libjpeg
    would pad the missing rows with grey)."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 100).save(buffer, "JPEG", quality=5)
    path.write_bytes(buffer.getvalue()[:1000] + b"\xff\xd9")
    return path


def test_a_1kb_jpeg_claiming_9400_pixels_is_reported_as_truncated(tmp_path):
    from braintumor.data.io import read_image

    from braintumor.data.io import ImageReadError

    bomb = truncated_jpeg(tmp_path / "claim.jpg")
    for source in (bomb, bomb.read_bytes()):  # a file and an upload
        with pytest.raises(ImageReadError, match=r"truncated image \(1002 bytes cannot hold the 9400x9400 pixels"):
            read_image(source)
    # Honest JPEGs far smaller per pixel than any real slice still read: flat grey, 4:2:0 colour, progressive.
    for mode, options in (("L", {}), ("RGB", {"subsampling": 2}), ("L", {"progressive": True})):
        buffer = io.BytesIO()
        Image.new(mode, (2000, 1500), 0).save(buffer, "JPEG", quality=1, **options)
        assert read_image(buffer.getvalue()).size == (2000, 1500)


def test_file_names_that_are_not_utf8_do_not_crash_audit(tmp_path, capsys):
    folder = tmp_path / "scans"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    Image.new("L", (32, 32), 50).save(folder / "a" / "x.png")
    raw_name = os.fsencode(folder / "b") + b"/bad\xff.png"
    Image.new("L", (32, 32), 90).save(raw_name, format="PNG")
    for _ in range(2):  # the second run reads the hash cache
        code, _, err = run_cli(["audit", folder, "--out", tmp_path / "audit", "--overwrite"], capsys)
        assert code == 0, err
    import json

    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert os.fsdecode(raw_name) in report["paths"] if "paths" in report else report["n_images"] == 2
    assert "bad\\udcff.png" in (tmp_path / "audit" / "audit.md").read_text()


def test_fail_on_leak_names_the_audited_set_first(tmp_path, capsys):
    from braintumor.synthetic.phantom import write_phantom_set

    train = write_phantom_set(tmp_path / "Training", per_class=3, size=48, seed=1)
    test = write_phantom_set(tmp_path / "Testing", per_class=2, size=48, seed=9)
    leaked = sorted((train / "glioma").iterdir())[0]
    (test / "glioma" / "copied.png").write_bytes(leaked.read_bytes())
    code, _, err = run_cli(["audit", test, "--against", train, "--fail-on-leak", "--threshold", "0",
                            "--out", tmp_path / "audit"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert f"1 image(s) of {test} duplicate images of {train} (1 of {train} duplicate images of {test})" in lines[0]


def test_make_phantoms_leaves_nothing_behind_when_a_write_fails(tmp_path, capsys, monkeypatch):
    from braintumor.synthetic import phantom

    written = []
    real = phantom.atomic_write

    def fail_third(path, write, mode="wb"):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        return real(path, write, mode)

    monkeypatch.setattr(phantom, "atomic_write", fail_third)
    code, _, err = run_cli(["make-phantoms", tmp_path / "new" / "ph", "--per-class", "2", "--size", "32"], capsys)
    one_error_line(code, err, "No space left on device")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "kept"  # a folder that was there keeps what it held
    (existing / "glioma").mkdir(parents=True)
    (existing / "glioma" / "mine.txt").write_text("x")
    written.clear()
    code, _, err = run_cli(["make-phantoms", existing, "--per-class", "2", "--size", "32"], capsys)
    assert code == 2 and files_under(existing) == {"glioma/mine.txt"}, err
    assert sorted(p.name for p in existing.iterdir()) == ["glioma"]
