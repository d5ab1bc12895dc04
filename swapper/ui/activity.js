"use strict";
// The dashboard's activity table and history plots; inlined into index.html after its main
// script (swapper/http/dashboard.py), whose globals ($, el, api, state, seconds, renderModels)
// it uses. The main script calls loadActivity() and activitySoon() only once this has run.

// -- activity and history plots ------------------------------------------------------------------

const ACTIVITY_MS = 5000;
const COLORS = ["#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];
// The uPlot charts by name, kept for the browser tests (and curious operators) to read.
const plots = {};
window.swapperPlots = plots;

const epoch = (iso) => Date.parse(iso) / 1000;

function plotChart(name, series, data, points) {
  const box = $("plot-" + name);
  if (plots[name]) { plots[name].destroy(); delete plots[name]; }
  box.replaceChildren();
  if (!data[0].length || !series.length) { box.append(el("div", "empty", "nothing yet")); return; }
  const opts = {
    width: Math.max(300, box.clientWidth || 420), height: 180,
    scales: { x: { time: true } },
    axes: [{ stroke: "#98a2b3" }, { stroke: "#98a2b3" }],
    series: [{}, ...series.map((label, i) => ({
      label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: !points,
      points: { show: points || data[0].length < 3, size: 6 },
      ...(points ? { paths: () => null } : {}),
    }))],
  };
  plots[name] = new uPlot(opts, data, box);
}

function renderPlots(doc) {
  const samples = doc.samples || [];
  const times = samples.map((s) => epoch(s.time));
  const names = (key) => [...new Set(samples.flatMap((s) => Object.keys(s[key] || {})))].sort();
  const requestModels = names("requests");
  plotChart("requests", requestModels, [times, ...requestModels.map(
    (m) => samples.map((s) => (s.requests[m] || 0) / s.seconds))], false);
  const tokenModels = names("tokens_per_s");
  plotChart("tokens", tokenModels, [times, ...tokenModels.map(
    (m) => samples.map((s) => s.tokens_per_s[m] ?? 0))], false);
  plotChart("queue", ["queued"], [times, samples.map((s) => s.queue_depth)], false);
  const gpus = names("vram_mb");
  plotChart("vram", gpus.map((g) => "GPU " + g), [times, ...gpus.map(
    (g) => samples.map((s) => s.vram_mb[g] ?? null))], false);
  // Swaps and loads: one point each, at its time, its height the seconds it took.
  const marks = [
    ...(doc.swaps || []).map((s) => [epoch(s.time), s.seconds, null]),
    ...(doc.loads || []).filter((l) => l.kind === "loaded").map((l) => [epoch(l.time), null, l.seconds]),
  ].sort((a, b) => a[0] - b[0]);
  plotChart("swaps", ["swap", "load"],
            [marks.map((m) => m[0]), marks.map((m) => m[1]), marks.map((m) => m[2])], true);
}

function fixed(value, digits) {
  return typeof value === "number" ? value.toFixed(digits) : "–";
}

function renderActivity() {
  const doc = state.activity;
  if (!doc) return;
  const filter = $("activity-filter");
  const models = [...new Set([...Object.keys((state.status || {}).models || {}),
                              ...(doc.requests || []).map((r) => r.model).filter(Boolean)])].sort();
  const chosen = filter.value;
  filter.replaceChildren(el("option", null, "all"));
  filter.firstChild.value = "";
  for (const m of models) { const o = el("option", null, m); o.value = m; filter.append(o); }
  filter.value = models.includes(chosen) ? chosen : "";
  const body = $("activity");
  body.replaceChildren();
  const rows = (doc.requests || []).filter((r) => !filter.value || r.model === filter.value).reverse();
  for (const r of rows) {  // latest first
    const row = el("tr");
    row.dataset.testid = "activity-row";
    row.dataset.requestId = r.request_id;
    if (r.request_id === state.picked) row.className = "picked";
    const status = el("td", r.status === "200" ? null : "bad", r.status);
    row.append(el("td", "num", new Date(r.time).toLocaleTimeString()), el("td", null, r.model || "–"),
               el("td", null, `${r.method} ${r.endpoint}`), status,
               el("td", "num", seconds(r.duration_s)), el("td", "num", seconds(r.ttfb_s)),
               el("td", "num", `${r.prompt_tokens ?? "–"} / ${r.completion_tokens ?? "–"}`),
               el("td", "num", fixed(r.tokens_per_s, 1)));
    row.addEventListener("click", () => {
      state.picked = r.request_id;
      $("activity-detail").textContent = JSON.stringify(r, null, 2);
      renderActivity();
    });
    body.append(row);
  }
  $("activity-note").textContent = `${rows.length} of the last ${doc.sizes.requests} requests`;
  renderPlots(doc);
  renderModels();
}

async function loadActivity() {
  try {
    state.activity = await api("GET", "/activity");
  } catch (error) {
    $("activity-note").textContent = `activity: ${error.message}`;
    return;
  }
  renderActivity();
}

let activityTimer = null;
function activitySoon() {
  clearTimeout(activityTimer);
  activityTimer = setTimeout(loadActivity, 300);
}

$("activity-filter").addEventListener("change", renderActivity);
setInterval(loadActivity, ACTIVITY_MS);
loadActivity();
