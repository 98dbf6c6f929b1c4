"""Predictor on a saved tiny checkpoint (the synthetic config: UNet-S5-D16 at 1/4 width)."""
import warnings

import numpy as np
import pytest
import torch

import fastunet
from fastunet.data.io import ImageConversionWarning, write_png
from fastunet.inference import Predictor
from fastunet.ops.tile_reference import slide_inference

CONFIG = "synthetic"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = fastunet.build_segmentor(fastunet.get_config(CONFIG))
    # non-trivial BN statistics, so that a checkpoint that failed to load would show
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"meta": {"config": CONFIG}, "state_dict": model.state_dict()}, path)
    return path, model.eval()


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 110, 3), dtype=np.uint8)
    img[40:45] = 250  # a bright "vessel"
    return img


def reference_logits(model, rgb):
    cfg = fastunet.get_config(CONFIG)
    mean = torch.tensor(cfg["data"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["data"]["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() - mean) / std
    test_cfg = cfg["model"]["test_cfg"]
    return slide_inference(model.encode_decode, x, test_cfg["crop_size"], test_cfg["stride"])


def test_predict_matches_the_reference_slide(checkpoint, image):
    path, model = checkpoint
    predictor = Predictor(CONFIG, path, device="cpu", precision="fp32", fuse=False,
                          channels_last=False)
    labels, probs = predictor.predict(image, return_probs=True)
    logits = reference_logits(model, image)
    assert labels.dtype == np.uint8 and labels.shape == image.shape[:2]
    assert probs.dtype == np.float32 and probs.shape == image.shape[:2]
    expected = logits.softmax(1)[0, 1].numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
    sure = np.abs(expected - 0.5) > 1e-4
    assert np.array_equal(labels[sure], logits.argmax(1)[0].numpy()[sure])
    assert np.array_equal(predictor.predict(image), labels)


def test_fused_channels_last_default_agrees(checkpoint, image):
    path, model = checkpoint
    probs = Predictor(CONFIG, path, device="cpu", precision="fp32").predict(
        image, return_probs=True)[1]
    expected = reference_logits(model, image).softmax(1)[0, 1].numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-3, atol=1e-4)


def test_checkpoint_is_loaded(checkpoint, image):
    path, model = checkpoint
    loaded = Predictor(CONFIG, path, device="cpu", fuse=False).model
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key].cpu(), value), key
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Predictor(CONFIG, path.parent / "missing.pth", device="cpu")


def test_gray_rgba_and_16_bit_are_converted_with_warnings(checkpoint, image):
    predictor = Predictor(CONFIG, checkpoint[0], device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor.predict(image)  # colour: no warning
    gray = image[..., 1]
    with pytest.warns(ImageConversionWarning, match="grayscale image.*colour"):
        got_gray = predictor.predict(gray)  # expanded to RGB; the model expects colour
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per Predictor, not per image
        assert np.array_equal(got_gray, predictor.predict(np.repeat(gray[..., None], 3, 2)))
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 128, np.uint8)], axis=2)
    with pytest.warns(ImageConversionWarning, match="alpha"):
        assert np.array_equal(predictor.predict(rgba), predictor.predict(image))
    wide = image.astype(np.uint16) * 257  # 16-bit with the same 8-bit values
    with pytest.warns(ImageConversionWarning, match="16-bit"):
        assert np.array_equal(predictor.predict(wide), predictor.predict(image))
    with pytest.raises(ValueError, match="shape"):
        predictor.predict(np.zeros((4, 4, 2), np.uint8))


def test_predict_many_paths_and_arrays_in_order(checkpoint, image, tmp_path):
    predictor = Predictor(CONFIG, checkpoint[0], device="cpu")
    other = np.ascontiguousarray(image[::-1])
    write_png(tmp_path / "a.png", image)
    items = [tmp_path / "a.png", other, str(tmp_path / "a.png")]
    results = list(predictor.predict_many(items))
    expected = [predictor.predict(image), predictor.predict(other), predictor.predict(image)]
    assert all(np.array_equal(r, e) for r, e in zip(results, expected))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    many = predictor.predict_many([tmp_path / "a.png", tmp_path / "bad.png"])
    assert np.array_equal(next(many), expected[0])
    with pytest.raises(ValueError, match="bad.png"):
        next(many)


@pytest.mark.parametrize("mode", ["whole", "overlap-tile"])
def test_other_modes(checkpoint, image, mode):
    predictor = Predictor(CONFIG, checkpoint[0], device="cpu", mode=mode, tile_size=64,
                          margin=8)
    labels = predictor.predict(image)
    assert labels.shape == image.shape[:2] and set(np.unique(labels)) <= {0, 1}


def test_auto_precision_is_bf16_where_the_cpu_has_it(checkpoint, image, monkeypatch):
    from fastunet.inference import engine

    auto = Predictor(CONFIG, checkpoint[0], device="cpu")
    assert auto.precision == ("bf16" if engine.cpu_has_native_bf16() else "fp32")
    assert auto.engine.precision == auto.precision
    exact = Predictor(CONFIG, checkpoint[0], device="cpu", precision="fp32")
    low = Predictor(CONFIG, checkpoint[0], device="cpu", precision="bf16")
    assert (low.predict(image) == exact.predict(image)).mean() > 0.98  # near-ties may flip
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    assert Predictor(CONFIG, checkpoint[0], device="cpu").precision == "fp32"
    assert engine.resolve_precision("auto", "cuda") == "fp32"  # CUDA keeps fp32 by default


def test_the_config_comes_from_the_checkpoint(checkpoint, image, tmp_path):
    path, model = checkpoint
    expected = Predictor(CONFIG, path, device="cpu").predict(image)
    from_file = Predictor(checkpoint=path, device="cpu")
    assert from_file.config == fastunet.get_config(CONFIG)
    assert np.array_equal(from_file.predict(image), expected)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "bare.pth")
    with pytest.raises(ValueError, match=r"holds no config.*config="):
        Predictor(checkpoint=tmp_path / "bare.pth", device="cpu")
    with pytest.raises(ValueError, match="give a checkpoint"):
        Predictor(device="cpu")


def test_bad_arguments(checkpoint):
    with pytest.raises(ValueError, match="precision"):
        Predictor(CONFIG, checkpoint[0], device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="mode"):
        Predictor(CONFIG, checkpoint[0], device="cpu", mode="tiles")


@pytest.mark.cuda
def test_cuda_bf16_agrees_with_cpu(checkpoint, image):
    cpu = Predictor(CONFIG, checkpoint[0], device="cpu").predict(image)
    gpu = Predictor(CONFIG, checkpoint[0], device="cuda", precision="bf16")
    for _ in range(2):  # the second call replays a CUDA graph
        labels = gpu.predict(image)
        assert labels.shape == cpu.shape and (labels == cpu).mean() > 0.98
