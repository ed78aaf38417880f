// One feature: its images with per-patch activations (outlines or a map), histogram, decoder profile, neighbours and text labels.
"use strict";
(async function () {
  const site = await V.load("site");
  const p = V.params();
  const tcId = p.get("tc") || site.transcoders[0].id;
  const layer = Number(p.get("layer"));
  const index = Number(p.get("feature"));
  const tc = site.transcoders.find((t) => t.id === tcId);
  const main = document.getElementById("main");
  const $ = (id) => document.getElementById(id);
  const done = () => { document.body.dataset.ready = "1"; };
  if (!tc || !(layer >= 0 && layer < tc.n_layers) || !(index >= 0 && index < tc.n_features)) {
    main.append(V.el("p", { class: "dead-note", text: "No such feature: check the tc, layer and feature in the address." }));
    return done();
  }
  V.banner(site, tc);
  $("back").href = `index.html?tc=${encodeURIComponent(tcId)}`;
  $("title").textContent = `${tc.name} · layer ${layer} · feature ${index}`;
  document.title = `L${layer}/${index} – ${tc.name}`;
  const step = $("step");
  if (index > 0) step.append(V.el("a", { href: V.featureUrl(tcId, layer, index - 1), text: "← previous" }), " ");
  if (index < tc.n_features - 1) step.append(V.el("a", { href: V.featureUrl(tcId, layer, index + 1), text: "next →" }));

  const shard = await V.load(`${tcId}/L${layer}/s${Math.floor(index / tc.shard_size)}`);
  const f = shard.features[index - shard.start];
  if (!f) {
    $("stats").textContent = "";
    main.append(V.el("p", { class: "dead-note",
      text: `Feature ${index} of layer ${layer} is dead: it never fired on any token of the ${site.n_images} images of ${site.dataset}.` }));
    return done();
  }
  $("stats").textContent =
    `fires on ${V.fmt(100 * f.freq, 2)}% of tokens and ${V.fmt(100 * f.img_freq, 2)}% of images · mean activation ` +
    `${V.fmt(f.mean)} · max ${V.fmt(f.max)} · ${V.pct(f.later)} of its decoder norm writes to later layers` +
    (f.write_norm != null ? ` · image-embedding write ${V.fmt(f.write_norm)} per unit` : "");

  const section = (title, ...children) => main.append(V.el("h2", { text: title }), ...children);
  const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const T = site.n_tokens, g = site.grid, P = site.n_prefix;

  // Per-patch activations are drawn as outlines, never as a colour wash: in a world whose classes are
  // colours a tint changes what the image shows (white turns pink, red hides it). Each active patch gets a
  // black-and-white double outline (visible on any colour) whose width and opacity grow with its activation;
  // the patch's own pixels stay untouched. "activation map" replaces the image by the activations alone.
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const viridis = (a) => {
    const x = Math.min(1, Math.max(0, a)) * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(x)), t = x - i;
    return VIRIDIS[i].map((c, j) => Math.round(c + t * (VIRIDIS[i + 1][j] - c)));
  };
  const painted = [];
  let view = ["outlines", "map", "image"].includes(p.get("view")) ? p.get("view") : "outlines";
  function paint(canvas, acts) {
    const S = 128, cell = S / g, ctx = canvas.getContext("2d");
    canvas.width = S; canvas.height = S;
    ctx.clearRect(0, 0, S, S);
    for (let i = 0; i < g * g; i++) {
      const a = acts[P + i] / 255, x = (i % g) * cell, y = Math.floor(i / g) * cell;
      if (view === "map") {
        ctx.fillStyle = `rgb(${viridis(a).join(",")})`;
        ctx.fillRect(x, y, cell, cell);
      } else if (view === "outlines" && a > 0) {
        // A black ring outside a white one, side by side (not overlapping, so neither greys the other).
        const w = 1 + Math.max(1, cell / 10) * a, b = Math.max(1, w / 2);
        const ring = (inset, width, colour) => {
          ctx.lineWidth = width; ctx.strokeStyle = colour;
          ctx.strokeRect(x + inset, y + inset, cell - 2 * inset, cell - 2 * inset);
        };
        ctx.globalAlpha = 0.4 + 0.6 * a;
        ring(1 + b / 2, b, "#000");
        ring(1 + b + w / 2, w, "#fff");
        ctx.globalAlpha = 1;
      }
    }
  }
  function heatmap(canvas, acts) {
    painted.push([canvas, acts]);
    paint(canvas, acts);
  }
  function setView(v) {
    view = v;
    document.body.dataset.view = v;
    for (const [canvas, acts] of painted) paint(canvas, acts);
    const q = V.params();
    if (v === "outlines") q.delete("view"); else q.set("view", v);
    history.replaceState(null, "", `${window.location.pathname}?${q}`);
  }

  function cards(list, b64, what) {
    const data = b64 ? bytes(b64) : new Uint8Array(0);
    const box = V.el("div", { class: "cards" });
    list.forEach(([img, act], k) => {
      const canvas = V.el("canvas", { class: "heatmap" });
      heatmap(canvas, data.subarray(k * T, (k + 1) * T));
      const cls = data[k * T] / 255;
      const where = V.provenance(site, img);
      box.append(V.el("div", { class: "card", title: `${where.long}; CLS ${V.pct(cls)} of max`, "data-image": V.datasetIndex(site, img) },
        V.el("div", { class: "imgbox" }, V.el("img", { src: V.image(site, img), alt: where.long }), canvas),
        V.el("div", { class: "meta" }, V.el("b", { text: `${what} ${V.fmt(act)}` }),
          V.el("span", { text: `CLS ${V.pct(cls)} of max` }), V.el("span", { text: V.classOf(site, img) }),
          V.el("span", { class: "where", text: where.short }))));
    });
    return box;
  }

  function labelTable(title, rows) {
    const t = V.el("table", { class: "small" }, V.el("tr", {}, V.el("th", { text: title }), V.el("th", { text: "cosine" })));
    for (const [name, score] of rows) {
      const w = Math.max(0, score) * 120;
      t.append(V.el("tr", {}, V.el("td", { text: name }),
        V.el("td", {}, V.el("span", { class: "bar", style: `width:${w}px` }), " ", V.el("span", { class: "score", text: score.toFixed(3) }))));
    }
    return t;
  }

  function explainedTable(title, rows) {
    const t = V.el("table", { class: "small" }, V.el("tr", {}, V.el("th", { text: title }), V.el("th", { text: "score" }),
      V.el("th", { text: "shuffled baseline" })));
    for (const [name, score, baseline, shown] of rows) {
      t.append(V.el("tr", { class: shown ? "" : "not-shown" }, V.el("td", { text: name }),
        V.el("td", { class: "score", text: score.toFixed(3) }), V.el("td", { class: "score", text: baseline.toFixed(3) })));
    }
    return t;
  }

  function bars(values, labels, { own = -1, width = 320, height = 90, title = "" } = {}) {
    const n = values.length, max = Math.max(...values, 1e-12), bw = (width - 30) / n, top = 16;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", width); svg.setAttribute("height", height + 18);
    svg.setAttribute("class", "chart");
    values.forEach((v, i) => {
      const h = Math.max(v > 0 ? 1 : 0, ((height - top) * v) / max);
      const r = document.createElementNS(ns, "rect");
      r.setAttribute("x", 30 + i * bw + 0.5); r.setAttribute("y", height - h);
      r.setAttribute("width", Math.max(1, bw - 1)); r.setAttribute("height", h);
      r.setAttribute("fill", i === own ? "#d9480f" : "#9db4d8");
      const tt = document.createElementNS(ns, "title"); tt.textContent = `${labels[i]}: ${V.fmt(v)}`; r.append(tt);
      svg.append(r);
    });
    const step = Math.max(1, Math.ceil(n / 8));
    labels.forEach((lab, i) => {
      if (i % step) return;
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", 30 + i * bw); t.setAttribute("y", height + 13); t.textContent = lab; svg.append(t);
    });
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", 0); t.setAttribute("y", 10); t.textContent = title; svg.append(t);
    return svg;
  }

  // Sees / writes labels, then the direct-path labels
  if ((f.sees && f.sees.length) || (f.writes && f.writes.length)) {
    const explained = V.el("div", { class: "grid2" });
    explained.append(explainedTable("sees (SoftWPMI of images where it fires)", f.sees || []),
      explainedTable("writes (its effect on the image embedding)", f.writes || []));
    section("What it sees and what it writes (greyed: not told apart from its shuffled baseline)", explained);
  }
  const labels = V.el("div", { class: "grid2" });
  labels.append(labelTable("class name", f.labels.classes), labelTable("word", f.labels.words));
  section("Text labels from the direct path (CLIP's text tower vs the feature's direct write into the image embedding)", labels);
  if (f.majority) main.append(V.el("p", { class: "summary",
    text: `Majority class of its top images: ${site.classnames[f.majority[0]]} (${f.majority[1]} of ${f.majority[2]}).` }));

  // Profile and histogram
  const charts = V.el("div", { class: "grid2" });
  charts.append(
    V.el("div", {}, bars(f.norms, f.norms.map((_, j) => `L${j}`), { own: layer, title: "decoder norm ‖W→j‖ by target layer" })),
    V.el("div", {}, bars(f.hist.counts, f.hist.counts.map((_, i) => V.fmt(Math.pow(2, site.hist.log2_min + (f.hist.first + i) / site.hist.per_octave), 2)),
      { title: "tokens by activation (log-spaced bins)" })));
  section("Where it writes, and how strongly it fires", charts);

  // Images
  const views = [["outlines", "image + outlined patches"], ["map", "activation map"], ["image", "image only"]];
  const toggle = V.el("div", { class: "views", id: "views" }, "per-patch activation: ",
    ...views.map(([v, text]) => V.el("label", {}, V.el("input", { type: "radio", name: "view", value: v }), ` ${text} `)),
    V.el("span", { class: "muted", text: "(outline width and opacity ∝ activation; the map runs dark purple → yellow)" }));
  toggle.querySelector(`input[value=${view}]`).checked = true;
  toggle.addEventListener("change", (e) => setView(e.target.value));
  section("Top images by maximum over tokens", toggle, cards(f.top, f.top_tok, "max"));
  if (f.cls.length) section("Top images by CLS activation", cards(f.cls, f.cls_tok, "CLS"));
  else section("Top images by CLS activation", V.el("p", { class: "summary", text: "It never fires on the CLS token." }));
  if (f.samples.length) {
    const box = V.el("div", {});
    const edges = [[0.5, 0.75], [0.25, 0.5], [0, 0.25]];
    const data = bytes(f.samples_tok);
    for (const [lo, hi] of edges) {
      const pick = f.samples.map((s, k) => [s, k]).filter(([s]) => s[1] >= lo * f.max && s[1] < hi * f.max).slice(0, 8);
      if (!pick.length) continue;
      const sub = new Uint8Array(pick.length * T);
      pick.forEach(([, k], n) => sub.set(data.subarray(k * T, (k + 1) * T), n * T));
      let b64 = ""; sub.forEach((x) => { b64 += String.fromCharCode(x); });
      box.append(V.el("div", { class: "interval", text: `${lo * 100}–${hi * 100}% of its maximum` }),
        cards(pick.map(([s]) => s), btoa(b64), "max"));
    }
    if (box.childElementCount) section("At moderate strength (a uniform sample of the images where it fires)", box);
  }

  // Neighbours
  const nearTable = async (rows) => {
    const t = V.el("table", { class: "small" }, V.el("tr", {}, V.el("th", { text: "feature" }), V.el("th", { text: "cosine" }), V.el("th", { text: "label" })));
    for (const [l, i, c] of rows) {
      const idx = await V.load(`${tcId}/index-L${l}`);
      t.append(V.el("tr", {}, V.el("td", {}, V.el("a", { href: V.featureUrl(tcId, l, i), text: `L${l}/${i}` })),
        V.el("td", { class: "score", text: c.toFixed(3) }), V.el("td", { text: `${idx.label[i]} · ${idx.word[i]}` })));
    }
    return t;
  };
  const near = V.el("div", { class: "grid2" });
  near.append(V.el("div", {}, V.el("h3", { text: "same layer" }), await nearTable(f.near.map(([i, c]) => [layer, i, c]))),
              V.el("div", {}, V.el("h3", { text: "other layers" }), await nearTable(f.near_other)));
  section("Nearest features by write direction (cosine of Σⱼ W→j)", near);
  setView(view);
  done();
})();
