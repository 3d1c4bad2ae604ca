"The docs site's pages: `nbdev-proc-nbs` processes every notebook, every page has a title, and every public name is documented."
import importlib, inspect, json, re, subprocess, sys
from pathlib import Path

import pytest
from fastcore.docments import docments

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODULES = sorted(p.stem for p in (ROOT/'pcam_fastai').glob('*.py') if not p.name.startswith('_'))


@pytest.fixture(scope='module')
def proc():
    "Run `nbdev-proc-nbs` (what the docs build runs before Quarto) and return the processed folder"
    res = subprocess.run([str(BIN/'nbdev-proc-nbs')], cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and 'Exception: Error' not in out, out[-4000:]
    return ROOT/'_proc'


def source_nb(module):
    "The notebook a module is exported from, as its header names it"
    return re.search(r'File to edit: \.\./nbs/(\S+\.ipynb)', (ROOT/'pcam_fastai'/f'{module}.py').read_text()).group(1)


def public_api(module):
    "Functions and classes a module exports (its `__all__`), defined in it"
    m = importlib.import_module(f'pcam_fastai.{module}')
    return [(n, getattr(m, n)) for n in getattr(m, '__all__', [])
            if (inspect.isfunction(getattr(m, n)) or inspect.isclass(getattr(m, n))) and getattr(getattr(m, n), '__module__', '') == m.__name__]


def test_every_page_has_a_title(proc):
    pages = sorted((ROOT/'nbs').rglob('*.ipynb'))
    assert len(pages) >= 16
    for nb in pages:
        rel = nb.relative_to(ROOT/'nbs')
        if any(p.startswith(('.', '_')) for p in rel.parts): continue
        cells = json.loads((proc/rel).read_text())['cells']
        front = ''.join(cells[0]['source']) if cells and cells[0]['cell_type'] == 'raw' else ''
        assert re.search(r'^title: \S', front, flags=re.M), f'{rel}: no title (start the notebook with a "# Title" markdown cell)'
        assert re.search(r'^description: \S', front, flags=re.M), f'{rel}: no summary (a "> summary" line under the title)'


@pytest.mark.parametrize('module', MODULES)
def test_every_public_name_has_show_doc(proc, module):
    nb = source_nb(module)
    text = '\n'.join(''.join(c['source']) for c in json.loads((proc/nb).read_text())['cells'] if c['cell_type'] == 'code')
    documented = set(re.findall(r'show_doc\(([\w.]+)', text))
    missing = [n for n, _ in public_api(module) if n not in documented]
    assert not missing, f'{nb}: no show_doc section for {missing}'


@pytest.mark.parametrize('module', MODULES)
def test_every_parameter_has_a_docment(module):
    missing = []
    for name, obj in public_api(module):
        if inspect.isclass(obj):
            if '__init__' not in vars(obj) or hasattr(obj, '__dataclass_fields__'): continue  # inherited, or fields documented in the class
            f = obj.__init__
        else: f = obj
        try: params = [n for n, p in inspect.signature(f).parameters.items()
                       if n not in ('self', 'cls') and not n.startswith('_') and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        except (TypeError, ValueError): continue
        docs = docments(f)
        missing += [f'{name}({p})' for p in params if not docs.get(p)]
    assert not missing, f'pcam_fastai.{module}: parameters without a docment: {missing}'
