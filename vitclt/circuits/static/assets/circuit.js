// The circuit viewer: the pruned attribution graph by layer, the image's patches, node details, and
// hand-made supernodes kept in the page address (and downloadable as JSON).
"use strict";
window.__vitcltErrors = [];
window.addEventListener("error", (e) => window.__vitcltErrors.push(String(e.message || e)));
window.addEventListener("unhandledrejection", (e) => window.__vitcltErrors.push(String(e.reason)));

const C = (window.C = { waiting: {} });
// Data files are `vitcltData(key, payload);` scripts: fetch() of local files is blocked under file://.
window.vitcltData = (key, payload) => {
  const resolve = C.waiting[key];
  if (resolve) { delete C.waiting[key]; resolve(payload); }
};
C.load = (key) => new Promise((resolve, reject) => {
  C.waiting[key] = resolve;
  const s = document.createElement("script");
  s.src = `data/${key}.js`;
  s.onerror = () => reject(new Error(`missing data file data/${key}.js`));
  document.head.appendChild(s);
});
const SVG = "http://www.w3.org/2000/svg";
function el(tag, attrs, ...children) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v;
    else if (k === "class") e.setAttribute("class", v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}
function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1e4 || a < 1e-3) return x.toExponential(1);
  return Number(x.toPrecision(digits)).toString();
}
const PALETTE = ["#7a28cb", "#0b8a83", "#c2255c", "#5c7cfa", "#e67700", "#2b8a3e", "#862e9c", "#1864ab"];

(async function main() {
  const G = await C.load("graph");
  const meta = G.meta, nodes = G.nodes, edges = G.edges;
  const L = meta.n_layers, P = meta.n_prefix, grid = meta.grid;
  const $ = (id) => document.getElementById(id);
  const byId = new Map(nodes.map((n, i) => [n.id, i]));

  const tokName = (t) => t === -1 ? "all tokens" : t === -2 ? "patches" : t < P ? "CLS" :
    `patch r${Math.floor((t - P) / grid)} c${(t - P) % grid}`;
  const name = (n) => n.kind === "feature" ? `L${n.layer} #${n.feature} · ${tokName(n.token)}` :
    n.kind === "error" ? `error L${n.layer} · ${tokName(n.token)}` : n.kind === "embedding" ? `embedding · ${tokName(n.token)}` :
    n.kind === "bias" ? (n.layer < L ? `biases L${n.layer}` : "output bias") : `score: ${meta.target_name}`;

  // Header ----------------------------------------------------------------------------------
  const what = meta.kind === "class" ? `class circuit of “${meta.target_name}” over ${meta.n_images} images` :
    `“${meta.target_name}” on ${meta.title}`;
  $("title").textContent = `Circuit: ${what}`;
  document.title = `circuit – ${meta.target_name}`;
  $("summary").textContent =
    `target: ${meta.target_formula || `cosine with “${meta.target_name}”`} = ${fmt(meta.score, 4)} (sum of direct effects ${fmt(meta.completeness.sum, 4)}) · ` +
    `${nodes.length} of ${meta.full.nodes} nodes kept (${(100 * meta.kept_node_fraction).toFixed(1)}% of influence), ` +
    `${edges.length} edges · ${meta.transcoder} on ${meta.backbone}`;
  $("classes").textContent = (meta.kind === "class" ? "mean cosine, top classes: " : "top classes: ") +
    meta.top.map(([c, s]) => `${c} ${fmt(s, 3)}`).join(" · ");

  // The label beside a feature's node: read here only, so a new label source changes this line alone
  // (node.label comes from vitclt.browser.site.feature_labels when the feature browser is known).
  const label = (n) => n.kind === "feature" ? n.label || "" : n.kind === "target" ? meta.target_name : "";
  const shortTok = (t) => t === -1 ? "all" : t === -2 ? "patches" : t < P ? "CLS" : `r${Math.floor((t - P) / grid)}c${(t - P) % grid}`;
  const subLabel = (n) => n.kind === "feature" ? `#${n.feature} · ${shortTok(n.token)}` : n.kind === "error" ? `error · ${shortTok(n.token)}` :
    n.kind === "embedding" ? `embed · ${shortTok(n.token)}` : n.kind === "bias" ? "biases" : "target";

  // Layout: one row per layer (target on top, embeddings at the bottom). Each row shows its most influential
  // nodes (ordered by token: CLS first, then patches row by row, biases last) and folds the rest into one
  // "+n" node, so that labels fit and the picture fits the window; a click on it (or on the row's name)
  // unfolds the row. The address keeps the choice: #per=N (nodes per row, or all) and #open=rows.
  const rowOf = (n) => n.kind === "embedding" ? -1 : n.kind === "target" ? L : n.layer;
  const rowName = (r) => r === -1 ? "embed" : r === L ? "target" : `L${r}`;
  const rows = new Map();
  for (let r = -1; r <= L; r++) rows.set(r, []);
  nodes.forEach((n, i) => rows.get(rowOf(n)).push(i));
  const kindOrder = { embedding: 0, feature: 1, error: 2, bias: 3, target: 0 };
  for (const list of rows.values()) list.sort((a, b) => {
    const na = nodes[a], nb = nodes[b];
    return (na.kind === "bias") - (nb.kind === "bias") || (na.token === -2) - (nb.token === -2) ||
      na.token - nb.token || kindOrder[na.kind] - kindOrder[nb.kind] || nb.influence - na.influence;
  });
  const hash0 = new URLSearchParams(window.location.hash.slice(1));
  const view = { per: hash0.get("per") === "all" ? Infinity : Number(hash0.get("per")) || null,
    open: new Set((hash0.get("open") || "").split(",").filter((x) => x !== "" && rows.has(Number(x))).map(Number)) };
  const maxInfl = Math.max(...nodes.filter((n) => n.kind !== "target").map((n) => n.influence), 1e-12);
  const radius = (n) => n.kind === "target" ? 12 : 3 + 11 * Math.sqrt(Math.max(n.influence, 0) / maxInfl);
  const svg = $("graph");
  const edgeLayer = el("svg:g"), ringLayer = el("svg:g"), nodeLayer = el("svg:g"), textLayer = el("svg:g");
  let xy = [], unitOf = [], nodeEls = [], edgeEls = [], groupEls = new Map(), drawnEdges = [], svgWidth = 0;
  let compact = false, maxR = 14;

  function fit(text, px) {
    const n = Math.floor(px / 5.6);
    return text.length <= n ? text : n > 1 ? text.slice(0, n - 1) + "…" : "";
  }
  function layout() {
    const width = Math.max(480, svg.parentElement.clientWidth - 18), left = 52, gap = 92;
    const per = view.per || Math.max(3, Math.min(12, Math.floor((width - left) / gap) - 1));
    const top = svg.getBoundingClientRect().top + window.scrollY;
    // Rows share the window's height: two label lines per node where they fit, one line and smaller nodes
    // in a short window or a deep model (a 12-layer ViT-B has 14 rows).
    const fair = Math.min(96, (window.innerHeight - Math.min(top, 200) - 40) / (L + 2));
    compact = fair < 60;
    const rowH = Math.max(compact ? 40 : 60, fair);
    maxR = compact ? rowH * 0.28 : 14;
    const height = (L + 2) * rowH;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svgWidth = svg.parentElement.clientWidth;
    svg.replaceChildren();
    edgeLayer.replaceChildren(); ringLayer.replaceChildren(); nodeLayer.replaceChildren(); textLayer.replaceChildren();
    const yOf = (r) => height - rowH * 0.6 - (r + 1) * rowH;
    xy = new Array(nodes.length); unitOf = new Array(nodes.length); nodeEls = new Array(nodes.length); groupEls = new Map();
    const units = [];   // where each drawn node or fold stands: [x, y]
    for (const [r, list] of rows) {
      const open = view.open.has(r) || list.length <= per + 1;
      const keep = new Set(open ? list : [...list].sort((a, b) => nodes[b].influence - nodes[a].influence).slice(0, per));
      const shown = list.filter((i) => keep.has(i)), folded = list.filter((i) => !keep.has(i));
      const slots = shown.length + (folded.length ? 1 : 0), step = (width - left - 8) / Math.max(slots, 1);
      const y = yOf(r);
      const name = el("svg:text", { x: 4, y: y + 4, class: "rowname" + (list.length > per + 1 ? " foldable" : ""),
        text: rowName(r) + (list.length > per + 1 ? (open ? " ▾" : " ▸") : "") });
      if (list.length > per + 1) {
        name.append(el("svg:title", { text: open ? "fold this row's weaker nodes" : `show all ${list.length} nodes of this row` }));
        name.addEventListener("click", () => toggleRow(r));
      }
      svg.append(el("svg:line", { x1: left - 6, x2: width - 4, y1: y, y2: y, stroke: "#f0f1f3" }), name);
      shown.forEach((i, k) => {
        const x = left + step * (k + 0.5);
        xy[i] = [x, y]; unitOf[i] = units.length; units.push([x, y]);
        drawNode(i, x, y, step);
      });
      if (folded.length) {
        const x = left + step * (shown.length + 0.5), u = units.length;
        units.push([x, y]);
        folded.forEach((i) => { xy[i] = [x, y]; unitOf[i] = u; });
        drawGroup(r, folded, x, y, step);
      }
    }
    // Edges between what is drawn: an edge into or out of a folded node joins its row's "+n" node (weights summed).
    const agg = new Map();
    for (const [s, t, w] of edges) {
      const a = unitOf[s], b = unitOf[t];
      if (a === b) continue;
      const key = `${a}>${b}`;
      if (!agg.has(key)) agg.set(key, { a, b, w: 0, members: [] });
      const e = agg.get(key); e.w += w; e.members.push([s, t]);
    }
    drawnEdges = [...agg.values()];
    const maxAgg = Math.max(...drawnEdges.map((e) => Math.abs(e.w)), 1e-12);
    edgeEls = drawnEdges.map((e) => {
      const [x1, y1] = units[e.a], [x2, y2] = units[e.b], ym = (y1 + y2) / 2, f = Math.abs(e.w) / maxAgg;
      const p = el("svg:path", { d: `M${x1},${y1} C${x1},${ym} ${x2},${ym} ${x2},${y2}`, class: `edge ${e.w >= 0 ? "pos" : "neg"}`,
        "stroke-width": (0.5 + 4 * f).toFixed(2) });
      p.dataset.base = (0.06 + 0.7 * Math.sqrt(f)).toFixed(3);
      p.style.strokeOpacity = p.dataset.base;
      edgeLayer.append(p);
      return p;
    });
    svg.append(edgeLayer, ringLayer, nodeLayer, textLayer);
    svg.dataset.per = per === Infinity ? "all" : String(per);
  }
  function drawNode(i, x, y, step) {
    // In a crowded (unfolded) row nodes shrink to their spacing rather than hide each other.
    const n = nodes[i], r = Math.min(radius(n), maxR, Math.max(1.5, step / 2 - 0.5));
    const shape = n.kind === "error" || n.kind === "embedding"
      ? el("svg:rect", { x: x - r, y: y - r, width: 2 * r, height: 2 * r, rx: n.kind === "embedding" ? 3 : 1 })
      : el("svg:circle", { cx: x, cy: y, r });
    shape.setAttribute("class", `node ${n.kind}`);
    shape.dataset.id = n.id;
    shape.append(el("svg:title", { text: `${name(n)}${label(n) ? ` — ${label(n)}` : ""}\ninfluence ${fmt(n.influence)} · direct effect on target ${fmt(n.direct)}` }));
    shape.addEventListener("click", (ev) => { if (ev.shiftKey) togglePick(i); else select(i); });
    nodeLayer.append(shape);
    nodeEls[i] = shape;
    if (step < 44) return;   // too crowded for words (an unfolded row): the tooltip names it
    const main = fit(label(n), step - 6), sub = fit(subLabel(n), step - 6);
    const y1 = y + Math.min(maxR, 14) + 11;
    if (main) textLayer.append(el("svg:text", { x, y: y1, class: "nodelabel", "text-anchor": "middle", "data-id": n.id, text: main }));
    if (n.kind !== "target" && !(compact && main)) {
      textLayer.append(el("svg:text", { x, y: y1 + (main ? 11 : 0), class: "nodesub", "text-anchor": "middle", text: sub }));
    }
  }
  function drawGroup(r, folded, x, y, step) {
    const infl = folded.reduce((s, i) => s + Math.max(nodes[i].influence, 0), 0);
    const rr = Math.min(maxR, 3 + 11 * Math.sqrt(infl / maxInfl)), y1 = y + Math.min(maxR, 14) + 11;
    const g = el("svg:circle", { cx: x, cy: y, r: rr, class: "node group" });
    g.dataset.row = r; g.dataset.count = folded.length;
    g.append(el("svg:title", { text: `${folded.length} weaker nodes of ${rowName(r)} (influence ${fmt(infl)} together): click to show them` }));
    g.addEventListener("click", () => toggleRow(r));
    nodeLayer.append(g);
    groupEls.set(r, g);
    textLayer.append(el("svg:text", { x, y: y1, class: "nodelabel", "text-anchor": "middle", text: `+${folded.length} more` }));
    if (!compact) {
      textLayer.append(el("svg:text", { x, y: y1 + 11, class: "nodesub", "text-anchor": "middle", text: fit(`influence ${fmt(infl, 2)}`, step - 6) }));
    }
  }
  function toggleRow(r) {
    if (view.open.has(r)) view.open.delete(r); else view.open.add(r);
    redraw();
    writeHash();
  }
  function redraw() {
    layout();
    renderGroups();
    select(selected, false);
    for (const i of picked) if (nodeEls[i]) nodeEls[i].classList.add("picked");
  }
  // Drawn for the panel's width (the svg scales with it in between); a real change of width lays it out anew.
  let resizeTimer = null;
  new ResizeObserver(() => {
    if (Math.abs(svg.parentElement.clientWidth - svgWidth) < 24) return;
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(redraw, 100);
  }).observe(svg.parentElement);

  // Image and patches --------------------------------------------------------------------------
  let patchEls = [];
  if (meta.image) {
    $("imagebox").hidden = false;
    $("image").src = meta.image;
    const ps = $("patches");
    ps.setAttribute("viewBox", `0 0 ${grid} ${grid}`);
    for (let t = P; t < P + grid * grid; t++) {
      const k = t - P;
      const rect = el("svg:rect", { x: k % grid, y: Math.floor(k / grid), width: 1, height: 1, class: "patch" });
      rect.style.strokeWidth = "0.03";
      rect.dataset.token = t;
      rect.append(el("svg:title", { text: tokName(t) }));
      rect.addEventListener("mouseenter", () => markToken(t));
      rect.addEventListener("mouseleave", () => markToken(null));
      ps.append(rect);
      patchEls[t] = rect;
    }
  }
  function markToken(t) {
    nodes.forEach((n, i) => nodeEls[i] && nodeEls[i].classList.toggle("at-patch", t !== null && n.token === t));
  }
  // The selected node's patch is outlined (a black ring around a white one, readable on any colour); it is never
  // tinted, so the image keeps its colours.
  const markLayer = el("svg:g", { id: "patch-marks" });
  if (meta.image) $("patches").append(markLayer);
  function markPatch(t) {
    patchEls.forEach((p) => p && p.classList.remove("mark"));
    markLayer.replaceChildren();
    if (t === null || !patchEls[t]) return;
    patchEls[t].classList.add("mark");
    const k = t - P, x = k % grid, y = Math.floor(k / grid);
    markLayer.append(el("svg:rect", { x: x + 0.06, y: y + 0.06, width: 0.88, height: 0.88, class: "ring-black" }),
      el("svg:rect", { x: x + 0.13, y: y + 0.13, width: 0.74, height: 0.74, class: "ring-white" }));
  }
  // Where each image comes from: the file given to --image, or the class images' indices in their split.
  if (meta.source) $("provenance").textContent = `image file: ${meta.source}`;
  if (meta.images && meta.images.length) {
    const box = $("imagegrid");
    box.hidden = false;
    const d = meta.dataset || {};
    $("provenance").textContent = `${meta.images.length} images of ${meta.target_name}: ${d.spec} (${d.split}), ` +
      "by their index in that split";
    for (const im of meta.images) {
      const where = `${d.spec} (${d.split}) image #${im.index}`;
      box.append(el("figure", { "data-image": im.index, title: where }, el("img", { src: im.file, alt: where }),
        el("figcaption", { text: `#${im.index}` })));
    }
  }

  // The effects table: the most influential nodes with their labels and effects on the target (and, where
  // measured, what zeroing them did); a click selects the node.
  function topNodes() {
    const fx = G.effects || {};
    const ranked = nodes.map((n, i) => i).filter((i) => nodes[i].kind !== "target").sort((a, b) => nodes[b].influence - nodes[a].influence);
    const feats = ranked.filter((i) => nodes[i].kind === "feature"), others = ranked.filter((i) => nodes[i].kind !== "feature");
    // Features first (what a reader looks for), then the strongest errors, embeddings and biases.
    const chosen = [...feats.slice(0, 20), ...feats.slice(20).filter((i) => fx[nodes[i].id]), ...others.slice(0, 5)];
    const measured = Object.keys(fx).length > 0, cls = meta.kind === "class";
    const head = ["node", "label", "influence", "direct effect", "total effect"];
    if (cls) head.push("share of images");
    if (measured) head.push("zeroed: graph", "CLT replacement", "original model");
    const table = $("top-nodes");
    table.replaceChildren(el("tr", {}, ...head.map((h) => el("th", { text: h }))));
    for (const i of chosen) {
      const n = nodes[i], f = fx[n.id];
      const a = el("a", { href: "#", text: name(n) });
      a.addEventListener("click", (ev) => { ev.preventDefault(); select(i); });
      const cells = [el("td", {}, a), el("td", { text: label(n) }), el("td", { text: fmt(n.influence) }), el("td", { text: fmt(n.direct) }),
        el("td", { text: n.kind === "feature" ? fmt(n.total) : "" })];
      if (cls) cells.push(el("td", { text: n.images === undefined ? "" : `${Math.round(100 * n.images)}%` }));
      if (measured) cells.push(el("td", { text: f ? fmt(f.predicted) : "" }), el("td", { text: f ? fmt(f.replacement) : "" }),
        el("td", { text: f ? fmt(f.original) : "" }));
      const tr = el("tr", { "data-id": n.id }, ...cells);
      table.append(tr);
    }
    $("top-nodes-note").textContent = `The ${Math.min(20, feats.length)} most influential of the ${feats.length} kept features` +
      (measured ? " and every feature whose zeroing was measured (--effects-top)" : "") +
      `, then the ${Math.min(5, others.length)} most influential other nodes (of ${others.length}).` +
      " Direct effect: the edge into the target; total effect: along all paths of the linear graph.";
  }

  // Selection and details ------------------------------------------------------------------------
  let selected = null;
  function select(i, write = true) {
    if (i !== null && !nodeEls[i] && write) {
      // A folded node: unfold its row first, so that it can be seen.
      view.open.add(rowOf(nodes[i]));
      selected = i;
      return redraw(), writeHash();
    }
    selected = i;
    nodeEls.forEach((e, k) => e && e.classList.toggle("selected", k === i));
    drawnEdges.forEach((e, k) => {
      const on = i !== null && e.members.some(([s, t]) => s === i || t === i);
      edgeEls[k].style.strokeOpacity = i === null ? edgeEls[k].dataset.base : on ? 0.95 : (0.3 * edgeEls[k].dataset.base).toFixed(3);
    });
    document.querySelectorAll("#top-nodes tr[data-id]").forEach((tr) => tr.classList.toggle("selected", i !== null && tr.dataset.id === nodes[i].id));
    markPatch(i === null ? null : nodes[i].token >= P ? nodes[i].token : null);
    $("imagebox").classList.toggle("cls", i !== null && nodes[i].token >= 0 && nodes[i].token < P);
    details(i);
    if (write) writeHash();
  }
  function details(i) {
    const box = $("details");
    box.replaceChildren();
    if (i === null) { box.append(el("p", { class: "muted", text: "Select a node to see it here." })); return; }
    const n = nodes[i];
    box.append(el("h2", { text: name(n) }));
    const rowsT = [["kind", n.kind], ...(label(n) && n.kind === "feature" ? [["label (feature browser)", label(n)]] : []), ["influence on the target", fmt(n.influence)], ["direct effect on the target", fmt(n.direct)]];
    if (n.kind === "feature") {
      rowsT.push(["activation", fmt(n.value)], ["total effect on the target (linear graph)", fmt(n.total)]);
      if (n.token >= 0) rowsT.push(["token", `${n.token} (${tokName(n.token)})`]);
    } else if (n.kind === "target") rowsT.push(["value", fmt(n.value, 4)]);
    else if (n.kind !== "bias") rowsT.push(["norm of its write", fmt(n.norm)]);
    if (n.images !== undefined) rowsT.push(["share of the class's images", `${Math.round(100 * n.images)}%`]);
    box.append(el("table", {}, ...rowsT.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: v })))));
    const fx = G.effects[n.id];
    if (fx) {
      box.append(el("h2", { text: "Set to 0 at this token: change of the target" }),
        el("table", { id: "effects" },
          el("tr", {}, el("th", { text: "graph (predicted)" }), el("td", { text: fmt(fx.predicted, 3) })),
          el("tr", {}, el("th", { text: "CLT replacement (measured)" }), el("td", { text: `${fmt(fx.replacement, 3)} → top ${fx.replacement_top}` })),
          el("tr", {}, el("th", { text: "original model + decoder change" }), el("td", { text: `${fmt(fx.original, 3)} → top ${fx.original_top}` }))));
    }
    if (n.kind === "feature") {
      if (meta.browser) {
        const url = `${meta.browser.url}/feature.html?tc=${encodeURIComponent(meta.browser.tc)}&layer=${n.layer}&feature=${n.feature}`;
        box.append(el("p", {}, el("a", { id: "browser-link", href: url, text: `open L${n.layer} #${n.feature} in the feature browser →` })));
      } else {
        box.append(el("p", { class: "muted", text: "Build the feature browser (vitclt browse RUN_DIR) and pass --browser to link features to their pages." }));
      }
    }
    const inc = edges.map((e, k) => [e, k]).filter(([e]) => e[1] === i).sort((a, b) => Math.abs(b[0][2]) - Math.abs(a[0][2])).slice(0, 6);
    const out = edges.map((e, k) => [e, k]).filter(([e]) => e[0] === i).sort((a, b) => Math.abs(b[0][2]) - Math.abs(a[0][2])).slice(0, 6);
    const list = (title, items, end) => {
      if (!items.length) return;
      box.append(el("h2", { text: title }), el("table", {}, ...items.map(([e]) => {
        const other = e[end];
        const a = el("a", { href: "#", text: name(nodes[other]) });
        a.addEventListener("click", (ev) => { ev.preventDefault(); select(other); });
        return el("tr", {}, el("td", {}, a), el("td", { text: fmt(e[2]) }));
      })));
    };
    list("Strongest inputs (kept edges)", inc, 0);
    list("Strongest outputs (kept edges)", out, 1);
  }

  // Supernodes -------------------------------------------------------------------------------------
  let groups = [];
  const picked = new Set();
  function togglePick(i) {
    if (picked.has(i)) picked.delete(i); else picked.add(i);
    if (nodeEls[i]) nodeEls[i].classList.toggle("picked", picked.has(i));
    $("selection-note").textContent = picked.size ? `${picked.size} node(s) selected for grouping.` :
      "Shift-click nodes to select them, then group them.";
  }
  function renderGroups() {
    ringLayer.replaceChildren();
    const ul = $("supernodes");
    ul.replaceChildren();
    groups.forEach((g, k) => {
      const color = PALETTE[k % PALETTE.length];
      const members = g.slice(1).map((id) => byId.get(id)).filter((i) => i !== undefined);
      for (const i of members) {
        const [x, y] = xy[i];
        const shape = nodeEls[i] || groupEls.get(rowOf(nodes[i]));
        const r = shape.tagName === "circle" ? +shape.getAttribute("r") : +shape.getAttribute("width") / 2;
        ringLayer.append(el("svg:circle", { cx: x, cy: y, r: r + 4, class: "groupring", stroke: color }));
      }
      const infl = members.reduce((s, i) => s + nodes[i].influence, 0);
      const remove = el("button", { text: "remove" });
      remove.addEventListener("click", () => { groups.splice(k, 1); renderGroups(); writeHash(); });
      const li = el("li", {}, el("span", { class: "swatch", style: `background:${color}` }), el("b", { text: g[0] }),
        ` · ${members.length} nodes · influence ${fmt(infl)} `, remove);
      li.dataset.name = g[0];
      li.addEventListener("mouseenter", () => members.forEach((i) => nodeEls[i] && nodeEls[i].classList.add("selected")));
      li.addEventListener("mouseleave", () => members.forEach((i) => nodeEls[i] && nodeEls[i].classList.toggle("selected", i === selected)));
      ul.append(li);
    });
  }
  $("group").addEventListener("click", () => {
    if (!picked.size) return;
    const label = $("group-name").value.trim() || `group ${groups.length + 1}`;
    groups.push([label, ...[...picked].map((i) => nodes[i].id)]);
    for (const i of [...picked]) togglePick(i);
    $("group-name").value = "";
    renderGroups();
    writeHash();
  });
  C.supernodesJson = () => JSON.stringify({ graph: meta.title, target: meta.target_name, supernodes: groups }, null, 1);
  $("download").addEventListener("click", () => {
    const a = el("a", { href: URL.createObjectURL(new Blob([C.supernodesJson()], { type: "application/json" })), download: "supernodes.json" });
    document.body.append(a);
    a.click();
    a.remove();
  });
  function setGroups(raw) {
    const list = Array.isArray(raw) ? raw : raw && raw.supernodes;
    if (!Array.isArray(list)) throw new Error("a supernode file holds {\"supernodes\": [[name, node id, ...], ...]}");
    groups = list.filter((g) => Array.isArray(g) && g.length > 1).map((g) => [String(g[0]), ...g.slice(1).map(String).filter((id) => byId.has(id))]);
    renderGroups();
  }
  $("upload").addEventListener("change", (ev) => {
    const file = ev.target.files[0];
    if (!file) return;
    file.text().then((text) => { setGroups(JSON.parse(text)); writeHash(); });
  });

  // The address keeps the selected node and the supernodes ---------------------------------------------
  function writeHash() {
    const h = new URLSearchParams();
    if (selected !== null) h.set("node", nodes[selected].id);
    if (view.per) h.set("per", view.per === Infinity ? "all" : String(view.per));
    if (view.open.size) h.set("open", [...view.open].sort((a, b) => a - b).join(","));
    if (groups.length) h.set("supernodes", JSON.stringify(groups));
    history.replaceState(null, "", h.toString() ? `#${h}` : window.location.pathname + window.location.search);
  }
  layout();
  topNodes();
  const h = hash0;
  if (h.get("supernodes")) setGroups(JSON.parse(h.get("supernodes")));
  if (h.get("node") && byId.has(h.get("node"))) select(byId.get(h.get("node")));
  else {
    // Start on the most influential feature, so the page opens with something to read.
    const feats = nodes.map((n, i) => [n, i]).filter(([n]) => n.kind === "feature").sort((a, b) => b[0].influence - a[0].influence);
    select(feats.length ? feats[0][1] : null);
  }
  document.body.dataset.ready = "1";
})().catch((e) => {
  window.__vitcltErrors.push(String(e));
  document.body.dataset.ready = "1";
});
