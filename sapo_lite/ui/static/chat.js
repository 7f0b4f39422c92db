// Chat: one prompt, each role's answer in its own column as soon as that role has decoded it.
"use strict";

let targets = [];

async function loadTargets() {
  targets = (await api("/api/chat/targets")).targets;
  const wanted = runFromAddress();
  document.querySelector("#target").replaceChildren(...targets.map(t =>
    el("option", {value: t.name, selected: t.name === wanted}, `${t.name} (${t.kind}: ${t.roles.join(", ")})`)));
  showSampling();
  if (!targets.length) document.querySelector("#chat-note").textContent = "no run with adapters yet";
}

function current() {
  return targets.find(t => t.name === document.querySelector("#target").value);
}

function showSampling() {
  const t = current();
  document.querySelector("#sampling").textContent = t ?
    `(the run's: temperature ${t.sampling.temperature}, top_k ${t.sampling.top_k}, top_p ${t.sampling.top_p}; else greedy)` : "";
}

async function send() {
  const target = current();
  if (!target) return;
  const note = document.querySelector("#chat-note");
  const columns = Object.fromEntries(target.roles.map(role =>
    [role, el("div", {class: "answer pending", "data-role": role}, el("h3", {}, role), el("p", {}, "…"))]));
  document.querySelector("#answers").replaceChildren(...Object.values(columns));
  note.textContent = "loading the model and answering…";
  const response = await fetch("/api/chat", {method: "POST", headers: {"content-type": "application/json"},
    body: JSON.stringify({target: target.name, prompt: document.querySelector("#prompt").value,
                          sample: document.querySelector("#sample").checked,
                          max_new_tokens: Number(document.querySelector("#max_new_tokens").value)})});
  if (!response.ok) { note.textContent = (await response.json()).error; return; }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, {stream: true});
    const lines = buffered.split("\n");
    buffered = lines.pop();
    for (const line of lines.filter(Boolean)) {
      const message = JSON.parse(line);
      if (message.error) { note.textContent = message.error + (message.hint ? " · " + message.hint : ""); return; }
      const column = columns[message.role], text = column.querySelector("p");
      column.classList.remove("pending");
      if (message.done) {
        column.classList.add("done");
        if (!text.textContent) text.textContent = "(an empty answer: the first token was a stop token)";
      } else {
        text.textContent = message.text;  // the answer so far
      }
    }
  }
  note.textContent = "";
}

document.querySelector("#target").addEventListener("change", showSampling);
document.querySelector("#send").addEventListener("click", () => send().catch(e => {
  document.querySelector("#chat-note").textContent = e.message; }));
loadTargets();
