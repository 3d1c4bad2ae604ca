"The package's structure: imports follow the notebooks' dependency order (so there are no cycles), no private name crosses a module, no unused imports."
import ast, re, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT/'pcam_fastai'


def modules() -> dict:
    "module name -> (its notebook's number, its syntax tree), for every exported module"
    out = {}
    for f in sorted(PKG.glob('*.py')):
        if f.name.startswith('_'): continue
        text = f.read_text()
        nb = re.search(r'^# %% \.\./nbs/(\d+)([a-z]?)_\w+\.ipynb', text, re.M)  # 03a comes after 03, as in fastai's 09b
        assert nb, f'{f.name} has no "# %% ../nbs/NN_name.ipynb" cell marker: is it exported by nbdev?'
        out[f.stem] = ((int(nb.group(1)), nb.group(2)), ast.parse(text))
    return out


def package_imports(tree) -> list:
    "(module, names) for every import of a package module anywhere in `tree`, inside functions too"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1: found.append((mod.split('.')[0], [a.name for a in node.names]))
            elif mod.startswith('pcam_fastai.'): found.append((mod.split('.')[1], [a.name for a in node.names]))
            elif mod == 'pcam_fastai': found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name.split('.')[1], []) for a in node.names if a.name.startswith('pcam_fastai.')]
    return found


MODULES = modules()
EDGES = {m: {dep for dep, _ in package_imports(tree) if dep != m} for m, (_, tree) in MODULES.items()}


def test_the_modules_are_found():
    assert {'core', 'data', 'cache', 'sources', 'train', 'cli'} <= set(MODULES)


def test_each_module_imports_only_modules_of_earlier_notebooks():
    "Reading the notebooks in their numbered order is reading the package in dependency order"
    num = lambda m: '%02d%s' % MODULES[m][0]
    late = [f'{m} ({num(m)}) imports {d} ({num(d)})' for m, deps in EDGES.items() for d in deps
            if d in MODULES and MODULES[d][0] >= MODULES[m][0]]
    assert not late, late


def test_no_import_cycles():
    seen, stack, cycles = set(), [], []
    def visit(m):
        if m in stack: cycles.append(stack[stack.index(m):] + [m]); return
        if m in seen: return
        seen.add(m); stack.append(m)
        for d in sorted(EDGES.get(m, ())): visit(d)
        stack.pop()
    for m in sorted(EDGES): visit(m)
    assert not cycles, [' -> '.join(c) for c in cycles]


def test_the_checks_can_fail():
    "The same checks flag a planted cycle and a planted late import"
    tree = ast.parse('from .train import x\ndef f():\n    from pcam_fastai.cli import y\n')
    assert sorted(d for d, _ in package_imports(tree)) == ['cli', 'train']
    assert MODULES['train'][0] > MODULES['core'][0]  # so core importing train would be a late import


def test_no_private_name_is_imported_from_another_module():
    private = [f'{m} imports {d}.{n}' for m, (_, tree) in MODULES.items() for d, names in package_imports(tree) for n in names
               if n.startswith('_') and d != m]
    assert not private, private


def test_no_unused_imports_or_undefined_names():
    "pyflakes' checks (through ruff) on the exported package"
    ruff = Path(sys.executable).parent/'ruff'
    if not ruff.exists(): pytest.skip('ruff is not installed: pip install -e ".[dev]"')
    res = subprocess.run([str(ruff), 'check', '--select', 'F', '--exclude', '_modidx.py', '--output-format', 'concise', str(PKG)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
