// InstructMoLE council map: layers (rows) x experts (columns) as plain DOM, for a node's DOM widget.
// Colour = router probability (the viridis-like ramp of instructmole/viz.py, scaled to the map's
// peak), a framed cell with a number = a chosen expert and its weight, a red cross = banned.
// Hovering a cell shows the layer (rule name such as `double:3` and the canonical name), the
// expert, its probability and weight. The council summary below the grid wraps at the node's edge.
//
// A plain ES module with no side effects and no build step: web/instructmole.js wires it to the
// nodes. Its data is the "instructmole_council" ui output of the Python nodes
// (nodes/council_nodes.py, council_ui):
//   {layers, names, num_experts, top_k, adapter_id, label, probs, weights, chosen, banned, instances}
// probs and weights come rounded to 4 decimals; `chosen` (from the unrounded weights) says which
// experts are members, so the count in the header and the framed cells agree with the summary.
// Not an extension itself: it lives in web/lib/ with an .mjs name because ComfyUI loads every
// *.js under WEB_DIRECTORY (subfolders too) as an extension; web/instructmole.js imports it.

export const UI_KEY = "instructmole_council";

const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

/** The ramp colour of v in [0, 1] as [r, g, b] (same interpolation as viz.py). */
export function colour(v) {
  const x = Math.min(Math.max(Number.isFinite(v) ? v : 0, 0), 1) * (RAMP.length - 1);
  const i = Math.min(Math.floor(x), RAMP.length - 2);
  const t = x - i;
  return [0, 1, 2].map((c) => Math.round(RAMP[i][c] + (RAMP[i + 1][c] - RAMP[i][c]) * t));
}

function isGrid(rows, height, width) {
  return Array.isArray(rows) && rows.length === height && rows.every((r) => Array.isArray(r) && r.length === width);
}

/** The council of an `executed` message (its ui output), checked; null when absent or malformed. */
export function councilData(message) {
  const list = message && message[UI_KEY];
  const data = Array.isArray(list) ? list[0] : null;
  if (!data || typeof data !== "object" || !Array.isArray(data.layers)) return null;
  const L = data.layers.length;
  const n = Number(data.num_experts);
  if (!Number.isInteger(n) || n < 0 || !isGrid(data.probs, L, n) || !isGrid(data.weights, L, n)) return null;
  if (data.banned != null && !isGrid(data.banned, L, n)) return null;
  if (data.chosen != null && !isGrid(data.chosen, L, n)) return null;
  const names = Array.isArray(data.names) && data.names.length === L ? data.names : data.layers;
  return { ...data, names };
}

/** The summary text of an `executed` message (ui "text", a list of strings), or null. */
export function summaryText(message) {
  const text = message && message.text;
  if (Array.isArray(text)) return text.map((t) => String(t ?? "")).join("\n");
  return typeof text === "string" ? text : null;
}

/**
 * A member's weight rounded for reading, never shown as 0 (a member is never "weight 0"): the rule
 * of instructmole/viz.py weight_text (the heat map and the Council Preview's summary). `compact` is the cell's form (".25", "1.5", "<.01").
 */
export function weightText(w, decimals, compact = false) {
  const step = 10 ** -decimals;
  let text;
  if (w !== 0 && Math.abs(w) < step / 2) text = (w > 0 ? "<" : ">-") + step.toFixed(decimals);
  else text = w.toFixed(decimals);
  return compact ? text.replace(/^([<>]?-?)0\./, "$1.") : text;
}

function cellText(w) {
  return Math.abs(w) < 1 ? weightText(w, 2, true) : w.toFixed(1);
}

/** Whether an expert is a member: the server's mask from unrounded weights, else the weight. */
function isChosen(data, row, expert) {
  return data.chosen ? Boolean(data.chosen[row][expert]) : Number(data.weights[row][expert]) !== 0;
}

/** What hovering cell (row, expert) shows: layer names, expert, probability, weight. */
export function describeCell(data, row, expert) {
  const name = data.names[row];
  const canonical = data.layers[row];
  const layer = name === canonical ? name : `${name} (${canonical})`;
  const p = Number(data.probs[row][expert]);
  const w = Number(data.weights[row][expert]);
  const banned = data.banned ? Boolean(data.banned[row][expert]) : false;
  const member = isChosen(data, row, expert) ? `weight ${weightText(w, 4)}` : "not chosen (weight 0)";
  return `layer ${layer} · expert ${expert} · probability ${p.toFixed(4)} · ${member}${banned ? " · banned" : ""}`;
}

const STYLE = `
.instructmole-council-map { box-sizing: border-box; display: flex; flex-direction: column; gap: 4px;
  width: 100%; height: 100%; overflow: hidden; font: 11px/1.3 sans-serif; color: var(--input-text, #ddd); }
.instructmole-council-map .imole-head { white-space: normal; overflow-wrap: anywhere; opacity: 0.9; }
.instructmole-council-map .imole-scroll { flex: 0 1 auto; min-height: 40px; overflow: auto; }
.instructmole-council-map .imole-grid { display: grid; gap: 1px; }
.instructmole-council-map .imole-cell { position: relative; min-height: 14px; box-sizing: border-box;
  font-size: 9px; text-align: center; line-height: 14px; cursor: default; }
.instructmole-council-map .imole-cell.chosen { outline: 2px solid #fff; outline-offset: -2px; font-weight: bold; }
.instructmole-council-map .imole-cell.banned { background-image: linear-gradient(to bottom right,
  transparent 45%, #e63c3c 45%, #e63c3c 55%, transparent 55%); }
.instructmole-council-map .imole-row, .instructmole-council-map .imole-col { font-size: 10px;
  white-space: nowrap; opacity: 0.85; padding-right: 4px; }
.instructmole-council-map .imole-col { text-align: center; padding: 0; }
.instructmole-council-map .imole-tip { min-height: 2.6em; white-space: normal; overflow-wrap: anywhere; opacity: 0.95; }
.instructmole-council-map .imole-summary { flex: 1 1 auto; min-height: 2em; margin: 0; overflow: auto;
  white-space: pre-wrap; overflow-wrap: anywhere; font: 10px/1.3 monospace; opacity: 0.85;
  background: var(--comfy-input-bg, #222); border-radius: 4px; padding: 4px; }
`;

function ensureStyle(doc) {
  if (doc.getElementById("instructmole-council-map-style")) return;
  const style = doc.createElement("style");
  style.id = "instructmole-council-map-style";
  style.textContent = STYLE;
  doc.head.appendChild(style);
}

/**
 * A council map element: `{ element, update(data, summary), data }`. `update(null, text)` shows only
 * the text (e.g. before the node has run). Hover cells to read them (`.imole-tip`); every cell also
 * carries data-layer / data-expert attributes and a title.
 */
export function createCouncilMap(placeholder = "council map: run the graph to see the council", doc = document) {
  ensureStyle(doc);
  const element = doc.createElement("div");
  element.className = "instructmole-council-map";
  element.dataset.state = "empty";
  const head = doc.createElement("div");
  head.className = "imole-head";
  head.textContent = placeholder;
  const scroll = doc.createElement("div");
  scroll.className = "imole-scroll";
  const grid = doc.createElement("div");
  grid.className = "imole-grid";
  scroll.appendChild(grid);
  const tip = doc.createElement("div");
  tip.className = "imole-tip";
  const summary = doc.createElement("pre");
  summary.className = "imole-summary";
  element.append(head, scroll, tip, summary);
  scroll.style.display = tip.style.display = summary.style.display = "none";

  const map = { element, data: null };
  const defaultTip = "hover a cell: layer, expert, probability, weight";

  grid.addEventListener("mouseover", (event) => {
    const cell = event.target && event.target.closest ? event.target.closest(".imole-cell") : null;
    if (!cell || !map.data) return;
    tip.textContent = describeCell(map.data, Number(cell.dataset.layer), Number(cell.dataset.expert));
  });
  grid.addEventListener("mouseleave", () => {
    tip.textContent = defaultTip;
  });

  map.update = (data, text) => {
    map.data = data || null;
    grid.replaceChildren();
    if (data) {
      const L = data.layers.length;
      const n = data.num_experts;
      const peak = Math.max(0, ...data.probs.flat().map(Number).filter(Number.isFinite)) || 1;
      let chosen = 0; // counted from the membership mask, never from rounded weights
      for (let row = 0; row < L; row++) for (let e = 0; e < n; e++) chosen += isChosen(data, row, e) ? 1 : 0;
      const parts = [
        data.label ? `“${data.label}”` : "council",
        `${L} layers × ${n} experts, top ${data.top_k}`,
        `${chosen} chosen`,
        data.instances > 1 ? `instance 1 of ${data.instances}` : null,
        "colour = router probability, framed = chosen (weight), red = banned",
      ];
      head.textContent = parts.filter(Boolean).join(" · ");
      grid.style.gridTemplateColumns = `max-content repeat(${n}, minmax(16px, 1fr))`;
      grid.append(doc.createElement("div"));
      for (let e = 0; e < n; e++) {
        const col = doc.createElement("div");
        col.className = "imole-col";
        col.textContent = String(e);
        grid.append(col);
      }
      for (let row = 0; row < L; row++) {
        const label = doc.createElement("div");
        label.className = "imole-row";
        label.textContent = data.names[row];
        label.title = data.layers[row];
        grid.append(label);
        for (let e = 0; e < n; e++) {
          const p = Number(data.probs[row][e]);
          const w = Number(data.weights[row][e]);
          const cell = doc.createElement("div");
          cell.className = "imole-cell";
          cell.dataset.layer = String(row);
          cell.dataset.expert = String(e);
          const [r, g, b] = colour(p / peak);
          cell.style.backgroundColor = `rgb(${r}, ${g}, ${b})`;
          cell.style.color = r + g + b > 420 ? "#000" : "#fff";
          if (isChosen(data, row, e)) {
            cell.classList.add("chosen");
            cell.textContent = cellText(w);
          }
          if (data.banned && data.banned[row][e]) cell.classList.add("banned");
          cell.title = describeCell(data, row, e);
          grid.append(cell);
        }
      }
      tip.textContent = defaultTip;
    } else {
      head.textContent = placeholder;
    }
    summary.textContent = text || "";
    scroll.style.display = tip.style.display = data ? "" : "none";
    summary.style.display = text ? "" : "none";
    element.dataset.state = data ? "ready" : "empty";
    element.dataset.layers = data ? String(data.layers.length) : "0";
  };
  return map;
}

/** Height the map wants for `data` (px): header, up to ~24 grid rows before it scrolls, tip, summary. */
export function preferredHeight(data, hasSummary) {
  if (!data) return 40;
  const rows = Math.min(data.layers.length + 1, 25);
  return 48 + rows * 16 + 44 + (hasSummary ? 110 : 0);
}
