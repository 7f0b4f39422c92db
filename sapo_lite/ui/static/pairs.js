// Pairs: the buffer's newest pairs, the rewritten segment highlighted where it was cut in.
"use strict";

async function loadRunsInto(select) {
  const data = await api("/api/runs");
  const wanted = runFromAddress();
  select.replaceChildren(...data.runs.map(r => el("option", {value: r.name, selected: r.name === wanted}, r.name)));
}

function response(label, cls, prefix, segment, tail) {
  return el("div", {class: "response " + cls}, el("b", {}, label + " "),
            el("span", {class: "prefix"}, prefix), el("mark", {class: "segment " + cls}, segment),
            el("span", {class: "tail"}, tail));
}

function pairCard(p) {
  const flags = [p.ending, p.identical ? "identical to the chosen" : null, p.origin ? `origin: ${p.origin}` : null]
    .filter(Boolean).join(" · ");
  return el("article", {class: "pair", "data-pair": p.id},
    el("h3", {}, `pair ${p.id} · step ${p.step} · drawn ${p.drawn}× · tokens ${p.cut_tokens[0]}–${p.cut_tokens[1]} rewritten · `,
       el("span", {class: "ending"}, flags)),
    el("div", {class: "prompt"}, el("b", {}, "prompt "), p.prompt),
    response("chosen", "chosen", p.prefix, p.chosen_segment, p.tail),
    response("rejected", "rejected", p.prefix, p.rejected_segment, p.kept_tail ? p.tail : ""));
}

async function loadPairs() {
  const run = document.querySelector("#run").value;
  const note = document.querySelector("#pairs-note");
  if (!run) { note.textContent = "no runs yet"; return; }
  const query = new URLSearchParams({run});
  for (const id of ["source", "identical", "cut_off", "first_step", "last_step", "origin"]) {
    const value = document.querySelector("#" + id).value;
    if (value) query.set(id, value);
  }
  try {
    const data = await api("/api/pairs?" + query);
    note.textContent = `${data.pairs.length} pairs shown (newest first, at most ${data.shown_at_most}) of ` +
                       `${data.scanned} in the buffer's step range`;
    document.querySelector("#pairs").replaceChildren(...data.pairs.map(pairCard));
    const filter = document.querySelector("#origin-filter");
    filter.hidden = data.origins === null;
    if (data.origins) {
      const select = document.querySelector("#origin"), current = select.value;
      select.replaceChildren(el("option", {value: ""}, "all"),
                             ...data.origins.map(o => el("option", {value: o, selected: o === current}, o)));
    }
  } catch (error) {
    note.textContent = error.message;
    document.querySelector("#pairs").replaceChildren();
  }
}

for (const id of ["run", "source", "identical", "cut_off", "origin"]) document.querySelector("#" + id).addEventListener("change", loadPairs);
for (const id of ["first_step", "last_step"]) document.querySelector("#" + id).addEventListener("change", loadPairs);
document.querySelector("#refresh").addEventListener("click", loadPairs);
loadRunsInto(document.querySelector("#run")).then(loadPairs);
