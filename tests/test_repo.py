"The repository stays consistent: notebooks and library in sync, notebooks clean, README from index.ipynb."
import filecmp, runpy, shutil, subprocess

from conftest import ROOT, BIN


def _copy_project(dst):
    for d in ('nbs', 'pcam_fastai'): shutil.copytree(ROOT/d, dst/d, ignore=shutil.ignore_patterns('__pycache__', '_proc', '.ipynb_checkpoints'))
    shutil.copy(ROOT/'pyproject.toml', dst/'pyproject.toml')
    return dst


def _files(root, pattern): return sorted(p.relative_to(root) for p in root.rglob(pattern) if '_proc' not in p.parts and '.ipynb_checkpoints' not in p.parts)


def test_nbdev_export_leaves_library_unchanged(tmp_path):
    proj = _copy_project(tmp_path)
    for f in (proj/'pcam_fastai').glob('*.py'):
        if f.name != '__init__.py': f.unlink()  # every module must come back from the notebooks
    res = subprocess.run([str(BIN/'nbdev-export')], cwd=proj, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    exported, committed = _files(proj/'pcam_fastai', '*.py'), _files(ROOT/'pcam_fastai', '*.py')
    assert exported == committed, 'run nbdev-export and commit'
    stale = [str(f) for f in exported if not filecmp.cmp(proj/'pcam_fastai'/f, ROOT/'pcam_fastai'/f, shallow=False)]
    assert not stale, f'library differs from the notebooks in {stale}: run nbdev-export and commit'


def test_notebooks_are_clean(tmp_path):
    proj = _copy_project(tmp_path)
    res = subprocess.run([str(BIN/'nbdev-clean')], cwd=proj, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    dirty = [str(f) for f in _files(ROOT/'nbs', '*.ipynb') if not filecmp.cmp(proj/'nbs'/f, ROOT/'nbs'/f, shallow=False)]
    assert not dirty, f'run nbdev-clean and commit: {dirty}'


def test_readme_matches_index_notebook():
    readme_text = runpy.run_path(str(ROOT/'tools'/'make_readme.py'))['readme_text']
    assert (ROOT/'README.md').read_text() == readme_text(ROOT/'nbs'/'index.ipynb'), 'run python tools/make_readme.py'


def test_metadata_lives_in_pyproject():
    assert not (ROOT/'settings.ini').exists()
    import tomllib
    cfg = tomllib.loads((ROOT/'pyproject.toml').read_text())
    assert cfg['tool']['nbdev']['tst_flags'].split() == ['slow', 'realdata']
    assert 'pcam-fastai' in cfg['project']['scripts']


def test_readme_test_command_runs_the_slow_tier():
    "CI runs the README's test command: it must include the slow notebook cells and every pytest test"
    import re
    readme = (ROOT/'README.md').read_text()
    cmds = re.findall(r'```sh\n(.*?)\n```', readme, re.S)
    test_cmd = cmds[1]  # .ci/run takes the second ```sh block as the test command
    assert 'nbdev-test --flags slow' in test_cmd and '-m' not in test_cmd.split('pytest', 1)[1], test_cmd
