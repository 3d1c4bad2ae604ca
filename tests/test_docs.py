"The docs site's pages: `nbdev-proc-nbs` processes every notebook, every page has a title, and every public name is documented."
import ast, importlib, inspect, json, re, subprocess, sys
from pathlib import Path

import pytest
from fastcore.docments import docments

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODULES = sorted(p.stem for p in (ROOT/'pcam_fastai').glob('*.py') if not p.name.startswith('_'))


PROC = """
import shutil, nbdev.quarto as q

if shutil.which('quarto') is None: q._ensure_quarto = lambda: print('quarto is not installed: processing only')  # never a sudo install from a test
q.nbdev_proc_nbs.__wrapped__(force=True)
"""


@pytest.fixture(scope='module')
def proc():
    "Run `nbdev-proc-nbs` on every notebook (forced: no cached page is trusted) and return the processed folder"
    res = subprocess.run([sys.executable, '-c', PROC], cwd=ROOT, capture_output=True, text=True, timeout=900)
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


@pytest.mark.slow  # nbdev-proc-nbs on every notebook: about 40 s
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
@pytest.mark.slow  # nbdev-proc-nbs on every notebook: about 40 s
def test_every_public_name_has_show_doc(proc, module):
    nb = source_nb(module)
    text = '\n'.join(''.join(c['source']) for c in json.loads((proc/nb).read_text())['cells'] if c['cell_type'] == 'code')
    documented = set(re.findall(r'show_doc\(([\w.]+)', text))
    missing = [n for n, _ in public_api(module) if n not in documented]
    assert not missing, f'{nb}: no show_doc section for {missing}'


def test_no_slow_cell_runs_in_the_docs():
    "The docs build runs every cell that imports something, whatever its flags: a slow cell that imports and then uses state from other slow cells fails there"
    bad = []
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        for i, cell in enumerate(json.loads(nb.read_text())['cells']):
            src = ''.join(cell['source'])
            flags = ' '.join(l for l in src.splitlines() if l.startswith('#|'))
            if cell['cell_type'] != 'code' or not re.search(r'\b(slow|realdata)\b', flags) or 'eval: false' in flags: continue
            body = ast.parse('\n'.join(l for l in src.splitlines() if not l.lstrip().startswith(('%', '!')))).body
            if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in body) and not all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in body):
                bad.append(f'{nb.name} cell {i}')
    assert not bad, f'slow cells that import and run code (move the imports to the notebook\'s import cell): {bad}'


@pytest.mark.parametrize('module', MODULES)
def test_every_parameter_has_a_docment(module):
    missing = []
    for name, obj in public_api(module):
        if inspect.isclass(obj) and (hasattr(obj, '__dataclass_fields__') or hasattr(obj, '_fields')):  # dataclass, NamedTuple: field comments
            src = inspect.getsource(obj)
            missing += [f'{name}.{fl}' for fl in getattr(obj, '_fields', None) or obj.__dataclass_fields__
                        if not (re.search(rf'^\s*{fl}\s*:[^#\n]*#\s*\S', src, flags=re.M)  # a comment on the field's line,
                                or re.search(rf'#[^\n]*\n\s*{fl}\s*:', src))]  # or on the line above it
            continue
        if inspect.isclass(obj):
            if '__init__' not in vars(obj): continue  # inherited: documented where it is defined
            f = obj.__init__
        else: f = obj
        try: params = [n for n, p in inspect.signature(f).parameters.items()
                       if n not in ('self', 'cls') and not n.startswith('_') and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        except (TypeError, ValueError): continue
        docs = docments(f)
        missing += [f'{name}({p})' for p in params if not docs.get(p)]
    assert not missing, f'pcam_fastai.{module}: parameters without a docment: {missing}'


def test_stored_outputs_are_small_and_clean():
    "What the site shows from the notebooks: no errors, stderr or progress bars; images and texts of modest size"
    bar = re.compile(r'█|\|----|^\s*Epoch \d+/\d+ :', flags=re.M)
    for nb in sorted((ROOT/'nbs').rglob('*.ipynb')):
        if any(p.startswith(('.', '_')) for p in nb.relative_to(ROOT/'nbs').parts): continue
        for i, c in enumerate(json.loads(nb.read_text())['cells']):
            for o in c.get('outputs', []):
                where = f'{nb.name} cell {i}'
                assert o['output_type'] != 'error', f'{where}: an error is stored'
                assert not (o['output_type'] == 'stream' and o.get('name') == 'stderr'), f'{where}: stderr is stored'
                text = ''.join(o.get('text', '')) + ''.join(o.get('data', {}).get('text/plain', ''))
                assert not bar.search(text), f'{where}: a progress bar is stored'
                assert len(text.splitlines()) <= 60, f'{where}: {len(text.splitlines())} lines of text'
                for k in ('image/png', 'image/jpeg'):
                    if k in o.get('data', {}): assert len(''.join(o['data'][k])) * 3 / 4 <= 160 * 1024, f'{where}: image over 150 kB'
