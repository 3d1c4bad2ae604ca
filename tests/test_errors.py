"Every error path a user can hit gets a clear message and no traceback."
import shutil

import pandas as pd
import pytest

from conftest import run_cli, run_main, clean_error

KAGGLE_VARS = ('KAGGLE_USERNAME', 'KAGGLE_KEY', 'KAGGLE_API_TOKEN', 'KAGGLE_CONFIG_DIR')




@pytest.mark.slow
def test_download_without_kaggle_credentials(tmp_path):
    res = run_cli(['download', '--dest', tmp_path/'pcam'], env={'HOME': str(tmp_path)}, drop=KAGGLE_VARS)
    err = clean_error(res)
    assert 'No Kaggle credentials found' in err and 'kaggle.json' in err and 'KAGGLE_USERNAME' in err


def _copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns('.*'))
    return dst


def test_labels_csv_ids_without_images(small_set, tmp_path):
    bad = _copy(small_set, tmp_path/'bad')
    df = pd.read_csv(bad/'train_labels.csv')
    (bad/'train'/f'{df.id[5]}.tif').unlink()
    err = clean_error(run_main(['train', '--data', bad, '--preset', 'cpu-demo', '--run-dir', tmp_path/'run']))
    assert f'1 ids in train_labels.csv have no train/<id>.tif ({df.id[5]})' in err


def test_images_without_labels(small_set, tmp_path):
    bad = _copy(small_set, tmp_path/'bad')
    df = pd.read_csv(bad/'train_labels.csv')
    df.drop(index=[3, 4]).to_csv(bad/'train_labels.csv', index=False)
    err = clean_error(run_main(['train', '--data', bad, '--preset', 'cpu-demo', '--run-dir', tmp_path/'run']))
    assert '2 images in train/ have no row in train_labels.csv' in err


@pytest.mark.slow
def test_corrupt_tiff_is_named(small_set, tmp_path):
    bad = _copy(small_set, tmp_path/'bad')
    df = pd.read_csv(bad/'train_labels.csv')
    victims = [bad/'train'/f'{i}.tif' for i in df.id[10:60]]
    for v in victims: v.write_bytes(v.read_bytes()[:500])  # truncated copies
    res = run_cli(['train', '--data', bad, '--preset', 'cpu-demo', '--lr-frozen', '1e-3', '--epochs-unfrozen', '0'])
    err = clean_error(res)
    assert 'Cannot read patch' in err and any(str(v) in err for v in victims), err


def test_corrupt_tiff_in_python(small_set, tmp_path):
    from pcam_fastai.sources import pcam_dataloaders
    from pcam_fastai.core import PCamDataError
    bad = _copy(small_set, tmp_path/'bad')
    dls = pcam_dataloaders(bad, size=96, bs=8, num_workers=0)
    victim = dls.valid.items[0]
    victim.write_bytes(b'not a tiff')
    with pytest.raises(PCamDataError, match=f'Cannot read patch {victim}'): list(dls.valid)


@pytest.mark.slow
def test_offline_pretrained_weights(small_set, tmp_path):
    # An empty torch cache and a proxy that refuses connections: offline on any machine
    env = {'TORCH_HOME': str(tmp_path/'torch'), 'https_proxy': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9',
           'http_proxy': 'http://127.0.0.1:9', 'HTTP_PROXY': 'http://127.0.0.1:9'}
    res = run_cli(['train', '--data', small_set, '--preset', 'cpu-demo', '--arch', 'resnet18', '--pretrained', 'true'], env=env)
    err = clean_error(res)
    assert 'Could not get ImageNet weights for resnet18' in err
    assert str(tmp_path/'torch'/'hub'/'checkpoints'/'resnet18-') in err  # where to put the file
    assert '--weights-path' in err and '--pretrained' in err


def test_unknown_arch_and_command(small_set, tmp_path):
    err = clean_error(run_main(['train', '--data', small_set, '--arch', 'resnet5O', '--run-dir', tmp_path/'run']))
    assert "Unknown arch 'resnet5O'" in err
    assert "unknown command 'trian'" in clean_error(run_main(['trian']))
