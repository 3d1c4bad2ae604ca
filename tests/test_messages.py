"Bad input gets a message that names the file and says what to do; the CLI's first path works with or without its flag."
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import run_main, clean_error


def _kaggle(tmp_path, ids, labels, ext='.tif'):
    root = tmp_path/'pcam'; (root/'train').mkdir(parents=True)
    for i in ids: Image.fromarray(np.full((96, 96, 3), 120, np.uint8)).save(root/'train'/f'{i.strip()}{ext}')
    pd.DataFrame(dict(id=ids, label=labels)).to_csv(root/'train_labels.csv', index=False)
    return root


def test_first_path_positional_or_flag(tmp_path):
    assert run_main(['synth', tmp_path/'a', '--n-train', '8', '--n-test', '2']).returncode == 0
    assert run_main(['synth', '--dest', tmp_path/'b', '--n-train', '8', '--n-test', '2']).returncode == 0
    assert (tmp_path/'a'/'train_labels.csv').exists() and (tmp_path/'b'/'train_labels.csv').exists()
    err = clean_error(run_main(['synth', tmp_path/'c', '--dest', tmp_path/'d']))
    assert 'two different paths' in err


def test_data_path_that_does_not_exist(tmp_path):
    assert 'does not exist' in clean_error(run_main(['train', '--data', '/nonexistent/pcam', '--run-dir', tmp_path/'run']))
    assert not (tmp_path/'run').exists()  # a failed start leaves no empty run folder


def test_arch_suggestions_once():
    err = clean_error(run_main(['train', '--arch', 'resnet5O']))
    names = err.split('did you mean ')[1].rstrip('?\n').split(', ')
    assert 'resnet50' in names and len(names) == len(set(names)), err


def test_labels_csv_messages(tmp_path):
    from pcam_fastai.data import read_labels
    from pcam_fastai.core import PCamDataError
    root = _kaggle(tmp_path/'empty', ['a'], [0]); (root/'train_labels.csv').write_text('')
    with pytest.raises(PCamDataError, match='train_labels.csv is empty or not a CSV'): read_labels(root)
    root = _kaggle(tmp_path/'two', ['a', 'b'], [0, 2])
    with pytest.raises(PCamDataError, match=r"not 0 or 1 \(e.g. id b: 2\)"): read_labels(root)
    root = _kaggle(tmp_path/'spaces', ['a ', 'b'], [0, 1])
    with pytest.raises(PCamDataError, match='1 of those ids have leading or trailing spaces'): read_labels(root)
    root = _kaggle(tmp_path/'upper', ['a', 'b'], [0, 1], ext='.TIF')
    with pytest.raises(PCamDataError, match='rename the files to end in .tif'): read_labels(root)


def test_no_in_memory_file_repr_in_messages():
    from pcam_fastai.cache import decode_patch, CacheError
    with pytest.raises(CacheError) as e: decode_patch(b'not an image', 'x.tif')
    assert 'BytesIO' not in str(e.value) and 'x.tif' in str(e.value)


def test_huge_patch_is_refused_from_its_header(monkeypatch):
    from PIL import TiffImagePlugin
    from pcam_fastai.cache import decode_patch, CacheError
    buf = io.BytesIO(); Image.new('RGB', (2000, 2000)).save(buf, format='TIFF', compression='tiff_lzw')
    def no_decoding(self): raise AssertionError('the pixels were decoded')
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, 'load', no_decoding)  # an 8000x8000 TIFF would cost 190 MB here
    with pytest.raises(CacheError, match='2000x2000 RGB, not 96x96 RGB'): decode_patch(buf.getvalue(), 'huge.tif')
    assert decode_patch(buf.getvalue(), 'huge.tif', on_bad='skip') is None


def test_weights_path_error_gives_no_unsafe_advice(tmp_path, small_set):
    import torch
    fn = tmp_path/'pickled.pth'
    torch.save({'x': io.BytesIO(b'a Python object, not a tensor')}, fn)  # weights_only=True refuses it
    err = clean_error(run_main(['train', '--data', small_set, '--run-dir', tmp_path/'run', '--arch', 'resnet18', '--weights-path', fn,
                                '--epochs-unfrozen', '1', '--num-workers', '0']))
    assert 'weights_only=False' not in err and 'pickled Python objects' in err, err


def test_small_sizes_in_mb():
    from pcam_fastai.cache import size_text
    assert size_text(3 * 96 * 96 * 3) == '0.0829 MB' and size_text(5 * 2**30) == '5.00 GiB'


def test_importing_the_package_prints_nothing():
    "No warning a user cannot act on (fastai's torch.jit.script FutureWarning) when the package is imported"
    import subprocess, sys
    res = subprocess.run([sys.executable, '-c', 'import pcam_fastai.export, pcam_fastai.heatmap'], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and 'FutureWarning' not in res.stderr, res.stderr[-2000:]
