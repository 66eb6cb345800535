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

TINY_TRAIN = ["--arch", "resnet18", "--weights", "none", "--lr", "1e-3", "--image-size", "32", "--epochs", "1",
              "--batch-size", "8", "--device", "cpu", "--workers", "0", "--no-progress"]


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


def error_line(err: str) -> str:
    """The one error line that ends a failed command's stderr (progress lines of a training may come before it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


def first_slice(work: Path, phantom_dir: Path) -> Path:
    return sorted((phantom_dir / "glioma").iterdir())[0]


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
    ("erasing-above-1", ["train", "{data}", "--erasing", "1.5"], {"data": data},
     "--erasing must be a probability in [0, 1]"),
    ("cutmix-negative", ["train", "{data}", "--cutmix", "-1"], {"data": data}, "--cutmix must be a Beta"),
    ("mixup-nan", ["train", "{data}", "--mixup", "nan"], {"data": data}, "--mixup must be a Beta"),
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
    ("ckpt-is-an-image", ["predict", "{image}", "{data}"], {"image": first_slice, "data": data},
     "it is an image or volume, not a model: give the model first"),
    ("ckpt-is-a-nifti", ["explain", "{volume}", "{data}"], {"volume": text_file("scan.nii.gz"), "data": data},
     "it is an image or volume, not a model"),
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
    line = error_line(err)
    assert code == 2 and "cannot write" in line and "last.pt" in line, err
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
    line = error_line(err)
    assert code == 2 and "non-finite at epoch 1, step" in line and "no checkpoint had been written yet" in line
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


# --- volumes: hostile geometry and values, streamed reading --------------------------------------------------


def nifti_file(path: Path, values: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    import nibabel as nib

    image = nib.Nifti1Image(values, np.diag([*zooms, 1.0]))
    image.header.set_zooms(zooms)
    nib.save(image, path)
    return path


def test_nifti_zooms_1e30_apart_are_one_line(tmp_path, capsys):
    from braintumor.data.volumes import read_volume
    from braintumor.errors import UserError

    path = nifti_file(tmp_path / "zooms.nii.gz", np.ones((8, 8, 2), np.int16), zooms=(1e-30, 1e30, 1.0))
    with pytest.raises(UserError, match=r"in-plane voxel sizes .* more than 16-fold apart") as error:
        read_volume(path)
    assert "\n" not in str(error.value)


def test_one_inf_voxel_is_counted_and_saturated_without_a_warning(tmp_path):
    import warnings

    from braintumor.data.volumes import read_volume

    values = np.arange(6 * 5 * 3, dtype=np.float32).reshape(6, 5, 3)
    values[2, 1, 1] = np.inf
    values[0, 0, 2] = np.nan
    path = nifti_file(tmp_path / "inf.nii", values)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning would fail here
        volume = read_volume(path)
    assert volume.nonfinite.tolist() == [0, 1, 1]  # per axial slice: the inf in slice 1, the NaN in slice 2
    assert volume.slices.shape == (3, 5, 6) and volume.window[1] < np.inf
    assert (volume.slices[1] == 255).sum() >= 1


def test_an_all_nan_volume_is_refused_not_classified(tmp_path, capsys):
    from braintumor.data.volumes import read_volume
    from braintumor.errors import UserError

    path = nifti_file(tmp_path / "nan.nii.gz", np.full((8, 8, 4), np.nan, np.float32))
    with pytest.raises(UserError, match="no finite voxel values"):
        read_volume(path)
    code, out, err = run_cli(["predict", make_checkpoint(tmp_path / "m.pt"), path], capsys)
    one_error_line(code, err, "no finite voxel values")
    assert "nan.nii.gz" not in out  # no row for it (a header line may have been printed)


def test_streamed_windowing_equals_the_in_memory_one(tmp_path, monkeypatch):
    """Tiny blocks and a tiny gather limit force the multi-pass exact percentiles; the slices must not change."""
    from braintumor.data import volumes

    rng = np.random.default_rng(3)
    values = (rng.standard_normal((40, 30, 7)) * 300).astype(np.float32)
    values[values > 400] = 0.0  # many ties
    values[5, 5, 5] = 1e30  # an outlier that would flatten a naive histogram
    path = nifti_file(tmp_path / "v.nii.gz", values, zooms=(1.0, 1.0, 2.0))
    whole = volumes.read_volume(path)
    monkeypatch.setattr(volumes, "_BLOCK_VOXELS", 37)
    monkeypatch.setattr(volumes, "_GATHER_VOXELS", 50)
    monkeypatch.setattr(volumes, "_HISTOGRAM_BINS", 16)
    streamed = volumes.read_volume(path)
    finite = values[np.isfinite(values)]
    assert streamed.window == pytest.approx(tuple(np.percentile(finite, [0.5, 99.5])), rel=0, abs=0)
    assert streamed.window == whole.window
    np.testing.assert_array_equal(streamed.slices, whole.slices)

def test_windowing_a_plane_known_to_be_finite_skips_nothing_that_matters():
    """The shortcut for planes without NaN or infinity gives the full path's bytes, overflowing values included."""
    from braintumor.data.volumes import _window_block

    rng = np.random.default_rng(5)
    block = (rng.standard_normal((40, 50)) * 1e3).astype(np.float32)
    block[0, :4] = [3.4e38, -3.4e38, 1e38, -1e38]
    for window in [(-500.0, 800.0), (-3.4e38, 3.4e38), (0.0, 1e-30), (7.0, 7.0)]:
        np.testing.assert_array_equal(_window_block(block, window, True), _window_block(block, window))
    eight_bit = rng.integers(0, 256, (8, 9)).astype(np.float32)
    np.testing.assert_array_equal(_window_block(eight_bit, None, True), _window_block(eight_bit, None))


@pytest.mark.parametrize("seed", range(4))
def test_streamed_percentiles_equal_numpy_for_any_percentiles(seed, monkeypatch):
    """The multi-pass order statistics (ranks that share bins share each chunk's histogram) give numpy's
    percentiles exactly, for percentiles close together, far apart and equal, on data with ties and outliers."""
    from braintumor.data import volumes

    monkeypatch.setattr(volumes, "_GATHER_VOXELS", 40)
    monkeypatch.setattr(volumes, "_HISTOGRAM_BINS", 8)
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(3001) * 100, rng.integers(0, 6, 2500).astype(float),
              np.concatenate([rng.exponential(5.0, 2000), [1e30, -1e29]]),
              rng.integers(-32768, 32767, 4000).astype(float)][seed].astype(np.float32)
    chunks = lambda: iter(np.array_split(values, 7))  # noqa: E731
    for percentiles in ((0.5, 99.5), (10.0, 10.0, 10.1), (0.0, 50.0, 100.0), tuple(rng.uniform(0, 100, 5))):
        streamed = volumes.volume_percentiles(chunks, values.size, float(values.min()), float(values.max()),
                                              percentiles)
        assert streamed == [float(v) for v in np.percentile(values, percentiles)]



def test_wide_planes_are_box_reduced_while_read(tmp_path, monkeypatch):
    from braintumor.data import volumes

    monkeypatch.setattr(volumes, "MAX_SIDE", 64)
    values = np.zeros((300, 200, 2), np.uint8)  # columns x rows x slices
    values[150:, :, :] = 200
    volume = volumes.read_volume(nifti_file(tmp_path / "wide.nii", values))
    assert volume.reduced_by == 5 and volume.slices.shape == (2, 40, 60)
    assert volume.spacing == (5.0, 5.0, 1.0)
    assert set(np.unique(volume.slices)) == {0, 200}


def test_the_volume_probe_never_inflates_a_deflated_bomb(tmp_path, monkeypatch):
    """is_volume reads a header: of a deflated DICOM only the start is inflated (to disk), and one over the
    inflate limit is left to the 2-D reader's one line, which refuses it before pydicom sees it."""
    import tracemalloc

    from bombs import dicom_deflate_bomb

    from braintumor.data import dicom
    from braintumor.data.io import ImageReadError, read_image
    from braintumor.data.volumes import is_volume, partition_inputs

    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(dicom_deflate_bomb(side=4000))  # 32 MB of pixels once inflated
    tracemalloc.start()
    assert not is_volume(bomb)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 12 * 2**20, f"the probe held {peak / 2**20:.0f} MiB"
    assert partition_inputs([bomb]) == ([bomb], [])
    monkeypatch.setattr(pixels, "MAX_DECODED_BYTES", 1_000_000)
    monkeypatch.setattr(dicom, "check_byte_budget", lambda *args: None)
    import pydicom

    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: pytest.fail("pydicom read the bomb"))
    with pytest.raises(ImageReadError, match="inflate to more than"):
        read_image(bomb)


# --- one memory budget: peak RSS of `braintumor predict reference FILE` in a subprocess ------------------------
#
# Each file is small on disk and huge once decoded. It is built here by repeating one compressed block (deflate
# blocks flushed with Z_FULL_FLUSH concatenate), so building it never holds the decoded data either.

RSS_LIMIT_BYTES = int(1.5 * 2**30)


def _deflate_repeat(prefix: bytes, piece: bytes, count: int) -> bytes:
    """A raw deflate stream of prefix + piece * count, compressing ``piece`` once."""
    import zlib

    def flushed(data: bytes, mode: int) -> bytes:
        stream = zlib.compressobj(6, zlib.DEFLATED, -15)
        return stream.compress(data) + stream.flush(mode)

    return (flushed(prefix, zlib.Z_FULL_FLUSH) + flushed(piece, zlib.Z_FULL_FLUSH) * count
            + flushed(b"", zlib.Z_FINISH))


def big_nifti_gz(path: Path, shape: tuple[int, int, int], dtype, piece: np.ndarray) -> Path:
    """A .nii.gz of ``shape`` (columns, rows, slices) whose voxels repeat ``piece`` (rows of voxels) in file order."""
    import struct
    import zlib

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    header["vox_offset"] = 352
    prefix, block = header.binaryblock + b"\0" * 4, np.ascontiguousarray(piece, dtype=dtype).tobytes()
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize // len(block)
    crc = zlib.crc32(prefix)
    for _ in range(count):
        crc = zlib.crc32(block, crc)
    size = len(prefix) + len(block) * count
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + _deflate_repeat(prefix, block, count)
                     + struct.pack("<II", crc, size & 0xFFFFFFFF))
    return path


def big_deflated_dicom(path: Path, rows: int, columns: int, frames: int, piece: np.ndarray, **elements) -> Path:
    """A deflated 16-bit MONOCHROME2 DICOM whose pixel data repeat ``piece``; ``elements`` are added as given
    (e.g. RescaleSlope, WindowCenter)."""
    import struct

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset = Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.Rows, dataset.Columns = "MR", rows, columns
    if frames > 1:
        dataset.NumberOfFrames = frames
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
    for key, value in elements.items():
        setattr(dataset, key, value)
    encoded, meta_bytes = DicomBytesIO(), DicomBytesIO()
    for stream in (encoded, meta_bytes):
        stream.is_little_endian, stream.is_implicit_VR = True, False
    write_dataset(encoded, dataset)
    write_file_meta_info(meta_bytes, meta)
    block = np.ascontiguousarray(piece, dtype="<u2").tobytes()
    size = rows * columns * frames * 2
    pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", size)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta_bytes.getvalue()
                     + _deflate_repeat(encoded.getvalue() + pixel_header, block, size // len(block)))
    return path


def ramp(rows: int, columns: int, high: int = 3000) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:columns]
    return ((x * 7 + y * 3) % 200 + (x > columns // 2) * high).astype(np.int64)


def memory_bombs(folder: Path) -> dict[str, Path]:
    """The decode paths of issue 25, each a file of at most a few MB."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "nifti-16384x16384x1-uint8": big_nifti_gz(folder / "wide.nii.gz", (16384, 16384, 1), np.uint8,
                                                  ramp(64, 16384, 50) % 256),
        "nifti-512x512x1024-int16": big_nifti_gz(folder / "tall.nii.gz", (512, 512, 1024), np.int16, ramp(512, 512)),
        "dicom-deflate-multiframe-1024x512": big_deflated_dicom(folder / "frames.dcm", 512, 512, 1024,
                                                                ramp(512, 512)),
        "dicom-deflate-9450-rescale-window": big_deflated_dicom(
            folder / "big16.dcm", 9450, 9450, 1, ramp(45, 9450, 30000), RescaleSlope=2, RescaleIntercept=-1024,
            WindowCenter=20000, WindowWidth=40000),
        "dicom-deflate-inflating-to-2gb": big_deflated_dicom(folder / "bomb2g.dcm", 32768, 32768, 1,
                                                             np.zeros((16, 32768))),
    }


def peak_rss(args: list[str], cwd: Path) -> tuple[int, str, int]:
    """(exit code, stderr, peak RSS in bytes) of ``braintumor ARGS`` run in a fresh process: a wrapper process
    waits for it and reads its children's maximum resident set (getrusage RUSAGE_CHILDREN), a memory figure
    independent of how long anything takes."""
    wrapper = textwrap.dedent("""
        import resource, subprocess, sys
        done = subprocess.run([sys.executable, "-m", "braintumor", *sys.argv[1:]], capture_output=True, text=True)
        sys.stderr.write(done.stderr)
        print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=1800)
    code, peak = result.stdout.split()
    return int(code), result.stderr, int(peak)


@pytest.fixture(scope="module")
def bombs_folder(tmp_path_factory):
    return memory_bombs(tmp_path_factory.mktemp("memory-bombs"))


BOMB_OUTCOMES = {  # processed within the budget (exit 0), or refused with one line (exit 2)
    "nifti-16384x16384x1-uint8": (0, "volume verdict"),
    "nifti-512x512x1024-int16": (0, "volume verdict"),
    "dicom-deflate-multiframe-1024x512": (0, "volume verdict"),
    "dicom-deflate-9450-rescale-window": (0, ""),
    "dicom-deflate-inflating-to-2gb": (2, "inflate to more than"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BOMB_OUTCOMES))
def test_decompression_bombs_stay_within_the_memory_budget(case, bombs_folder, tmp_path):
    code, err, peak = peak_rss(["predict", "reference", str(bombs_folder[case])], tmp_path)
    expected_code, message = BOMB_OUTCOMES[case]
    assert peak <= RSS_LIMIT_BYTES, f"{case}: peak RSS {peak / 2**20:.0f} MiB"
    assert code == expected_code and message in err and "Traceback" not in err, err
    if code == 2:
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err


@pytest.mark.slow
def test_auditing_and_evaluating_a_folder_of_bombs_stay_within_the_memory_budget(bombs_folder, tmp_path):
    folder = tmp_path / "scans" / "glioma"
    folder.mkdir(parents=True)
    for case in ("dicom-deflate-9450-rescale-window", "dicom-deflate-inflating-to-2gb"):
        os.symlink(bombs_folder[case], folder / bombs_folder[case].name)
    truncated_jpeg(folder / "claim.jpg")
    Image.new("L", (64, 64), 80).save(folder / "plain.png")
    code, err, peak = peak_rss(["audit", str(tmp_path / "scans"), "--out", str(tmp_path / "audit")], tmp_path)
    assert peak <= RSS_LIMIT_BYTES, f"audit: peak RSS {peak / 2**20:.0f} MiB"
    assert code == 0, err
    import json

    unreadable = {Path(u["path"]).name: u["reason"] for u in json.loads((tmp_path / "audit" / "audit.json")
                                                                     .read_text())["unreadable"]}
    assert "inflate to more than" in unreadable["bomb2g.dcm"] and "truncated" in unreadable["claim.jpg"]
    (folder.parent / "notumor").mkdir()
    Image.new("L", (64, 64), 30).save(folder.parent / "notumor" / "dark.png")
    code, err, peak = peak_rss(["evaluate", "reference", str(tmp_path / "scans"), "--skip-bad",
                                "--out", str(tmp_path / "evaluation")], tmp_path)
    assert peak <= RSS_LIMIT_BYTES, f"evaluate: peak RSS {peak / 2**20:.0f} MiB"
    assert code == 0 and "Traceback" not in err, err


def test_a_float_image_of_nan_is_refused_and_a_partly_nan_one_reads(tmp_path):
    from braintumor.data.io import ImageReadError, read_image

    Image.fromarray(np.full((16, 16), np.nan, np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match="no finite pixel values"):
        read_image(tmp_path / "nan.tif")
    values = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    values[0, 0] = np.nan
    Image.fromarray(values, mode="F").save(tmp_path / "some.tif")
    pixels_read = np.asarray(read_image(tmp_path / "some.tif"))[..., 0]
    assert pixels_read[0, 0] == 0 and pixels_read[-1, -1] == 255


def test_uploaded_volumes_stream_like_files(tmp_path):
    """An upload reads as the same file does; gzip is streamed from disk, and data past what the header declares
    (a small upload inflating to a large one) is never read."""
    from braintumor.data.volumes import read_volume, read_volume_bytes

    values = np.arange(20 * 10 * 3, dtype=np.int16).reshape(20, 10, 3)
    for name in ("v.nii", "v.nii.gz"):
        path = nifti_file(tmp_path / name, values)
        from_file, from_upload = read_volume(path), read_volume_bytes(path.read_bytes(), name)
        np.testing.assert_array_equal(from_file.slices, from_upload.slices)
        assert from_upload.source == name and from_upload.window == from_file.window
    padded = big_nifti_gz(tmp_path / "pad.nii.gz", (64, 32, 4), np.int16, ramp(32, 64))
    import gzip

    raw = gzip.decompress(padded.read_bytes()) + bytes(256 * 2**20)  # 256 MiB of zeros the header never declares
    volume = read_volume_bytes(gzip.compress(raw, compresslevel=1), "pad.nii.gz")
    assert volume.slices.shape == (4, 32, 64)
