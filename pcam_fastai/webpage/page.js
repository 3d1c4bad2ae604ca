// pcam_fastai's in-browser page: decodes patches, resizes them as the bundle's training did, and runs model.onnx
// with onnxruntime-web (WebAssembly, one thread) on this computer. Written by `pcam-fastai export --web`.
'use strict';
(function () {
  const B = window.PCAM_BUNDLE;  // bundle.json's model facts, written into model.js by the export
  const LIMITS = B.page_limits;  // the same defaults as `pcam-fastai serve`: a patch, not a slide
  const CHUNK_MS = 60;  // classify in chunks of about this long, updating the rows and the progress bar in between
  const state = window.pcamState = { ready: false, mode: null, failed: null, queued: 0, done: 0, errors: 0, counts: {}, chunks: 0, results: [], busy: false };
  const $ = id => document.getElementById(id);

  function b64bytes(s) {
    const bin = atob(s), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  // ---- the runtime and the model: both come from files beside the page (classic scripts, so file:// works too) ----
  // The model runs in a web worker made from those scripts' text, so the page never waits on it; where a worker
  // cannot start, on the page's own thread, in chunks.
  function workerMain() {  // the worker's code (after onnxruntime-web's): one session, one message per batch
    let session = null;
    self.onmessage = async e => {
      const m = e.data;
      try {
        if (m.type === 'init') {
          ort.env.wasm.numThreads = 1;  // threads need cross-origin isolation, which file:// and plain static hosts don't give
          ort.env.wasm.wasmBinary = m.wasm;
          ort.env.wasm.wasmPaths = { mjs: URL.createObjectURL(new Blob([m.glue], { type: 'text/javascript' })) };
          session = await ort.InferenceSession.create(m.model, { executionProviders: ['wasm'] });
          self.postMessage({ id: m.id, ok: true });
        } else {
          const out = await session.run({ [session.inputNames[0]]: new ort.Tensor('uint8', m.x, m.dims) });
          const probs = Float32Array.from(out[session.outputNames[0]].data);
          self.postMessage({ id: m.id, ok: true, probs }, [probs.buffer]);
        }
      } catch (err) { self.postMessage({ id: m.id, ok: false, error: String((err && err.message) || err) }); }
    };
  }
  function startWorker() {
    return new Promise((resolve, reject) => {
      let w;
      try { w = new Worker(URL.createObjectURL(new Blob([window.PCAM_ORT_JS + '\n;(' + workerMain.toString() + ')();\n'], { type: 'text/javascript' }))); }
      catch (e) { reject(e); return; }
      const pending = new Map();
      let next = 1;
      w.onmessage = e => { const p = pending.get(e.data.id); pending.delete(e.data.id); if (e.data.ok) p.resolve(e.data); else p.reject(new Error(e.data.error)); };
      w.onerror = e => {
        if (e.preventDefault) e.preventDefault();
        const err = new Error(e.message || 'the model worker stopped');
        for (const p of pending.values()) p.reject(err);
        pending.clear(); reject(err);
      };
      const call = (msg, transfer) => new Promise((res, rej) => { const id = next++; pending.set(id, { resolve: res, reject: rej }); w.postMessage({ ...msg, id }, transfer); });
      const wasm = b64bytes(window.PCAM_ORT_WASM).buffer, model = b64bytes(window.PCAM_MODEL);
      call({ type: 'init', wasm, glue: window.PCAM_ORT_GLUE, model }, [wasm, model.buffer])
        .then(() => resolve({ mode: 'web worker', run: (x, dims) => call({ type: 'run', x, dims }, [x.buffer]).then(r => r.probs) }), e => { w.terminate(); reject(e); });
    });
  }
  async function startOnPageThread() {
    ort.env.wasm.numThreads = 1;
    ort.env.wasm.wasmBinary = b64bytes(window.PCAM_ORT_WASM).buffer;
    ort.env.wasm.wasmPaths = { mjs: URL.createObjectURL(new Blob([window.PCAM_ORT_GLUE], { type: 'text/javascript' })) };
    const session = await ort.InferenceSession.create(b64bytes(window.PCAM_MODEL), { executionProviders: ['wasm'] });
    return { mode: 'page thread', run: async (x, dims) => (await session.run({ [session.inputNames[0]]: new ort.Tensor('uint8', x, dims) }))[session.outputNames[0]].data };
  }
  async function startModel() {
    let model;
    try {
      if (new URLSearchParams(location.search).get('worker') === 'no') throw new Error('index.html?worker=no');  // the fallback, on purpose
      model = await startWorker();
    }
    catch (e) { console.warn('pcam_fastai: the model worker did not start (' + e.message + '); running the model on the page thread'); model = await startOnPageThread(); }
    window.PCAM_ORT_WASM = window.PCAM_MODEL = window.PCAM_ORT_JS = null;  // the decoded copies are all that is needed now
    state.mode = model.mode;
    return model;
  }

  // ---- formats: recognised by their first bytes; sizes read from the header before anything is decoded ----
  const u16be = (b, i) => (b[i] << 8) | b[i + 1], u16le = (b, i) => b[i] | (b[i + 1] << 8);
  const u32be = (b, i) => ((b[i] << 24) >>> 0) + (b[i + 1] << 16) + (b[i + 2] << 8) + b[i + 3];
  function sniff(b) {
    if (b.length >= 24 && b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4E && b[3] === 0x47) return 'png';
    if (b.length >= 4 && b[0] === 0xFF && b[1] === 0xD8 && b[2] === 0xFF) return 'jpeg';
    if (b.length >= 8 && ((b[0] === 0x49 && b[1] === 0x49 && b[2] === 42 && b[3] === 0) || (b[0] === 0x4D && b[1] === 0x4D && b[2] === 0 && b[3] === 42))) return 'tiff';
    if (b.length >= 8 && ((b[0] === 0x49 && b[1] === 0x49 && b[2] === 43) || (b[0] === 0x4D && b[1] === 0x4D && b[3] === 43))) return 'bigtiff';
    if (b.length >= 26 && b[0] === 0x42 && b[1] === 0x4D) return 'bmp';
    if (b.length >= 10 && b[0] === 0x47 && b[1] === 0x49 && b[2] === 0x46 && b[3] === 0x38) return 'gif';
    if (b.length >= 30 && u32be(b, 0) === 0x52494646 && u32be(b, 8) === 0x57454250) return 'webp';
    return null;
  }
  function headerSize(fmt, b) {
    if (fmt === 'png') return [u32be(b, 16), u32be(b, 20)];
    if (fmt === 'gif') return [u16le(b, 6), u16le(b, 8)];
    if (fmt === 'bmp') { const dv = new DataView(b.buffer, b.byteOffset); return [Math.abs(dv.getInt32(18, true)), Math.abs(dv.getInt32(22, true))]; }
    if (fmt === 'webp') {
      const kind = String.fromCharCode(b[12], b[13], b[14], b[15]);
      if (kind === 'VP8X') return [1 + (b[24] | (b[25] << 8) | (b[26] << 16)), 1 + (b[27] | (b[28] << 8) | (b[29] << 16))];
      if (kind === 'VP8L') return [1 + (((b[22] & 0x3F) << 8) | b[21]), 1 + (((b[24] & 0x0F) << 10) | (b[23] << 2) | ((b[22] & 0xC0) >> 6))];
      return [u16le(b, 26) & 0x3FFF, u16le(b, 28) & 0x3FFF];
    }
    if (fmt === 'jpeg') {
      let i = 2;
      while (i + 9 < b.length) {
        if (b[i] !== 0xFF) return null;
        const m = b[i + 1];
        if (m === 0xFF) { i += 1; continue; }
        if (m >= 0xC0 && m <= 0xCF && m !== 0xC4 && m !== 0xC8 && m !== 0xCC) return [u16be(b, i + 7), u16be(b, i + 5)];
        i += 2 + u16be(b, i + 2);
      }
      return null;
    }
    return null;
  }

  // ---- decoding to RGBA: TIFF with UTIF (browsers can't), the rest by the browser without colour management ----
  async function decode(file, bytes) {  // (the bytes may be replaced by a corrected copy)
    const fmt = sniff(bytes);
    if (fmt === null) throw new Error('is not an image this page can read (PNG, JPEG, TIFF, BMP, GIF or WebP)');
    if (fmt === 'bigtiff') throw new Error('is a BigTIFF, which this page cannot read: save the patch as a TIFF, PNG or JPEG');
    let ifd = null, wh = null;
    if (fmt === 'tiff') {
      let ifds;
      try { ifds = UTIF.decode(bytes.buffer); } catch (e) { throw new Error('is a damaged TIFF (' + e.message + ')'); }
      if (!ifds.length || !ifds[0].t256 || !ifds[0].t257) throw new Error('is a TIFF without an image in it');
      ifd = ifds[0];
      wh = [ifd.t256[0], ifd.t257[0]];
    } else wh = headerSize(fmt, bytes);
    if (wh) checkPixels(wh[0], wh[1]);
    if (fmt === 'tiff') {
      checkTiff(ifd);
      try { UTIF.decodeImage(bytes.buffer, ifd); } catch (e) { throw new Error('is a TIFF this page cannot decode (' + e.message + ')'); }
      if (!ifd.width || !ifd.data || ifd.data.length < ifd.width * ifd.height * (ifd.t277 ? ifd.t277[0] : 1)) throw new Error('is a TIFF this page cannot decode (damaged or truncated)');
      return { rgba: UTIF.toRGBA8(ifd), width: ifd.width, height: ifd.height };  // 8-bit gray, RGB or RGBA: exact
    }
    if (fmt === 'png' && bytes[24] === 16) throw new Error('is a 16-bit PNG; the page reads 8-bit images (Python would scale it by its own rule): save it as 8-bit');
    if (fmt === 'jpeg') bytes = withoutExifOrientation(bytes);
    let bmp;
    try { bmp = await createImageBitmap(new Blob([bytes], { type: 'image/' + fmt }), { colorSpaceConversion: 'none', premultiplyAlpha: 'none' }); }
    catch (e) { throw new Error('cannot be decoded: it looks like a ' + fmt.toUpperCase() + ' file but is damaged or truncated'); }
    const width = bmp.width, height = bmp.height;  // (a closed bitmap's are 0)
    let rgba;
    try {
      checkPixels(width, height);
      const canvas = new OffscreenCanvas(width, height), ctx = canvas.getContext('2d', { willReadFrequently: true });
      ctx.drawImage(bmp, 0, 0);
      rgba = ctx.getImageData(0, 0, width, height).data;
    } finally { bmp.close(); }
    for (let i = 3; i < rgba.length; i += 4) if (rgba[i] !== 255)  // a canvas keeps colours premultiplied: transparent pixels lose theirs
      throw new Error('has transparent pixels, whose colours a browser cannot read back exactly (Python keeps them): save it without transparency');
    return { rgba, width, height };
  }
  const TIFF_COMPRESSIONS = { 1: 'none', 5: 'LZW', 8: 'deflate', 32946: 'deflate', 32773: 'PackBits' };  // what UTIF decodes exactly
  function checkTiff(ifd) {  // UTIF decodes other layouts wrongly without a word (black or scrambled pixels): refuse them
    const tag = (t, d) => (ifd[t] ? ifd[t][0] : d), cmpr = tag('t259', 1), photo = tag('t262', -1), spp = tag('t277', 1);
    const bits = ifd.t258 ? Array.from(ifd.t258) : [1], planar = tag('t284', 1), format = tag('t339', 1);
    const save = ': save it as an 8-bit RGB TIFF (uncompressed, LZW or deflate), PNG or JPEG';
    if (!(cmpr in TIFF_COMPRESSIONS)) throw new Error(`is a TIFF with compression ${cmpr}, which this page cannot decode` + save);
    if (bits.some(b => b !== 8) || format !== 1) throw new Error(`is a TIFF with ${bits.join('/')}-bit ${format === 3 ? 'float' : format === 2 ? 'signed' : ''} samples; the page reads 8-bit ones` + save);
    if (planar !== 1) throw new Error('is a TIFF with separate colour planes, which this page cannot decode' + save);
    if (spp === 4 && tag('t338', 0) === 1) throw new Error('is a TIFF with premultiplied alpha, which Python un-premultiplies and this page cannot' + save);
    if (!((photo === 2 && (spp === 3 || spp === 4)) || (photo === 1 && spp === 1)))
      throw new Error(`is a TIFF with photometric ${photo} and ${spp} samples per pixel; the page reads gray, RGB and RGBA` + save);
  }
  function withoutExifOrientation(b) {  // browsers rotate JPEGs by their EXIF orientation; PIL (and so Python) does not
    for (let i = 2; i + 4 < b.length && b[i] === 0xFF;) {
      const m = b[i + 1], len = u16be(b, i + 2);
      if (m === 0xDA) break;  // start of the image data: no EXIF before it
      if (m === 0xE1 && len > 16 && String.fromCharCode(b[i + 4], b[i + 5], b[i + 6], b[i + 7]) === 'Exif') {
        const t = i + 10, le = b[t] === 0x49, rd = o => (le ? u16le(b, t + o) : u16be(b, t + o));
        const ifd0 = le ? (b[t + 4] | (b[t + 5] << 8) | (b[t + 6] << 16)) : ((b[t + 5] << 16) | (b[t + 6] << 8) | b[t + 7]);
        const n = rd(ifd0);
        for (let e = 0; e < n; e++) {
          const o = ifd0 + 2 + e * 12;
          if (t + o + 10 > i + 2 + len) break;
          if (rd(o) === 0x0112 && rd(o + 8) !== 1) {
            const c = b.slice(); c[t + o + 8] = le ? 1 : 0; c[t + o + 9] = le ? 0 : 1;
            return c;
          }
        }
        break;
      }
      i += 2 + len;
    }
    return b;
  }
  function checkPixels(w, h) {
    if (w * h > LIMITS.max_pixels) throw new Error(`is ${w}x${h} pixels; the limit is ${LIMITS.max_pixels / 1e6} megapixels: choose a patch, not a slide`);
    if (!w || !h) throw new Error('has no pixels');
  }
  function rgbOf(rgba, n) {  // drop alpha, as PIL's convert('RGB') does
    const out = new Uint8Array(n * 3);
    for (let i = 0, j = 0; i < n; i++, j += 4) { out[i * 3] = rgba[j]; out[i * 3 + 1] = rgba[j + 1]; out[i * 3 + 2] = rgba[j + 2]; }
    return out;
  }

  // ---- resizing as the run's training loader did: one separable bilinear resampler, two rules ----
  // 'pil-bilinear': PIL's Image.resize(BILINEAR): the filter widens when shrinking (antialias), 22-bit fixed point.
  // 'torch-bilinear': torch's uint8 bilinear interpolate without antialiasing: a fixed 2-tap filter, 16-bit fixed point.
  function axisWeights(inSize, outSize, rule) {
    const scale = inSize / outSize, antialias = rule === 'pil-bilinear';
    const filterscale = antialias ? Math.max(scale, 1) : 1, support = filterscale;
    const ksize = Math.ceil(support) * 2 + 1, bounds = new Int32Array(outSize * 2), w = new Float64Array(outSize * ksize);
    let wmax = 0;
    for (let o = 0; o < outSize; o++) {
      const center = (o + 0.5) * scale;
      const xmin = Math.max(Math.trunc(center - support + 0.5), 0), xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
      let total = 0;
      for (let x = 0; x < xmax; x++) {
        const t = Math.abs((x + xmin - center + 0.5) / filterscale), v = t < 1 ? 1 - t : 0;
        w[o * ksize + x] = v; total += v;
      }
      for (let x = 0; x < xmax; x++) { if (total !== 0) w[o * ksize + x] /= total; wmax = Math.max(wmax, w[o * ksize + x]); }
      bounds[o * 2] = xmin; bounds[o * 2 + 1] = xmax;
    }
    let bits = 22;
    if (!antialias) { bits = 0; while (bits < 15 && Math.trunc(0.5 + wmax * 2 ** (bits + 1)) < 2 ** 15) bits++; }
    const k = new Float64Array(w.length);
    for (let i = 0; i < w.length; i++) k[i] = w[i] < 0 ? Math.trunc(-0.5 + w[i] * 2 ** bits) : Math.trunc(0.5 + w[i] * 2 ** bits);
    return { ksize, bounds, k, bits };
  }
  function resamplePass(src, w, h, out, horizontal, A) {  // uint8 RGB in, uint8 RGB out along one axis
    const half = 2 ** (A.bits - 1), div = 2 ** A.bits, ow = horizontal ? out.w : w, oh = horizontal ? h : out.h;
    const dst = new Uint8Array(ow * oh * 3);
    for (let y = 0; y < oh; y++) for (let x = 0; x < ow; x++) {
      const o = horizontal ? x : y, xmin = A.bounds[o * 2], n = A.bounds[o * 2 + 1], kb = o * A.ksize;
      for (let c = 0; c < 3; c++) {
        let s = half;
        for (let i = 0; i < n; i++) {
          const si = horizontal ? (y * w + xmin + i) * 3 + c : ((xmin + i) * w + x) * 3 + c;
          s += src[si] * A.k[kb + i];
        }
        const v = Math.floor(s / div);
        dst[(y * ow + x) * 3 + c] = v < 0 ? 0 : v > 255 ? 255 : v;
      }
    }
    return dst;
  }
  function resize(rgb, w, h, size, rule) {
    if (w === size && h === size) return rgb;
    let cur = rgb;
    if (w !== size) cur = resamplePass(cur, w, h, { w: size }, true, axisWeights(w, size, rule));  // horizontal first, as both do
    if (h !== size) cur = resamplePass(cur, size, h, { h: size }, false, axisWeights(h, size, rule));
    return cur;
  }

  // ---- the model: (N, size, size, 3) uint8 in, (N, classes) probabilities out ----
  async function runBatch(model, patches) {
    const s = B.size, x = new Uint8Array(patches.length * s * s * 3);
    patches.forEach((p, i) => x.set(p, i * s * s * 3));
    const probs = await model.run(x, [patches.length, s, s, 3]), nc = B.classes.length;
    return patches.map((_, i) => Array.from(probs.slice(i * nc, (i + 1) * nc)));
  }
  function labelOf(p) {  // as pcam-fastai serve: p(positive) >= the bundle's threshold, else the most likely class
    if (B.threshold !== null && B.classes.length === 2) return B.classes[p[1] >= B.threshold ? 1 : 0];
    return B.classes[p.indexOf(Math.max(...p))];
  }

  // ---- the queue: one file at a time is read and decoded, the model runs on chunks, the page paints in between ----
  const queue = [];
  let session = null, msPerPatch = 20, generation = 0;
  const yieldToPage = () => new Promise(r => setTimeout(r, 0));

  function addFiles(files) {
    if (!files.length) return;
    for (const f of files) queue.push(f);
    state.queued += files.length;
    $('results').hidden = false;
    showProgress();
    if (!state.busy && session) work();
  }
  async function prepare(file) {
    if (file.size > LIMITS.max_mb * 1e6) throw new Error(`is ${(file.size / 1e6).toFixed(1)} MB; the limit is ${LIMITS.max_mb} MB: choose a patch, not a slide`);
    if (file.size === 0) throw new Error('is empty');
    const bytes = new Uint8Array(await file.arrayBuffer());
    const img = await decode(file, bytes);
    return { patch: resize(rgbOf(img.rgba, img.width * img.height), img.width, img.height, B.size, B.resize), width: img.width, height: img.height };
  }
  async function work() {
    state.busy = true;
    try {
      while (queue.length) {
        const gen = generation, items = [], target = Math.max(1, Math.min(64, Math.round(CHUNK_MS / msPerPatch)));
        let n = 0;
        while (queue.length && n < target) {  // in the files' order: rows and the CSV keep it
          const file = queue.shift();
          try { items.push({ file, ...(await prepare(file)) }); n += 1; }
          catch (e) { items.push({ file, error: file.name + ' ' + e.message }); }
        }
        const good = items.filter(c => !c.error);
        if (good.length) {
          const t0 = performance.now();
          try { (await runBatch(session, good.map(c => c.patch))).forEach((p, i) => { good[i].probs = p; }); }
          catch (e) { good.forEach(c => { c.error = c.file.name + ': the model failed on it (' + (e.message || e) + ')'; }); }
          msPerPatch = Math.max(1, (performance.now() - t0) / good.length); state.chunks += 1;
        }
        if (gen !== generation) continue;  // cleared meanwhile
        items.forEach(c => addRow(c.error ? { name: c.file.name, error: c.error }
          : { name: c.file.name, probs: c.probs, label: labelOf(c.probs), patch: c.patch, width: c.width, height: c.height }));
        await yieldToPage();
      }
    } finally { state.busy = false; showProgress(); }
  }

  // ---- what the user sees ----
  function fmt(v, d = 4) { return v === null || v === undefined ? '–' : Number(v).toFixed(d); }
  function addRow(r) {
    state.results.push(r); state.done += 1;
    if (r.error) state.errors += 1; else state.counts[r.label] = (state.counts[r.label] || 0) + 1;
    const tr = document.createElement('tr');
    tr.dataset.name = r.name;
    const cell = (content, cls) => { const td = document.createElement('td'); if (cls) td.className = cls; if (content instanceof Node) td.appendChild(content); else td.textContent = content; tr.appendChild(td); return td; };
    if (r.error) {
      tr.className = 'error'; tr.dataset.error = r.error;
      cell(''); cell(r.name); const td = cell(r.error); td.colSpan = 2;
    } else {
      const pi = B.classes.length === 2 ? 1 : r.probs.indexOf(Math.max(...r.probs));
      tr.dataset.p = String(r.probs[pi]); tr.dataset.probs = JSON.stringify(r.probs); tr.dataset.label = r.label;
      const c = document.createElement('canvas'); c.width = c.height = B.size;
      const img = new ImageData(B.size, B.size), px = img.data;
      for (let i = 0; i < B.size * B.size; i++) { px[i * 4] = r.patch[i * 3]; px[i * 4 + 1] = r.patch[i * 3 + 1]; px[i * 4 + 2] = r.patch[i * 3 + 2]; px[i * 4 + 3] = 255; }
      c.getContext('2d').putImageData(img, 0, 0);
      c.title = `the model's input: ${B.size}x${B.size}` + (r.width !== B.size || r.height !== B.size ? `, resized from ${r.width}x${r.height} (${B.resize})` : '');
      cell(c); cell(r.name); cell(B.classes.length === 2 ? fmt(r.probs[1]) : `${B.classes[pi]} ${fmt(r.probs[pi])}`, 'p');
      cell(r.label, r.label === B.positive ? 'pos' : '');
      delete r.patch;  // the canvas holds the pixels; the results keep only the numbers
    }
    $('results').tBodies[0].appendChild(tr);
    $('csv').disabled = $('clear').disabled = false;
    showProgress();
  }
  function showProgress() {
    const p = $('progress');
    if (state.failed) return;
    p.hidden = state.queued === 0 || state.done >= state.queued;
    p.max = Math.max(1, state.queued); p.value = state.done;
    const errors = state.errors, counts = B.classes.map(c => state.counts[c] || 0);
    $('status').textContent = !session ? 'Loading the model…' : state.queued === 0 ? 'Ready: choose or drop patches.' :
      `${state.done} of ${state.queued} files done` + (errors ? ` (${errors} could not be classified)` : '') + (state.done < state.queued ? '…' : '.') +
      (state.done > errors ? ' ' + B.classes.map((c, i) => `${c}: ${counts[i]}`).join(', ') + '.' : '');
  }
  function csvText() {
    const q = s => '"' + String(s).replace(/^([=+\-@\t\r])/, "'$1").replace(/"/g, '""') + '"';  // no spreadsheet formulas from file names
    const head = ['file', ...B.classes.map(c => 'p_' + c), 'label', 'threshold', 'error'];
    const rows = state.results.map(r => r.error ? [q(r.name), ...B.classes.map(() => ''), '', '', q(r.error)]
      : [q(r.name), ...r.probs.map(v => v.toPrecision(7)), q(r.label), B.threshold ?? '', '']);
    return [head.join(','), ...rows.map(r => r.join(','))].join('\n') + '\n';
  }
  function showModel() {
    const rows = [['model', `${B.arch}, ${(B.n_params / 1e6).toFixed(2)} M parameters, model.onnx ${B.onnx_mb} MB`],
      ['classes', B.classes.join(', ') + (B.positive ? ` (positive: ${B.positive})` : '')],
      ['input', `${B.size}x${B.size} RGB; other sizes are resized (${B.resize})` + (B.tta ? '; the 8 dihedral views are averaged' : '')]];
    if (B.threshold !== null) rows.push(['label', `${B.positive} when p(${B.positive}) ≥ ${fmt(B.threshold)}: ${B.threshold_source}`]);
    const v = [['accuracy', B.valid_accuracy], ['ROC AUC', B.valid_roc_auc], ['balanced accuracy', B.valid_balanced_accuracy], ['ECE', B.valid_ece]].filter(([, x]) => x !== null && x !== undefined);
    if (v.length) rows.push(['validation', v.map(([k, x]) => `${k} ${fmt(x)}`).join(', ') + (B.split ? ` (${B.split})` : '')]);
    if (B.tta && B.valid_tta === false) rows.push(['note', 'the run was evaluated on one view; this bundle averages 8']);
    if (!B.tta && B.valid_tta) rows.push(['note', 'the validation numbers and threshold were measured with 8 views averaged; this bundle uses one']);
    const t = document.createElement('table');
    for (const [k, x] of rows) { const tr = t.insertRow(); tr.insertCell().textContent = k; tr.insertCell().textContent = x; }
    $('model').replaceChildren(t);
    $('p-head').textContent = B.classes.length === 2 ? `p(${B.positive})` : 'most likely';
    $('limits').textContent = `PNG, JPEG, TIFF, BMP, GIF or WebP; at most ${LIMITS.max_mb} MB and ${LIMITS.max_pixels / 1e6} megapixels a file.`;
    $('about').textContent = `Exported by pcam_fastai ${B.pcam_fastai} on ${B.exported}; onnxruntime-web ${B.runtime['onnxruntime-web']}, WebAssembly, one thread` +
      (state.mode ? ` (in a ${state.mode})` : '') + '. ' +
      'In the project\'s tests (headless Chromium, real PCam tiles) the probabilities equal the Python bundle\'s (load_bundle(...).predict) within 1e-3.';
  }

  // ---- a benchmark the export runs in headless Chromium: random patches, patches/s ----
  window.pcamBenchmark = async function (n = 64, bs = 16, maxSeconds = 20) {
    const s = B.size, rnd = () => { const a = new Uint8Array(s * s * 3); for (let i = 0; i < a.length; i++) a[i] = (Math.random() * 256) | 0; return a; };
    const patches = Array.from({ length: bs }, rnd);
    await runBatch(session, patches.slice(0, 2));  // warm-up
    const t0 = performance.now();
    let done = 0;
    while (done < n && (done === 0 || performance.now() - t0 < maxSeconds * 1000)) { await runBatch(session, patches); done += bs; }
    return { patches: done, seconds: (performance.now() - t0) / 1000, patches_per_s: done / ((performance.now() - t0) / 1000), batch: bs };
  };
  window.pcamResize = (rgb, w, h, size, rule) => Array.from(resize(Uint8Array.from(rgb), w, h, size, rule));  // for the tests
  window.pcamCsv = csvText;

  // ---- wiring ----
  showModel(); showProgress();
  const drop = $('drop');
  $('files').addEventListener('change', e => { addFiles([...e.target.files]); e.target.value = ''; });
  window.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
  window.addEventListener('dragleave', e => { if (!e.relatedTarget) drop.classList.remove('over'); });
  window.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over'); addFiles([...e.dataTransfer.files]); });
  $('csv').addEventListener('click', () => {
    const a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([csvText()], { type: 'text/csv' })); a.download = 'pcam-results.csv'; a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  });
  $('clear').addEventListener('click', () => {
    queue.length = 0; generation += 1;  // files not started are dropped; a chunk being classified is discarded when it ends
    state.results = []; state.queued = state.done = state.errors = 0; state.counts = {};
    $('results').tBodies[0].replaceChildren(); $('results').hidden = true; $('csv').disabled = $('clear').disabled = true; showProgress();
  });
  startModel().then(s => { session = s; state.ready = true; showModel(); showProgress(); if (queue.length) work(); })
    .catch(e => {
      state.failed = String(e && e.message || e);
      $('status').innerHTML = '';
      const p = document.createElement('p'); p.className = 'warn';
      p.textContent = 'The model could not be started in this browser: ' + state.failed + '. Use a current Chrome, Edge, Firefox or Safari (WebAssembly with SIMD is needed).';
      $('status').appendChild(p);
    });
})();
