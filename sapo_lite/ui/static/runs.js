// Runs: the table of runs, and their curves overlaid. Polls only while a run trains: a finished run is read once.
"use strict";

const LIVE = ["training", "starting"];
const state = {runs: [], shown: new Set(), records: {}, panels: [], noisy: new Set(), legends: {},
               capacity: {}, window: null, windowByUser: false, plot: null, timer: null};
window.sapoRuns = state;  // what the browser tests read: the records each run's curve draws

async function loadRuns() {
  const data = await api("/api/runs");
  state.runs = data.runs;
  state.panels = data.panels;
  state.noisy = new Set(data.noisy);
  state.legends = data.legends;
  if (!document.querySelector("#panel option")) {
    data.panels.forEach((p, i) => document.querySelector("#panel").append(el("option", {value: i}, p.title)));
    const wanted = runFromAddress();
    data.runs.forEach((r, i) => { if (wanted ? r.name === wanted : i < 4) state.shown.add(r.name); });
  }
  drawTable();
}

function stateCell(run) {
  const cell = el("td", {class: "state " + run.state}, run.state);
  if (run.state === "training" && run.pid) cell.append(el("span", {class: "note"}, ` (pid ${run.pid})`));
  return cell;
}

function drawTable() {
  const body = document.querySelector("#runs tbody");
  body.replaceChildren(...state.runs.map(run => {
    const box = el("input", {type: "checkbox", checked: state.shown.has(run.name), "data-run": run.name,
                             onchange: e => { e.target.checked ? state.shown.add(run.name) : state.shown.delete(run.name);
                                               refreshCurves(); }});
    const held = run.held_out ? `${run.held_out.metric}: ${pct(run.held_out.before)} → ${pct(run.held_out.after)}` : "–";
    const extra = el("td", {class: "extra"});
    if (run.resume) extra.append(el("code", {class: "resume"}, run.resume));
    if (run.error) extra.append(el("div", {class: "error"}, run.error));
    extra.append(" ", el("a", {href: `/pairs?run=${encodeURIComponent(run.name)}`}, "pairs"), " ",
                 el("a", {href: `/chat?run=${encodeURIComponent(run.name)}`}, "chat"));
    return el("tr", {"data-run": run.name}, el("td", {}, box), el("td", {class: "name"}, run.name), stateCell(run),
              el("td", {class: "step"}, `${run.step}${run.max_steps ? " / " + run.max_steps : ""}`),
              el("td", {}, fmt(run.loss)), el("td", {}, run.best_step ?? "–"), el("td", {}, held), extra);
  }));
  document.querySelector("#runs-note").textContent = state.runs.length ? "" :
    `no runs in ${SAPO.runsDir} yet: start one on the Launch page, or with sapo-lite train --out ${SAPO.runsDir}/NAME`;
}

async function fetchNew(name) {
  const have = state.records[name] || [];
  const data = await api(`/api/metrics?run=${encodeURIComponent(name)}&since=${have.length}`);
  state.records[name] = have.concat(data.records);
  state.capacity[name] = data.capacity;
  if (!state.windowByUser) state.window = Math.max(state.window || 0, data.window);
  return data.state;
}

async function refreshCurves() {
  for (const name of state.shown) {
    const run = state.runs.find(r => r.name === name);
    const have = state.records[name];
    if (!have || (run && (LIVE.includes(run.state) || run.points > have.length))) await fetchNew(name);
  }
  drawChart();
}

function series(records, key, capacity) {
  if (key === "buffer_fill") return records.map(r => r.buffer_size == null || !capacity ? null : r.buffer_size / capacity);
  return records.map(r => r[key] ?? null);
}

function smooth(values, window) {  // trailing mean, as sapo-lite plot draws it
  return values.map((_, i) => {
    const chunk = values.slice(Math.max(0, i - window + 1), i + 1).filter(v => v !== null && isFinite(v));
    return chunk.length ? chunk.reduce((a, b) => a + b, 0) / chunk.length : null;
  });
}

const STEP_TICKS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000];  // whole steps
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

function drawChart() {
  const panel = state.panels[Number(document.querySelector("#panel").value || 0)];
  if (!panel) return;
  const log = document.querySelector("#logscale").checked;
  const input = document.querySelector("#window");
  if (!state.windowByUser && state.window) input.value = state.window;
  const window = Math.max(1, Number(input.value) || 1);
  document.querySelector("#window-note").textContent =
    `faint: each step; solid: trailing mean over ${window} steps` + (log ? "; log scale: values ≤ 0 left out" : "");
  const tables = [], opts = [];
  let colour = 0;
  for (const name of state.shown) {
    const records = state.records[name] || [];
    const steps = records.map(r => r.step);
    for (const key of panel.keys) {
      const label = `${name} · ${state.legends[key] || key}`;
      let raw = series(records, key, state.capacity[name]);
      if (log) raw = raw.map(v => v !== null && v > 0 ? v : null);
      const stroke = COLOURS[colour++ % COLOURS.length];
      if (state.noisy.has(key)) {
        tables.push([steps, raw, smooth(raw, window)]);
        opts.push({label: label + " (raw)", stroke: stroke + "55", width: 1, points: {show: records.length < 60}},
                  {label, stroke, width: 2, points: {show: false}});
      } else {
        tables.push([steps, raw]);
        opts.push({label, stroke, width: 2, points: {show: records.length < 60}});
      }
    }
  }
  const holder = document.querySelector("#chart");
  if (state.plot) { state.plot.destroy(); state.plot = null; }
  if (!tables.length) { holder.replaceChildren(el("p", {class: "note"}, "tick a run to draw its curves")); return; }
  holder.replaceChildren();
  const data = tables.length === 1 ? tables[0] : uPlot.join(tables);
  state.plot = new uPlot({
    title: panel.title, width: Math.min(1100, holder.clientWidth || 900), height: 360,
    scales: {x: {time: false}, y: log ? {distr: 3} : {}},
    axes: [{label: "step", incrs: STEP_TICKS}, {label: panel.ylabel}],
    series: [{label: "step"}, ...opts],
  }, data, holder);
}

async function tick() {
  try {
    await loadRuns();
    await refreshCurves();
  } catch (error) {  // one failed request (the dashboard restarting) does not end the watching
    document.querySelector("#runs-note").textContent = error.message;
  }
  const live = state.runs.some(r => LIVE.includes(r.state));
  clearTimeout(state.timer);
  state.timer = live ? setTimeout(tick, SAPO.pollMs) : null;  // nothing training: no more requests
  document.body.dataset.polling = live ? "yes" : "no";
}

document.querySelector("#panel").addEventListener("change", drawChart);
document.querySelector("#logscale").addEventListener("change", drawChart);
document.querySelector("#window").addEventListener("input", () => { state.windowByUser = true; drawChart(); });
tick();
