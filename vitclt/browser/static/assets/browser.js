// Shared by both pages: data loading through <script> tags (works from file:// and any server),
// formatting, the dataset banner, and an error record the tests read.
"use strict";
window.__vitcltErrors = [];
window.addEventListener("error", (e) => window.__vitcltErrors.push(String(e.message || e)));
window.addEventListener("unhandledrejection", (e) => window.__vitcltErrors.push(String(e.reason)));

const V = (window.V = {});
V._waiting = {};
// Every data file is `vitcltData(key, payload);`: fetch() of local files is blocked under file://.
window.vitcltData = function (key, payload) {
  const w = V._waiting[key];
  if (w) { delete V._waiting[key]; w.resolve(payload); }
};
V._cache = {};
V.load = function (key) {
  if (V._cache[key]) return V._cache[key];
  V._cache[key] = new Promise((resolve, reject) => {
    V._waiting[key] = { resolve, reject };
    const s = document.createElement("script");
    s.src = "data/" + key + ".js";
    s.onerror = () => { delete V._waiting[key]; reject(new Error("missing data file data/" + key + ".js")); };
    document.head.appendChild(s);
  });
  return V._cache[key];
};
V.params = () => new URLSearchParams(window.location.search);
V.el = function (tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
};
V.fmt = function (x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1e4 || a < 1e-3) return x.toExponential(1);
  return Number(x.toPrecision(digits)).toString();
};
V.pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(0) + "%");
V.featureUrl = (tc, layer, index) => `feature.html?tc=${encodeURIComponent(tc)}&layer=${layer}&feature=${index}`;
V.banner = function (site, tc) {
  const b = document.getElementById("banner");
  if (tc && tc.differs) {
    b.hidden = false;
    b.textContent = `Note: ${tc.name} was trained on ${tc.trained_on}, but these pages show it on ${site.dataset} (${site.split}).`;
  } else b.hidden = true;
};
V.strip = function (norms, own) {
  const max = Math.max(...norms, 1e-12);
  const s = V.el("span", { class: "strip", title: norms.map((n, j) => `→${j}: ${V.fmt(n)}`).join("  ") });
  norms.forEach((n, j) => {
    const bar = V.el("span", { class: j === own ? "own" : n > 0 ? "" : "none" });
    bar.style.height = Math.max(1, Math.round((24 * n) / max)) + "px";
    s.append(bar);
  });
  return s;
};
V.image = (site, id) => site.images.files[id];
// Provenance: the image's index in the whole split (load_dataset(spec, split)[index]) and, for a subset
// (--max-images), the seed that picked it, so that anyone can find the image again.
V.datasetIndex = (site, id) => site.images.index[id];
V.provenance = function (site, id) {
  const s = site.subset || {}, index = V.datasetIndex(site, id);
  const seed = s.subsampled ? ` · seed ${s.seed}` : "";
  return { short: `#${index}${seed}`,
    long: `${s.spec || site.dataset} (${s.split || site.split}) image #${index}` +
      (seed ? `, from the subset of ${s.n_images} picked with seed ${s.seed}` : "") };
};
V.classOf = (site, id) => site.classnames[site.images.labels[id]];
