"The array cache (issue 3): same data from every source, every fault named, and the fast loader trains as well."
import errno, json, os, shutil, signal, subprocess, sys, time, zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import run_cli, run_main, clean_error

from pcam_fastai.cache import (build_cache, load_cache, cache_splits, make_synthetic_pcam_h5, CacheError, PCAM_H5)
from pcam_fastai.data import make_synthetic_pcam, COMPETITION


def zip_folder(folder, zp):
    with zipfile.ZipFile(zp, 'w', zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(Path(folder).rglob('*')):
            if f.is_file() and not f.name.startswith('.'): zf.write(f, f.relative_to(folder))
    return zp


@pytest.fixture(scope='module')
def kaggle_set(tmp_path_factory):
    base = tmp_path_factory.mktemp('kaggle')
    folder = make_synthetic_pcam(base/'pcam', n_train=120, n_test=10, seed=5, show_progress=False)
    return folder, zip_folder(folder, base/f'{COMPETITION}.zip')




def _bad_copy(folder, tmp_path):
    "A copy of the Kaggle set to break, and its labels"
    bad = Path(shutil.copytree(folder, tmp_path/'bad', ignore=shutil.ignore_patterns('.*')))
    return bad, pd.read_csv(bad/'train_labels.csv', dtype={'id': str})


def test_zip_folder_and_pil_agree(kaggle_set, tmp_path):
    folder, zp = kaggle_set
    build_cache(zp, tmp_path/'from_zip', show_progress=False)
    build_cache(folder, tmp_path/'from_folder', show_progress=False)
    a, b = load_cache(tmp_path/'from_zip'), load_cache(tmp_path/'from_folder')
    df = pd.read_csv(folder/'train_labels.csv', dtype={'id': str})
    assert a.ids == b.ids == list(df.id)  # the CSV's order
    assert np.array_equal(a.labels, df.label.values) and np.array_equal(b.labels, df.label.values)
    direct = np.stack([np.asarray(Image.open(folder/'train'/f'{i}.tif')) for i in df.id])
    assert np.array_equal(a.images, direct) and np.array_equal(b.images, direct)
    sub = pd.read_csv(folder/'sample_submission.csv', dtype={'id': str})
    t = load_cache(tmp_path/'from_zip', 'test')
    assert t.ids == list(sub.id) and (t.labels == -1).all()
    assert np.array_equal(t.images[3], np.asarray(Image.open(folder/'test'/f'{sub.id[3]}.tif')))


def test_h5_agrees_with_torchvision(tmp_path):
    import torchvision
    h5 = make_synthetic_pcam_h5(tmp_path/'pcam', n_train=30, n_valid=10, n_test=10, seed=2)
    build_cache(h5, tmp_path/'cache', show_progress=False)
    assert cache_splits(tmp_path/'cache') == ['train', 'valid', 'test']
    for split, tv_split in (('train', 'train'), ('valid', 'val'), ('test', 'test')):
        tv = torchvision.datasets.PCAM(tmp_path, split=tv_split)  # reads tmp_path/pcam/*.h5
        c = load_cache(tmp_path/'cache', split)
        assert len(tv) == len(c.ids)
        for i in range(len(tv)):
            img, target = tv[i]
            assert np.array_equal(np.asarray(img), c.images[i]) and int(target) == int(c.labels[i])


def test_truncated_zip(kaggle_set, tmp_path):
    _, zp = kaggle_set
    (tmp_path/'t.zip').write_bytes(zp.read_bytes()[: zp.stat().st_size // 2])
    err = clean_error(run_main(['cache', tmp_path/'t.zip', tmp_path/'cache']))
    assert 'download was probably interrupted' in err or 'corrupt' in err
    assert not (tmp_path/'cache'/'train'/'manifest.json').exists()


@pytest.mark.parametrize('fault,message', [
    ('corrupt', 'Cannot read patch'),
    ('size', 'is 50x50 RGB, not 96x96 RGB'),
    ('gray', 'is 96x96 L, not 96x96 RGB'),
])
def test_bad_tiff_in_zip_is_named(kaggle_set, tmp_path, fault, message):
    folder, _ = kaggle_set
    bad, df = _bad_copy(folder, tmp_path)
    victim = df.id[17]
    fn = bad/'train'/f'{victim}.tif'
    if fault == 'corrupt': fn.write_bytes(fn.read_bytes()[:300])
    elif fault == 'size': Image.new('RGB', (50, 50)).save(fn)
    else: Image.new('L', (96, 96)).save(fn)
    zp = zip_folder(bad, tmp_path/'bad.zip')
    err = clean_error(run_main(['cache', zp, tmp_path/'cache']))
    assert message in err and f'train/{victim}.tif' in err, err
    assert run_main(['cache', zp, tmp_path/'skip', '--on-bad', 'skip']).returncode == 0
    c = load_cache(tmp_path/'skip')
    assert c.manifest['skipped'] == [victim] and c.keep.sum() == len(c.ids) - 1
    if fault != 'corrupt':
        assert run_main(['cache', zp, tmp_path/'fix', '--on-bad', 'fix']).returncode == 0
        assert load_cache(tmp_path/'fix').keep.all()


@pytest.mark.parametrize('fault,message', [
    ('missing_image', 'have no train/<id>.tif'),
    ('unlabelled_image', 'have no row in'),
    ('duplicate', 'duplicate ids'),
    ('bad_label', 'not 0 or 1'),
])
def test_labels_csv_problems_in_zip(kaggle_set, tmp_path, fault, message):
    folder, _ = kaggle_set
    bad, df = _bad_copy(folder, tmp_path)
    if fault == 'missing_image': (bad/'train'/f'{df.id[4]}.tif').unlink()
    elif fault == 'unlabelled_image': df.drop(index=[4]).to_csv(bad/'train_labels.csv', index=False)
    elif fault == 'duplicate': pd.concat([df, df.iloc[:2]]).to_csv(bad/'train_labels.csv', index=False)
    else: df.assign(label=df.label.where(df.index != 9, 2)).to_csv(bad/'train_labels.csv', index=False)
    err = clean_error(run_main(['cache', zip_folder(bad, tmp_path/'bad.zip'), tmp_path/'cache']))
    assert message in err, err


def test_bad_h5(tmp_path):
    import h5py
    h5 = make_synthetic_pcam_h5(tmp_path/'h5', n_train=20, n_valid=8, n_test=8, seed=1)
    with h5py.File(h5/PCAM_H5.format(split='test', xy='y'), 'w') as f: f.create_dataset('y', data=np.zeros((3, 1, 1, 1), np.uint8))
    assert 'holds 8 patches but' in clean_error(run_main(['cache', h5, tmp_path/'c1']))
    with h5py.File(h5/PCAM_H5.format(split='test', xy='x'), 'w') as f: f.create_dataset('x', data=np.zeros((3, 64, 64, 3), np.uint8))
    assert 'expected uint8 N x 96 x 96 x 3' in clean_error(run_main(['cache', h5, tmp_path/'c1']))


def test_full_disk_leaves_old_cache_untouched(kaggle_set, tmp_path):
    folder, _ = kaggle_set
    build_cache(folder, tmp_path/'cache', show_progress=False)
    before = (tmp_path/'cache'/'train'/'manifest.json').read_bytes()
    with mock.patch('os.posix_fallocate', side_effect=OSError(errno.ENOSPC, 'No space left on device')):
        with pytest.raises(CacheError, match='Not enough disk space'): build_cache(folder, tmp_path/'cache', force=True, show_progress=False)
    assert (tmp_path/'cache'/'train'/'manifest.json').read_bytes() == before
    assert load_cache(tmp_path/'cache').images.shape[0] == 120


@pytest.mark.slow
def test_killed_build_resumes(tmp_path):
    import pcam_fastai.cache as pc
    folder = make_synthetic_pcam(tmp_path/'pcam', n_train=4000, n_test=0, seed=9, show_progress=False)
    code = (f"from pcam_fastai.cache import build_cache; build_cache({str(folder)!r}, {str(tmp_path/'cache')!r}, chunk=100, show_progress=False)")
    proc = subprocess.Popen([sys.executable, '-c', code])
    state = tmp_path/'cache'/'train.partial'/'progress.json'
    deadline, done = time.time() + 300, 0
    while time.time() < deadline and proc.poll() is None:
        try: done = json.loads(state.read_text())['done']
        except (OSError, ValueError, KeyError): pass
        if done >= 500: break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.wait()
    done = json.loads(state.read_text())['done']
    assert 0 < done < 4000, done
    with pytest.raises(CacheError, match='interrupted build'): load_cache(tmp_path/'cache')
    real, calls = pc.decode_patch, []
    def counting(*a, **k): calls.append(1); return real(*a, **k)
    with mock.patch.object(pc, 'decode_patch', counting):
        build_cache(folder, tmp_path/'cache', chunk=100, show_progress=False)
    assert len(calls) == (4000 - done) + 64, (len(calls), done)  # only the rest was decoded, plus 64 verification reads
    c = load_cache(tmp_path/'cache')
    df = pd.read_csv(folder/'train_labels.csv', dtype={'id': str})
    for i in (0, done - 1, done, 3999):
        assert np.array_equal(c.images[i], np.asarray(Image.open(folder/'train'/f'{df.id[i]}.tif')))


@pytest.mark.slow
def test_cache_loader_trains_as_well_as_files(demo_run, tmp_path):
    run, data, _ = demo_run
    res = run_cli(['train', '--data', data, '--cache', tmp_path/'cache', '--run-dir', tmp_path/'run', '--preset', 'cpu-demo', '--epochs-unfrozen', '6'])  # as many as the demo run
    assert res.returncode == 0, res.stderr[-3000:]
    files_m = json.loads((run/'metrics.json').read_text())
    cache_m = json.loads((tmp_path/'run'/'metrics.json').read_text())
    print(f"\nAUC from files {files_m['roc_auc']:.4f} in {files_m['seconds']} s; from the cache {cache_m['roc_auc']:.4f} in {cache_m['seconds']} s")
    assert cache_m['roc_auc'] >= 0.9 and cache_m['roc_auc'] >= files_m['roc_auc'] - 0.05
    assert cache_m['n_valid'] == files_m['n_valid'] == 120
    assert cache_m['optimistic'] is True and cache_m['test'] is None


def test_grouped_split_holds_out_whole_slides(kaggle_set, tmp_path):
    from pcam_fastai.loader import cache_dataloaders, GROUPED_SPLIT
    folder, _ = kaggle_set
    build_cache(folder, tmp_path/'cache', show_progress=False)
    df = pd.read_csv(folder/'train_labels.csv', dtype={'id': str})
    slides = pd.DataFrame(dict(id=df.id, slide=[f'slide{i % 12}' for i in range(len(df))]))
    slides.to_csv(tmp_path/'slides.csv', index=False)
    dls = cache_dataloaders(tmp_path/'cache', size=96, bs=8, groups=tmp_path/'slides.csv', device='cpu')
    assert dls.split == GROUPED_SPLIT and dls.split_name == str(GROUPED_SPLIT)
    ids = load_cache(tmp_path/'cache').ids
    slide_of = dict(zip(slides.id, slides.slide))
    tr = {slide_of[ids[i]] for i in dls.train_ds.idxs}
    va = {slide_of[ids[i]] for i in dls.valid_ds.idxs}
    assert tr and va and not tr & va
    slides.iloc[5:].to_csv(tmp_path/'partial.csv', index=False)
    with pytest.raises(Exception, match='have no slide in'):
        cache_dataloaders(tmp_path/'cache', size=96, groups=tmp_path/'partial.csv', device='cpu')


def test_patch_rewritten_in_place_is_noticed(kaggle_set, tmp_path):
    folder, _ = kaggle_set
    bad, labels = _bad_copy(folder, tmp_path)
    build_cache(bad, tmp_path/'cache', show_progress=False)
    first = labels.id[0]
    new = np.full((96, 96, 3), 7, np.uint8)
    mtime = (bad/'train').stat().st_mtime_ns
    Image.fromarray(new).save(bad/'train'/f'{first}.tif')  # same name, in place: the folder's own mtime does not change
    os.utime(bad/'train', ns=(mtime, mtime))
    build_cache(bad, tmp_path/'cache', show_progress=False)
    c = load_cache(tmp_path/'cache')
    assert (c.images[c.ids.index(first)] == new).all(), 'the cache still holds the old pixels'


def test_unreadable_patch_is_a_message_or_skipped(kaggle_set, tmp_path):
    folder, _ = kaggle_set
    bad, labels = _bad_copy(folder, tmp_path)
    victim = bad/'train'/f'{labels.id[3]}.tif'
    victim.unlink(); victim.mkdir()  # a folder named *.tif: reading it raises IsADirectoryError
    err = clean_error(run_main(['cache', bad, tmp_path/'c1']))
    assert f'{victim} cannot be read' in err and '--on-bad skip' in err
    assert run_main(['cache', bad, tmp_path/'c2', '--on-bad', 'skip']).returncode == 0
    m = json.loads((tmp_path/'c2'/'train'/'manifest.json').read_text())
    assert m['skipped'] == [labels.id[3]] and m['n_kept'] == len(labels) - 1


def test_disk_full_while_writing_is_a_message(kaggle_set, tmp_path):
    folder, _ = kaggle_set
    with mock.patch('numpy.save', side_effect=OSError(errno.ENOSPC, 'No space left on device')):
        err = clean_error(run_main(['cache', folder, tmp_path/'cache']))
    assert 'filled up while' in err and 'run the same command again' in err
