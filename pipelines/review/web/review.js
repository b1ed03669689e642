// The review page: case list, viewer of scan + saliency overlay, and the grade form. A case whose layout is
// "bscan" (an OCT volume) opens B-scan first with an en-face projection (oct_view.js); any other in NiiVue's
// three orthogonal planes. Grades are sent to the server on every change; the server saves them to
// EXPORT_DIR/review/<reader>.csv.
import { Niivue } from "/static/niivue.js";
import { OctView } from "/static/oct_view.js";

const OUTCOME_ORDER = { FP: 0, FN: 1, wrong: 1, TP: 2, TN: 3, correct: 3, unlabelled: 4 };
const $ = (id) => document.getElementById(id);

const state = {
  exportName: "",
  cases: [],
  byId: new Map(),
  reader: null,
  grades: new Map(), // "case|method|target" -> row of the reader's CSV
  current: null,
  overlayIndex: 0,
  sort: { key: null, dir: 1 },
  loadToken: 0,
};
// read by the browser test and handy in the console
window.review = { state, nv: null, ready: false, error: null, loads: 0 };

const nv = new Niivue({
  backColor: [0, 0, 0, 1],
  crosshairColor: [0.2, 0.8, 1.0, 1.0],
  isColorbar: true,
  show3Dcrosshair: true,
  multiplanarShowRender: 0, // three orthogonal planes, no 3D render tile
});
window.review.nv = nv;

const octView = new OctView({
  view: $("oct-view"),
  bscan: $("bscan"),
  enface: $("enface"),
  slider: $("bscan-slider"),
  number: $("bscan-number"),
  controls: $("bscan-controls"),
  aspect: $("bscan-aspect"),
  enfaceMode: $("enface-mode"),
  enfaceControls: $("enface-controls"),
  colorbar: $("oct-colorbar"),
  location: $("location"),
});
window.review.oct = octView;

function isOct() {
  return !!state.current && state.current.layout === "bscan";
}

function gradeKey(caseId, method, target) {
  return `${caseId}|${method}|${target}`;
}

function casesGradedBy(reader) {
  const done = new Set();
  if (!reader) return done;
  for (const row of state.grades.values()) if (row.coverage) done.add(row.case_id);
  return done;
}

// -- case list ---------------------------------------------------------------------------------------------
function visibleCases() {
  const filter = $("filter").value;
  const text = $("search").value.trim().toLowerCase();
  const done = casesGradedBy(state.reader);
  let list = state.cases.filter((c) => {
    if (text && !c.case_id.toLowerCase().includes(text)) return false;
    if (filter === "all") return true;
    if (filter === "ungraded") return !done.has(c.case_id);
    if (filter === "wrong") return ["FP", "FN", "wrong"].includes(c.outcome);
    return c.outcome === filter;
  });
  const order = $("order").value;
  const prob = (c) => c.prob_predicted ?? 0;
  if (state.sort.key) {
    const k = state.sort.key;
    const value = (c) =>
      k === "methods" ? c.overlays.map((o) => o.method).join(",") : k === "graded" ? done.has(c.case_id) : c[k];
    list = [...list].sort((a, b) => {
      const va = value(a), vb = value(b);
      return (va > vb ? 1 : va < vb ? -1 : 0) * state.sort.dir;
    });
  } else if (order === "fp-first") {
    // the reading order of a false-positive review: FP, then FN, then the confident cases of each outcome first
    list = [...list].sort((a, b) => OUTCOME_ORDER[a.outcome] - OUTCOME_ORDER[b.outcome] || prob(b) - prob(a));
  } else if (order === "prob-desc") {
    list = [...list].sort((a, b) => prob(b) - prob(a));
  } else if (order === "prob-asc") {
    list = [...list].sort((a, b) => prob(a) - prob(b));
  }
  return list;
}

function renderList() {
  const body = document.querySelector("#cases tbody");
  const done = casesGradedBy(state.reader);
  const list = visibleCases();
  body.replaceChildren(
    ...list.map((c) => {
      const tr = document.createElement("tr");
      tr.dataset.caseId = c.case_id;
      if (state.current && state.current.case_id === c.case_id) tr.classList.add("current");
      const cells = [
        c.case_id,
        c.label ?? "?",
        c.predicted_class,
        c.prob_predicted == null ? "" : c.prob_predicted.toFixed(3),
        [...new Set(c.overlays.map((o) => o.method))].join(", "),
        done.has(c.case_id) ? "\u2713" : "",
      ];
      cells.forEach((text, i) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (i === 2) td.className = c.outcome;
        tr.appendChild(td);
      });
      tr.addEventListener("click", () => openCase(c.case_id));
      return tr;
    }),
  );
  $("list-count").textContent = `${list.length} of ${state.cases.length} cases (${done.size} graded by you)`;
  document.querySelectorAll("#cases th").forEach((th) => {
    th.classList.toggle("sorted-asc", state.sort.key === th.dataset.sort && state.sort.dir > 0);
    th.classList.toggle("sorted-desc", state.sort.key === th.dataset.sort && state.sort.dir < 0);
  });
}

// -- viewer --------------------------------------------------------------------------------------------------
function currentOverlay() {
  return state.current ? state.current.overlays[state.overlayIndex] : null;
}

function overlayLabel(o) {
  const cls = o.target_class !== "" ? ` (class ${o.target_class})` : "";
  return `${o.method}, target ${o.target}${cls}`;
}

function applyOverlaySettings() {
  const opacity = parseFloat($("opacity").value);
  const threshold = parseFloat($("threshold").value);
  $("opacity-value").textContent = opacity.toFixed(2);
  $("threshold-value").textContent = threshold.toFixed(2);
  octView.setSettings({ opacity, threshold, outline: $("outline").checked });
  if (isOct() || nv.volumes.length < 2) return;
  const ov = nv.volumes[1];
  // values are saliency / max |saliency|: show |s| >= threshold, positive warm, negative cool
  ov.cal_min = Math.max(threshold, 1e-3);
  ov.cal_max = 1.0;
  ov.opacity = opacity;
  if (nv.volumes.length > 2) nv.volumes[2].opacity = $("outline").checked ? 1.0 : 0.0;
  nv.updateGLVolume(); // one update for all changes: each re-samples every layer onto the scan's grid
}

// the mask's boundary: mask voxels with a face neighbour outside the mask (drawn over the scan as a line)
function outlineMask(vol) {
  const [, nx, ny, nz] = vol.hdr.dims;
  const src = vol.img;
  const out = new Float32Array(src.length);
  const at = (x, y, z) => (x < 0 || y < 0 || z < 0 || x >= nx || y >= ny || z >= nz ? 0 : src[x + nx * (y + ny * z)]);
  for (let z = 0; z < nz; z++)
    for (let y = 0; y < ny; y++)
      for (let x = 0; x < nx; x++) {
        if (!(at(x, y, z) > 0.5)) continue;
        const edge =
          !(at(x - 1, y, z) > 0.5) || !(at(x + 1, y, z) > 0.5) || !(at(x, y - 1, z) > 0.5) ||
          !(at(x, y + 1, z) > 0.5) || !(at(x, y, z - 1) > 0.5) || !(at(x, y, z + 1) > 0.5);
        out[x + nx * (y + ny * z)] = edge ? 1 : 0;
      }
  vol.img = out;
  vol.hdr.datatypeCode = 16; // float32 now
  vol.cal_min = 0.5;
  vol.cal_max = 1;
}

function goToPeak() {
  if (isOct()) {
    octView.setBscan(octView.peak);
    return;
  }
  const o = currentOverlay();
  if (o && o.peak_ras_mm && nv.volumes.length) {
    nv.scene.crosshairPos = nv.mm2frac(o.peak_ras_mm);
    nv.drawScene();
    nv.createOnLocationChange?.();
  }
}

async function loadViewer() {
  const c = state.current;
  const o = currentOverlay();
  const token = ++state.loadToken;
  window.review.ready = false;
  $("problems").textContent = c.problems.join("; ");
  const oct = c.layout === "bscan";
  document.body.dataset.layout = c.layout;
  $("gl").hidden = oct;
  $("oct-view").hidden = !oct;
  $("location").textContent = "";
  const useScan = !oct && $("view-select").value === "scan" && c.scan_image && o.scan_overlay;
  const background = useScan ? c.scan_image : c.image;
  if (!background) {
    $("problems").textContent = `the scan of ${c.case_id} is not in the export folder: ${c.problems.join("; ")}`;
    return;
  }
  if (oct) return loadOct(c, o, token);
  const volumes = [
    { url: background, name: "image.nii.gz", colorbarVisible: false },
    {
      url: useScan ? o.scan_overlay : o.overlay,
      name: "overlay.nii.gz",
      colormap: "warm",
      colormapNegative: "winter",
      opacity: parseFloat($("opacity").value),
    },
  ];
  if (c.mask) volumes.push({ url: c.mask, name: "mask.nii.gz", colormap: "green", opacity: 1, colorbarVisible: false });
  try {
    await nv.loadVolumes(volumes);
  } catch (err) {
    if (token !== state.loadToken) return;
    window.review.error = String(err);
    $("problems").textContent = `could not load ${c.case_id}: ${err}`;
    return;
  }
  if (token !== state.loadToken) return; // another case was opened meanwhile
  try {
    const back = nv.volumes[0];
    if (back.global_min <= -900) {
      // Hounsfield units: the LIDC preprocessing's window (-1000..400 HU) instead of a percentile range
      back.cal_min = -1000;
      back.cal_max = 400;
    }
    if (nv.volumes.length > 2) outlineMask(nv.volumes[2]);
    applyOverlaySettings();
    goToPeak();
  } catch (err) {
    showLoadError(c, err);
    return;
  }
  markLoaded(c, o);
}

// what the browser test waits for: the case, method and target now on screen, and a count of loads
function markLoaded(c, o) {
  window.review.loads += 1;
  window.review.ready = true;
  document.body.dataset.viewer = `${c.case_id}|${o.method}|${o.target}`;
}

function showLoadError(c, err) {
  window.review.error = String(err);
  $("problems").textContent = `could not show ${c.case_id}: ${err}`;
}

async function loadOct(c, o, token) {
  try {
    const current = await octView.load(
      { image: c.image, overlay: o.overlay, mask: c.mask, peakVoxel: o.peak_voxel },
      () => token === state.loadToken,
    );
    if (!current) return; // another case was opened meanwhile
    applyOverlaySettings();
  } catch (err) {
    if (token !== state.loadToken) return;
    showLoadError(c, err);
    return;
  }
  markLoaded(c, o);
}

function fillOverlaySelect() {
  const c = state.current;
  $("overlay-select").replaceChildren(
    ...c.overlays.map((o, i) => {
      const opt = document.createElement("option");
      opt.value = String(i);
      opt.textContent = overlayLabel(o);
      return opt;
    }),
  );
  $("overlay-select").value = String(state.overlayIndex);
  $("view-label").hidden = !c.scan_image || c.layout === "bscan";
  $("outline-label").hidden = !c.mask;
}

function showCaseInfo() {
  const c = state.current;
  const o = currentOverlay();
  const prob = c.prob_predicted == null ? "" : ` (p = ${c.prob_predicted.toFixed(3)})`;
  $("case-info").textContent =
    `${c.case_id}: label ${c.label ?? "?"}, predicted ${c.predicted_class}${prob}, ${c.outcome}` +
    (o ? `; overlay ${overlayLabel(o)}` : "");
}

async function openCase(caseId, overlayIndex = 0) {
  const c = state.byId.get(caseId);
  if (!c) return;
  state.current = c;
  state.overlayIndex = Math.min(overlayIndex, c.overlays.length - 1);
  if (state.reader) localStorage.setItem(`review.last.${state.exportName}.${state.reader}`, caseId);
  fillOverlaySelect();
  showCaseInfo();
  showGrade();
  renderList();
  if (c.overlays.length) await loadViewer();
}

// -- grades --------------------------------------------------------------------------------------------------
function setStatus(text, cls) {
  const el = $("save-status");
  el.textContent = text;
  el.className = cls || "";
}

function showGrade() {
  const c = state.current;
  const o = currentOverlay();
  const form = $("grade-form");
  form.classList.toggle("disabled", !state.reader || !o);
  $("grade-overlay").textContent = o ? overlayLabel(o) : "";
  const row = o && state.grades.get(gradeKey(c.case_id, o.method, o.target));
  const anyRow = [...state.grades.values()].find((r) => r.case_id === (c && c.case_id));
  for (const input of form.querySelectorAll("input[type=radio]")) {
    const source = input.name === "coverage" ? row : anyRow;
    input.checked = !!source && source[input.name] === input.value;
  }
  $("comment").value = anyRow ? anyRow.comment : "";
}

async function saveChange(fields) {
  const c = state.current;
  const o = currentOverlay();
  if (!state.reader || !c || !o) return;
  setStatus("saving\u2026");
  const body = { reader: state.reader, case_id: c.case_id, method: o.method, target: o.target, ...fields };
  try {
    const res = await fetch("/api/grades", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const data = await res.json();
    if (!res.ok) throw new Error(data.error || res.statusText);
    for (const row of data.rows) state.grades.set(gradeKey(row.case_id, row.method, row.target), row);
    setStatus(`saved ${new Date().toLocaleTimeString()}`, "saved");
    renderList();
  } catch (err) {
    setStatus(`NOT saved: ${err.message}`, "failed");
  }
}

async function startReader(name) {
  const res = await fetch(`/api/grades?reader=${encodeURIComponent(name)}`);
  const data = await res.json();
  if (!res.ok) {
    setStatus(data.error, "failed");
    return;
  }
  state.reader = name;
  localStorage.setItem("review.reader", name);
  state.grades = new Map(data.grades.map((r) => [gradeKey(r.case_id, r.method, r.target), r]));
  setStatus(`reader ${name}: ${casesGradedBy(name).size} cases graded so far`, "saved");
  // resume: the case last opened, else the first one not yet graded in the reading order
  const last = localStorage.getItem(`review.last.${state.exportName}.${name}`);
  const done = casesGradedBy(name);
  const next = visibleCases().find((c) => !done.has(c.case_id));
  const target = last && state.byId.has(last) ? last : next ? next.case_id : visibleCases()[0]?.case_id;
  renderList();
  if (target) await openCase(target);
}

// -- wiring --------------------------------------------------------------------------------------------------
function wire() {
  $("reader-form").addEventListener("submit", (e) => {
    e.preventDefault();
    startReader($("reader").value.trim());
  });
  for (const id of ["filter", "order"]) {
    $(id).addEventListener("change", () => {
      if (id === "order") state.sort.key = null;
      renderList();
    });
  }
  $("search").addEventListener("input", renderList);
  document.querySelectorAll("#cases th").forEach((th) =>
    th.addEventListener("click", () => {
      const k = th.dataset.sort;
      state.sort = { key: k, dir: state.sort.key === k ? -state.sort.dir : 1 };
      renderList();
    }),
  );
  $("overlay-select").addEventListener("change", async () => {
    state.overlayIndex = parseInt($("overlay-select").value, 10);
    showCaseInfo();
    showGrade();
    await loadViewer();
  });
  $("view-select").addEventListener("change", loadViewer);
  for (const id of ["opacity", "threshold", "outline"]) $(id).addEventListener("input", applyOverlaySettings);
  $("outline").addEventListener("change", applyOverlaySettings);
  $("to-peak").addEventListener("click", goToPeak);
  for (const input of document.querySelectorAll("#grade-form input[type=radio]")) {
    input.addEventListener("change", () => saveChange({ [input.name]: input.value }));
  }
  let timer = null;
  $("comment").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => saveChange({ comment: $("comment").value }), 700);
  });
  $("comment").addEventListener("change", () => {
    clearTimeout(timer);
    saveChange({ comment: $("comment").value });
  });
  $("next-ungraded").addEventListener("click", () => {
    const done = casesGradedBy(state.reader);
    const list = visibleCases();
    const at = list.findIndex((c) => state.current && c.case_id === state.current.case_id);
    const next = [...list.slice(at + 1), ...list.slice(0, at + 1)].find((c) => !done.has(c.case_id));
    if (next) openCase(next.case_id);
  });
  nv.onLocationChange = (data) => {
    if (!isOct()) $("location").textContent = data && data.string ? data.string : "";
  };
  // up / down (and page up / down) step through the B-scans, except while typing or choosing in the form
  document.addEventListener("keydown", (e) => {
    if (!isOct() || e.altKey || e.ctrlKey || e.metaKey) return;
    if (e.target.closest && e.target.closest("input, textarea, select")) return;
    const delta = { ArrowDown: 1, PageDown: 1, ArrowUp: -1, PageUp: -1 }[e.key];
    if (!delta) return;
    e.preventDefault();
    octView.step(delta);
  });
}

async function main() {
  wire();
  try {
    await nv.attachTo("gl");
    nv.setSliceType(nv.sliceTypeMultiplanar);
    const res = await fetch("/api/cases");
    const data = await res.json();
    state.exportName = data.export;
    state.cases = data.cases;
    state.byId = new Map(data.cases.map((c) => [c.case_id, c]));
    $("export-name").textContent = data.export;
    renderList();
    const saved = localStorage.getItem("review.reader");
    if (saved) {
      $("reader").value = saved;
      await startReader(saved);
    } else if (state.cases.length) {
      await openCase(visibleCases()[0].case_id);
    }
  } catch (err) {
    window.review.error = String(err);
    $("problems").textContent = `the page could not start: ${err}`;
  }
}

main();
