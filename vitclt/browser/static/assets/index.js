// The index: every feature of one transcoder, filtered, sorted and paged in the browser.
"use strict";
(async function () {
  const PAGE = 100;
  const site = await V.load("site");
  const params = V.params();
  // Filters, sort and page live in the address (restored here, rewritten on every change), so a view can be
  // bookmarked, shared, and is still there on coming back from a feature page.
  const known = (id) => site.transcoders.some((t) => t.id === id);
  const SORTS = ["layer", "index", "freq", "mean", "later", "label", "word"];
  const state = { tc: known(params.get("tc")) ? params.get("tc") : site.transcoders[0].id,
    sort: SORTS.includes(params.get("sort")) ? params.get("sort") : "layer", desc: params.get("desc") === "1",
    page: Math.max(0, (Number(params.get("page")) || 1) - 1) };
  let rows = [];
  let shown = [];
  const $ = (id) => document.getElementById(id);

  document.title = `${site.title} – feature browser`;
  $("title").textContent = site.title;
  const sub = site.subset || {};
  $("subtitle").textContent = `${site.dataset} · ${site.split} · ${site.n_images} images` +
    (sub.subsampled ? ` (a subset picked with seed ${sub.seed}; image numbers are indices in the whole split)` : "");
  for (const t of site.transcoders) $("tc").append(V.el("option", { value: t.id, text: t.name }));
  $("tc").value = state.tc;

  async function loadTranscoder() {
    const tc = site.transcoders.find((t) => t.id === state.tc);
    V.banner(site, tc);
    const check = tc.label_check;
    $("summary").textContent =
      `${tc.name}: ${tc.topology} / ${tc.sparsifier}, ${tc.n_layers} layers × ${tc.n_features} features, ` +
      `${tc.n_dead} dead. ` +
      (check && check.n_features
        ? `Text labels: the top class label is the majority class of a feature's top images for ` +
          `${V.pct(check.agreement)} of ${check.n_features} features (shuffled labels: ${V.pct(check.shuffled)}).`
        : "");
    const layerSel = $("layer");
    const keep = layerSel.value;
    layerSel.length = 1;
    for (let l = 0; l < tc.n_layers; l++) layerSel.append(V.el("option", { value: String(l), text: String(l) }));
    layerSel.value = Number(keep) < tc.n_layers ? keep : "";
    const shards = await Promise.all([...Array(tc.n_layers).keys()].map((l) => V.load(`${tc.id}/index-L${l}`)));
    rows = [];
    for (const s of shards) {
      const L = tc.n_layers;
      for (let i = 0; i < s.freq.length; i++) {
        rows.push({
          layer: s.layer, index: i, freq: s.freq[i], mean: s.mean[i], later: s.later[i],
          dead: s.dead[i] === 1, label: s.label[i], word: s.word[i], thumb: s.thumb[i],
          norms: s.norms.slice(i * L, (i + 1) * L), ...explainedColumns(s, i),
        });
      }
    }
    render();
  }

  function band(freq, dead) {
    const b = $("band").value;
    if (!b) return true;
    if (b === "dead") return dead;
    if (b === "alive") return !dead;
    if (dead) return false;
    const e = Math.log10(freq);
    if (b === "lt-4") return e < -4;
    if (b === "ge-1") return e >= -1;
    const lo = Number(b);
    return e >= lo && e < lo + 1;
  }

  function render() {
    const layer = $("layer").value;
    const text = $("text").value.trim().toLowerCase();
    const later = $("later").checked;
    shown = rows.filter((r) =>
      (layer === "" || r.layer === Number(layer)) && band(r.freq, r.dead) && (!later || r.later > 0.5) &&
      (!text || r.label.toLowerCase().includes(text) || r.word.toLowerCase().includes(text) ||
       r.sees.toLowerCase().includes(text) || r.writes.toLowerCase().includes(text)) &&
      (!$("explained").checked || r.sees !== "" || r.writes !== ""));
    const k = state.sort;
    const sign = state.desc ? -1 : 1;
    shown.sort((a, b) => {
      const x = a[k], y = b[k];
      const c = typeof x === "string" ? x.localeCompare(y) : x - y;
      return sign * c || a.layer - b.layer || a.index - b.index;
    });
    const pages = Math.max(1, Math.ceil(shown.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    const start = state.page * PAGE;
    const body = document.querySelector("#features tbody");
    body.replaceChildren(...shown.slice(start, start + PAGE).map(row));
    $("count").textContent = `${shown.length} of ${rows.length} features`;
    $("page").textContent = `page ${state.page + 1} of ${pages}`;
    $("prev").disabled = state.page === 0;
    $("next").disabled = state.page >= pages - 1;
    for (const th of document.querySelectorAll("th.sortable")) {
      th.classList.toggle("sorted-asc", th.dataset.key === k && !state.desc);
      th.classList.toggle("sorted-desc", th.dataset.key === k && state.desc);
    }
    writeAddress();
    document.body.dataset.ready = "1";
  }

  function writeAddress() {
    const q = new URLSearchParams({ tc: state.tc });
    if ($("layer").value !== "") q.set("layer", $("layer").value);
    if ($("band").value) q.set("band", $("band").value);
    if ($("later").checked) q.set("later", "1");
    if ($("text").value.trim()) q.set("q", $("text").value.trim());
    if (state.sort !== "layer" || state.desc) q.set("sort", state.sort);
    if (state.desc) q.set("desc", "1");
    if (state.page) q.set("page", String(state.page + 1));
    history.replaceState(null, "", `${window.location.pathname}?${q}`);
  }

  function row(r) {
    const tr = V.el("tr", { class: "feature-row" + (r.dead ? " dead" : ""), "data-layer": r.layer, "data-feature": r.index });
    let thumb = V.el("div", { class: "thumb-none" });
    if (r.thumb >= 0) {
      const where = V.provenance(site, r.thumb);
      thumb = V.el("div", { class: "thumbcell", title: where.long, "data-image": V.datasetIndex(site, r.thumb) },
        V.el("img", { class: "thumb", src: V.image(site, r.thumb), alt: where.long, loading: "lazy" }), where.short);
    }
    const name = r.dead ? V.el("span", { text: `${r.index} (dead)` })
                        : V.el("a", { href: V.featureUrl(state.tc, r.layer, r.index), text: String(r.index) });
    tr.append(
      V.el("td", {}, thumb), V.el("td", { class: "num", text: String(r.layer) }), V.el("td", { class: "num" }, name),
      V.el("td", { class: "num", text: r.dead ? "dead" : V.fmt(r.freq, 2) }),
      V.el("td", { class: "num", text: r.dead ? "–" : V.fmt(r.mean) }),
      V.el("td", {}, V.strip(r.norms, r.layer)),
      V.el("td", { class: "num", text: V.pct(r.later) }),
      V.el("td", { text: r.dead ? "" : r.label }), V.el("td", { text: r.dead ? "" : r.word }));
    tr.append(...explainedCells(r));
    return tr;
  }

  // Sees / writes labels: the top label if it beats its shuffled baseline ("" if not), and its margin over that baseline.
  function explainedColumns(s, i) {
    const out = {};
    for (const kind of ["sees", "writes"]) {
      const m = s[`${kind}_margin`] ? s[`${kind}_margin`][i] : null;
      out[kind] = s[kind] ? s[kind][i] : "";
      out[`${kind}_margin`] = m === null || m === undefined ? -Infinity : m;
    }
    return out;
  }

  function explainedCells(r) {
    return ["sees", "writes"].map((kind) => {
      const m = r[`${kind}_margin`];
      const text = r.dead || !r[kind] ? "" : `${r[kind]} (+${V.fmt(m, 2)})`;
      return V.el("td", { class: "explained", text, title: r[kind] ? `${kind} label; score minus its shuffled baseline ${V.fmt(m, 3)}` : "" });
    });
  }

  for (const th of document.querySelectorAll("th.sortable")) {
    th.addEventListener("click", () => {
      const key = th.dataset.key;
      state.desc = state.sort === key ? !state.desc : ["freq", "mean", "later", "sees_margin", "writes_margin"].includes(key);
      state.sort = key;
      render();
    });
  }
  for (const id of ["layer", "band", "later", "text", "explained"]) {
    for (const ev of ["input", "change"]) $(id).addEventListener(ev, () => { state.page = 0; render(); });
  }
  // A placeholder option lets the address's layer survive until loadTranscoder lists the real ones.
  if (params.get("layer") !== null) $("layer").append(V.el("option", { value: params.get("layer"), text: params.get("layer") }));
  $("layer").value = params.get("layer") || "";
  $("band").value = [...$("band").options].some((o) => o.value === params.get("band")) ? params.get("band") : "";
  $("later").checked = params.get("later") === "1";
  $("text").value = params.get("q") || "";
  $("tc").addEventListener("change", () => { state.tc = $("tc").value; state.page = 0; loadTranscoder(); });
  $("prev").addEventListener("click", () => { state.page--; render(); });
  $("next").addEventListener("click", () => { state.page++; render(); });
  await loadTranscoder();
})();
