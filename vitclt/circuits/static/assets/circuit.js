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

  // Layout: one row per layer (target on top, embeddings at the bottom), tokens left to right ---------
  const rowOf = (n) => n.kind === "embedding" ? -1 : n.kind === "target" ? L : n.layer;
  const rows = new Map();
  nodes.forEach((n, i) => { const r = rowOf(n); if (!rows.has(r)) rows.set(r, []); rows.get(r).push(i); });
  const kindOrder = { embedding: 0, feature: 1, error: 2, bias: 3, target: 0 };
  for (const list of rows.values()) list.sort((a, b) => {
    const na = nodes[a], nb = nodes[b];
    return (na.kind === "bias") - (nb.kind === "bias") || (na.token === -2) - (nb.token === -2) ||
      na.token - nb.token || kindOrder[na.kind] - kindOrder[nb.kind] || nb.influence - na.influence;
  });
  const widest = Math.max(...[...rows.values()].map((r) => r.length));
  const left = 64, rowH = 64, width = Math.max(860, left + 24 + widest * 16), height = (L + 2) * rowH;
  const svg = $("graph");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.style.minWidth = `${Math.min(width, 2400)}px`;
  const yOf = (r) => height - rowH / 2 - (r + 1) * rowH;
  const xy = new Array(nodes.length);
  for (const [r, list] of rows) {
    const step = (width - left - 24) / Math.max(list.length, 1);
    list.forEach((i, k) => { xy[i] = [left + step * (k + 0.5), yOf(r)]; });
  }
  for (let r = -1; r <= L; r++) {
    const label = r === -1 ? "embed" : r === L ? "target" : `L${r}`;
    svg.append(el("svg:line", { x1: left - 6, x2: width - 8, y1: yOf(r), y2: yOf(r), stroke: "#f0f1f3" }),
      el("svg:text", { x: 6, y: yOf(r) + 4, text: label }));
  }
  const maxW = Math.max(...edges.map((e) => Math.abs(e[2])), 1e-12);
  const edgeLayer = el("svg:g"), ringLayer = el("svg:g"), nodeLayer = el("svg:g");
  svg.append(edgeLayer, ringLayer, nodeLayer);
  const edgeEls = edges.map(([s, t, w]) => {
    const [x1, y1] = xy[s], [x2, y2] = xy[t], ym = (y1 + y2) / 2;
    const p = el("svg:path", { d: `M${x1},${y1} C${x1},${ym} ${x2},${ym} ${x2},${y2}`, class: `edge ${w >= 0 ? "pos" : "neg"}`,
      "stroke-width": (0.4 + 3.6 * Math.abs(w) / maxW).toFixed(2) });
    edgeLayer.append(p);
    return p;
  });
  const maxInfl = Math.max(...nodes.filter((n) => n.kind !== "target").map((n) => n.influence), 1e-12);
  const radius = (n) => n.kind === "target" ? 12 : 3 + 11 * Math.sqrt(Math.max(n.influence, 0) / maxInfl);
  const nodeEls = nodes.map((n, i) => {
    const [x, y] = xy[i], r = radius(n);
    const shape = n.kind === "error" || n.kind === "embedding"
      ? el("svg:rect", { x: x - r, y: y - r, width: 2 * r, height: 2 * r, rx: n.kind === "embedding" ? 3 : 1 })
      : el("svg:circle", { cx: x, cy: y, r });
    shape.setAttribute("class", `node ${n.kind}`);
    shape.dataset.id = n.id;
    shape.append(el("svg:title", { text: `${name(n)}\ninfluence ${fmt(n.influence)} · direct effect on target ${fmt(n.direct)}` }));
    shape.addEventListener("click", (ev) => { if (ev.shiftKey) togglePick(i); else select(i); });
    nodeLayer.append(shape);
    return shape;
  });

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
    nodes.forEach((n, i) => nodeEls[i].classList.toggle("at-patch", t !== null && n.token === t));
  }
  function markPatch(t) {
    patchEls.forEach((p) => p && p.classList.remove("mark"));
    if (t !== null && patchEls[t]) patchEls[t].classList.add("mark");
  }

  // Selection and details ------------------------------------------------------------------------
  let selected = null;
  function select(i) {
    selected = i;
    nodeEls.forEach((e, k) => e.classList.toggle("selected", k === i));
    edgeEls.forEach((e, k) => {
      const on = i !== null && (edges[k][0] === i || edges[k][1] === i);
      e.classList.toggle("hot", on);
      e.classList.toggle("cold", i !== null && !on);
    });
    markPatch(i === null ? null : nodes[i].token >= P ? nodes[i].token : null);
    $("imagebox").classList.toggle("cls", i !== null && nodes[i].token >= 0 && nodes[i].token < P);
    details(i);
    writeHash();
  }
  function details(i) {
    const box = $("details");
    box.replaceChildren();
    if (i === null) { box.append(el("p", { class: "muted", text: "Select a node to see it here." })); return; }
    const n = nodes[i];
    box.append(el("h2", { text: name(n) }));
    const rowsT = [["kind", n.kind], ["influence on the target", fmt(n.influence)], ["direct effect on the target", fmt(n.direct)]];
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
    nodeEls[i].classList.toggle("picked", picked.has(i));
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
        ringLayer.append(el("svg:circle", { cx: x, cy: y, r: radius(nodes[i]) + 4, class: "groupring", stroke: color }));
      }
      const infl = members.reduce((s, i) => s + nodes[i].influence, 0);
      const remove = el("button", { text: "remove" });
      remove.addEventListener("click", () => { groups.splice(k, 1); renderGroups(); writeHash(); });
      const li = el("li", {}, el("span", { class: "swatch", style: `background:${color}` }), el("b", { text: g[0] }),
        ` · ${members.length} nodes · influence ${fmt(infl)} `, remove);
      li.dataset.name = g[0];
      li.addEventListener("mouseenter", () => members.forEach((i) => nodeEls[i].classList.add("selected")));
      li.addEventListener("mouseleave", () => members.forEach((i) => nodeEls[i].classList.toggle("selected", i === selected)));
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
    if (groups.length) h.set("supernodes", JSON.stringify(groups));
    history.replaceState(null, "", h.toString() ? `#${h}` : window.location.pathname + window.location.search);
  }
  const h = new URLSearchParams(window.location.hash.slice(1));
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
