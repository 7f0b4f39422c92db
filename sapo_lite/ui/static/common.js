// Shared by every page: JSON requests that show the server's error line, and a tiny element builder.
"use strict";

async function api(path, body) {
  const options = body === undefined ? {} : {method: "POST", headers: {"content-type": "application/json"},
                                             body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const type = response.headers.get("content-type") || "";
  const data = type.includes("json") ? await response.json() : {error: await response.text()};
  if (!response.ok) {
    const error = new Error(data.error + (data.hint ? "\nhint: " + data.hint : ""));
    error.status = response.status;
    throw error;
  }
  return data;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  return typeof value === "number" ? Number(value.toPrecision(digits)).toString() : String(value);
}

function pct(value) {
  return value === null || value === undefined ? "–" : (100 * value).toFixed(1) + "%";
}

// The run named in the address (?run=NAME), so a link opens a page on one run.
function runFromAddress() {
  return new URLSearchParams(location.search).get("run");
}
