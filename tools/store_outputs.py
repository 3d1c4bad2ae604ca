"""Run the notebooks and keep their outputs small enough for the docs site and git.

    python tools/store_outputs.py [--flags slow] [--cell-timeout SECONDS] [NOTEBOOK ...]   (default: every notebook in nbs/)

Each notebook is executed as `nbdev-test` does (cells flagged `slow` or `eval: false` are skipped; `--flags slow` runs the `slow` ones too,
for pages whose stored outputs come from a real run, e.g. the real-tissue tutorial). On success its outputs are
written back, then trimmed: no stderr, no progress bars, no HTML widgets, long text cut, and images over MAX_IMAGE_KB dropped
(with a note). Run `nbdev-clean` afterwards. Rebuilding a notebook from its source drops its outputs: run this last."""
from __future__ import annotations
import base64, json, re, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_IMAGE_KB, MAX_TEXT_LINES = 150, 40
BAR = ('█', '|----', '% [')


def _is_bar(text:str) -> bool: return any(b in text for b in BAR) or bool(re.match(r'^\s*Epoch \d+/\d+ :', text))


def _lines(text:str) -> list:
    "The lines a terminal would show: only what follows the last carriage return of each line; no bars, no blank lines"
    return [l for l in (seg.split('\r')[-1].rstrip() for seg in text.split('\n')) if l.strip() and not _is_bar(l)]


def _shrink(png:bytes) -> bytes|None:
    "A JPEG of a too-large plot (noisy tissue patches compress badly as PNG), halved in size until it fits; None if it never does"
    import io
    from PIL import Image
    im = Image.open(io.BytesIO(png)).convert('RGB')
    for _ in range(4):
        buf = io.BytesIO(); im.save(buf, 'JPEG', quality=80, optimize=True)
        if buf.tell() <= MAX_IMAGE_KB * 1024: return buf.getvalue()
        im = im.resize((im.width * 7 // 10, im.height * 7 // 10), Image.LANCZOS)
    return None


def trim_output(o:dict):
    "The output to keep (possibly shortened), or None to drop it"
    kind = o.get('output_type')
    if kind == 'stream':
        if o.get('name') == 'stderr': return None
        lines = _lines(''.join(o.get('text', '')))
        if not lines: return None
        if len(lines) > MAX_TEXT_LINES: lines = lines[:MAX_TEXT_LINES] + [f'... ({len(lines) - MAX_TEXT_LINES} more lines)']
        return dict(o, text='\n'.join(lines) + '\n')
    if kind in ('display_data', 'execute_result'):
        data = dict(o.get('data', {}))
        html = ''.join(data.get('text/html', ''))
        if 'progress' in html or _is_bar(''.join(data.get('text/plain', ''))): return None
        data.pop('application/vnd.jupyter.widget-view+json', None)
        for k in ('image/png', 'image/jpeg'):
            if k in data and len(base64.b64decode(''.join(data[k]))) > MAX_IMAGE_KB * 1024:
                small = _shrink(base64.b64decode(''.join(data[k])))
                data = {'image/jpeg': base64.b64encode(small).decode(), 'text/plain': data.get('text/plain', '<Figure>')} if small else \
                       {'text/plain': [f'[image of {len(base64.b64decode("".join(data[k]))) // 1024} kB not stored; run the notebook to see it]']}
        if 'text/plain' in data and not any(k.startswith('image/') or k == 'text/html' or k == 'text/markdown' for k in data):
            lines = ''.join(data['text/plain']).split('\n')
            if len(lines) > MAX_TEXT_LINES: data['text/plain'] = '\n'.join(lines[:MAX_TEXT_LINES] + [f'... ({len(lines) - MAX_TEXT_LINES} more lines)'])
        return dict(o, data=data) if data else None
    return o  # errors do not happen: only notebooks that ran through are written


def trim(nb_path:Path) -> int:
    "Trim the stored outputs of one notebook in place; returns its size in bytes"
    nb = json.loads(nb_path.read_text())
    for c in nb['cells']:
        if c['cell_type'] != 'code': continue
        c['outputs'] = [t for t in (trim_output(o) for o in c.get('outputs', [])) if t is not None]
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    return nb_path.stat().st_size


def main(paths):
    from nbdev.test import test_nb
    from nbdev.config import get_config
    cfg = get_config()
    run_flags, timeout = [], cfg.get('cell_timeout', 900)
    while paths and paths[0] in ('--flags', '--cell-timeout'):
        if paths[0] == '--flags': run_flags.append(paths[1])
        else: timeout = int(paths[1])  # the real-tissue benchmark cell runs for about 20 minutes
        paths = paths[2:]
    nbs = [Path(p).resolve() for p in paths] or sorted(p for p in (ROOT/'nbs').rglob('*.ipynb') if '_proc' not in p.parts and not p.name.startswith('_'))
    failed = []
    for nb in nbs:
        t0 = time.time()
        ok, _ = test_nb(nb, skip_flags=[f for f in cfg.tst_flags.split() if f not in run_flags], save=True, basepath=cfg.config_path, cell_timeout=timeout)
        if not ok: failed.append(nb.name); print(f'{nb.relative_to(ROOT)}: FAILED, outputs not stored'); continue
        print(f'{nb.relative_to(ROOT)}: {time.time() - t0:.0f} s, {trim(nb) / 1024:.0f} kB with outputs')
    if failed: sys.exit(f'failed: {failed}')


if __name__ == '__main__': main(sys.argv[1:])
