// The fleet page: polls /fleet.json and draws the matrix and the roster. Every name goes
// in as text (textContent, title), never as markup.
"use strict";

const POLL_MS = 2000;
const STATES = {
  p: "present", a: "absent", n: "no answer", d: "drift", u: "pulling", w: "asked, not there yet", f: "failed",
};

let shape = "";
let cellsByPosition = [];

function named() {
  return new URLSearchParams(window.location.search).getAll("image");
}

function element(tag, text, className) {
  const made = document.createElement(tag);
  if (text !== undefined) made.textContent = text;
  if (className) made.className = className;
  return made;
}

function shortName(image) {
  const slash = image.lastIndexOf("/");
  return slash >= 0 ? image.slice(slash + 1) : image;
}

function drawCell(span, value, node, image) {
  const key = JSON.stringify(value);
  if (span.dataset.v === key) return; // unchanged since the last poll
  span.dataset.v = key;
  const code = Array.isArray(value) ? value[0] : value;
  span.className = "cell " + code;
  span.replaceChildren();
  let hover = node + " · " + image + ": " + (STATES[code] || code);
  if (code === "u") {
    const bar = element("i");
    bar.style.height = (value[1] === null ? 0 : value[1]) + "%";
    span.appendChild(bar);
    hover += value[1] === null ? "" : " " + value[1] + "%";
  } else if (code === "f") {
    hover += " (" + value[1] + ")" + (value[2] ? ": " + value[2] : "");
  } else if (code === "d") {
    hover += ": has " + value[1];
  } else if (code === "w") {
    hover += " (asked " + value[1] + " s ago: pulling or queued; its answer goes to whoever asked)";
  }
  span.title = hover;
  span.dataset.state = code;
}

function drawMatrix(doc) {
  const table = document.getElementById("matrix");
  const newShape = JSON.stringify([doc.nodes.map((n) => n.name), doc.images]);
  if (newShape !== shape) {
    shape = newShape;
    const head = table.tHead.rows[0];
    head.replaceChildren(element("th"));
    for (const image of doc.images) {
      const th = element("th");
      th.title = image;
      th.appendChild(element("div", shortName(image)));
      head.appendChild(th);
    }
    const body = table.tBodies[0];
    body.replaceChildren();
    cellsByPosition = doc.nodes.map((node) => {
      const row = element("tr");
      row.dataset.node = node.name;
      const th = element("th", node.name);
      th.title = node.name;
      row.appendChild(th);
      const spans = doc.images.map((image) => {
        const td = element("td");
        td.dataset.image = image;
        const span = element("span", undefined, "cell");
        td.appendChild(span);
        row.appendChild(td);
        return span;
      });
      body.appendChild(row);
      return spans;
    });
  }
  doc.cells.forEach((row, i) =>
    row.forEach((value, j) => drawCell(cellsByPosition[i][j], value, doc.nodes[i].name, doc.images[j]))
  );
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "?";
  if (seconds < 60) return Math.max(0, Math.round(seconds)) + " s ago";
  if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

function drawRoster(doc) {
  const body = document.querySelector("#roster tbody");
  body.replaceChildren();
  for (const node of doc.nodes) {
    const row = element("tr", undefined, node.state.split(" ")[0]);
    row.dataset.node = node.name;
    row.appendChild(element("td", node.name));
    row.appendChild(element("td", node.state));
    const seen = node.last_seen === null ? null : doc.generated_at - node.last_seen;
    row.appendChild(element("td", ago(seen)));
    row.appendChild(element("td", node.version || ""));
    body.appendChild(row);
  }
}

function summarise(doc) {
  const counts = {};
  for (const row of doc.cells) {
    for (const value of row) {
      const code = Array.isArray(value) ? value[0] : value;
      counts[code] = (counts[code] || 0) + 1;
    }
  }
  const parts = [doc.nodes.length + " nodes", doc.images.length + " images"];
  for (const code of ["p", "u", "w", "f", "a", "d", "n"]) {
    if (counts[code]) parts.push(counts[code] + " " + STATES[code]);
  }
  if (doc.hidden_nodes) parts.push(doc.hidden_nodes + " more nodes not shown");
  const when = new Date(doc.generated_at * 1000).toLocaleTimeString();
  document.getElementById("summary").textContent = parts.join(" · ") + " · as of " + when;
}

function showError(message) {
  const box = document.getElementById("error");
  box.hidden = !message;
  box.textContent = message || "";
}

async function poll() {
  const query = new URLSearchParams();
  for (const image of named()) query.append("image", image);
  try {
    const search = query.toString(); // (URLSearchParams.size is newer than some browsers)
    const response = await fetch("/fleet.json" + (search ? "?" + search : ""), { cache: "no-store" });
    const doc = await response.json();
    if (!response.ok) {
      showError(doc.exception ? doc.exception.message : "HTTP " + response.status);
    } else if (doc.error) {
      showError(doc.error);
    } else {
      showError((doc.notes || []).join("; "));
      drawMatrix(doc);
      drawRoster(doc);
      summarise(doc);
      document.getElementById("actions").hidden = !doc.actions;
      document.body.dataset.ready = "true";
    }
  } catch (error) {
    showError("the gateway did not answer: " + error);
  }
  window.setTimeout(poll, POLL_MS);
}

async function act(action) {
  const images = document.getElementById("action-images").value
    .split("\n").map((line) => line.trim()).filter((line) => line && !line.startsWith("#"));
  const out = document.getElementById("action-result");
  out.textContent = action + "…";
  try {
    const response = await fetch("/fleet/actions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ action: action, images: images }),
    });
    const doc = await response.json();
    if (!response.ok) {
      out.textContent = action + " refused: " + (doc.exception ? doc.exception.message : response.status);
    } else if (action === "check") {
      const present = doc.nodes.filter((row) => row.status === "present").length;
      out.textContent = doc.image + ": present on " + present + " of " + doc.nodes.length + " nodes"
        + (doc.drift ? " (drift)" : "");
    } else {
      out.textContent = action + " started: " + doc.images.join(", ");
    }
  } catch (error) {
    out.textContent = action + " failed: " + error;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("show").addEventListener("submit", (event) => {
    event.preventDefault();
    const image = document.getElementById("show-image").value.trim();
    if (!image) return;
    const query = new URLSearchParams(window.location.search);
    if (!query.getAll("image").includes(image)) query.append("image", image);
    window.history.replaceState(null, "", "?" + query);
  });
  for (const button of document.querySelectorAll("#actions button")) {
    button.addEventListener("click", () => act(button.dataset.action));
  }
  poll();
});
