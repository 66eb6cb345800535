"""Explanations: shapes and range, batch == single, Grad-CAM against a hand-computed reference and captum, no
leftover hooks, restored model state, clear errors, and every method pointing at the planted lesion of a tiny
model whose only evidence it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from braintumor.inference.runtimes import OnnxBackend
from braintumor.models.checkpoint import ModelSpec
from braintumor.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from braintumor.errors import UserError
from braintumor.visualize.explain import (CAM_METHODS, DEFAULT_METHOD, METHODS, Explanation, explain, explain_batch,
                                          explain_cam_batch, normalize_maps, write_explanations)
from braintumor.synthetic.phantom import make_phantom
from braintumor.inference.classifier import Classifier

SIZE = 64
LESION_CLASSES = ("glioma", "meningioma", "pituitary")


def random_image(seed: int, size=(90, 80)) -> Image.Image:
    """A noisy RGB image whose size differs from the model's input size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint):
    return Classifier.from_checkpoint(tiny_checkpoint)


class TinyCNN(nn.Module):
    """A small CNN with a 16 x 16 last block at 64 px (resnet18's is 2 x 2), named layer4 like a ResNet's."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.layer4 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        # Max pooling makes the net a lesion detector: a small bright spot is not averaged away.
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 2))

    def forward(self, x):
        return self.head(self.layer4(self.features(x)))


def lesion_phantom(seed: int):
    return make_phantom(LESION_CLASSES[seed % 3], SIZE, seed, return_mask=True)


@pytest.fixture(scope="module")
def lesion_classifier():
    """TinyCNN trained to tell lesion phantoms from notumor phantoms drawn with the same seeds (same heads)."""
    images, labels = [], []
    for seed in range(32):
        images.append(lesion_phantom(seed)[0])
        labels.append(1)
        images.append(make_phantom("notumor", SIZE, seed))
        labels.append(0)
    torch.manual_seed(0)
    model = TinyCNN()
    clf = Classifier.from_model(model, ModelSpec(arch="tiny-cnn", classes=("notumor", "tumor"), image_size=SIZE,
                                                 mean=IMAGENET_MEAN, std=IMAGENET_STD))
    inputs = torch.stack([clf.preprocess(Image.fromarray(image).convert("RGB")) for image in images])
    targets = torch.tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        train_accuracy = (model(inputs).argmax(dim=1) == targets).float().mean().item()
    assert train_accuracy >= 0.9, f"the tiny model did not learn the task (accuracy {train_accuracy:.2f})"
    return clf


def reference_gradcam(model: TinyCNN, inputs: torch.Tensor, class_indices: list[int]) -> np.ndarray:
    """Grad-CAM by hand (explicit forward, autograd.grad per image, no hooks), normalized like explain()."""
    model.eval()
    activations = model.layer4(model.features(inputs))
    logits = model.head(activations)
    maps = []
    for row, index in enumerate(class_indices):
        (gradient,) = torch.autograd.grad(logits[row, index], activations, retain_graph=True)
        weights = gradient[row].mean(dim=(1, 2))
        maps.append((weights[:, None, None] * activations[row]).sum(dim=0))
    upsampled = F.interpolate(torch.stack(maps)[:, None].detach(), size=inputs.shape[-2:], mode="bilinear",
                              align_corners=False)[:, 0].relu().numpy()
    result = []
    for heat in upsampled:
        span = heat.max() - heat.min()
        result.append((heat - heat.min()) / span if span > 0 else np.zeros_like(heat))
    return np.stack(result)


def hook_count(model: nn.Module) -> int:
    """Every module and parameter hook on the model, plus torch's global module hooks."""
    from torch.nn.modules import module as module_globals

    count = 0
    for module in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            count += len(getattr(module, name))
    for parameter in model.parameters():
        count += len(parameter._backward_hooks or {})
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        count += len(getattr(module_globals, name))
    return count


def test_heatmap_has_input_size_and_unit_range(classifier):
    result = explain(classifier, random_image(0))
    assert isinstance(result, Explanation)
    assert result.heatmap.shape == (SIZE, SIZE) and result.heatmap.dtype == np.float32
    assert result.heatmap.min() == 0.0 and result.heatmap.max() == pytest.approx(1.0)
    assert result.image.size == (SIZE, SIZE) and result.image.mode == "RGB"
    prediction = classifier.predict(random_image(0))
    assert result.predicted == result.target == prediction.label
    assert result.probability == pytest.approx(prediction.confidence, abs=1e-5)
    assert result.target_probability == result.probability


def test_target_class_probability_and_unknown_class(classifier):
    target = classifier.classes[0]
    result = explain(classifier, random_image(1), target=target)
    prediction = classifier.predict(random_image(1))
    assert result.target == target and result.predicted == prediction.label
    assert result.target_probability == pytest.approx(prediction.probabilities[target], abs=1e-5)
    with pytest.raises(UserError, match="glioma, meningioma, notumor, pituitary"):
        explain(classifier, random_image(1), target="astrocytoma")


def test_onnx_backend_is_refused():
    onnx_only = Classifier(OnnxBackend(object()), ModelSpec(arch="resnet18", classes=("a", "b"), image_size=SIZE,
                                                            mean=(0.5,) * 3, std=(0.5,) * 3))
    with pytest.raises(UserError, match="PyTorch checkpoint"):
        explain(onnx_only, random_image(0))


def test_no_hooks_left_after_repeated_calls(classifier):
    before = hook_count(classifier.model)
    for seed in range(3):
        explain(classifier, [random_image(seed), random_image(seed + 10)])
        assert hook_count(classifier.model) == before == 0


def test_model_mode_and_requires_grad_restored(classifier):
    model = classifier.model
    model.train()
    model.layer1.eval()  # e.g. a frozen block inside a training model: the mix must survive
    for parameter in model.layer2.parameters():
        parameter.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    try:
        first = explain(classifier, random_image(3))
        second = explain(classifier, random_image(3))
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
        # Eval mode inside the call: dropout in the head would otherwise make two maps differ.
        np.testing.assert_array_equal(first.heatmap, second.heatmap)
    finally:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(True)


def test_works_inside_inference_mode(classifier):
    with torch.inference_mode():
        result = explain(classifier, random_image(4))
    assert result.heatmap.max() == pytest.approx(1.0)


def test_normalize_scales_each_map_and_zeroes_constant_maps():
    maps = torch.stack([torch.arange(16.0).reshape(4, 4) + 3.0, torch.full((4, 4), 2.5)])
    normalized = normalize_maps(maps).numpy()
    np.testing.assert_allclose(normalized[0], np.arange(16.0).reshape(4, 4) / 15.0, atol=1e-7)
    np.testing.assert_array_equal(normalized[1], np.zeros((4, 4)))


def test_overlay_blends_colormap_over_the_slice():
    import matplotlib

    heatmap = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    image = random_image(5, size=(SIZE, SIZE)).convert("L").convert("RGB")
    explanation = Explanation("x", "a", "a", 0.9, 0.9, heatmap, image)
    np.testing.assert_array_equal(np.asarray(explanation.overlay(alpha=0.0)), np.asarray(image))
    expected = np.rint(matplotlib.colormaps["jet"](heatmap)[..., :3] * 255)
    np.testing.assert_allclose(np.asarray(explanation.overlay(alpha=1.0)), expected, atol=1)


@pytest.mark.slow
def test_planted_lesion_is_hotter_than_the_background(lesion_classifier):
    phantoms = [lesion_phantom(seed) for seed in range(1000, 1012)]
    results = explain(lesion_classifier, [Image.fromarray(image) for image, _ in phantoms], target="tumor",
                      method="gradcam")
    inside = np.array([r.heatmap[mask].mean() for r, (_, mask) in zip(results, phantoms)])
    outside = np.array([r.heatmap[~mask].mean() for r, (_, mask) in zip(results, phantoms)])
    assert inside.mean() > 3 * outside.mean(), (inside, outside)
    assert (inside > outside).sum() >= 11, (inside, outside)


def test_batch_matches_single_images_and_hand_computed_reference(lesion_classifier):
    # Lesion and notumor slices together: the predicted (explained) class differs within one batch.
    images = [lesion_phantom(2000)[0], make_phantom("notumor", SIZE, 2001), lesion_phantom(2002)[0],
              make_phantom("notumor", SIZE, 2003)]
    pictures = [Image.fromarray(image) for image in images]
    batch = explain(lesion_classifier, pictures, batch_size=3, method="gradcam", mirror=False)  # chunks: 3 + 1
    assert {r.predicted for r in batch} == {"tumor", "notumor"} and not any(r.mirror for r in batch)
    for picture, together in zip(pictures, batch):
        alone = explain(lesion_classifier, picture, method="gradcam", mirror=False)
        assert alone.predicted == together.predicted
        np.testing.assert_allclose(together.heatmap, alone.heatmap, atol=1e-5)
    inputs = torch.stack([lesion_classifier.preprocess(p.convert("RGB")) for p in pictures])
    indices = [lesion_classifier.classes.index(r.predicted) for r in batch]
    reference = reference_gradcam(lesion_classifier.model, inputs, indices)
    np.testing.assert_allclose(np.stack([r.heatmap for r in batch]), reference, atol=1e-5)
    # Mirror averaging (the default): the hand-made maps of the slice and of its mirror (flipped back), each
    # normalized, summed and normalized again; the probabilities stay the slice's own.
    mirrored = explain(lesion_classifier, pictures, method="gradcam")
    assert all(r.mirror for r in mirrored)
    flipped_back = reference_gradcam(lesion_classifier.model, inputs.flip(-1), indices)[..., ::-1]
    expected = normalize_maps(torch.from_numpy(reference + flipped_back)).numpy()
    np.testing.assert_allclose(np.stack([r.heatmap for r in mirrored]), expected, atol=1e-5)
    assert [r.probability for r in mirrored] == [r.probability for r in batch]
    assert not np.allclose(expected, reference, atol=0.05)  # the test can tell the two apart


@pytest.mark.parametrize("method", ["gradcampp", "occlusion"])
def test_mirror_averaged_map_of_a_symmetric_slice_is_symmetric(lesion_classifier, method):
    image, _ = lesion_phantom(2100)
    symmetric = np.concatenate([image[:, : SIZE // 2], image[:, : SIZE // 2][:, ::-1]], axis=1)
    inputs = lesion_classifier.preprocess(Image.fromarray(np.ascontiguousarray(symmetric)).convert("RGB"))[None]
    layer = "layer4" if method in CAM_METHODS else None
    _, single = explain_batch(lesion_classifier.model, inputs, method, layer=layer, targets=[1], mirror=False)
    _, averaged = explain_batch(lesion_classifier.model, inputs, method, layer=layer, targets=[1])
    np.testing.assert_allclose(averaged[0], averaged[0][:, ::-1], atol=1e-5)
    assert np.abs(single[0] - single[0][:, ::-1]).max() > 0.01  # one view alone is not: the test has power


@pytest.mark.slow
def test_write_explanations_names_files_and_adds_a_caption(classifier, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        random_image(6).save(tmp_path / folder / "slice.png")
    random_image(7).save(tmp_path / "a" / "other.jpg")
    target = classifier.classes[2]
    written = write_explanations(classifier, [tmp_path / "a", tmp_path / "b" / "slice.png"], tmp_path / "out",
                                 target=target)
    assert len(written) == 3 and len(set(written)) == 3 and all(p.is_file() for p in written)
    # No probability in the name: a rerun replaces its own files instead of leaving stale ones.
    method = DEFAULT_METHOD
    assert [p.name for p in written] == [f"other_{method}_{target}.png", f"slice_{method}_{target}.png",
                                         f"slice_{method}_{target}-2.png"]
    again = write_explanations(classifier, [tmp_path / "a"], tmp_path / "out", target=target)
    assert again == written[:2] and len(list((tmp_path / "out").iterdir())) == 3
    from braintumor.visualize.figures import GRADCAM_SIZE_PX

    for path in written:  # slice | overlay | colour bar, one fixed size whatever the caption
        with Image.open(path) as picture:
            assert picture.mode == "RGB" and picture.size == GRADCAM_SIZE_PX
            pixels = np.asarray(picture)
    # The colour bar's jet colours sit right of the two panels: strong red and strong blue columns exist there.
    bar = pixels[:, int(0.81 * GRADCAM_SIZE_PX[0]):]
    assert ((bar[..., 0] > 200) & (bar[..., 2] < 60)).any() and ((bar[..., 2] > 200) & (bar[..., 0] < 60)).any()


def test_grad_cam_is_a_pure_function_of_model_layer_and_batch(lesion_classifier):
    """No Classifier, no files, no lock: a network, a layer name and a batch; the same maps as through the
    Classifier and as by hand, and the network left as it was found."""
    from braintumor.visualize.explain import grad_cam

    model = TinyCNN()
    model.load_state_dict(lesion_classifier.model.state_dict())  # a network of its own, outside any Classifier
    model.train()
    pictures = [Image.fromarray(lesion_phantom(3000)[0]), Image.fromarray(make_phantom("notumor", SIZE, 3001))]
    inputs = torch.stack([lesion_classifier.preprocess(p.convert("RGB")) for p in pictures])
    hooks = hook_count(model)
    probabilities, maps = grad_cam(model, "layer4", inputs)
    assert model.training and hook_count(model) == hooks and all(p.requires_grad for p in model.parameters())
    assert probabilities.shape == (2, 2) and maps.shape == (2, SIZE, SIZE)
    indices = list(probabilities.argmax(axis=1))
    np.testing.assert_allclose(maps, reference_gradcam(model, inputs, indices), atol=1e-5)
    through_classifier = lesion_classifier.explain(pictures, method="gradcam", mirror=False)
    np.testing.assert_allclose(maps, np.stack([e.heatmap for e in through_classifier]), atol=1e-5)
    # Per-image targets: each row explains its own class.
    _, chosen = grad_cam(model, model.layer4, inputs, targets=[1, 0])
    np.testing.assert_allclose(chosen, reference_gradcam(model, inputs, [1, 0]), atol=1e-5)
    model.eval()


def test_grad_cam_names_a_missing_layer():
    from braintumor.visualize.explain import grad_cam

    with pytest.raises(ValueError, match="no layer 'layer9'.*features, layer4, head"):
        grad_cam(TinyCNN(), "layer9", torch.zeros(1, 3, SIZE, SIZE))


# ------------------------------------------------------------------------------ every method of explain_batch


def lesion_box_hit(heatmap: np.ndarray, mask: np.ndarray) -> bool:
    """The localisation benchmark's pointing game against the lesion's bounding box."""
    import importlib.util
    import sys
    from pathlib import Path

    if "localization" not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "benchmarks" / "localization.py"
        spec = importlib.util.spec_from_file_location("localization", path)
        sys.modules["localization"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["localization"])
    loc = sys.modules["localization"]
    ys, xs = np.nonzero(mask)
    size = mask.shape[0]
    box = loc.Box("phantom", "tumor", xs.min() / size, ys.min() / size, (xs.max() + 1) / size, (ys.max() + 1) / size)
    return loc.pointing_hit(heatmap, box)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_points_at_the_only_evidence(lesion_classifier, method):
    """A model whose only evidence for "tumor" is the lesion: every method's maximum lies in the lesion's box."""
    model = lesion_classifier.model
    phantoms = [lesion_phantom(seed) for seed in range(4000, 4006)]
    inputs = torch.stack([lesion_classifier.preprocess(Image.fromarray(image).convert("RGB"))
                          for image, _ in phantoms])
    hooks, flags = hook_count(model), [p.requires_grad for p in model.parameters()]
    model.train()
    layer = "layer4" if method in CAM_METHODS else None  # TinyCNN's one named block
    probabilities, maps = explain_batch(model, inputs, method, layer=layer, targets=[1] * len(phantoms))
    assert model.training and hook_count(model) == hooks and [p.requires_grad for p in model.parameters()] == flags
    model.eval()
    assert probabilities.shape == (6, 2) and maps.shape == (6, SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() == pytest.approx(1.0)
    hits = [lesion_box_hit(heat, mask) for heat, (_, mask) in zip(maps, phantoms)]
    assert all(hits), hits
    # Deterministic: the same batch gives the same maps (eval mode inside, no random state).
    np.testing.assert_allclose(explain_batch(model, inputs, method, layer=layer, targets=[1] * 6)[1], maps,
                               atol=1e-6)


def test_cam_methods_share_one_pass_and_match_captum(lesion_classifier):
    """explain_cam_batch gives each CAM method what explain_batch gives alone; Grad-CAM equals captum's
    LayerGradCam and HiResCAM equals Grad-CAM where the head averages the block (as a ResNet's layer4)."""
    from captum.attr import LayerGradCam

    model = lesion_classifier.model
    inputs = torch.stack([lesion_classifier.preprocess(Image.fromarray(lesion_phantom(s)[0]).convert("RGB"))
                          for s in (5000, 5001)])
    for mirror in (True, False):
        _, together = explain_cam_batch(model, inputs, CAM_METHODS, ["features.3", "layer4"], targets=[1, 0],
                                        mirror=mirror)
        for method in CAM_METHODS:
            for position, layer in enumerate(["features.3", "layer4"]):
                _, alone = explain_batch(model, inputs, method, layer=layer, targets=[1, 0], mirror=mirror)
                np.testing.assert_allclose(together[method, position], alone, atol=1e-6)
    reference = LayerGradCam(model, model.layer4).attribute(inputs, target=torch.tensor([1, 0]),
                                                            relu_attributions=False).detach()
    reference = F.interpolate(reference, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(together["gradcam", 1], normalize_maps(reference.relu()).numpy(), atol=1e-5)
    # A global-average-pool head: the gradient is the same at every position of layer4.
    from braintumor.models.network import build_model

    torch.manual_seed(0)
    resnet = build_model("resnet18", num_classes=3).eval()
    batch = torch.randn(2, 3, 64, 64)
    _, cams = explain_cam_batch(resnet, batch, ["gradcam", "hirescam"], ["layer4"], targets=[0, 2])
    np.testing.assert_allclose(cams["gradcam", 0], cams["hirescam", 0], atol=1e-5)


def test_unknown_method_and_layer_are_clear_errors():
    batch = torch.zeros(1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="unknown explanation method 'saliency'; choose one of: gradcam, "):
        explain_batch(TinyCNN(), batch, "saliency")
    with pytest.raises(ValueError, match="no layer 'layer9'.*features, layer4, head"):
        explain_batch(TinyCNN(), batch, "layercam", layer="layer9")
    with pytest.raises(ValueError, match="--layer applies to the CAM methods"):
        explain_batch(TinyCNN(), batch, "occlusion", layer="layer4")
    with pytest.raises(ValueError, match="no layer 'layer3'"):  # the default layer of Grad-CAM++
        explain_batch(TinyCNN(), batch, "gradcampp")
    with pytest.raises(ValueError, match="2 targets for 1 images"):
        explain_batch(TinyCNN(), batch, "gradcam", targets=[0, 1])
    assert DEFAULT_METHOD in METHODS and len(set(METHODS)) == len(METHODS)


def test_an_explanation_says_how_its_map_was_made(lesion_classifier):
    from braintumor.visualize.figures import gradcam_panel

    picture = Image.fromarray(lesion_phantom(2200)[0])  # (this phantom model's blocks: features, layer4, head)
    default = explain(lesion_classifier, picture, method="gradcam")
    assert (default.method, default.layer, default.mirror) == ("gradcam", "layer4", True)  # its default block
    assert default.setting == "Grad-CAM at layer4, averaged with the mirrored slice's map"
    chosen = explain(lesion_classifier, picture, method="gradcampp", layer="layer4", mirror=False)
    assert chosen.layer == "layer4" and chosen.setting == "Grad-CAM++ at layer4, single view (not mirror-averaged)"
    occlusion = explain(lesion_classifier, picture, method="occlusion")
    assert occlusion.layer is None and occlusion.setting == "Occlusion, averaged with the mirrored slice's map"
    panels = [np.asarray(gradcam_panel(e)) for e in (default, chosen)]
    assert panels[0].shape == panels[1].shape and not np.array_equal(panels[0][:60], panels[1][:60])  # the caption
