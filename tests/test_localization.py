"""The localisation benchmark's measures: boxes parse, the pointing game and mass in box on hand-made maps, the
baselines and intervals, and the script end to end on phantoms with their lesion boxes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("localization", BENCHMARKS / "localization.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("localization", module)  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return sys.modules["localization"]


loc = load_benchmark()


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("file,class,x_center,y_center,width,height\n" + "\n".join(rows) + "\n")
    return path


def test_boxes_parse_to_corners(tmp_path):
    boxes = loc.read_boxes(write_csv(tmp_path / "b.csv", ["glioma/a.jpg,glioma,0.30,0.47,0.20,0.10",
                                                          "pituitary/b.jpg,pituitary,0.5,0.5,1.0,1.0"]))
    assert [b.file for b in boxes] == ["glioma/a.jpg", "pituitary/b.jpg"]
    assert (boxes[0].label, boxes[0].x0, boxes[0].y0) == ("glioma", pytest.approx(0.2), pytest.approx(0.42))
    assert (boxes[0].x1, boxes[0].y1) == (pytest.approx(0.4), pytest.approx(0.52))
    assert boxes[0].area == pytest.approx(0.02) and boxes[1].area == pytest.approx(1.0)


@pytest.mark.parametrize("row, message", [("a.jpg,glioma,x,0.5,0.1,0.1", "numbers"),
                                          ("a.jpg,glioma,0.95,0.5,0.2,0.1", "inside the image"),
                                          ("a.jpg,glioma,0.5,0.5,0,0.1", "inside the image")])
def test_bad_boxes_name_their_line(tmp_path, row, message):
    with pytest.raises(ValueError, match=rf"b.csv:2: .*{message}"):
        loc.read_boxes(write_csv(tmp_path / "b.csv", [row]))
    (tmp_path / "c.csv").write_text("file,class,x,y\n")
    with pytest.raises(ValueError, match="missing column"):
        loc.read_boxes(tmp_path / "c.csv")


def box(x0, y0, x1, y1):
    return loc.Box("f", "glioma", x0, y0, x1, y1)


def test_box_mask_takes_pixel_centres_and_grows():
    mask = loc.box_mask(box(0.25, 0.5, 0.5, 0.75), 8)
    expected = np.zeros((8, 8), bool)
    expected[4:6, 2:4] = True  # centres 4.5/8 and 5.5/8 in y, 2.5/8 and 3.5/8 in x
    np.testing.assert_array_equal(mask, expected)
    grown = loc.box_mask(box(0.25, 0.5, 0.5, 0.75), 8, grow=1 / 8)
    expected[3:7, 1:5] = True
    np.testing.assert_array_equal(grown, expected)


def test_pointing_game_on_hand_made_maps():
    size = 100
    target = box(0.2, 0.2, 0.4, 0.4)
    heat = np.zeros((size, size), np.float32)
    heat[30, 30] = 1.0  # (0.305, 0.305): inside
    assert loc.pointing_hit(heat, target)
    heat[30, 30], heat[60, 60] = 0.5, 1.0  # the maximum moves out, a lower value stays inside
    assert not loc.pointing_hit(heat, target)
    edge = np.zeros((size, size), np.float32)
    edge[30, 42] = 1.0  # x = 0.425: outside the box, within 15/512 = 0.0293 of its right edge
    assert loc.pointing_hit(edge, target) and not loc.pointing_hit(edge, target, grow=0.0)
    edge[30, 42], edge[30, 44] = 0.0, 1.0  # x = 0.445: beyond the tolerance
    assert not loc.pointing_hit(edge, target)
    assert not loc.pointing_hit(np.zeros((size, size), np.float32), target)  # no evidence points nowhere
    plateau = np.zeros((size, size), np.float32)
    plateau[20:41, 0:61] = 1.0  # a plateau of maxima: its centroid (0.305, 0.305) counts, not its first pixel
    assert loc.peak(plateau) == pytest.approx((0.305, 0.305))
    assert loc.pointing_hit(plateau, target)


def test_mass_in_box_on_hand_made_maps():
    size = 10
    target = box(0.0, 0.0, 0.5, 0.5)  # the top-left quarter: 25 pixels
    assert loc.mass_in_box(np.ones((size, size)), target) == pytest.approx(0.25)
    heat = np.zeros((size, size))
    heat[1, 1], heat[8, 8] = 3.0, 1.0
    assert loc.mass_in_box(heat, target) == pytest.approx(0.75)
    assert loc.mass_in_box(np.zeros((size, size)), target) == 0.0


def test_centre_and_random_baselines():
    size = 64
    centre = loc.centre_map(size)
    assert centre.shape == (size, size) and centre.max() == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(centre, centre.T)
    np.testing.assert_allclose(centre, centre[::-1, ::-1])
    assert loc.peak(centre) == pytest.approx((0.5, 0.5))  # four equal central pixels: their centroid
    central, corner = box(0.45, 0.45, 0.55, 0.55), box(0.0, 0.0, 0.2, 0.2)
    hits, masses = loc.score_maps(loc.baseline_maps("centre", 2, size), [central, corner])
    assert hits.tolist() == [True, False] and masses[0] > masses[1] > 0
    # Random maps point anywhere: over many boxes the hit rate is about the grown box's share of the image.
    maps = loc.baseline_maps("random", 400, 32)
    assert maps.shape == (400, 32, 32)
    np.testing.assert_array_equal(maps, loc.baseline_maps("random", 400, 32))  # seeded
    hits, masses = loc.score_maps(maps, [box(0.0, 0.0, 0.5, 0.5)] * 400, grow=0.0)
    assert 0.18 < hits.mean() < 0.32 and masses.mean() == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ValueError, match="unknown baseline"):
        loc.baseline_maps("corner", 1, 8)


def test_intervals():
    # Wilson's interval for 8 of 10 (Newcombe 1998, method 3): 0.4902 to 0.9433.
    assert loc.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert loc.wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-9)
    low, high = loc.bootstrap_interval(np.r_[np.zeros(50), np.ones(50)])
    assert 0.38 < low < 0.5 < high < 0.62
    assert loc.bootstrap_interval([0.3, 0.3, 0.3]) == (0.3, 0.3)


def test_report_splits_by_class():
    hits = np.array([True, False, True, True])
    masses = np.array([0.5, 0.1, 0.3, 0.7])
    table = loc.report({"m": (hits, masses)}, ["a", "a", "b", "b"])
    assert table["m"]["all"]["pointing"] == 0.75 and table["m"]["all"]["n"] == 4
    assert table["m"]["a"]["pointing"] == 0.5 and table["m"]["b"]["mass"] == pytest.approx(0.5)


def test_balanced_limit_takes_classes_in_turn():
    boxes = [loc.Box(f"{c}{i}", c, 0, 0, 1, 1) for c in ("a", "b") for i in range(3)]
    assert [b.file for b in loc.balanced(boxes, 3)] == ["a0", "b0", "a1"]
    assert loc.balanced(boxes, None) == boxes


def phantom_boxes(folder, seed: int):
    """A glioma, a meningioma and a pituitary phantom (64 px) in class folders, and boxes.csv with each lesion's
    exact box (from the phantom's lesion mask)."""
    from braintumor.synthetic.phantom import make_phantom

    rows = []
    for k, label in enumerate(("glioma", "meningioma", "pituitary")):
        image, mask = make_phantom(label, 64, seed + k, return_mask=True)
        (folder / label).mkdir()
        Image.fromarray(image).save(folder / label / f"s{k}.png")
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = xs.min() / 64, (xs.max() + 1) / 64, ys.min() / 64, (ys.max() + 1) / 64
        rows.append(f"{label}/s{k}.png,{label},{(x0 + x1) / 2},{(y0 + y1) / 2},{x1 - x0},{y1 - y0}")
    return write_csv(folder / "boxes.csv", rows)


@pytest.mark.slow
def test_script_runs_on_phantoms_with_lesion_boxes(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(loc, "FAITHFULNESS_STEPS", 2)  # 3 passes instead of 17: the plumbing, not the figure
    csv_path = phantom_boxes(tmp_path, seed=40)
    argv = [str(csv_path), "--checkpoint", str(tiny_checkpoint), "--methods", "gradcam", "hirescam", "occlusion",
            "--layers", "layer3", "layer4", "--faithfulness", "--save-maps", str(tmp_path / "maps.npz"),
            "--image-size", "32", "--mirror", "both"]
    assert loc.main(argv + ["--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    single = ["gradcam@layer3", "gradcam@layer4", "hirescam@layer3", "hirescam@layer4", "occlusion"]
    assert list(result["rows"]) == single + [f"{row}+mirror" for row in single] + ["centre", "random"]
    assert result["runs"]["occlusion+mirror"]["mirror"] is True and result["runs"]["occlusion"]["mirror"] is False
    assert result["slices"] == 3 and result["image_size"] == 32
    row = result["rows"]["occlusion"]
    assert set(row) == {"all", "glioma", "meningioma", "pituitary"} and row["all"]["n"] == 3
    assert 0 <= row["all"]["pointing"] <= 1 and 0 <= result["runs"]["gradcam@layer4"]["deletion"] <= 1
    for baseline in ("centre", "random"):  # the references a method's deletion and insertion AUC are read against
        assert 0 <= result["runs"][baseline]["deletion"] <= 1 and 0 <= result["runs"][baseline]["insertion"] <= 1
    saved = np.load(tmp_path / "maps.npz")
    assert saved["gradcam@layer4"].shape == (3, 32, 32) and list(saved["files"]) == [r.split(",")[0] for r in csv_path.read_text().splitlines()[1:]]
    assert loc.main([str(csv_path), "--checkpoint", str(tiny_checkpoint), "--methods", "gradcam", "--limit", "1",
                     "--image-size", "32"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| explanation | pointing (all)") and "| centre |" in table
    assert "| gradcam@layer3+mirror |" in table  # explain's default: mirror averaging
    assert loc.main([str(csv_path), "--checkpoint", str(tiny_checkpoint), "--methods", "saliency"]) == 2
    assert "unknown method 'saliency'" in capsys.readouterr().err


def test_deletion_and_insertion_reward_the_map_that_names_the_evidence():
    import torch

    class CornerModel(torch.nn.Module):
        """Class 1's logit is the brightness of the top-left quarter: the only evidence."""

        def forward(self, x):
            evidence = x[:, :, :8, :8].mean(dim=(1, 2, 3))
            return torch.stack([torch.zeros_like(evidence), 4 * evidence], dim=1)

    batch = torch.ones(1, 3, 16, 16)
    batch[:, :, 0, 0] = 0.0  # the per-channel minimum: what "black" becomes
    right, wrong = np.zeros((1, 16, 16), np.float32), np.zeros((1, 16, 16), np.float32)
    right[0, :8, :8] = 1.0
    wrong[0, 8:, 8:] = 1.0
    deletion_right, insertion_right = loc.faithfulness(CornerModel(), batch, right, [1], steps=4)
    deletion_wrong, insertion_wrong = loc.faithfulness(CornerModel(), batch, wrong, [1], steps=4)
    assert deletion_right[0] < deletion_wrong[0] and insertion_right[0] > insertion_wrong[0]
    assert 0 < deletion_right[0] < 1 and 0 < insertion_right[0] < 1


def test_peak_regions_and_maskings_on_a_phantom():
    import torch

    from braintumor.synthetic.phantom import make_phantom

    image, mask = make_phantom("meningioma", 64, 3, return_mask=True)
    head = loc.head_mask(image.astype(np.float32))
    assert head[32, 32] and not head[0, 0] and 0.3 < head.mean() < 0.95
    ys, xs = np.nonzero(mask)
    lesion = box(xs.min() / 64, ys.min() / 64, (xs.max() + 1) / 64, (ys.max() + 1) / 64)
    heat = np.zeros((64, 64), np.float32)
    heat[ys[0], xs[0]] = 1.0
    assert loc.peak_region(heat, head, lesion) == "box"
    heat[:] = 0
    heat[1, 1] = 1.0
    assert loc.peak_region(heat, head, lesion) == "background" and loc.in_margin(heat)
    assert loc.peak_region(np.zeros((64, 64), np.float32), head, lesion) == "none"
    batch = torch.from_numpy(image.astype(np.float32) / 255.0)[None, None].repeat(1, 3, 1, 1)
    heads = head[None]
    assert torch.equal(loc.masked(batch, heads, [lesion], "original"), batch)
    no_background = loc.masked(batch, heads, [lesion], "no-background")
    assert torch.equal(no_background[0, :, head], batch[0, :, head])
    assert (no_background[0, :, ~head] == batch.min()).all()
    inside = torch.from_numpy(loc.box_mask(lesion, 64, loc.GROW))
    only = loc.masked(batch, heads, [lesion], "tumour-only")
    assert torch.equal(only[0, :, inside], batch[0, :, inside]) and (only[0, :, ~inside] == batch.min()).all()
    removed = loc.masked(batch, heads, [lesion], "no-tumour")[0, 0]
    assert removed[inside].std() == 0 and torch.equal(removed[~inside], batch[0, 0][~inside])


@pytest.mark.slow
def test_diagnose_montage_and_mean_maps_from_saved_maps(tmp_path, tiny_checkpoint, capsys):
    csv_path = phantom_boxes(tmp_path, seed=50)
    common = [str(csv_path), "--checkpoint", str(tiny_checkpoint), "--methods", "gradcam", "--layers", "layer4",
              "--image-size", "32"]
    assert loc.main(common + ["--save-maps", str(tmp_path / "maps.npz")]) == 0
    capsys.readouterr()
    assert loc.main(common + ["--diagnose", str(tmp_path / "maps.npz"), "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["masking"]) == set(loc.MASKINGS) and result["slices"] == 3
    assert sum(result["peaks"]["gradcam@layer4+mirror"][k] for k in ("box", "brain", "rim", "background", "none")) == \
        pytest.approx(1.0)
    assert set(result["distance"]) == {"gradcam@layer4+mirror", "centre"}
    assert set(result["distance"]["centre"]) == {"all", "glioma", "meningioma", "pituitary"}
    for flag in ("--montage", "--mean-maps"):
        out = tmp_path / f"{flag[2:]}.png"
        assert loc.main(common + ["--diagnose", str(tmp_path / "maps.npz"), flag, str(out)]) == 0
        with Image.open(out) as picture:
            assert picture.mode == "RGB" and min(picture.size) > 200


def quadrant_maps(size: int, values: list[tuple[float, float]]) -> np.ndarray:
    """One map per slice: its top-left quadrant at the first value, bottom-right at the second, the rest 0."""
    maps = np.zeros((len(values), size, size), np.float16)
    half = size // 2
    for m, (top_left, bottom_right) in zip(maps, values):
        m[:half, :half], m[half:, half:] = top_left, bottom_right
    return maps


def test_average_scores_each_model_and_the_mean_of_their_maps(tmp_path, capsys):
    csv_path = write_csv(tmp_path / "b.csv", ["a.jpg,glioma,0.25,0.25,0.5,0.5",        # top-left quadrant
                                              "b.jpg,pituitary,0.75,0.75,0.5,0.5"])  # bottom-right quadrant
    files = np.array(["a.jpg", "b.jpg"])
    row = "gradcampp@layer3+mirror"
    # model A (8 px maps) hits on a, misses on b; model B (16 px) misses on a, hits on b; their mean hits on both.
    np.savez(tmp_path / "A.npz", files=files, **{row: quadrant_maps(8, [(1.0, 0.0), (1.0, 0.6)])})
    np.savez(tmp_path / "B.npz", files=files, **{row: quadrant_maps(16, [(0.7, 1.0), (0.0, 1.0)])})
    common = [str(csv_path), "--methods", "gradcampp", "--layers", "layer3", "--mirror", "on", "--average",
              str(tmp_path / "A.npz"), str(tmp_path / "B.npz")]
    assert loc.main(common + ["--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    pointing = {name: row_["all"]["pointing"] for name, row_ in result["rows"].items()}
    assert pointing["A"] == 0.5 and pointing["B"] == 0.5 and pointing["mean of 2"] == 1.0
    assert result["image_size"] == 8 and result["slices"] == 2  # the first file's size and {"centre", "random"} <= set(pointing)
    assert result["rows"]["mean of 2"]["glioma"]["pointing"] == 1.0
    assert loc.main(common) == 0
    assert "| mean of 2 | 100.0" in capsys.readouterr().out

    np.savez(tmp_path / "C.npz", files=files[::-1], **{row: quadrant_maps(8, [(1.0, 0.0)] * 2)})
    (tmp_path / "torn.npz").write_bytes((tmp_path / "A.npz").read_bytes()[:40])  # a zip cut short
    for extra, message in ((["--average", str(tmp_path / "A.npz"), str(tmp_path / "C.npz")], "other slices"),
                           (["--average", str(tmp_path / "torn.npz")], "cannot read"),
                           (["--layers", "layer2"], "has no row gradcampp@layer2"),
                           (["--mirror", "both"], "one map row")):
        assert loc.main(common + extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", ["--json", "--save-maps", "--montage", "--mean-maps"])
def test_an_existing_output_file_is_refused_before_any_work(tmp_path, flag, capsys):
    taken = tmp_path / "taken"
    taken.write_text("kept")
    csv_path = write_csv(tmp_path / "b.csv", ["a.jpg,glioma,0.5,0.5,0.2,0.2"])
    assert loc.main([str(csv_path), "--checkpoint", str(tmp_path / "no-such.pt"), flag, str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {taken} already exists; pass --overwrite to replace it, or choose another {flag}"
    assert taken.read_text() == "kept"


def test_distance_of_a_maximum_from_the_box_in_box_sides():
    square = box(0.4, 0.4, 0.6, 0.6)  # side 0.2
    assert loc.box_distance((0.5, 0.5), square) == 0.0 and loc.box_distance((0.4, 0.6), square) == 0.0  # edge: inside
    assert loc.box_distance((0.8, 0.5), square) == pytest.approx(1.0)  # one side to the right
    assert loc.box_distance((0.1, 0.5), square) == pytest.approx(1.5)
    assert loc.box_distance((0.8, 0.8), square) == pytest.approx(2 ** 0.5)  # diagonal from the corner
    assert loc.box_distance(None, square) == float("inf")  # a zero map points nowhere
    summary = loc.distance_summary([0.0, 2.0, 0.5, float("inf")], ["glioma", "glioma", "pituitary", "pituitary"])
    assert summary["all"] == {"median": 1.25, "within_one_side": 0.5}
    assert summary["glioma"] == {"median": 1.0, "within_one_side": 0.5}
    assert summary["pituitary"]["within_one_side"] == 0.5 and summary["pituitary"]["median"] == float("inf")
