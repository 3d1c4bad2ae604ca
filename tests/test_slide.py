"Whole-slide heatmaps on slides built from real PCam tiles: agreement with patch predictions, the outputs, resuming, crashes, bad files, and a 50,000 x 50,000 px slide in bounded memory."
import json, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import ROOT
from pcam_fastai.core import PCamError, UsageError
from pcam_fastai.heatmap import slide_heatmap
from pcam_fastai.slide import SlideError, SlideReader, open_slide, register_slide_reader, slide_readers, unregister_slide_reader
from pcam_fastai.testslides import make_mosaic_slide, write_pyramid_tiff

FIXTURE = ROOT/'tests'/'data'/'real-pcam-100'
SHARED = ROOT.parent/'shared'/'real-pcam'


def read_tiles(root, n=None):
    "Real PCam tiles of a Kaggle-layout folder: (N, 96, 96, 3) uint8 and their labels"
    labels = pd.read_csv(root/'train_labels.csv')[:n]
    return np.stack([np.asarray(Image.open(root/'train'/f'{i}.tif').convert('RGB')) for i in labels.id]), labels.label.to_numpy()


@pytest.fixture(scope='module')
def real(): return read_tiles(FIXTURE)


@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
    "A tiny run on the fixture tiles (the cpu-demo recipe, 2 epochs), exported for one view (8x faster than the run's TTA)"
    from pcam_fastai.cache import build_cache
    from pcam_fastai.train import train_pcam
    from pcam_fastai.bundling import export_bundle
    from pcam_fastai.export import load_bundle
    tmp = tmp_path_factory.mktemp('slide-bundle')
    cache = build_cache(FIXTURE, tmp/'cache', show_progress=False)
    train_pcam(cache, run_dir=tmp/'run', preset='cpu-demo', epochs_unfrozen=2, lr_find_iters=5, num_workers=0)
    return load_bundle(export_bundle(tmp/'run', bench_patches=0, onnx=False, tta=False))


class DarknessBundle:
    "A stand-in for a bundle: p(tumour) is how dark a patch is; with `fail_after`, predict raises after that many batches"
    size, classes, positive, threshold, threshold_source, path = 96, ['normal', 'tumour'], 'tumour', 0.35, 'a stand-in', Path('darkness')
    def __init__(self, fail_after=None): self.meta, self.calls, self.fail_after = {}, 0, fail_after
    def predict(self, x, bs=64):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after: raise RuntimeError('the model crashed')
        p = 1 - np.asarray(x, np.float32).mean((1, 2, 3)) / 255
        return np.stack([1 - p, p], 1)


def probabilities_at(folder, boxes):
    "tiles.csv's probabilities of the tiles at the placed patches' corners"
    tiles = pd.read_csv(folder/'tiles.csv').set_index(['x', 'y'])
    return tiles.reindex([tuple(b) for b in boxes[:, :2]])['probability'].to_numpy()  # NaN: not classified (no tissue: not listed)


# ---------------------------------------------------------------- quick: a stand-in model

def test_bad_files_and_settings_are_clear_errors(tmp_path, real):
    x, y = real
    (tmp_path/'notes.svs').write_text('a text file, not a slide')
    with pytest.raises(SlideError, match='not a whole-slide image OpenSlide can read'): open_slide(tmp_path/'notes.svs')
    with pytest.raises(SlideError, match='does not exist'): open_slide(tmp_path/'missing.svs')
    with pytest.raises(SlideError, match='is a folder'): open_slide(tmp_path)
    no_mpp = make_mosaic_slide(tmp_path/'no-mpp.tif', x[:4], y[:4], cols=2, mpp=None).path
    with pytest.raises(SlideError, match=r'no openslide.mpp-x/mpp-y\); pass it .*mpp=0.25 in Python, --mpp 0.25 on the command line'): open_slide(no_mpp)
    tiny = write_pyramid_tiff(tmp_path/'tiny.tif', 60, 300)
    truncated = tmp_path/'truncated.tif'
    truncated.write_bytes(make_mosaic_slide(tmp_path/'whole.tif', x[:4], y[:4], cols=2).path.read_bytes()[:5000])
    out = tmp_path/'out'
    for slide, message in [(tmp_path/'notes.svs', 'not a whole-slide image'), (no_mpp, 'pass it'), (tiny, 'smaller than one model tile'),
                           (truncated, 'OpenSlide')]:
        with pytest.raises(SlideError, match=message) as e: slide_heatmap(slide, DarknessBundle(), out)
        assert str(slide) in str(e.value)
    good = make_mosaic_slide(tmp_path/'good.tif', x[:4], y[:4], cols=2).path
    for kw, message in [(dict(stride=0), 'from 0.125 to 1'), (dict(min_tissue=2), 'from 0 to 1'), (dict(bs=0), 'positive integer'),
                        (dict(mpp='40x'), 'number of µm per pixel'), (dict(mpp=0), 'between 0.01 and 100'), (dict(tissue_threshold=300), '0 to 255')]:
        with pytest.raises(UsageError, match=message): slide_heatmap(good, DarknessBundle(), out, **kw)
    (tmp_path/'sub').mkdir(); (tmp_path/'sub'/'good.tif').write_bytes(good.read_bytes())
    with pytest.raises(UsageError, match='would both write to'): slide_heatmap([good, tmp_path/'sub'/'good.tif'], DarknessBundle(), out)
    # a bad slide late in the list fails before the first one is processed
    with pytest.raises(SlideError): slide_heatmap([good, tiny], DarknessBundle(), out)
    assert not out.exists()
    assert issubclass(SlideError, PCamError)


def test_crash_mid_slide_leaves_no_summary(tmp_path, real):
    x, y = real
    slide = make_mosaic_slide(tmp_path/'m.tif', x[:40], y[:40], cols=8).path
    out = tmp_path/'out'
    with pytest.raises(RuntimeError, match='the model crashed'): slide_heatmap(slide, DarknessBundle(fail_after=2), out, bs=8, show_progress=False)
    assert not (out/'m'/'slide.json').exists()
    res = slide_heatmap(slide, DarknessBundle(), out, bs=8)[0]  # with its progress bar; not taken for done
    assert res['complete'] and (out/'m'/'slide.json').exists()
    # redoing a finished slide: the old summary goes first, so a crash leaves nothing that claims to be complete
    with pytest.raises(RuntimeError): slide_heatmap(slide, DarknessBundle(fail_after=1), out, bs=8, force=True, show_progress=False)
    assert not (out/'m'/'slide.json').exists()
    assert not list((out/'m').glob('*.part')) and not list((out/'m').glob('*.tmp'))


def test_an_unreadable_region_is_named_skipped_and_counted(tmp_path, real):
    x, y = real
    m = make_mosaic_slide(tmp_path/'m.tif', x[:16], y[:16], cols=4)
    with tifffile.TiffFile(m.path) as tif:  # damage the level-0 TIFF tile x 256-512, y 0-256 (the thumbnail is read from a deeper level)
        offset, count = tif.pages[0].dataoffsets[1], tif.pages[0].databytecounts[1]  # row 0, column 1 of the 3 x 3 TIFF tiles
    with open(m.path, 'r+b') as f: f.seek(offset + count // 3); f.write(b'\x00' * (count // 3))
    with pytest.warns(UserWarning, match=r'could not be read \(the slide reader failed on them\); they were skipped and counted as unreadable'):
        res = slide_heatmap(m.path, DarknessBundle(), tmp_path/'out', tissue_threshold=20, min_tissue=0.05, show_progress=False)[0]
    hit = [(bx < 512 and bx + 96 > 256 and by < 256) for bx, by, _, _ in m.boxes]  # placed tiles on the damaged TIFF tile
    assert res['tiles_unreadable'] == sum(hit) > 0
    assert res['tiles_classified'] == 16 - sum(hit) and res['complete']
    assert res['status'] == f"partial: {sum(hit)} of 16 tissue tiles could not be read"
    tiles = pd.read_csv(tmp_path/'out'/'m'/'tiles.csv')
    assert (tiles.status == 'unreadable').sum() == sum(hit) and tiles[tiles.status == 'unreadable'].probability.isna().all()


def test_a_tiff_openslide_does_not_read_goes_to_tiffslide(tmp_path, real):
    "A striped TIFF (OpenSlide reads only tiled ones): auto falls back to tiffslide, and the heatmap finds the placed patches"
    pytest.importorskip('tiffslide', reason='tiffslide is not installed (pip install tiffslide; it is in the dev extra)')
    x, y = real
    m = make_mosaic_slide(tmp_path/'tiled.tif', x[:12], y[:12], cols=4)
    with open_slide(m.path) as s: canvas = s.read(0, 0, 0, *s.dimensions)
    tifffile.imwrite(tmp_path/'striped.tif', canvas, photometric='rgb', resolution=(1e4 / 0.972, 1e4 / 0.972), resolutionunit='CENTIMETER')
    with pytest.raises(SlideError, match="it is a TIFF, which tiffslide may read: reader='tiffslide'"): open_slide(tmp_path/'striped.tif', reader='openslide')
    kw = dict(tissue_threshold=20, min_tissue=0.05, show_progress=False)
    res = slide_heatmap(tmp_path/'striped.tif', DarknessBundle(), tmp_path/'out', **kw)[0]
    ref = slide_heatmap(m.path, DarknessBundle(), tmp_path/'ref', **kw)[0]
    assert (res['reader'], ref['reader']) == ('tiffslide', 'openslide')
    assert res['tiles_classified'] == ref['tiles_classified'] == 12 and res['tumour_area_mm2'] == ref['tumour_area_mm2']
    assert np.allclose(probabilities_at(tmp_path/'out'/'striped', m.boxes), probabilities_at(tmp_path/'ref'/'tiled', m.boxes))
    with pytest.raises(UsageError, match='applies to a bundle folder'): slide_heatmap(m.path, DarknessBundle(), tmp_path/'x', device='cuda')


class PNGHandle:
    "A PNG held in memory, shaped like an OpenSlide handle: one level, its resolution in its properties"
    def __init__(self, path, mpp):
        self.rgb = np.asarray(Image.open(path).convert('RGB'))
        self.properties = {'toy.mpp-x': str(mpp), 'toy.mpp-y': str(mpp)}
        self.dimensions = self.rgb.shape[1], self.rgb.shape[0]
        self.level_dimensions, self.level_downsamples = (self.dimensions,), (1.0,)
    def close(self): pass


class ToyReader(SlideReader):
    "A slide reader that serves a PNG as a one-level slide at PCam's resolution"
    name = 'toy'
    def can_open(self, path): return Path(path).suffix.lower() == '.png'
    def open(self, path, tried=()): return PNGHandle(path, 0.972)
    def read_inside(self, handle, x, y, level, w, h): return handle.rgb[y:y + h, x:x + w]


def test_a_registered_reader_serves_slides(tmp_path, real):
    "A toy reader registered by name: open_slide and slide_heatmap read through it, 'auto' reaches it, and it goes away again"
    x, y = real
    m = make_mosaic_slide(tmp_path/'m.tif', x[:12], y[:12], cols=4)
    with open_slide(m.path) as s: Image.fromarray(s.read(0, 0, 0, *s.dimensions)).save(tmp_path/'mosaic.png')  # the mosaic as a PNG
    assert register_slide_reader(ToyReader) is ToyReader
    try:
        assert slide_readers() == ('auto', 'openslide', 'tiffslide', 'toy')
        with open_slide(tmp_path/'mosaic.png', reader='toy') as s:
            assert (s.reader, s.dimensions, s.mpp, s.mpp_source) == ('toy', (576, 480), 0.972, 'toy.mpp-x/mpp-y')
            assert (s.read(96, 96, 0, 96, 96) == x[0]).all()  # the first placed patch
            assert (s.read(560, 0, 0, 32, 8)[:, 16:] == 255).all()  # beyond the PNG: the background colour
        with open_slide(tmp_path/'mosaic.png') as s: assert s.reader == 'toy'  # auto: OpenSlide turns a PNG down, tiffslide does not try it
        res = slide_heatmap(tmp_path/'mosaic.png', DarknessBundle(), tmp_path/'out', reader='toy', tissue_threshold=20, min_tissue=0.05,
                            show_progress=False)[0]
        assert (res['reader'], res['tiles_classified']) == ('toy', 12)
        assert np.allclose(probabilities_at(tmp_path/'out'/'mosaic', m.boxes), DarknessBundle().predict(x[:12])[:, 1], atol=1e-6)
    finally: unregister_slide_reader('toy')
    assert 'toy' not in slide_readers()
    with pytest.raises(UsageError, match="reader must be one of auto, openslide, tiffslide, not 'toy'"): open_slide(tmp_path/'mosaic.png', reader='toy')
    with pytest.raises(SlideError, match='not a whole-slide image OpenSlide can read'): open_slide(tmp_path/'mosaic.png')
    with pytest.raises(UsageError, match='takes a subclass of SlideReader'): register_slide_reader(PNGHandle)
    with pytest.raises(UsageError, match="other than 'auto'"): register_slide_reader(type('Auto', (ToyReader,), {'name': 'auto'}))


def write_levels(dest, levels, mpp):
    "A tiled pyramidal TIFF from the given level arrays (level 0 first), whatever they hold: damaged pyramids on purpose"
    with tifffile.TiffWriter(dest) as tif:
        for i, a in enumerate(levels):
            h, w = a.shape[:2]
            tif.write(a, tile=(64, 64), photometric='rgb', compression='zlib', subfiletype=1 if i else 0, metadata=None,
                      resolution=(1e4 / (mpp * levels[0].shape[1] / w), 1e4 / (mpp * levels[0].shape[0] / h)), resolutionunit='CENTIMETER')
    return dest


def test_damaged_pyramid_levels_are_skipped(tmp_path, real):
    "A blank level or one of the wrong shape is found, named, and finer levels are read: the same tiles as an intact pyramid"
    x, y = real
    canvas = np.full((1536, 2048, 3), 240, np.uint8)  # 4x PCam's resolution (0.243 µm/px): tiles of 384 px, read from level 2
    for i in range(12):
        r, c = divmod(i, 4)
        canvas[r * 384:(r + 1) * 384, (c + 1) * 384:(c + 2) * 384] = np.repeat(np.repeat(x[i], 4, 0), 4, 1)
    levels = [canvas] + [np.asarray(Image.fromarray(canvas).reduce(k)) for k in (2, 4, 8)]
    kw = dict(tissue_threshold=20, min_tissue=0.05, show_progress=False)
    good = slide_heatmap(write_levels(tmp_path/'good.tif', levels, 0.243), DarknessBundle(), tmp_path/'out', **kw)[0]
    assert (good['read_level'], good['damaged_levels'], good['tiles_classified']) == (2, {}, 12)
    blank = [levels[0], levels[1], np.full_like(levels[2], 240), np.full_like(levels[3], 240)]  # levels 2 and 3 lost their tissue
    with pytest.warns(UserWarning, match='pyramid level 3 is damaged'):
        res = slide_heatmap(write_levels(tmp_path/'blank.tif', blank, 0.243), DarknessBundle(), tmp_path/'out', **kw)[0]
    assert res['read_level'] == 1 and sorted(res['damaged_levels']) == ['2', '3'] and 'colours differ' in res['damaged_levels']['2']
    assert res['tiles_classified'] == 12 and abs(res['tumour_area_mm2'] - good['tumour_area_mm2']) < 1e-9
    squashed = levels[:2] + [np.asarray(Image.fromarray(levels[2]).resize((512, 192)))]  # level 2 of the wrong aspect ratio
    with pytest.warns(UserWarning, match='pyramid level 2 is damaged'):
        res = slide_heatmap(write_levels(tmp_path/'squashed.tif', squashed, 0.243), DarknessBundle(), tmp_path/'out', **kw)[0]
    assert res['read_level'] == 1 and 'not level 0' in res['damaged_levels']['2'] and res['tiles_classified'] == 12


def test_a_second_run_into_the_same_folder_stops(tmp_path, real):
    "Two slide runs into one folder: the second stops at once with a message, while the first holds its lock"
    import fcntl
    x, y = real
    m = make_mosaic_slide(tmp_path/'m.tif', x[:4], y[:4], cols=2)
    (tmp_path/'out'/'m').mkdir(parents=True)
    with open(tmp_path/'out'/'m'/'.slide.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running slide_heatmap holds
        with pytest.raises(UsageError, match='is being written by another slide run now'): slide_heatmap(m.path, DarknessBundle(), tmp_path/'out')
    assert slide_heatmap(m.path, DarknessBundle(), tmp_path/'out', show_progress=False)[0]['complete']


# ---------------------------------------------------------------- a trained model

@pytest.mark.slow  # trains a tiny model (the module's fixture)
def test_mosaic_tiles_are_the_patches(tmp_path, real, bundle, capsys):
    x, y = real
    m = make_mosaic_slide(tmp_path/'mosaic.tif', x, y, cols=10)  # 10 x 10 real tiles inside a margin of one tile: 44 glass cells
    out = tmp_path/'out'
    # a fixed saturation threshold: the fixture has a few tiles of fat, which Otsu's would (rightly) call mostly glass
    res = slide_heatmap(m.path, bundle, out, tissue_threshold=20, min_tissue=0.05, show_progress=False)[0]
    folder = out/'mosaic'
    p_slide, p_patch = probabilities_at(folder, m.boxes), bundle.predict(x)[:, 1]
    auc_slide, auc_patch = roc_auc_score(y, p_slide), roc_auc_score(y, p_patch)
    with capsys.disabled(): print(f'\nmosaic: max |slide - patch| = {np.abs(p_slide - p_patch).max():.2g}, AUC slide {auc_slide:.4f} patches {auc_patch:.4f}, '
                                  f"{res['tiles_per_second']} tiles/s, {res['seconds']}")
    assert np.abs(p_slide - p_patch).max() < 1e-4 and abs(auc_slide - auc_patch) < 0.01
    assert (res['tiles_total'], res['tiles_classified'], res['tiles_background'], res['tiles_unreadable']) == (144, 100, 44, 0)
    tiles = pd.read_csv(folder/'tiles.csv')
    assert set(map(tuple, tiles[tiles.status == 'classified'][['x', 'y']].to_numpy())) == set(map(tuple, m.boxes[:, :2]))
    above = p_slide >= bundle.threshold
    assert res['threshold'] == bundle.threshold and res['tiles_tumour'] == above.sum()
    with open_slide(m.path) as s: mpp = s.mpp
    assert res['tumour_area_mm2'] == pytest.approx(above.sum() * (96 * mpp) ** 2 / 1e6, rel=1e-9)
    assert res['max_probability'] == pytest.approx(p_slide.max(), abs=1e-6)
    geo = json.loads((folder/'tumour.geojson').read_text())
    assert geo['type'] == 'FeatureCollection' and len(geo['features']) == above.sum()
    boxes = {tuple(b[:2]) for b in m.boxes[above]}
    for f in geo['features']:
        ring = f['geometry']['coordinates'][0]
        assert f['geometry']['type'] == 'Polygon' and ring[0] == ring[-1] and tuple(ring[0]) in boxes and ring[2][0] - ring[0][0] == 96
        assert f['properties']['objectType'] == 'annotation' and f['properties']['classification']['name'] == 'Tumor'
        assert f['properties']['probability'] >= bundle.threshold
    with Image.open(folder/'heatmap.png') as im: im.verify()
    summary = json.loads((folder/'slide.json').read_text())
    assert summary == json.loads(json.dumps(res)) and summary['complete']
    # done: skipped, nothing rewritten
    stamp = (folder/'slide.json').stat().st_mtime_ns
    capsys.readouterr()
    assert slide_heatmap(m.path, bundle, out, tissue_threshold=20, min_tissue=0.05)[0] == summary
    assert 'done already' in capsys.readouterr().out and (folder/'slide.json').stat().st_mtime_ns == stamp
    # the defaults: Otsu's threshold (within its bounds) and min_tissue 0.1 skip the glass and a few tiles of fat, nothing else
    res = slide_heatmap(m.path, DarknessBundle(), tmp_path/'defaults', show_progress=False)[0]  # the model is beside the point here
    tiles = pd.read_csv(tmp_path/'defaults'/'mosaic'/'tiles.csv').set_index(['x', 'y'])
    placed = tiles.reindex([tuple(b[:2]) for b in m.boxes])
    skipped = placed.status.fillna('background') != 'classified'
    assert res['tiles_background'] == 44 + skipped.sum() and skipped.sum() <= 10
    assert (placed.tissue_fraction.fillna(0)[skipped.to_numpy()] < res['min_tissue']).all()


@pytest.mark.slow  # trains a tiny model (the module's fixture)
def test_a_finer_scan_is_read_at_the_model_resolution(tmp_path, real, bundle):
    x, y = real
    m = make_mosaic_slide(tmp_path/'fine.tif', x[:20], y[:20], cols=5, upscale=2)  # 0.486 µm/px: tiles of 192 px, read from level 1
    res = slide_heatmap(m.path, bundle, tmp_path/'out', tissue_threshold=20, min_tissue=0.05, show_progress=False)[0]
    assert (res['tile'], res['read_level'], res['level_tile']) == (192, 1, 96)
    assert np.abs(probabilities_at(tmp_path/'out'/'fine', m.boxes) - bundle.predict(x[:20])[:, 1]).max() < 1e-4
    # half-overlapping tiles: the tumour area counts each pixel once (checked here on a level-0 canvas; the model is beside the point)
    res = slide_heatmap(m.path, DarknessBundle(), tmp_path/'half', stride=0.5, tissue_threshold=20, min_tissue=0.05, show_progress=False)[0]
    tiles = pd.read_csv(tmp_path/'half'/'fine'/'tiles.csv')
    hot = tiles[tiles.probability >= res['threshold']]
    canvas = np.zeros((res['height'], res['width']), bool)
    for tx, ty in hot[['x', 'y']].to_numpy(): canvas[ty:ty + 192, tx:tx + 192] = True
    assert res['stride'] == 96 and len(hot) == res['tiles_tumour']
    assert res['tumour_area_mm2'] == pytest.approx(canvas.sum() * res['mpp'] ** 2 / 1e6, rel=1e-9)
    assert res['tumour_area_mm2'] <= len(hot) * (192 * res['mpp']) ** 2 / 1e6


@pytest.mark.slow  # trains a tiny model (the module's fixture)
@pytest.mark.skipif(not SHARED.exists(), reason=f'{SHARED} is missing (3,000 real tiles beside the repository)')
def test_mosaic_of_more_real_tiles(tmp_path, bundle):
    x, y = read_tiles(SHARED, 64)
    m = make_mosaic_slide(tmp_path/'shared.tif', x, y, cols=8)
    res = slide_heatmap(m.path, bundle, tmp_path/'out', tissue_threshold=20, min_tissue=0.05, show_progress=False)[0]
    p_slide = probabilities_at(tmp_path/'out'/'shared', m.boxes)
    classified = ~np.isnan(p_slide)
    assert classified.mean() > 0.9 and res['tiles_background'] == 10 * 10 - classified.sum()
    assert np.abs(p_slide[classified] - bundle.predict(x[classified])[:, 1]).max() < 1e-4


LARGE = r"""
import json, re, resource, sys, time, tracemalloc
from pathlib import Path
t0 = time.perf_counter()
import numpy as np, pandas as pd
from PIL import Image
from pcam_fastai.testslides import make_sparse_slide
from pcam_fastai.heatmap import slide_heatmap
fixture, tmp, bundle = map(Path, sys.argv[1:4])
labels = pd.read_csv(fixture/'train_labels.csv')
x = np.stack([np.asarray(Image.open(fixture/'train'/f'{i}.tif').convert('RGB')) for i in labels.id])
def rss():
    "Peak RSS of this process, MB: Linux's VmHWM (ru_maxrss would count the pytest process this one was forked from)"
    try: return int(re.search(r'VmHWM:\s+(\d+) kB', Path('/proc/self/status').read_text()).group(1)) / 1024
    except (OSError, AttributeError): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == 'darwin' else 1024)
t1, rss_ready = time.perf_counter(), rss()
slide = make_sparse_slide(tmp/'large.tif', x, labels.label, width=50_000, height=50_000, islands=4)
t2, rss_written = time.perf_counter(), rss()
tracemalloc.start()  # numpy's arrays are traced too: what the heatmap itself allocates at most
res = slide_heatmap(slide.path, bundle, tmp/'out', tissue_threshold=20, min_tissue=0.05, show_progress=False)[0]
print(json.dumps(dict(imports_s=t1 - t0, write_s=t2 - t1, heatmap_s=time.perf_counter() - t2, file_mb=slide.path.stat().st_size / 1e6,
                      rss_ready_mb=rss_ready, rss_written_mb=rss_written, peak_rss_mb=rss(), traced_peak_mb=tracemalloc.get_traced_memory()[1] / 2**20,
                      summary=res)))
"""


@pytest.mark.slow  # trains a tiny model (the module's fixture), then a subprocess of ~40 s
def test_a_large_sparse_slide_in_bounded_memory(tmp_path, bundle):
    res = subprocess.run([sys.executable, '-c', textwrap.dedent(LARGE), str(FIXTURE), str(tmp_path), str(bundle.path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    s = r['summary']
    print(f"\nlarge slide 50,000 x 50,000 px: written in {r['write_s']:.1f} s ({r['file_mb']:.1f} MB); heatmap {r['heatmap_s']:.1f} s "
          f"(tissue {s['seconds']['tissue_detection']} s, inference {s['seconds']['inference']} s, {s['tiles_per_second']} tiles/s); "
          f"peak RSS {r['peak_rss_mb']:.0f} MB ({r['rss_ready_mb']:.0f} MB after the imports; the heatmap's own arrays at most {r['traced_peak_mb']:.0f} MB)")
    assert r['peak_rss_mb'] < 2048
    assert (s['width'], s['height'], s['tiles_total']) == (50_000, 50_000, 520 * 520)
    assert 95 <= s['tiles_classified'] <= 100 and s['tiles_unreadable'] == 0
    assert s['tiles_classified'] + s['tiles_background'] == s['tiles_total']


@pytest.mark.slow  # trains a tiny model (the module's fixture)
def test_cli_slide_writes_outputs_and_resumes(tmp_path, real, bundle):
    "`pcam-fastai slide SLIDE... --bundle B --out DIR`: the outputs of each slide, a finished slide skipped, a bad file a one-line error"
    from conftest import run_main
    x, y = real
    slides = [make_mosaic_slide(tmp_path/f'{n}.tif', x[k:k + 16], y[k:k + 16], cols=4).path for n, k in (('a', 0), ('b', 16))]
    args = ['slide', *slides, '--bundle', bundle.path, '--out', tmp_path/'out', '--tissue-threshold', '20', '--min-tissue', '0.05', '--device', 'cpu']
    res = run_main(args)
    assert res.returncode == 0, res.stdout + res.stderr
    for n in 'ab':
        assert sorted(f.name for f in (tmp_path/'out'/n).iterdir() if f.name != '.slide.lock') == ['heatmap.png', 'slide.json', 'tiles.csv', 'tumour.geojson']
        summary = json.loads((tmp_path/'out'/n/'slide.json').read_text())
        assert summary['tiles_classified'] == 16 and (summary['model_device'], summary['reader']) == ('cpu', 'openslide')
    assert 'a.tif: 16 tissue tiles classified' in res.stdout
    assert 'done already' in run_main(args).stdout
    (tmp_path/'c.svs').write_text('not a slide')
    res = run_main(['slide', tmp_path/'c.svs', '--bundle', bundle.path, '--out', tmp_path/'out'])
    assert res.returncode == 2 and 'not a whole-slide image' in res.stderr and 'Traceback' not in res.stderr
    res = run_main(['slide', slides[0], '--bundle', bundle.path, '--out', tmp_path/'gpu', '--device', 'tpu'])
    assert res.returncode == 2 and "device must be 'auto', 'cpu'" in res.stderr and 'Traceback' not in res.stderr
