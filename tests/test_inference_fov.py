"""Field-of-view detection and segmenting at the training images' FOV scale (labels aligned)."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastunet
from fastunet.data.synthetic import generate
from fastunet.inference import InferenceEngine
from fastunet.inference import fov as fov_mod
from fastunet.inference.fov import FovWarning, detect_fov, fov_scale, resize_logits


def disc_photo(height, width, diameter, centre=None, border=0, red=190, green=110):
    """A flat bright disc (the FOV) on a dark border, uint8 RGB."""
    cy, cx = centre or ((height - 1) / 2, (width - 1) / 2)
    yy, xx = np.mgrid[:height, :width]
    inside = np.hypot(yy - cy, xx - cx) < diameter / 2
    img = np.full((height, width, 3), border, np.uint8)
    img[inside] = (red, green, 60)
    return img


@pytest.mark.parametrize("index", range(4))
def test_detects_the_synthetic_images_fov_diameter(index):
    item = generate(0, "training", index)
    truth = max(item["fov"].sum(1).max(), item["fov"].sum(0).max())
    found = detect_fov(item["img"])
    assert found is not None and abs(found.diameter - truth) <= 0.015 * truth


@pytest.mark.parametrize("case", ["plain", "grey border + noise", "clipped top and bottom",
                                  "off centre", "large"])
def test_detects_discs_robustly(case):
    rng = np.random.default_rng(0)
    if case == "large":  # strided detection: the diameter within two strides
        img, truth, tol = disc_photo(2300, 3000, 2100), 2100, 6
    elif case == "clipped top and bottom":  # a camera that cuts the circle: its width counts
        img, truth, tol = disc_photo(500, 640, 600), 600, 2
    elif case == "off centre":
        img, truth, tol = disc_photo(600, 700, 420, centre=(330, 250)), 420, 2
    else:
        img, truth, tol = disc_photo(584, 565, 540), 540, 2
    if case == "grey border + noise":
        img = img.astype(np.int16) + rng.integers(-12, 13, img.shape)
        img[img[..., 0] < 40] += 25  # a grey (not black) border
        img[20:40, 30:200] = 255  # the camera's text in a corner
        img = np.clip(img, 0, 255).astype(np.uint8)
    found = detect_fov(img)
    assert found is not None and abs(found.diameter - truth) <= tol, (found, truth)


@pytest.mark.parametrize("image", [
    np.full((300, 300, 3), 128, np.uint8),  # flat
    np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8),  # noise
    disc_photo(300, 300, 1000),  # a photo cropped inside its FOV: no border to measure
    disc_photo(300, 300, 80),  # a small bright spot, not a FOV
])
def test_no_fov_without_a_bright_disc_on_a_dark_border(image):
    assert detect_fov(image) is None and fov_scale(image, 540) is None


def test_scale_is_one_within_the_tolerance():
    assert fov_scale(disc_photo(584, 565, 540), 550) == 1.0
    assert fov_scale(disc_photo(584, 565, 540), 270) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("sizes", [((10, 13), (27, 31)), ((30, 20), (11, 9)), ((7, 7), (7, 7)),
                                   ((1, 5), (4, 12))])
def test_logits_resize_like_interpolate_at_pixel_centres(sizes, monkeypatch):
    (h, w), (height, width) = sizes
    monkeypatch.setattr(fov_mod, "BAND_ROWS", 4)  # several bands
    logits = torch.randn(3, h, w, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(logits[None], size=(height, width), mode="bilinear",
                        align_corners=False)[0]
    labels, probs = resize_logits(logits, height, width, probs_class=2)
    torch.testing.assert_close(probs, ref.softmax(0)[2], rtol=1e-5, atol=1e-6)
    assert torch.equal(labels, ref.argmax(0).to(torch.uint8))


def dark_pixel_predictor(fov_diameter):
    """A Predictor whose 'model' calls a pixel vessel where its green value is below 70 (midway
    between the test photo's line, 20, and its background, 120): whatever the rescaling does to
    a dark line, the labels show where it went."""
    cfg = fastunet.get_config("synthetic")
    predictor = fastunet.Predictor(cfg, device="cpu", fov_diameter=fov_diameter)
    green_mean, green_std = cfg["data"]["mean"][1], cfg["data"]["std"][1]
    cut = (70 - green_mean) / green_std

    def window_fn(x):  # normalised (B, 3, h, w) -> logits (B, 2, h, w)
        return torch.stack([torch.zeros_like(x[:, 1]), cut - x[:, 1]], 1)

    predictor.engine = InferenceEngine(window_fn, "whole", size_divisor=16)
    return predictor


@pytest.mark.parametrize("scale_to", [400, 1500])  # photo shrunk 2.5x / enlarged 1.5x
def test_a_thin_dark_line_comes_out_where_it_was(scale_to):
    photo = disc_photo(1000, 1000, 1000 * 0.95, red=200, green=120)
    photo[:, 401:404, 1] = 20  # a vertical line, 3 pixels wide: centre 402
    photo[611:614, :, 1] = 20  # a horizontal one: centre 612
    labels = dark_pixel_predictor(scale_to).predict(photo)
    assert labels.shape == photo.shape[:2]
    columns = labels[300:500].astype(bool)  # rows away from the horizontal line
    rows = labels[:, 300:380].astype(bool)  # columns away from the vertical line
    inside = slice(200, 800)
    for mask, where in ((columns[:, inside], 402), (rows[inside].T, 612)):
        index = np.arange(mask.shape[1]) + inside.start
        assert mask.any(1).all()  # the line is found on every row
        centre = (mask * index).sum(1) / mask.sum(1)
        # a half-pixel shift (cv2's nearest resize: floor(x * src / dst)) is 0.75 pixels here
        assert np.abs(centre - where).max() <= 0.25, (centre.min(), centre.max())
    # nothing else is dark
    assert not labels[300:500, 450:550].any()


def test_without_a_fov_the_photo_is_segmented_as_it_is_with_a_warning():
    predictor = dark_pixel_predictor(400)
    photo = np.full((120, 130, 3), 120, np.uint8)
    photo[:, 50:53, 1] = 20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = predictor.predict(photo)
    assert [w.category for w in caught] == [FovWarning]
    assert "no field of view found" in str(caught[0].message)
    expected = dark_pixel_predictor(None).predict(photo)
    assert np.array_equal(labels, expected) and labels[:, 50:53].all()


@pytest.mark.parametrize("bad", [0, -3, "big", True, 1e9])
def test_bad_fov_diameter(bad):
    with pytest.raises(ValueError, match="fov_diameter"):
        fastunet.Predictor("synthetic", device="cpu", fov_diameter=bad)
