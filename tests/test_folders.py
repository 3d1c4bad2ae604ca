"A folder-per-class data set of 50x50 patches (the breast IDC layout) trains on the CPU demo configuration, from the CLI."
import json

from conftest import run_cli, run_main, clean_error

import pytest
pytestmark = pytest.mark.slow  # trains models, starts processes or builds pages: the fast loop skips these


def test_idc_layout_50px_trains_on_cpu_demo(tmp_path):
    from pcam_fastai.folders import make_synthetic_folders
    data = make_synthetic_folders(tmp_path/'idc', classes=('0', '1'), n_per_class=80, size=50, groups=8, seed=1)
    res = run_cli(['train', '--data', data, '--preset', 'cpu-demo', '--run-dir', tmp_path/'run'], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    m = json.loads((tmp_path/'run'/'metrics.json').read_text())
    assert m['classes'] == ['0', '1'] and m['config']['arch'] == 'regnetx_002' and m['preset'] == 'cpu-demo'
    assert m['split'].startswith('grouped-by-patient') and not m['optimistic']
    print(f"\nIDC-layout 50x50, cpu-demo: accuracy {m['accuracy']:.3f}, AUC {m['roc_auc']:.3f} on {m['n_valid']} patches, {m['seconds']} s")
    assert m['roc_auc'] >= 0.8, m['roc_auc']
    report = (tmp_path/'run'/'report.md').read_text()
    assert 'grouped-by-patient' in report and (tmp_path/'run'/'false_negatives_gradcam.png').exists()


def test_folder_errors(tmp_path):
    (tmp_path/'one'/'tumour').mkdir(parents=True)
    from PIL import Image
    Image.new('RGB', (50, 50)).save(tmp_path/'one'/'tumour'/'a.png')
    err = clean_error(run_main(['train', '--data', tmp_path/'one', '--run-dir', tmp_path/'r']))
    assert 'neither a Kaggle-layout folder' in err and 'only one class (tumour)' in err
