"Cohorts of mosaic slides built from the committed real tiles: cohort.csv against each slide's tiles.csv, slide-level AUC as scikit-learn computes it, 1 worker = 2 workers, a killed worker, bad manifests."
import json, os, signal, threading, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import ROOT, run_main

FIXTURE = ROOT/'tests'/'data'/'real-pcam-100'


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
    "A tiny bundle trained on the fixture tiles, and 8 mosaic slides: 4 holding a cluster of tumour tiles, 4 with none"
    from pcam_fastai.cache import build_cache
    from pcam_fastai.train import train_pcam
    from pcam_fastai.bundling import export_bundle
    from pcam_fastai.testslides import make_mosaic_slide
    tmp = tmp_path_factory.mktemp('cohort')
    train_pcam(build_cache(FIXTURE, tmp/'cache', show_progress=False), run_dir=tmp/'run', preset='cpu-demo',
               epochs_unfrozen=2, lr_find_iters=5, num_workers=0)
    bundle = export_bundle(tmp/'run', bench_patches=0, onnx=False, tta=False)
    labels = pd.read_csv(FIXTURE/'train_labels.csv')
    tiles = {i: np.asarray(Image.open(FIXTURE/'train'/f'{i}.tif').convert('RGB')) for i in labels.id}
    tumour, normal = labels.id[labels.label == 1].tolist(), labels.id[labels.label == 0].tolist()
    rows = []
    for k in range(8):  # even slides: 6 normal tiles around a 2 x 2 cluster of tumour; odd ones: 10 normal tiles
        ids = [normal[(10 * k + j) % len(normal)] for j in range(6 if k % 2 == 0 else 10)]
        if k % 2 == 0: ids = ids[:3] + tumour[4 * k:4 * k + 2] + ids[3:5] + tumour[4 * k + 2:4 * k + 4] + ids[5:]
        make_mosaic_slide(tmp/f'slide{k}.tif', np.stack([tiles[i] for i in ids]), np.zeros(len(ids), int), cols=5)
        rows.append(dict(slide=f'slide{k}.tif', label=int(k % 2 == 0), split='valid' if k < 4 else 'test'))
    pd.DataFrame(rows).to_csv(tmp/'cohort.csv', index=False)
    return tmp, bundle


def test_cohort_table_equals_each_slides_tiles_and_sklearn_auc(cohort):
    from pcam_fastai.cohort import run_cohort
    from pcam_fastai.slide_score import read_tiles, slide_scores
    tmp, bundle = cohort
    table = run_cohort(tmp/'cohort.csv', bundle, tmp/'out1', workers=1, bs=16, show_progress=False)
    assert table.status.eq('ok').all() and len(table) == 8
    on_disk = pd.read_csv(tmp/'out1'/'cohort.csv')
    assert on_disk.slide.tolist() == table.slide.tolist()
    for _, row in on_disk.iterrows():
        summary = json.loads((Path(row.output)/'slide.json').read_text())
        expect = slide_scores(read_tiles(row.output), summary['threshold'], summary['mpp'])
        for name, value in expect.items(): assert row[name] == pytest.approx(value, rel=1e-6), name
        assert row.score == row['max']  # the default score
    s = json.loads((tmp/'out1'/'cohort.json').read_text())
    test = on_disk[on_disk.split == 'test']
    assert s['metrics']['split'] == 'test' and s['metrics']['n'] == 4
    assert s['metrics']['roc_auc'] == pytest.approx(roc_auc_score(test.label, test.score))
    assert 'validation slides' in s['threshold_source']
    print(f"\ncohort of 8 mosaic slides: test slide AUC {s['metrics']['roc_auc']:.3f}; scores {on_disk.score.round(3).tolist()}")


def test_two_workers_equal_one_and_a_killed_worker_loses_only_its_slide(cohort):
    "2 local worker processes give 1 worker's table; one killed mid-cohort still ends with each slide written once"
    from distributed import Client, LocalCluster
    from pcam_fastai.cohort import run_cohort
    tmp, bundle = cohort
    one = run_cohort(tmp/'cohort.csv', bundle, tmp/'w1', workers=1, bs=16, show_progress=False)
    two = run_cohort(tmp/'cohort.csv', bundle, tmp/'w2', workers=2, bs=16, show_progress=False)
    cols = ['label', 'split', 'score', 'max', 'top_k_mean', 'tumour_area_mm2', 'largest_region_mm2', 'tiles_classified', 'status']
    pd.testing.assert_frame_equal(one[cols], two[cols], check_exact=False, rtol=1e-5)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client: pids = client.run(os.getpid)
        first_seen, killed = {}, []
        def watch():
            while len(first_seen) < 8:
                for f in (tmp/'killed'/'slides').glob('*/slide.json'):
                    first_seen.setdefault(f, f.stat().st_mtime_ns)
                    if not killed:  # one slide done: kill a worker (SIGKILL: no cleanup) while the others run
                        killed.append(next(iter(pids.values()))); os.kill(killed[0], signal.SIGKILL)
                time.sleep(0.05)
        t = threading.Thread(target=watch, daemon=True); t.start()
        table = run_cohort(tmp/'cohort.csv', bundle, tmp/'killed', scheduler=cluster.scheduler_address, bs=16, show_progress=False)
        t.join(timeout=30)
    assert killed and table.slide.is_unique and len(table) == 8 and table.status.eq('ok').all()
    assert all(f.stat().st_mtime_ns == m for f, m in first_seen.items())  # no slide.json was written twice
    pd.testing.assert_frame_equal(one[cols], table[cols], check_exact=False, rtol=1e-5)


def test_bad_manifests_get_one_line_before_any_work(cohort, tmp_path):
    tmp, bundle = cohort
    cases = [('path,label\nslide0.tif,1\n', "has no 'slide' column"),
             (f'slide\n{tmp}/slide0.tif\n{tmp}/nothing.tif\n', 'no such file: row 3'),
             (f'slide\n{tmp}/slide0.tif\n{tmp}/slide0.tif\n', 'a slide listed more than once'),
             (f'slide,label\n{tmp}/slide0.tif,maybe\n', "labels must be 0 or 1 or the bundle's class names")]
    for text, says in cases:
        (tmp_path/'m.csv').write_text(text)
        res = run_main(['cohort', tmp_path/'m.csv', '--bundle', bundle, '--out', tmp_path/'out'])
        assert res.returncode == 2 and says in res.stderr and 'Traceback' not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path/'out'/'slides').exists()


def test_unreadable_and_unscaled_slides_are_rows_and_the_rest_finish(cohort, tmp_path):
    from pcam_fastai.cohort import run_cohort
    from pcam_fastai.testslides import make_mosaic_slide
    tmp, bundle = cohort
    (tmp_path/'broken.svs').write_bytes(b'not a slide at all')
    tile = np.asarray(Image.open(next((FIXTURE/'train').glob('*.tif'))).convert('RGB'))
    make_mosaic_slide(tmp_path/'plain.tif', tile[None].repeat(4, 0), np.zeros(4, int), cols=2, mpp=None)
    (tmp_path/'m.csv').write_text(f'slide,label,mpp\n{tmp}/slide0.tif,1,\nbroken.svs,0,\nplain.tif,0,\n')
    table = run_cohort(tmp_path/'m.csv', bundle, tmp_path/'out', workers=1, bs=16, show_progress=False)
    assert table.status.tolist() == ['ok', 'unreadable', 'no-mpp'], table
    assert 'broken.svs' in table.message[1] and 'does not record its resolution' in table.message[2]
    (tmp_path/'m.csv').write_text(f'slide,label,mpp\n{tmp}/slide0.tif,1,\nplain.tif,0,0.972\n')  # an mpp column fixes it
    assert run_cohort(tmp_path/'m.csv', bundle, tmp_path/'out', workers=1, bs=16, show_progress=False).status.tolist() == ['ok', 'ok']
