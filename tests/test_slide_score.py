"Slide-level scores: the connected regions and areas agree with scipy.ndimage on random tile grids, at stride 1 and 1/2."
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage


@pytest.mark.parametrize('stride', [96, 48])
def test_regions_and_areas_match_ndimage_on_random_grids(stride):
    from pcam_fastai.slide_score import slide_scores, tumour_regions
    rng = np.random.default_rng(stride)
    for _ in range(20):
        pos = rng.random((12, 15)) < 0.3  # tiles at or above the threshold on a 12 x 15 grid
        r, c = np.nonzero(pos)
        boxes = np.c_[c * stride, r * stride, np.full(len(r), 96)]
        # the same tiles painted on a pixel canvas of 1 px = 1 µm: ndimage's 8-connected regions and areas
        canvas = np.zeros((12 * stride + 96, 15 * stride + 96), bool)
        for x, y, s in boxes: canvas[y:y + s, x:x + s] = True
        labels, n = ndimage.label(canvas, structure=np.ones((3, 3)))
        areas = np.bincount(labels.ravel())[1:]
        assert len(tumour_regions(boxes)) == n
        tiles = pd.DataFrame(dict(x=boxes[:, 0], y=boxes[:, 1], width=96, probability=0.9))
        s = slide_scores(tiles, threshold=0.5, mpp=1.0)
        assert s['tumour_area_mm2'] == pytest.approx(canvas.sum() / 1e6)
        assert s['largest_region_mm2'] == pytest.approx((areas.max() if n else 0) / 1e6)
