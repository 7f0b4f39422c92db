// Launch and control: a form from the config schema, and stop / resume / export with each job's output.
"use strict";

const control = {runs: [], timer: null};

async function loadSchema(preset) {
  const form = document.querySelector("#config-form");
  const data = await api("/api/schema?preset=" + encodeURIComponent(preset || "tiny"));
  const select = document.querySelector("#preset");
  if (!select.options.length) {
    select.append(...data.presets.map(name => el("option", {value: name, selected: name === data.preset}, name)));
  }
  document.querySelector("#preset-note").textContent = data.description;
  const name = document.querySelector("#run-name");
  if (!name.dataset.byUser) name.value = `${data.preset}-${new Date().toISOString().slice(5, 19).replace(/[-:T]/g, "")}`;
  const sections = {};
  for (const field of data.fields) {
    const input = field.choices
      ? el("select", {name: field.key}, ...field.choices.map(c => el("option", {selected: String(c) === field.value}, String(c))))
      : el("input", {name: field.key, value: field.value, size: 28});
    input.dataset.preset = field.value;
    input.addEventListener("input", () => input.classList.toggle("changed", input.value !== input.dataset.preset));
    const row = el("div", {class: "field"}, el("label", {}, el("code", {}, field.key), input),
                   el("small", {}, `${field.doc} (${field.type})`));
    (sections[field.section] ||= el("fieldset", {}, el("legend", {}, field.section))).append(row);
  }
  form.replaceChildren(...Object.values(sections));
}

async function start() {
  const error = document.querySelector("#launch-error");
  error.textContent = "";
  const values = {};
  for (const input of document.querySelectorAll("#config-form [name]")) values[input.name] = input.value;
  try {
    await api("/api/launch", {preset: document.querySelector("#preset").value,
                              name: document.querySelector("#run-name").value, values});
    await refresh();
  } catch (e) {
    error.textContent = e.message;
  }
}

async function act(path, body) {
  const error = document.querySelector("#control-error");
  error.textContent = "";
  try {
    await api(path, body);
  } catch (e) {
    error.textContent = e.message;
  }
  await refresh();
}

function selectedRun() {
  return document.querySelector("#control-run").value;
}

function jobCard(job) {
  const status = job.running ? "running" : job.returncode === 0 ? "done" : `ended (exit ${job.returncode})`;
  return el("article", {class: "job " + (job.running ? "running" : job.returncode === 0 ? "done" : "failed"),
                        "data-job": job.id, "data-run": job.run, "data-kind": job.kind},
    el("h3", {}, `${job.kind} · ${job.run} · ${status}`), el("code", {}, "sapo-lite " + job.command),
    job.error ? el("div", {class: "error"}, job.error) : null,
    el("pre", {}, job.log.slice(-12).join("\n")));
}

async function refresh() {
  clearTimeout(control.timer);
  try {
    await redraw();
  } catch (error) {  // one failed request does not end the watching
    document.querySelector("#control-error").textContent = error.message;
    control.timer = setTimeout(refresh, SAPO.pollMs);
  }
}

async function redraw() {
  const [runs, jobs] = await Promise.all([api("/api/runs"), api("/api/jobs")]);
  control.runs = runs.runs;
  const select = document.querySelector("#control-run"), chosen = select.value;
  select.replaceChildren(...runs.runs.map(r => el("option", {value: r.name, selected: r.name === chosen}, r.name)));
  const run = runs.runs.find(r => r.name === select.value);
  document.querySelector("#control-state").textContent = run ?
    `${run.state}, step ${run.step}${run.max_steps ? " of " + run.max_steps : ""}` + (run.resume ? ` · ${run.resume}` : "") : "";
  document.querySelector("#control-state").dataset.state = run ? run.state : "";
  const quant = document.querySelector("#export-quant");
  if (!quant.options.length) quant.append(...jobs.quants.map(q => el("option", {selected: q === "q8_0"}, q)));
  document.querySelector("#jobs").replaceChildren(...jobs.jobs.slice().reverse().map(jobCard));
  const busy = jobs.jobs.some(j => j.running) || runs.runs.some(r => r.state === "training" || r.state === "starting");
  control.timer = busy ? setTimeout(refresh, SAPO.pollMs) : null;
}

document.querySelector("#preset").addEventListener("change", e => loadSchema(e.target.value));
document.querySelector("#run-name").addEventListener("input", e => { e.target.dataset.byUser = "1"; });
document.querySelector("#start").addEventListener("click", start);
document.querySelector("#control-run").addEventListener("change", refresh);
document.querySelector("#stop").addEventListener("click", () => act("/api/stop", {run: selectedRun()}));
document.querySelector("#resume").addEventListener("click", () =>
  act("/api/resume", {run: selectedRun(), overrides: document.querySelector("#resume-overrides").value}));
document.querySelector("#export").addEventListener("click", () =>
  act("/api/export", {run: selectedRun(), format: document.querySelector("#export-format").value,
                      quant: document.querySelector("#export-quant").value,
                      adapter: document.querySelector("#export-adapter").value}));
loadSchema(runFromAddress() ? null : "tiny").then(refresh);
