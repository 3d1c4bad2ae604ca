"The in-browser page (`pcam-fastai export --web`): in headless Chromium, from file:// and from a localhost static server, on the committed real tiles."
import contextlib, functools, http.server, os, threading
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_cli, run_main, clean_error, launch_chromium

FIXTURE = ROOT/'tests'/'data'/'real-pcam-100'
slow = pytest.mark.slow  # trains a model, downloads the runtime once, drives a browser


@pytest.fixture(scope='module')
def home(tmp_path_factory):
    "A PCAM_FASTAI_HOME whose web-runtime cache holds the pinned runtime: from $PCAM_FASTAI_WEB_RUNTIME's tarballs, else downloaded once from npm"
    from pcam_fastai.webruntime import web_runtime, WebExportError
    home = tmp_path_factory.mktemp('web-home')
    try: web_runtime(os.environ.get('PCAM_FASTAI_WEB_RUNTIME'), cache=home/'web-runtime')
    except WebExportError as e:
        if 'Could not download' in str(e): pytest.skip(f'the npm registry cannot be reached, so the page cannot be built: {e}')
        raise
    return home


@pytest.fixture(scope='module')
def web_bundle(home, tmp_path_factory):
    "A small run on the fixture tiles at 64 px (so the page resizes, with torch's rule), exported with --web as a user does"
    pytest.importorskip('playwright')
    from pcam_fastai.cache import build_cache
    from pcam_fastai.train import train_pcam
    tmp = tmp_path_factory.mktemp('web-bundle')
    cache = build_cache(FIXTURE, tmp/'cache', show_progress=False)
    train_pcam(cache, run_dir=tmp/'run', preset='cpu-demo', size=64, epochs_unfrozen=3, lr_find_iters=5, num_workers=0)
    res = run_cli(['export', '--run-dir', tmp/'run', '--web', '--bench-patches', '32'], env={'PCAM_FASTAI_HOME': str(home)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert 'export_web:' in res.stdout, res.stdout[-1500:]
    if 'throughput not measured: ' in res.stdout:  # no browser here: the page is written, but nothing can open it (a timeout fails below)
        pytest.skip('no headless Chromium: ' + res.stdout.split('throughput not measured: ', 1)[1].splitlines()[0])
    assert 'patches/s in Chromium' in res.stdout, res.stdout[-1500:]
    return tmp/'run'/'bundle'


@pytest.fixture(scope='module')
def upload(tmp_path_factory):
    "Files to upload: real tiles (TIFF, and PNG and JPEG copies), and files the page must refuse with a message"
    d = tmp_path_factory.mktemp('upload')
    tiles = sorted((FIXTURE/'train').glob('*.tif'))
    for t in tiles[:6]:
        im = Image.open(t).convert('RGB')
        im.save(d/f'{t.stem}.png'); im.save(d/f'{t.stem}.jpg', quality=92)
    Image.open(tiles[0]).convert('RGB').resize((150, 120)).save(d/'resized.png')  # another size: the page resizes it to 64 too
    exif = Image.Exif(); exif[0x0112] = 6  # "rotate 90 degrees": browsers would, PIL (and so Python) does not
    Image.open(tiles[1]).convert('RGB').save(d/'exif-rotated.jpg', quality=92, exif=exif)
    (d/'notes.txt').write_text('not an image\n')
    Image.new('RGB', (2100, 2100), (200, 120, 160)).save(d/'slide-sized.png')  # 4.4 megapixels, a small file
    (d/'huge.png').write_bytes(b'\x89PNG' + os.urandom(6_000_000))  # 6 MB
    rgba = np.dstack([np.asarray(Image.open(tiles[2]).convert('RGB')), np.full((96, 96), 255, np.uint8)]); rgba[:10, :10, 3] = 0
    Image.fromarray(rgba).save(d/'transparent.png')
    Image.fromarray(np.asarray(Image.open(tiles[3]).convert('L')).astype(np.uint16) * 257).save(d/'gray16.png')
    Image.open(tiles[4]).convert('LA').save(d/'gray-alpha.tif')
    import tifffile
    tifffile.imwrite(d/'planar.tif', np.asarray(Image.open(tiles[5]).convert('RGB')).transpose(2, 0, 1), planarconfig='separate', photometric='rgb')
    bad = [d/'notes.txt', d/'slide-sized.png', d/'huge.png', d/'transparent.png', d/'gray16.png', d/'gray-alpha.tif', d/'planar.tif']
    good = tiles + sorted(d.glob('*.png')) + sorted(d.glob('*.jpg'))
    good = [f for f in good if f not in bad]
    return good[:40] + bad + good[40:], bad  # the bad files in the middle: the files after them must still be classified


@contextlib.contextmanager
def static_server(folder):
    "A plain static file server on localhost (what any intranet web host is), in a thread"
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(folder)))
    t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()
    try: yield f'http://127.0.0.1:{srv.server_address[1]}'
    finally: srv.shutdown(); srv.server_close()


ROWS = "[...document.querySelectorAll('#results tbody tr')].map(tr => ({name: tr.dataset.name, p: tr.dataset.p ?? null, label: tr.dataset.label ?? null, error: tr.dataset.error ?? null}))"


def classify_in_page(page, url, files, mode='web worker'):
    "Open the page, choose `files` in its file picker, wait for every row; the rows as the page shows them"
    from pcam_fastai.web import wait_for
    page.goto(url)
    wait_for(page, 'window.pcamState && (window.pcamState.ready || !!window.pcamState.failed)', 120)
    assert page.evaluate('[window.pcamState.failed, window.pcamState.mode]') == [None, mode]  # normally the model runs off the page's thread
    page.evaluate("window.longestPause = 0; let last = performance.now(); setInterval(() => { const t = performance.now(); "
                  "window.longestPause = Math.max(window.longestPause, t - last); last = t; }, 10)")
    page.set_input_files('#files', [str(f) for f in files])
    wait_for(page, f'window.pcamState.done >= {len(files)}', 300)
    pause = page.evaluate('window.longestPause')
    print(f'\nthe page thread paused at most {pause:.0f} ms while classifying {len(files)} files')
    assert pause < 2000, pause  # it never froze: the model runs in the worker, the page decodes one file at a time
    return page.evaluate(ROWS)


def python_labels(b, p1):
    return [b.classes[int(p >= b.threshold)] if b.threshold is not None else None for p in p1]


def hosts(urls):
    "The hosts the browser asked: a blob: URL belongs to the page that made it"
    return {urlparse(u[5:] if u.startswith('blob:') else u).netloc for u in urls if not u.startswith('data:')}


@slow
def test_page_over_http_matches_python(web_bundle, upload):
    "From a localhost static server: probabilities equal load_bundle().predict within 1e-3, labels match, bad files get messages, no other host is asked"
    pytest.importorskip('playwright')
    from playwright.sync_api import sync_playwright
    from pcam_fastai.export import load_bundle
    files, bad = upload
    b = load_bundle(web_bundle, device='cpu')
    with static_server(web_bundle/'web') as url, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        requests = []
        page.on('request', lambda r: requests.append(r.url))
        rows = classify_in_page(page, url + '/index.html', files)
        status, csv, chunks = page.inner_text('#status'), page.evaluate('pcamCsv()'), page.evaluate('window.pcamState.chunks')
        pixels = page.evaluate("[...document.querySelectorAll('#results tbody tr:not(.error) canvas')].map(c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data))")
        browser.close()
    assert [r['name'] for r in rows] == [f.name for f in files]
    by_name = {r['name']: r for r in rows}
    for f in bad: assert by_name[f.name]['error'] and by_name[f.name]['p'] is None, by_name[f.name]
    assert 'is not an image' in by_name['notes.txt']['error']
    assert '2100x2100 pixels; the limit is 4 megapixels' in by_name['slide-sized.png']['error']
    assert '6.0 MB; the limit is 5 MB' in by_name['huge.png']['error']
    assert 'transparent pixels' in by_name['transparent.png']['error'] and '16-bit PNG' in by_name['gray16.png']['error']
    assert 'photometric 1 and 2 samples' in by_name['gray-alpha.tif']['error'] and 'separate colour planes' in by_name['planar.tif']['error']
    assert by_name[files[files.index(bad[-1]) + 1].name]['p'] is not None  # the file after the bad ones is classified
    good = [f for f in files if f not in bad]
    shown = np.array(pixels, np.uint8).reshape(len(good), b.size, b.size, 4)[..., :3]  # the model's input, as each row's thumbnail shows it
    px = np.abs(shown.astype(int) - b.prepare(good).astype(int))
    assert px.max() == 0, [(f.name, int(d.max())) for f, d in zip(good, px) if d.max()]  # TIFF, PNG, JPEG (EXIF-rotated too), resized: Python's pixels
    ref = b.predict(good)[:, 1]
    got = np.array([float(by_name[f.name]['p']) for f in good])
    diff = np.abs(got - ref)
    print(f'\npage vs Python on {len(good)} files: max |diff| {diff.max():.2e} (TIFF {diff[:100].max():.2e}); p range {ref.min():.3f}..{ref.max():.3f}')
    assert diff.max() <= 1e-3, sorted(zip(diff, [f.name for f in good]))[-5:]
    clear = np.abs(ref - b.threshold) > 1e-3  # a file within the tolerance of the threshold may fall either way
    assert [by_name[f.name]['label'] for f, c in zip(good, clear) if c] == [l for l, c in zip(python_labels(b, ref), clear) if c]
    assert ref.std() > 1e-3  # the model tells the tiles apart: the comparison is not of constants
    assert hosts(requests) == {urlparse(url).netloc}, sorted(set(requests))[:10]
    assert f'{len(files)} of {len(files)} files done ({len(bad)} could not be classified)' in status
    assert chunks > 5, chunks  # the model ran in many short chunks, the page painting in between, not in one long freeze
    assert len(csv.strip().splitlines()) == len(files) + 1 and csv.startswith('file,p_normal,p_tumour,label,threshold,error')


@slow
@pytest.mark.parametrize('mode', ['web worker', 'page thread'])
def test_page_from_file_matches_python(web_bundle, mode):
    "Opened from file:// (a file share): the same probabilities, and no request leaves the folder; also with the model on the page's thread (the fallback)"
    pytest.importorskip('playwright')
    from playwright.sync_api import sync_playwright
    from pcam_fastai.export import load_bundle
    files = sorted((FIXTURE/'train').glob('*.tif'))[:12]
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        requests = []
        page.on('request', lambda r: requests.append(r.url))
        rows = classify_in_page(page, (web_bundle/'web'/'index.html').as_uri() + ('?worker=no' if mode == 'page thread' else ''), files, mode)
        assert page.is_visible('#research-only') and 'For research use only; not for clinical diagnosis.' in page.inner_text('body')
        browser.close()
    ref = load_bundle(web_bundle, device='cpu').predict(files)[:, 1]
    assert np.abs(np.array([float(r['p']) for r in rows]) - ref).max() <= 1e-3
    assert all(u.startswith(('file:', 'blob:', 'data:')) for u in requests), [u for u in requests if not u.startswith(('file:', 'blob:'))]
    assert not [u for u in requests if u.startswith('file:') and not u.startswith((web_bundle/'web').as_uri())]


@slow
def test_page_resize_matches_pil_and_torch(web_bundle):
    "The page's two resize rules against PIL's and torch's pixels, shrinking and enlarging"
    pytest.importorskip('playwright')
    import torch
    from playwright.sync_api import sync_playwright
    rng = np.random.default_rng(0)
    tile = np.asarray(Image.open(sorted((FIXTURE/'train').glob('*.tif'))[0]).convert('RGB'))
    cases = [(tile, 64), (tile, 224), (tile, 50), (rng.integers(0, 256, (70, 50, 3), dtype=np.uint8), 96),
             (rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), 96)]
    def pil(a, s): return np.asarray(Image.fromarray(a).resize((s, s), Image.BILINEAR))
    def torch_rule(a, s):
        t = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
        return torch.nn.functional.interpolate(t, size=(s, s), mode='bilinear', align_corners=False, antialias=False)[0].permute(1, 2, 0).numpy()
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        page.goto((web_bundle/'web'/'index.html').as_uri())
        worst = {}
        for a, s in cases:
            for rule, ref in (('pil-bilinear', pil), ('torch-bilinear', torch_rule)):
                got = np.array(page.evaluate('([x, w, h, s, r]) => pcamResize(x, w, h, s, r)', [a.ravel().tolist(), a.shape[1], a.shape[0], s, rule]), np.uint8).reshape(s, s, 3)
                d = np.abs(got.astype(int) - ref(a, s).astype(int))
                worst[rule] = max(worst.get(rule, 0), int(d.max()))
                if rule == 'pil-bilinear': assert d.max() == 0, (a.shape, s, d.max(), (d > 0).mean())
                else: assert d.max() <= 1 and (d > 0).mean() < 0.01, (a.shape, s, d.max(), (d > 0).mean())
        browser.close()
    print(f'\nresize, max |page - reference|: {worst}')


@slow
def test_web_json_and_report(web_bundle):
    "The export records the page's size and its measured throughput, in web.json and the bundle's report"
    import json
    pytest.importorskip('playwright')
    info = json.loads((web_bundle/'web'/'web.json').read_text())
    assert info['total_mb'] > 1 and info['browser']['patches_per_s'] > 0 and info['browser']['other_requests'] == []
    assert info['runtime'] == {'onnxruntime-web': '1.30.0', 'utif': '3.1.0', 'pako': '1.0.11'}
    report = (web_bundle/'report.md').read_text()
    assert '## In the browser' in report and 'patches/s in Chromium' in report and 'onnxruntime in Python' in report
    assert 'MIT' in (web_bundle/'web'/'vendor'/'LICENSES.txt').read_text()
    with open(web_bundle/'web'/'model.js') as f: facts = f.read(200_000).split('window.PCAM_MODEL')[0]
    assert str(web_bundle.parent) not in facts  # no path of the exporting machine in the page


def test_web_cli_errors(tmp_path):
    "Bad requests get one clear line: no bundle, --web with --no-onnx, a runtime folder without the tarballs"
    assert 'is not a bundle' in clean_error(run_main(['web', tmp_path]))
    assert '--web needs model.onnx' in clean_error(run_main(['export', '--run-dir', tmp_path, '--web', '--no-onnx']))
    (tmp_path/'b').mkdir()
    (tmp_path/'b'/'bundle.json').write_text('{"arch": "resnet18", "classes": ["normal", "tumour"], "size": 96, "resize": "pil-bilinear", '
                                            '"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}')
    (tmp_path/'b'/'model.onnx').write_bytes(b'')
    err = clean_error(run_main(['web', tmp_path/'b', '--web-runtime', tmp_path]))
    assert 'npm pack onnxruntime-web@1.30.0' in err and not (tmp_path/'b'/'web').exists()



@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    "A bundle whose page is written with a stand-in runtime (no npm, no model): its model never finishes starting, as a very large one"
    import json
    from pcam_fastai import web
    from pcam_fastai.webruntime import WEB_RUNTIME
    rt = tmp_path/'runtime'; rt.mkdir()
    names = [n for s in WEB_RUNTIME.values() for n in s['files'].values()]
    for n in names: (rt/n).write_text('/* stand-in */\n')
    (rt/'ort.wasm.min.js').write_text('/*! stand-in */ var ort = {env: {wasm: {}}, InferenceSession: {create: () => new Promise(() => {})}};\n')
    monkeypatch.setattr(web, 'web_runtime', lambda source=None: {n: rt/n for n in names})
    b = tmp_path/'bundle'; b.mkdir()
    (b/'bundle.json').write_text(json.dumps(dict(arch='resnet18', classes=['normal', 'tumour'], positive='tumour', size=96, resize='pil-bilinear', threshold=0.5,
                                                 mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])))
    (b/'model.onnx').write_bytes(b'not a model')
    return b


def page_files(b): return sorted(p.relative_to(b/'web').as_posix() for p in (b/'web').rglob('*') if p.is_file())


def test_page_says_research_only(stand_in):
    "The page says, above everything it shows, that it is for research and not for diagnosis"
    from pcam_fastai.web import export_web
    html = (export_web(stand_in, measure=False)/'index.html').read_text()
    line = 'For research use only; not for clinical diagnosis.'
    assert '<p class="warn" id="research-only"><strong>' + line in html
    assert html.index('<body>') < html.index(line) < html.index('<div id="model">') < html.index('id="files"')


def test_reexport_keeps_the_users_files(stand_in):
    "A re-export replaces only the files the export wrote (its manifest); files and folders the user added to web/ stay, and remove_web_page leaves them too"
    import json
    from pcam_fastai.web import export_web, remove_web_page, WEB_MANIFEST
    web = export_web(stand_in, measure=False)
    page = page_files(stand_in)
    manifest = json.loads((web/WEB_MANIFEST).read_text())
    assert manifest['format'] == 1 and manifest['files'] == [f for f in page if f != WEB_MANIFEST]
    assert {'index.html', 'model.js', 'web.json', 'vendor/ort-wasm.js'} <= set(manifest['files'])
    mine = ['notes.txt', 'mine/slides/a.png', 'vendor/extra.js']
    for f in mine: (web/f).parent.mkdir(parents=True, exist_ok=True); (web/f).write_text(f)
    (web/'vendor'/'old.js').write_text('an older page had it'); manifest['files'].append('vendor/old.js')
    (web/WEB_MANIFEST).write_text(json.dumps(manifest))
    export_web(stand_in, measure=False)
    assert page_files(stand_in) == sorted(page + mine)  # the stale vendor/old.js went; the user's files are there
    assert all((web/f).read_text() == f for f in mine)
    remove_web_page(stand_in)
    assert page_files(stand_in) == sorted(mine)


def test_web_folder_without_manifest(stand_in):
    "A web/ the user made is written into where nothing collides, refused where it would overwrite their file; a page from before the manifest is replaced"
    from pcam_fastai.web import export_web, WEB_MANIFEST
    from pcam_fastai.webruntime import WebExportError
    web = stand_in/'web'; web.mkdir()
    (web/'README.txt').write_text('for colleagues')
    export_web(stand_in, measure=False)
    assert (web/'README.txt').read_text() == 'for colleagues' and (web/'index.html').exists()
    (web/WEB_MANIFEST).unlink()  # as a page written before the manifest: recognised by its model.js and web.json
    export_web(stand_in, measure=False)
    assert (web/WEB_MANIFEST).exists() and (web/'README.txt').exists()
    for f in page_files(stand_in):
        if f != 'README.txt': (web/f).unlink()
    (web/'index.html').write_text('my own page')
    with pytest.raises(WebExportError, match=r"holds index.html, which the export did not write \(the folder has no .pcam-web-manifest.json\)"):
        export_web(stand_in, measure=False)
    assert (web/'index.html').read_text() == 'my own page' and page_files(stand_in) == ['README.txt', 'index.html']


def test_web_link_or_file_is_refused(stand_in, tmp_path):
    "BUNDLE/web as a symbolic link (or one inside it) or a file: one clear line, and nothing written or removed through the link"
    elsewhere = tmp_path/'elsewhere'; elsewhere.mkdir(); (elsewhere/'keep.txt').write_text('keep')
    (stand_in/'web').symlink_to(elsewhere)
    err = clean_error(run_main(['web', stand_in, '--no-measure']))
    assert 'web is a symbolic link' in err and 'remove the link' in err, err
    assert sorted(p.name for p in elsewhere.iterdir()) == ['keep.txt']
    (stand_in/'web').unlink(); (stand_in/'web').write_text('a file')
    assert 'web is a file, not a folder' in clean_error(run_main(['web', stand_in, '--no-measure']))
    (stand_in/'web').unlink(); (stand_in/'web').mkdir(); (stand_in/'web'/'vendor').symlink_to(elsewhere)
    assert 'vendor is a symbolic link' in clean_error(run_main(['web', stand_in, '--no-measure']))
    assert sorted(p.name for p in elsewhere.iterdir()) == ['keep.txt']


def test_measure_timeout_is_said(stand_in, capsys):
    "A page that does not start within the measurement's timeout: 'not measured (timed out after N s)' in the printed line, web.json and the report, no figure"
    import json
    pytest.importorskip('playwright')
    from pcam_fastai.web import export_web
    web = export_web(stand_in, measure_timeout=3)
    out = capsys.readouterr().out
    if 'headless Chromium did not run the page' in out: pytest.skip('no headless Chromium: ' + out[-300:])
    said = 'throughput not measured (timed out after 3 s)'
    assert said in out and said in (stand_in/'report.md').read_text(), out
    assert 'patches/s in' not in out and 'patches/s in' not in (stand_in/'report.md').read_text()
    assert json.loads((web/'web.json').read_text())['browser'] == {
        'not_measured': 'timed out after 3 s: the page had not started in headless Chromium', 'timed_out_s': 3}


@slow
def test_bench_prints_the_page_beside_python(web_bundle, home, tmp_path):
    "bench/web_page.py times the page and onnxruntime in Python in one run (last here: it rewrites web/ without the export's figures)"
    import json, subprocess, sys
    pytest.importorskip('playwright')
    res = subprocess.run([sys.executable, ROOT/'bench'/'web_page.py', web_bundle, '--n', '16', '--out', tmp_path/'b.json'],
                         capture_output=True, text=True, timeout=600, env={**os.environ, 'PCAM_FASTAI_HOME': str(home)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = json.loads((tmp_path/'b.json').read_text())
    assert len(rows) == 6 and all(r['patches_per_s'] > 0 for r in rows)
    assert 'the page against onnxruntime in Python on one thread' in res.stdout
