// B-scan-first view of an OCT volume for the review page. The volume's array has axes (V, H, W) = (B-scan,
// depth from the vitreous down, lateral A-scan), the convention of data_prep.oct_nifti. One large B-scan (depth
// down, A-scans across, at the aspect of the voxel spacing) and beside it an en-face projection along depth
// (V down, W across) with a line at the current B-scan. Both are plain 2D canvases drawn from the voxel arrays
// that NiiVue's reader returns; the saliency uses NiiVue's own colour tables so that it looks as in the
// three-plane view of other scans.
import { NVImage, cmapper } from "/static/niivue.js";

const LINE_COLOUR = "rgb(51, 204, 255)"; // the three-plane view's crosshair colour
const OUTLINE_COLOUR = "rgb(0, 255, 0)";
const GAP = 12; // px between the two views

// the voxel values with the header's scaling applied (NiiVue keeps the raw type and scales when it draws)
function values(vol) {
  const slope = Number.isFinite(vol.hdr.scl_slope) && vol.hdr.scl_slope !== 0 ? vol.hdr.scl_slope : 1;
  const inter = Number.isFinite(vol.hdr.scl_inter) ? vol.hdr.scl_inter : 0;
  if (slope === 1 && inter === 0) return vol.img;
  const out = new Float32Array(vol.img.length);
  for (let i = 0; i < out.length; i++) out[i] = vol.img[i] * slope + inter;
  return out;
}

function dimsOf(vol) {
  return [vol.hdr.dims[1], vol.hdr.dims[2], vol.hdr.dims[3]];
}

function percentile(data, q) {
  const sorted = Float32Array.from(data).sort();
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.round(q * (sorted.length - 1))))];
}

// line segments along the voxel edges between inside and outside of a 2D mask (rows x cols, row-major)
function edgePath(inside, rows, cols, sx, sy) {
  const path = new Path2D();
  const at = (r, c) => r >= 0 && c >= 0 && r < rows && c < cols && inside[r * cols + c];
  for (let r = 0; r < rows; r++)
    for (let c = 0; c < cols; c++) {
      if (!inside[r * cols + c]) continue;
      if (!at(r - 1, c)) { path.moveTo(c * sx, r * sy); path.lineTo((c + 1) * sx, r * sy); }
      if (!at(r + 1, c)) { path.moveTo(c * sx, (r + 1) * sy); path.lineTo((c + 1) * sx, (r + 1) * sy); }
      if (!at(r, c - 1)) { path.moveTo(c * sx, r * sy); path.lineTo(c * sx, (r + 1) * sy); }
      if (!at(r, c + 1)) { path.moveTo((c + 1) * sx, r * sy); path.lineTo((c + 1) * sx, (r + 1) * sy); }
    }
  return path;
}

export class OctView {
  /**
   * @param {object} el the page's elements: view (the container), bscan and enface (canvases), slider,
   *   number (the B-scan number), controls (the slider's row), aspect and enfaceMode (selects), enfaceControls
   *   (the en-face select and the colour bar), colorbar (canvas), location (the line under the view).
   */
  constructor(el) {
    this.el = el;
    this.warm = cmapper.colormap("warm");
    this.cool = cmapper.colormap("winter");
    this.settings = { opacity: 0.6, threshold: 0.2, outline: true };
    this.cache = new Map(); // url -> NVImage, for the case on screen (its overlays share image and mask)
    this.volume = null;
    this.bscan = 0;
    this.peak = 0;
    this.listeners = [];
    this.wire();
    new ResizeObserver(() => this.volume && this.draw()).observe(el.view);
  }

  onChange(fn) {
    this.listeners.push(fn);
  }

  get count() {
    return this.volume ? this.volume.dims[0] : 0;
  }

  // the en-face line's height in CSS px from the en-face canvas's top (read by the browser test)
  get lineY() {
    return this.volume ? ((this.bscan + 0.5) * this.el.enface.clientHeight) / this.count : null;
  }

  async read(url, name) {
    if (!this.cache.has(url)) this.cache.set(url, await NVImage.loadFromUrl({ url, name }));
    return this.cache.get(url);
  }

  /**
   * Load a case: image, overlay and optional mask URLs (files of the export), and the B-scan to start at.
   * @returns {Promise<boolean>} false when a newer load started meanwhile
   */
  async load({ image, overlay, mask, peakVoxel }, isCurrent = () => true) {
    const keep = new Set([image, overlay, mask]);
    for (const url of this.cache.keys()) if (!keep.has(url)) this.cache.delete(url);
    const [img, ov, mk] = await Promise.all([
      this.read(image, "image.nii.gz"),
      this.read(overlay, "overlay.nii.gz"),
      mask ? this.read(mask, "mask.nii.gz") : null,
    ]);
    if (!isCurrent()) return false;
    const dims = dimsOf(img);
    for (const [vol, what] of [[ov, "overlay"], [mk, "mask"]]) {
      if (vol && dimsOf(vol).join("x") !== dims.join("x"))
        throw new Error(`the ${what} is ${dimsOf(vol).join(" x ")} voxels, the scan ${dims.join(" x ")}`);
    }
    const spacing = [1, 2, 3].map((i) => Math.abs(img.hdr.pixDims[i]) || 1);
    const data = values(img);
    const sal = values(ov);
    const inside = mk ? Uint8Array.from(values(mk), (x) => (x > 0.5 ? 1 : 0)) : null;
    // the image's window: NiiVue's robust range, else the data's own
    let lo = img.cal_min, hi = img.cal_max;
    if (!(hi > lo)) [lo, hi] = [percentile(data, 0.005), percentile(data, 0.995)];
    this.volume = { dims, spacing, data, sal, inside, lo, hi };
    this.project();
    const [nV] = dims;
    let peak = peakVoxel ? peakVoxel[0] : null;
    if (peak === null || !(peak >= 0 && peak < nV)) {
      let best = -Infinity;
      for (let i = 0; i < sal.length; i++) if (sal[i] > best) [best, peak] = [sal[i], i % nV];
    }
    this.peak = peak;
    this.el.slider.max = String(nV - 1);
    this.bscan = -1;
    this.setBscan(peak);
    return true;
  }

  // the en-face images: intensity (mean or max along depth), the saliency of largest magnitude along depth,
  // and the lesion's footprint (any voxel of the mask along depth)
  project() {
    const { dims, data, sal, inside } = this.volume;
    const [nV, nH, nW] = dims;
    const useMax = this.el.enfaceMode.value === "max";
    const img = new Float32Array(nV * nW);
    const ov = new Float32Array(nV * nW);
    const foot = inside ? new Uint8Array(nV * nW) : null;
    for (let w = 0; w < nW; w++)
      for (let v = 0; v < nV; v++) {
        let acc = useMax ? -Infinity : 0, s = 0, any = 0;
        for (let h = 0; h < nH; h++) {
          const i = v + nV * (h + nH * w);
          acc = useMax ? Math.max(acc, data[i]) : acc + data[i];
          if (Math.abs(sal[i]) > Math.abs(s)) s = sal[i];
          if (foot && inside[i]) any = 1;
        }
        const j = v * nW + w;
        img[j] = useMax ? acc : acc / nH;
        ov[j] = s;
        if (foot) foot[j] = any;
      }
    this.enface = { img, ov, foot, lo: percentile(img, 0.01), hi: percentile(img, 0.99) };
  }

  setSettings(settings) {
    Object.assign(this.settings, settings);
    if (this.volume) this.draw();
  }

  setBscan(v) {
    if (!this.volume) return;
    const clamped = Math.max(0, Math.min(this.count - 1, Math.round(v)));
    if (clamped === this.bscan) return;
    this.bscan = clamped;
    this.el.slider.value = String(clamped);
    this.el.number.textContent = `${clamped + 1} / ${this.count}`;
    this.el.number.dataset.index = String(clamped);
    this.draw();
    for (const fn of this.listeners) fn(clamped);
  }

  step(delta) {
    this.setBscan(this.bscan + delta);
  }

  // sizes and arrangement: side by side at one height (the en-face at most a third of the width), or, where that
  // leaves a wide flat B-scan with room to spare below it, the B-scan across the whole width and the en-face, as
  // large as it was, under it; stacked only when that makes the B-scan clearly larger
  layout() {
    const { dims, spacing } = this.volume;
    const [nV, nH, nW] = dims;
    const [dv, dh, dw] = spacing;
    const pixels = this.el.aspect.value === "pixels";
    const ab = pixels ? nW / nH : (nW * dw) / (nH * dh); // B-scan width / height
    const ae = (nW * dw) / (nV * dv); // en-face width / height
    const box = this.el.view.getBoundingClientRect();
    const ctrl = this.el.controls.getBoundingClientRect().height + GAP / 2;
    const elab = this.el.enfaceControls.getBoundingClientRect().height + GAP / 2;
    const fit = (w, h, aspect) => (w / h > aspect ? [h * aspect, h] : [w, w / aspect]);

    const width = Math.max(100, box.width - GAP);
    const height = Math.max(100, box.height - Math.max(ctrl, elab));
    let en = fit(width / 3, height, ae);
    const h = Math.min(height, width / (ab + ae));
    if (ae * h <= width / 3) en = [ae * h, h];
    const side = { stacked: false, bscan: fit(width - en[0], height, ab), enface: en };

    // stacked: the en-face keeps the height it had side by side, the B-scan takes the rest
    const minEn = 120;
    const enTarget = Math.max(minEn, side.enface[1]);
    const b = fit(box.width, Math.max(50, box.height - ctrl - GAP - enTarget), ab);
    const enBox = [box.width / 2, box.height - b[1] - ctrl - GAP];
    const stacked = { stacked: true, bscan: b, enface: fit(enBox[0], Math.max(1, enBox[1]), ae) };
    const area = (s) => s.bscan[0] * s.bscan[1];
    return stacked.enface[1] >= minEn && area(stacked) > 1.25 * area(side) ? stacked : side;
  }

  size(canvas, [w, h]) {
    const dpr = window.devicePixelRatio || 1;
    canvas.style.width = `${Math.floor(w)}px`;
    canvas.style.height = `${Math.floor(h)}px`;
    const pw = Math.max(1, Math.round(Math.floor(w) * dpr)), ph = Math.max(1, Math.round(Math.floor(h) * dpr));
    if (canvas.width !== pw || canvas.height !== ph) [canvas.width, canvas.height] = [pw, ph];
  }

  // one RGBA pixel: the grey of the image with the saliency over it (|s| >= threshold, warm or cool)
  shade(rgba, k, grey, s) {
    let r = grey, g = grey, b = grey;
    const { opacity, threshold } = this.settings;
    const mag = Math.abs(s);
    if (mag >= threshold && mag > 0) {
      const lut = s > 0 ? this.warm : this.cool;
      const t = threshold < 1 ? Math.min(1, (mag - threshold) / (1 - threshold)) : 1;
      const c = 4 * Math.round(t * 255);
      r += opacity * (lut[c] - r);
      g += opacity * (lut[c + 1] - g);
      b += opacity * (lut[c + 2] - b);
    }
    rgba[k] = r;
    rgba[k + 1] = g;
    rgba[k + 2] = b;
    rgba[k + 3] = 255;
  }

  // a small image (cols x rows voxels) drawn scaled onto a canvas, smoothed as a scanner's display does
  paint(canvas, cols, rows, fill) {
    const small = new OffscreenCanvas(cols, rows);
    const sctx = small.getContext("2d");
    const pix = sctx.createImageData(cols, rows);
    fill(pix.data);
    sctx.putImageData(pix, 0, 0);
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
    return ctx;
  }

  draw() {
    const { dims, data, sal, inside, lo, hi } = this.volume;
    const [nV, nH, nW] = dims;
    const sizes = this.layout();
    this.el.view.classList.toggle("stacked", sizes.stacked);
    this.size(this.el.bscan, sizes.bscan);
    this.size(this.el.enface, sizes.enface);
    this.el.controls.style.width = `${Math.floor(sizes.bscan[0])}px`;
    const v = this.bscan;
    const span = hi - lo || 1;

    const bctx = this.paint(this.el.bscan, nW, nH, (rgba) => {
      for (let h = 0; h < nH; h++)
        for (let w = 0; w < nW; w++) {
          const i = v + nV * (h + nH * w);
          const grey = 255 * Math.min(1, Math.max(0, (data[i] - lo) / span));
          this.shade(rgba, 4 * (h * nW + w), grey, sal[i]);
        }
    });
    const dpr = window.devicePixelRatio || 1;
    if (inside && this.settings.outline) {
      const slice = new Uint8Array(nH * nW);
      for (let h = 0; h < nH; h++) for (let w = 0; w < nW; w++) slice[h * nW + w] = inside[v + nV * (h + nH * w)];
      bctx.strokeStyle = OUTLINE_COLOUR;
      bctx.lineWidth = 2 * dpr;
      bctx.stroke(edgePath(slice, nH, nW, this.el.bscan.width / nW, this.el.bscan.height / nH));
    }

    const en = this.enface;
    const espan = en.hi - en.lo || 1;
    const ectx = this.paint(this.el.enface, nW, nV, (rgba) => {
      for (let j = 0; j < nV * nW; j++) {
        const grey = 255 * Math.min(1, Math.max(0, (en.img[j] - en.lo) / espan));
        this.shade(rgba, 4 * j, grey, en.ov[j]);
      }
    });
    const ex = this.el.enface.width / nW, ey = this.el.enface.height / nV;
    if (en.foot && this.settings.outline) {
      ectx.strokeStyle = OUTLINE_COLOUR;
      ectx.lineWidth = 2 * dpr;
      ectx.stroke(edgePath(en.foot, nV, nW, ex, ey));
    }
    this.drawColorbar();
    ectx.strokeStyle = LINE_COLOUR;
    ectx.lineWidth = 2 * dpr;
    ectx.beginPath();
    ectx.moveTo(0, (v + 0.5) * ey);
    ectx.lineTo(this.el.enface.width, (v + 0.5) * ey);
    ectx.stroke();
  }

  // the saliency's colours: -1 .. -threshold in the cool table, threshold .. 1 in the warm one
  drawColorbar() {
    const canvas = this.el.colorbar;
    const dpr = window.devicePixelRatio || 1;
    const [w, h] = [canvas.clientWidth, canvas.clientHeight];
    [canvas.width, canvas.height] = [Math.round(w * dpr), Math.round(h * dpr)];
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    const bar = 12, half = (w - 8) / 2;
    const t = this.settings.threshold;
    for (let x = 0; x < half; x++) {
      const c = 4 * Math.round(255 * (1 - x / (half - 1))); // cool: strongest on the left
      ctx.fillStyle = `rgb(${this.cool[c]}, ${this.cool[c + 1]}, ${this.cool[c + 2]})`;
      ctx.fillRect(x, 0, 1, bar);
      const k = 4 * Math.round((255 * x) / (half - 1));
      ctx.fillStyle = `rgb(${this.warm[k]}, ${this.warm[k + 1]}, ${this.warm[k + 2]})`;
      ctx.fillRect(w - half + x, 0, 1, bar);
    }
    ctx.fillStyle = "#9ab";
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "top";
    const label = (text, x, align) => {
      ctx.textAlign = align;
      ctx.fillText(text, x, bar + 4);
    };
    label("-1", 0, "left");
    label(`-${t.toFixed(2)}`, half, "right");
    label(t.toFixed(2), w - half, "left");
    label("1", w, "right");
  }

  // the voxel under the mouse on the B-scan, as the location line shows it
  describe(event) {
    const { dims, spacing, data, sal } = this.volume;
    const [nV, nH, nW] = dims;
    const rect = this.el.bscan.getBoundingClientRect();
    const w = Math.floor(((event.clientX - rect.left) / rect.width) * nW);
    const h = Math.floor(((event.clientY - rect.top) / rect.height) * nH);
    if (w < 0 || h < 0 || w >= nW || h >= nH) return "";
    const i = this.bscan + nV * (h + nH * w);
    return (
      `B-scan ${this.bscan + 1}, depth row ${h} (${(h * spacing[1]).toFixed(3)} mm), A-scan ${w}: ` +
      `intensity ${data[i].toPrecision(3)}, saliency ${sal[i].toFixed(3)}`
    );
  }

  wire() {
    const { slider, bscan, enface, aspect, enfaceMode, location } = this.el;
    slider.addEventListener("input", () => this.setBscan(parseInt(slider.value, 10)));
    const wheel = (e) => {
      if (!this.volume || e.deltaY === 0) return;
      e.preventDefault(); // the wheel steps through B-scans instead of scrolling the page
      this.step(Math.sign(e.deltaY));
    };
    for (const canvas of [bscan, enface]) canvas.addEventListener("wheel", wheel, { passive: false });
    const pick = (e) => {
      if (!this.volume) return;
      const rect = enface.getBoundingClientRect();
      this.setBscan(Math.floor(((e.clientY - rect.top) / rect.height) * this.count));
    };
    enface.addEventListener("pointerdown", (e) => {
      enface.setPointerCapture?.(e.pointerId);
      pick(e);
    });
    enface.addEventListener("pointermove", (e) => e.buttons && pick(e));
    bscan.addEventListener("mousemove", (e) => this.volume && (location.textContent = this.describe(e)));
    aspect.addEventListener("change", () => this.volume && this.draw());
    enfaceMode.addEventListener("change", () => {
      if (!this.volume) return;
      this.project();
      this.draw();
    });
  }
}
