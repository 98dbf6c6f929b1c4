"""Every pad, window grid and crop-back of the inference engine keeps predictions on the input's
pixel grid: with a per-pixel "model" (vessel = dark green), the labels agree with the image's
dark pixels best at zero shift, in every mode, with flips, Gaussian weights and streaming."""
import numpy as np
import pytest
import torch

from fastunet.data.transforms import normalize
from fastunet.inference import InferenceEngine

from alignkit import BRIGHT, DARK, aligned, line_image


def dark_pixel_logits(windows):
    """Per-pixel logits (B, 2, h, w): vessel where the normalised green channel is below the
    midpoint of line_image's two levels. It looks at no neighbour, so a prediction lands where
    its pixel is only if every pad, window and crop-back is placed exactly."""
    from fastunet.data.transforms import MEAN, STD

    mid = ((DARK + BRIGHT) / 2 - MEAN[1]) / STD[1]
    g = windows[:, 1:2] - mid
    return torch.cat([g, -g], dim=1)


CASES = {
    "slide": dict(mode="slide", crop_size=64, stride=42),
    "slide, image smaller than the window": dict(mode="slide", crop_size=64, stride=42),
    "slide, gaussian, flips": dict(mode="slide", crop_size=64, stride=42, gaussian=True,
                                   tta="hv"),
    "slide, streamed in bands": dict(mode="slide", crop_size=32, stride=21,
                                     max_buffer_bytes=64 << 10),
    "overlap-tile": dict(mode="overlap-tile", tile_size=64, margin=16),
    "overlap-tile, flips": dict(mode="overlap-tile", tile_size=64, margin=16, tta="h"),
    "whole": dict(mode="whole"),
    "whole, flips": dict(mode="whole", tta="v"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_predictions_stay_on_the_input_pixel_grid(case):
    rng = np.random.default_rng(list(CASES).index(case))
    engine = InferenceEngine(dark_pixel_logits, **CASES[case])
    lo, hi = (35, 60) if "smaller" in case else (70, 150)
    for _ in range(4):
        h, w = (int(v) for v in rng.integers(lo, hi, 2))
        img, label = line_image(h, w, rng)
        labels = engine(normalize(img)[None], output="labels")[0].numpy()
        dark = img[..., 1] < (DARK + BRIGHT) / 2
        assert labels.shape == (h, w)
        assert aligned(labels, dark), case
        assert np.array_equal(labels, dark.astype(np.uint8)), case
        if "streamed" in case:
            schedule = engine.last_schedule
            assert schedule.streamed and schedule.band_rows < schedule.window_rows
