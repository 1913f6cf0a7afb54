// trainctl dashboard: one small script, no dependencies. Charts are plain SVG drawn here.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const SVGNS = "http://www.w3.org/2000/svg";
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
const COLORS = {train: "#1f77b4", val: "#ff7f0e", test: "#2ca02c", lr: "#9467bd", ips: "#8c564b", trial: "#1f77b4",
                reference: "#555555"};

function csrf() { const m = $('meta[name="csrf-token"]'); return m ? m.content : ""; }

async function api(method, path, body) {
  const opts = {method, credentials: "same-origin", headers: {"X-CSRF-Token": csrf(), "Accept": "application/json"}};
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const resp = await fetch(path, opts);
  if (resp.status === 401) { location.href = "/ui/login?next=" + encodeURIComponent(location.pathname); }
  return resp;
}

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const pct = v => (v === null || v === undefined) ? "—" : (v * 100).toFixed(2) + " %";
// the job view's worker spans as the page renders them (service/ui/routes.py _workers): "2 (epochs 1-2) → 3 (epoch 3)"
const workerSpans = spans => spans.map(s => `${s.workers} (epoch${s.last_epoch > s.first_epoch ? "s" : ""} ${s.first_epoch}`
  + `${s.last_epoch > s.first_epoch ? "-" + s.last_epoch : ""})`).join(" → ");

function duration(s) {
  if (s === null || s === undefined) return "";
  s = Math.round(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}

function niceTicks(lo, hi, n) {
  if (!(hi > lo)) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return {lo: Math.min(lo, ticks[0]), hi: Math.max(hi, ticks[ticks.length - 1]), ticks};
}

function fmtTick(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return +v.toPrecision(4) + "";
}

// series: [{name, color, points: [[x, y], ...]}]; opts: {xlabel, lines: bool, integerX: bool}
function drawChart(svg, series, opts = {}) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 480, H = 260, L = 56, R = 12, T = 12, B = 40;
  const pts = series.flatMap(s => s.points);
  if (!pts.length) {
    svg.appendChild(svgEl("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"}, "no data yet"));
    return;
  }
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
  let xlo = Math.min(...xs), xhi = Math.max(...xs);
  if (opts.integerX && xlo === xhi) { xlo -= 1; xhi += 1; }
  const xt = niceTicks(xlo, xhi, 6), yt = niceTicks(Math.min(...ys), Math.max(...ys), 5);
  const sx = x => L + (x - xt.lo) / (xt.hi - xt.lo) * (W - L - R);
  const sy = y => H - B - (y - yt.lo) / (yt.hi - yt.lo) * (H - T - B);
  const axes = svgEl("g", {class: "axes"});
  for (const t of yt.ticks) {
    axes.appendChild(svgEl("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid"}));
    axes.appendChild(svgEl("text", {x: L - 6, y: sy(t) + 4, "text-anchor": "end"}, fmtTick(t)));
  }
  for (const t of xt.ticks) {
    if (opts.integerX && !Number.isInteger(t)) continue;
    axes.appendChild(svgEl("line", {x1: sx(t), x2: sx(t), y1: H - B, y2: H - B + 4, class: "tick"}));
    axes.appendChild(svgEl("text", {x: sx(t), y: H - B + 16, "text-anchor": "middle"}, fmtTick(t)));
  }
  axes.appendChild(svgEl("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  axes.appendChild(svgEl("line", {x1: L, x2: L, y1: T, y2: H - B, class: "axis"}));
  if (opts.xlabel) axes.appendChild(svgEl("text", {x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle"}, opts.xlabel));
  svg.appendChild(axes);
  let legendX = L + 8;
  for (const s of series) {
    if (!s.points.length) continue;
    const g = svgEl("g", {class: "series", "data-series": s.name});
    if (opts.lines !== false && s.points.length > 1) {
      g.appendChild(svgEl("polyline", {points: s.points.map(p => sx(p[0]) + "," + sy(p[1])).join(" "),
                                       fill: "none", stroke: s.color, "stroke-width": 2}));
    }
    for (const p of s.points) {
      const c = svgEl("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 3.5, fill: s.color, class: "pt",
                                 "data-x": p[0], "data-y": p[1]});
      c.appendChild(svgEl("title", {}, `${s.name}: ${fmtTick(p[1])} at ${fmtTick(p[0])}`));
      g.appendChild(c);
    }
    svg.appendChild(g);
    if (series.length > 1) {
      svg.appendChild(svgEl("rect", {x: legendX, y: T + 2, width: 10, height: 10, fill: s.color}));
      svg.appendChild(svgEl("text", {x: legendX + 14, y: T + 11, class: "legend"}, s.name));
      legendX += 20 + 7 * s.name.length + 10;
    }
  }
}

// The run against the reference at its latest epoch that has a reference point (as service/api/reference.py words it).
function standingText(metrics, refPct) {
  for (const m of [...metrics].reverse()) {
    const r = refPct.get(m.epoch), metric = typeof m.test_acc === "number" ? "test" : "val";
    const run = metric === "test" ? m.test_acc : m.val_acc;
    if (r === undefined || typeof run !== "number") continue;
    const delta = Math.round((run * 100 - r) * 100) / 100;
    const word = delta > 0 ? "ahead of" : delta < 0 ? "behind" : "level with";
    return `epoch ${m.epoch}: ${metric} ${(run * 100).toFixed(1)} % vs the authors' notebook's test ${r.toFixed(1)} % ` +
           `(${delta >= 0 ? "+" : ""}${delta.toFixed(1)} points, ${word} it)`;
  }
  return null;
}

function seriesOf(metrics, key, name, color, scale = 1) {
  return {name, color, points: metrics.filter(m => typeof m[key] === "number").map(m => [m.epoch, m[key] * scale])};
}

// --- jobs list ---------------------------------------------------------------------------------------------

function initJobs() {
  const filter = $("#state-filter");
  const params = new URLSearchParams(location.search);
  if (params.get("state")) filter.value = params.get("state");
  filter.addEventListener("change", () => {
    const q = filter.value ? "?state=" + filter.value : "";
    history.replaceState(null, "", location.pathname + q);
    refreshJobs();
  });
  $("#compare-button").addEventListener("click", () => {
    location.href = "/ui/compare?ids=" + encodeURIComponent(Array.from(selected).join(","));
  });
  refreshJobs();
  setInterval(refreshJobs, 2000);
}

const selected = new Set();  // job ids ticked for comparison (kept across the table's refreshes)

function updateCompareButton() {
  const button = $("#compare-button");
  button.disabled = selected.size < 2 || selected.size > 5;
  button.textContent = `Compare selected (${selected.size})`;
}

async function refreshJobs() {
  const filter = $("#state-filter").value;
  const resp = await api("GET", "/ui/api/jobs" + (filter ? "?state=" + filter : ""));
  if (!resp.ok) return;
  const data = await resp.json();
  const body = $("#jobs-body");
  body.replaceChildren();
  if (!data.jobs.length) {
    const tr = el("tr"); tr.appendChild(el("td", {colspan: 10, class: "muted"}, "no jobs")); body.appendChild(tr);
  }
  for (const j of data.jobs) {
    const tr = el("tr", {"data-job-id": j.id, "data-state": j.state});
    const pick = el("input", {type: "checkbox", class: "pick", "aria-label": "compare " + j.id});
    pick.checked = selected.has(j.id);
    pick.addEventListener("change", () => {
      if (pick.checked) selected.add(j.id); else selected.delete(j.id);
      updateCompareButton();
    });
    const pickCell = el("td"); pickCell.appendChild(pick); tr.appendChild(pickCell);
    const idCell = el("td"); idCell.appendChild(el("a", {href: "/ui/jobs/" + j.id, class: "job-link"}, j.id));
    if (j.search) idCell.appendChild(el("span", {class: "tag"}, "search"));
    tr.appendChild(idCell);
    const labels = el("td", {class: "labels"}, j.name || "");
    if (j.project) labels.appendChild(el("span", {class: "muted"}, " · " + j.project));
    for (const t of j.tags || []) labels.appendChild(el("span", {class: "tag"}, t));
    tr.appendChild(labels);
    tr.appendChild(el("td", {}, j.owner));
    const st = el("td"); st.appendChild(el("span", {class: "state", "data-state": j.state}, j.state)); tr.appendChild(st);
    const prog = el("td", {class: "progress-cell"});
    const bar = el("div", {class: "bar"}), fill = el("div", {class: "fill"});
    fill.style.width = (j.epochs ? Math.min(100, 100 * j.epoch / j.epochs) : 0) + "%";
    bar.appendChild(fill); prog.appendChild(bar);
    const eta = j.eta_seconds && !TERMINAL.has(j.state) ? " · ETA " + duration(j.eta_seconds) : "";
    prog.appendChild(el("span", {class: "progress-text"}, `epoch ${j.epoch}/${j.epochs ?? "?"}${eta}`));
    tr.appendChild(prog);
    tr.appendChild(el("td", {}, pct(j.best_val_acc)));
    tr.appendChild(el("td", {}, pct(j.test_acc)));
    tr.appendChild(el("td", {}, j.device));
    tr.appendChild(el("td", {title: j.message || ""}, duration(j.age_seconds) + " ago"));
    body.appendChild(tr);
  }
  $("#jobs-updated").textContent = "updated " + new Date().toLocaleTimeString();
}

// --- job page ----------------------------------------------------------------------------------------------

function initJob() {
  const root = $("#job"), id = root.dataset.jobId;
  const epochs = new Map();   // epoch -> metrics line (a resumed run rewrites an epoch: keep the last)
  let state = root.dataset.state;

  const redraw = () => {
    if (!$("#chart-loss")) return;
    const ms = Array.from(epochs.values()).sort((a, b) => a.epoch - b.epoch);
    const o = {xlabel: "epoch", integerX: true};
    drawChart($("#chart-loss"), [seriesOf(ms, "train_loss", "train", COLORS.train),
                                 seriesOf(ms, "val_loss", "val", COLORS.val),
                                 seriesOf(ms, "test_loss", "test", COLORS.test)], o);
    const acc = [seriesOf(ms, "train_acc", "train", COLORS.train, 100),
                 seriesOf(ms, "val_acc", "val", COLORS.val, 100),
                 seriesOf(ms, "test_acc", "test", COLORS.test, 100)];
    const ref = $("#reference"), last = ms.length ? ms[ms.length - 1].epoch : 0;
    if (ref) {  // the authors' notebook's test accuracy, up to the run's last epoch (service/api/reference.py)
      const points = JSON.parse(ref.dataset.points).filter(p => p[0] <= last).map(p => [p[0], p[1] * 100]);
      acc.push({name: "notebook (test)", color: COLORS.reference, points});
      const text = standingText(ms, new Map(points.map(p => [p[0], p[1]])));
      if (text) ref.textContent = text;
    }
    drawChart($("#chart-acc"), acc, o);
    drawChart($("#chart-lr"), [seriesOf(ms, "lr", "lr", COLORS.lr)], o);
    drawChart($("#chart-ips"), [seriesOf(ms, "images_per_s", "images/s", COLORS.ips)], o);
    $("#epochs-drawn").textContent = `(${ms.length} epoch${ms.length === 1 ? "" : "s"})`;
  };

  const showState = view => {
    state = view.state;
    root.dataset.state = state;
    const badge = $("#job-state"); badge.textContent = state; badge.dataset.state = state;
    const p = view.progress, fill = $("#progress-fill");
    fill.dataset.epoch = p.epoch; fill.dataset.epochs = p.epochs || 0;
    fill.style.width = (p.epochs ? Math.min(100, 100 * p.epoch / p.epochs) : 0) + "%";
    $("#progress-text").textContent = `epoch ${p.epoch}/${p.epochs ?? "?"}`;
    $("#eta").textContent = p.eta_seconds && !TERMINAL.has(state) ? "ETA " + duration(p.eta_seconds) : "";
    $("#best-val").textContent = pct(view.best_val_acc);
    if (view.workers) $("#workers").textContent = workerSpans(view.workers);
    $("#attempts").textContent = view.attempts;
    $("#message").textContent = view.message || "—";
    if (TERMINAL.has(state)) $("#cancel-button").hidden = true;
  };

  const fill = $("#progress-fill");
  const e0 = +fill.dataset.epoch, n0 = +fill.dataset.epochs;
  fill.style.width = (n0 ? Math.min(100, 100 * e0 / n0) : 0) + "%";
  redraw();

  const es = new EventSource(`/v1/jobs/${id}/events`);
  es.addEventListener("epoch", ev => { const m = JSON.parse(ev.data); epochs.set(m.epoch, m); redraw(); refreshCheckpoints(id); });
  es.addEventListener("state", ev => showState(JSON.parse(ev.data)));
  es.addEventListener("end", () => {
    es.close(); refreshLog(id); refreshCheckpoints(id); showConfusion(id);
    if (root.dataset.search === "true") refreshTrials(id);
  });

  $("#resubmit-button").addEventListener("click", async () => {
    const text = $("#resubmit-overrides").value.trim();
    let overrides = {};
    try { overrides = text ? JSON.parse(text) : {}; }
    catch (e) { showError({error: {message: "the overrides are not valid JSON: " + e.message}}); return; }
    const body = {overrides};
    if ($("#resubmit-name").value.trim()) body.name = $("#resubmit-name").value.trim();
    const resp = await api("POST", `/v1/jobs/${id}/resubmit`, body);
    const answer = await resp.json();
    if (resp.ok) location.href = "/ui/jobs/" + answer.id;
    else showError(answer);
  });

  $("#cancel-button").addEventListener("click", async () => {
    if (!confirm(`Cancel job ${id}?`)) return;
    const resp = await api("POST", `/v1/jobs/${id}/cancel`);
    if (resp.ok) showState(await resp.json());
    else showError(await resp.json());
  });

  refreshLog(id);
  setInterval(() => { if (!TERMINAL.has(state)) refreshLog(id); }, 3000);
  if (TERMINAL.has(state)) showConfusion(id);
  if (root.dataset.search === "true") {
    refreshTrials(id);
    setInterval(() => { if (!TERMINAL.has(state)) refreshTrials(id); }, 3000);
    initSort();
  }
  for (const td of $$("td.time")) td.textContent = new Date(+td.dataset.t * 1000).toLocaleString();
}

function showError(body, box = $("#action-error")) {
  const details = body.error && Array.isArray(body.error.details) ? body.error.details : [];
  box.textContent = ((body.error && body.error.message) || "request failed") +
    details.map(d => ` [${d.field}: ${d.message}]`).join("");
  box.hidden = false;
}

// --- comparison page (GET /v1/compare: service/api/comparison.py) ---------------------------------------------------

const RUN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"];

function runSeries(job, key, color, scale) {
  const s = job.series, pts = [];
  s.epoch.forEach((e, i) => { if (typeof s[key][i] === "number") pts.push([e, s[key][i] * scale]); });
  return {name: job.name || job.id.slice(0, 8), color, points: pts};
}

async function initCompare() {
  const ids = $("#compare").dataset.ids;
  const query = "?ids=" + encodeURIComponent(ids);
  $("#compare-png").href = "/v1/compare.png" + query;
  const resp = await api("GET", "/v1/compare" + query);
  const data = await resp.json();
  if (!resp.ok) { showError(data, $("#compare-error")); return; }
  const head = $("#compare-head"), dhead = $("#diff-head");
  for (const j of data.jobs) {
    for (const row of [head, dhead]) {
      const th = el("th"); th.appendChild(el("a", {href: "/ui/jobs/" + j.id}, j.name || j.id)); row.appendChild(th);
    }
  }
  const num = v => (typeof v === "number" ? fmtTick(v) : "—");
  const rows = [
    ["state", j => j.state], ["epochs done", j => j.epochs_done],
    ["final val acc", j => pct(j.final.val_acc)], ["final test acc", j => pct(j.final.test_acc)],
    ["final train loss", j => num(j.final.train_loss)], ["final val loss", j => num(j.final.val_loss)],
    ["best val acc", j => pct(j.best.val_acc) + (j.best.val_acc_epoch ? ` (epoch ${j.best.val_acc_epoch})` : "")],
    ["best test acc", j => pct(j.best.test_acc)], ["best checkpoint test acc", j => pct(j.best.checkpoint_test_acc)],
  ];
  for (const [title, get] of rows) {
    const tr = el("tr"); tr.appendChild(el("th", {}, title));
    for (const j of data.jobs) tr.appendChild(el("td", {}, String(get(j))));
    $("#compare-body").appendChild(tr);
  }
  for (const d of data.spec_differences) {
    const tr = el("tr", {"data-path": d.path}); tr.appendChild(el("td", {}, d.path));
    for (const v of d.values) tr.appendChild(el("td", {}, v === null ? "—" : typeof v === "object" ? JSON.stringify(v) : String(v)));
    $("#diff-body").appendChild(tr);
  }
  if (!data.spec_differences.length) {
    const tr = el("tr"); tr.appendChild(el("td", {colspan: data.jobs.length + 1, class: "muted"}, "none: the same spec"));
    $("#diff-body").appendChild(tr);
  }
  const has = (j, k) => j.series[k].some(v => typeof v === "number");
  const o = {xlabel: "epoch", integerX: true};
  drawChart($("#compare-acc"), data.jobs.map((j, i) =>
    runSeries(j, has(j, "test_acc") ? "test_acc" : "val_acc", RUN_COLORS[i % 5], 100)), o);
  drawChart($("#compare-loss"), data.jobs.map((j, i) =>
    runSeries(j, has(j, "test_loss") ? "test_loss" : "val_loss", RUN_COLORS[i % 5], 1)), o);
}

async function refreshLog(id) {
  const resp = await api("GET", `/v1/jobs/${id}/logs?tail=60`);
  if (resp.ok) { const pre = $("#log"); pre.textContent = await resp.text(); pre.scrollTop = pre.scrollHeight; }
}

async function refreshCheckpoints(id) {
  const resp = await api("GET", `/v1/jobs/${id}/checkpoints`);
  if (!resp.ok) return;
  const body = $("#checkpoints-body"), cps = (await resp.json()).checkpoints;
  body.replaceChildren();
  for (const c of cps) {
    const tr = el("tr");
    tr.appendChild(el("td", {}, c.epoch ?? "—"));
    tr.appendChild(el("td", {}, pct(c.val_acc)));
    tr.appendChild(el("td", {}, c.size ?? "—"));
    const sha = el("td"); sha.appendChild(el("code", {}, (c.sha256 || "").slice(0, 12))); tr.appendChild(sha);
    const dl = el("td"); dl.appendChild(el("a", {href: `/v1/jobs/${id}/checkpoints/${c.epoch}/file`}, "download"));
    tr.appendChild(dl);
    body.appendChild(tr);
  }
  if (!cps.length) { const tr = el("tr"); tr.appendChild(el("td", {colspan: 5, class: "muted"}, "none yet")); body.appendChild(tr); }
}

function showConfusion(id) {
  const img = $("#confusion-img");
  if (!img) return;
  img.addEventListener("load", () => { $("#confusion").hidden = false; }, {once: true});
  img.src = `/v1/jobs/${id}/plots/confusion.png?t=${Date.now()}`;
}

// --- search page -------------------------------------------------------------------------------------------

let trials = [], sortKey = "best_metric", sortDir = -1;

const valueAt = (obj, path) => path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);

async function refreshTrials(id) {
  const resp = await api("GET", `/v1/jobs/${id}/trials`);
  if (!resp.ok) return;
  trials = (await resp.json()).trials;
  renderTrials();
}

function renderTrials() {
  const root = $("#job"), body = $("#trials-body");
  const params = $$("#trials-table th[data-key^='config.']").map(th => th.dataset.key.slice(7));
  const rows = trials.slice().sort((a, b) => {
    const x = valueAt(a, sortKey), y = valueAt(b, sortKey);
    if (x === y) return 0;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * sortDir;
  });
  body.replaceChildren();
  for (const t of rows) {
    const tr = el("tr", {"data-trial": t.trial_id});
    tr.appendChild(el("td", {}, t.trial_id));
    for (const p of params) { const v = t.config[p]; tr.appendChild(el("td", {}, typeof v === "number" ? fmtTick(v) : String(v))); }
    tr.appendChild(el("td", {}, t.state));
    tr.appendChild(el("td", {}, t.epochs));
    tr.appendChild(el("td", {}, t.best_metric === null ? "—" : fmtTick(t.best_metric)));
    tr.appendChild(el("td", {}, t.stopped_early ? "yes" : "no"));
    body.appendChild(tr);
  }
  for (const svg of $$("svg.scatter")) {
    const p = svg.dataset.param;
    const pts = trials.filter(t => typeof t.config[p] === "number" && typeof t.best_metric === "number")
                      .map(t => [t.config[p], t.best_metric]);
    drawChart(svg, [{name: root.dataset.metric, color: COLORS.trial, points: pts}], {xlabel: p, lines: false});
  }
}

function initSort() {
  for (const th of $$("#trials-table th[data-key]")) {
    th.classList.add("sort");
    th.addEventListener("click", () => {
      sortDir = sortKey === th.dataset.key ? -sortDir : 1;
      sortKey = th.dataset.key;
      $$("#trials-table th").forEach(h => h.removeAttribute("data-dir"));
      th.dataset.dir = sortDir > 0 ? "asc" : "desc";
      renderTrials();
    });
  }
}

// --- submit form -------------------------------------------------------------------------------------------

// The estimate of what the form would submit (POST /ui/api/estimate = POST /v1/estimates), refreshed as the
// form changes; each figure shows its basis (history, benchmark or unknown).
async function refreshEstimate() {
  const figures = $("#estimate-figures"), checks = $("#estimate-checks"), note = $("#estimate-note");
  const resp = await api("POST", "/ui/api/estimate", {preset: $("#preset").value, overrides_yaml: $("#overrides").value});
  const body = await resp.json();
  figures.replaceChildren(); checks.replaceChildren();
  if (!resp.ok) { note.textContent = "no estimate: " + ((body.error && body.error.message) || `HTTP ${resp.status}`); return; }
  const num = v => (v === null || v === undefined) ? "unknown" : String(+v.toPrecision(4));
  const rows = [
    ["wall time", body.wall_seconds, v => duration(v) || "unknown"],
    ["images/s", body.images_per_s, num],
    ["node type", {value: body.node_type, basis: body.node_type_basis}, v => v || "unknown"],
    ["nodes", body.nodes, num],
    ["GPU hours", body.gpu_hours, num],
    ["CPU hours", body.cpu_hours, num],
    ["cost", body.cost, num],
  ];
  for (const [name, fig, fmt] of rows) {
    figures.appendChild(el("dt", {}, name));
    const dd = el("dd", {"data-figure": name}, fmt(fig.value) + " ");
    dd.appendChild(el("span", {class: "muted"}, "(" + fig.basis + ")"));
    figures.appendChild(dd);
  }
  for (const c of body.checks || []) checks.appendChild(el("li", {"data-result": c.result}, c.message));
  note.textContent = body.settings && body.settings.length ? "settings used: " + body.settings.join(", ") : "";
}

function initSubmit() {
  let timer = null;
  const later = () => { clearTimeout(timer); timer = setTimeout(refreshEstimate, 400); };
  $("#preset").addEventListener("change", later);
  $("#overrides").addEventListener("input", later);
  refreshEstimate();
  $("#submit-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const errors = $("#field-errors"), box = $("#submit-error");
    errors.replaceChildren(); box.hidden = true;
    const resp = await api("POST", "/ui/api/submit", {preset: $("#preset").value, overrides_yaml: $("#overrides").value});
    const body = await resp.json();
    if (resp.ok) { location.href = "/ui/jobs/" + body.id; return; }
    box.textContent = (body.error && body.error.message) || `HTTP ${resp.status}`;
    box.hidden = false;
    for (const d of (body.error && Array.isArray(body.error.details) ? body.error.details : [])) {
      const li = el("li", {"data-field": d.field || ""});
      li.appendChild(el("code", {}, d.field || "?"));
      li.appendChild(document.createTextNode(" " + (d.message || "")));
      errors.appendChild(li);
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "jobs") initJobs();
  else if (page === "job") initJob();
  else if (page === "submit") initSubmit();
  else if (page === "compare") initCompare();
});
