"""The evaluation overlay: colours per outcome and the legend drawn into the picture."""
import numpy as np

from fastunet.training.evaluation import OVERLAY_COLOURS, error_overlay


def test_overlay_colours_each_outcome_and_carries_its_legend():
    rgb = np.full((40, 50, 3), 200, np.uint8)
    label = np.zeros((40, 50), np.uint8)
    pred = np.zeros((40, 50), np.uint8)
    label[5, 5] = pred[5, 5] = 1          # found
    label[6, 6] = 1                       # missed
    pred[7, 7] = 1                        # false
    label[8, 8], pred[8, 8] = 255, 1      # ignored: not coloured
    img = error_overlay(rgb, pred, label)
    h, w = rgb.shape[:2]
    right = img[:h, w + 6:2 * w + 6]
    (_, found), (_, missed), (_, false) = OVERLAY_COLOURS
    assert tuple(right[5, 5]) == found and tuple(right[6, 6]) == missed
    assert tuple(right[7, 7]) == false and tuple(right[8, 8]) == (110, 110, 110)
    assert np.array_equal(img[:h, :w], rgb)
    # the legend strip below holds a swatch of each colour, and text
    legend = img[h:]
    assert legend.shape[0] >= 16 and img.shape[1] >= 2 * w + 6
    for _, colour in OVERLAY_COLOURS:
        assert np.all(legend == colour, axis=-1).sum() >= 50
    assert ((legend < 100).all(axis=-1)).sum() > 50  # dark text pixels
    # beside a big image the legend does not widen it
    assert error_overlay(np.zeros((300, 400, 3), np.uint8), np.zeros((300, 400)),
                         np.zeros((300, 400))).shape[1] == 806
