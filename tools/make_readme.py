"Write README.md from nbs/index.ipynb (nbdev-readme needs Quarto, which cannot be installed everywhere)."
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def readme_text(nb_path=ROOT/'nbs'/'index.ipynb') -> str:
    "The README text for the index notebook: markdown cells as they are, code cells as python blocks, hidden cells skipped"
    cells = json.loads(Path(nb_path).read_text())['cells']
    out = []
    for c in cells:
        src = ''.join(c['source']).strip()
        if not src: continue
        if c['cell_type'] == 'markdown':
            out.append(src)
        elif c['cell_type'] == 'code':
            if any(l.strip() in ('#| hide', '#|hide') for l in src.splitlines()): continue
            lines = [l for l in src.splitlines() if not l.startswith('#|')]
            out.append('```python\n' + '\n'.join(lines).strip() + '\n```')
    return '<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n\n' + '\n\n'.join(out) + '\n'

if __name__ == '__main__':
    (ROOT/'README.md').write_text(readme_text())
    print('wrote', ROOT/'README.md')
