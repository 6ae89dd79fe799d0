// InstructMoLE "Expert grid" for the Override Council node (InstructMoLE_OverrideCouncil).
//
// A click grid below the node's `rules` text box: one row per layer group (double, single), each
// unfoldable to one row per block, one cell per expert. A click cycles a cell auto → force → ban;
// shift-click asks for the weight of a forced expert (blank: the council's mean weight). Grid and
// text stay in sync both ways; the text is the only state (what the workflow saves and shares):
// clicks rewrite the grid's rules canonically and keep every other line verbatim, typing updates
// the grid. Rules the grid cannot show (scale, top, only, all, layer names, comments) are listed as
// "text rules also apply". The pure logic lives in lib/grid_rules.mjs (unit-tested under tests/web/).
//
// Layout: FLUX.1's 19 double + 38 single blocks and 8 experts are assumed (and the grid says so)
// until the node runs; then the node's ui output "instructmole_council" ([{layers, names,
// num_experts, top_k, ...}]) gives the real one (kept in memory only, not in the workflow).
//
// Test hook (for browser tests), window.InstructMoLEGrid:
//   cellState(node, row, expert)  -> "auto" | "force" | "force:W" | "ban" as shown (blocks inherit)
//   cellInfo(node, row, expert)   -> {cell, state, weight, inherited}
//   click(node, row, expert, {shift, weight})  -> the new rules text, or null when nothing changed;
//                                    with shift and a `weight` key (number or null) no editor opens
//   rows(node)                    -> the row ids shown now ("double", "double:3", ...)
//   setOpen(node, kind, open)     -> unfold/fold the block rows of "double" or "single"
//   layout(node)                  -> {double: [...], single: [...], numExperts, topK, assumed}
//   status(node)                  -> {error, hazards, problems, textRules}
//   logic                         -> the lib/grid_rules.mjs module
// `node` is a graph node or its id; row ids are "double" / "single" (group rows) or "double:N".
// DOM: the grid root has [data-instructmole-grid]; each cell is a <td data-row data-expert
// data-state data-inherited>; group toggles are [data-toggle="double"] with aria-expanded;
// the notes are in [data-grid-status]; the weight editor is [data-grid-weight] (input + OK).
//
// Defensive on purpose: any failure is logged with console.warn, never thrown into the frontend.
import { app } from "../../scripts/app.js";

import * as grid from "./lib/grid_rules.mjs";

const NODE_TYPE = "InstructMoLE_OverrideCouncil";
const WIDGET_NAME = "instructmole_expert_grid";
const UI_KEY = "instructmole_council";
const LOG = "[InstructMoLE grid]";
const MAX_SCROLL = 400; // px of block rows before the grid scrolls: all 19 double blocks of FLUX.1 fit

function warn(what, err) {
  console.warn(`${LOG} ${what}:`, err);
}

function safely(what, fn) {
  return function (...args) {
    try {
      return fn.apply(this, args);
    } catch (err) {
      warn(what, err);
      return undefined;
    }
  };
}

// ---- the node's rules widget ----------------------------------------------------------------------

function rulesWidget(node) {
  return (node?.widgets || []).find((w) => w && w.name === "rules") || null;
}

function rulesText(node) {
  const value = rulesWidget(node)?.value;
  return typeof value === "string" ? value : "";
}

function rulesLinked(node) {
  const input = (node?.inputs || []).find((i) => i && (i.name === "rules" || i.widget?.name === "rules"));
  return !!(input && input.link != null);
}

function setRules(node, text) {
  const widget = rulesWidget(node);
  if (!widget) return false;
  widget.value = text;
  const el = widget.inputEl || widget.element;
  if (el && "value" in el && el.value !== text) el.value = text;
  widget.callback?.(widget.value);
  node.setDirtyCanvas?.(true, true);
  return true;
}

// ---- per-node grid --------------------------------------------------------------------------------

function layoutOf(node) {
  return node?.__imoleGrid?.layout || grid.FLUX_LAYOUT;
}

function injectStyle() {
  if (document.getElementById("instructmole-grid-style")) return;
  const style = document.createElement("style");
  style.id = "instructmole-grid-style";
  style.textContent = `
.imole-grid { display: flex; flex-direction: column; gap: 3px; box-sizing: border-box; overflow: hidden;
  font: 11px/1.35 var(--font-family, sans-serif); color: var(--input-text, #ddd); }
.imole-grid .imole-help { opacity: 0.8; }
.imole-grid details { opacity: 0.8; }
.imole-grid summary { cursor: pointer; user-select: none; }
.imole-grid details div { padding-left: 10px; }
.imole-grid .imole-status div { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.imole-grid .imole-layout { opacity: 0.7; }
.imole-grid .imole-warn { color: #f0b35a; }
.imole-grid .imole-err { color: #ff7b7b; }
.imole-grid .imole-text { color: #9ecbff; }
.imole-grid .imole-scroll { overflow: auto; max-height: ${MAX_SCROLL}px; flex: 0 1 auto; min-height: 0; }
.imole-grid table { border-collapse: collapse; user-select: none; }
.imole-grid th { font-weight: normal; opacity: 0.7; padding: 0 2px; min-width: 20px; }
.imole-grid th.imole-rowname, .imole-grid td.imole-rowname { text-align: left; padding-right: 6px; white-space: nowrap; }
.imole-grid td.imole-rowname.imole-block { padding-left: 14px; opacity: 0.85; }
.imole-grid button.imole-toggle { all: unset; cursor: pointer; padding-right: 3px; }
.imole-grid td.imole-cell { width: 20px; min-width: 20px; height: 15px; text-align: center; cursor: pointer;
  border: 1px solid var(--border-color, #444); background: var(--comfy-input-bg, #222); font-size: 10px; }
.imole-grid td.imole-cell:hover { outline: 1px solid var(--input-text, #ddd); }
.imole-grid td.imole-cell[data-state="force"] { background: #2f6b3a; color: #e6ffe9; }
.imole-grid td.imole-cell[data-state="ban"] { background: #7a2c2c; color: #ffe6e6; }
.imole-grid td.imole-cell[data-inherited="1"] { opacity: 0.45; }
.imole-grid td.imole-cell.imole-ovr { box-shadow: inset -4px -4px 0 -2px #f0b35a; }
.imole-grid .imole-weight { display: none; gap: 4px; align-items: center; }
.imole-grid .imole-weight.imole-on { display: flex; }
.imole-grid .imole-weight input { width: 70px; font: inherit; color: inherit; background: var(--comfy-input-bg, #222);
  border: 1px solid var(--border-color, #444); }
.imole-grid .imole-weight button { font: inherit; }
`;
  document.head.appendChild(style);
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function buildElement(node, g) {
  const root = el("div", "imole-grid");
  root.dataset.instructmoleGrid = "1";
  root.appendChild(el("div", "imole-help", grid.HELP_SHORT));
  const details = el("details");
  details.appendChild(el("summary", "", "Rule syntax"));
  for (const line of grid.HELP_LONG) details.appendChild(el("div", "", line));
  details.addEventListener("toggle", safely("help toggle", () => fit(node)));
  root.appendChild(details);
  g.status = el("div", "imole-status");
  g.status.dataset.gridStatus = "1";
  root.appendChild(g.status);
  g.scroll = el("div", "imole-scroll");
  g.table = el("table");
  g.scroll.appendChild(g.table);
  root.appendChild(g.scroll);

  g.editor = el("div", "imole-weight");
  g.editor.dataset.gridWeight = "1";
  g.editorLabel = el("span");
  g.editorInput = el("input");
  g.editorInput.type = "text";
  g.editorInput.placeholder = "mean";
  const ok = el("button", "", "OK");
  const cancel = el("button", "", "Cancel");
  g.editor.append(g.editorLabel, g.editorInput, ok, cancel);
  root.appendChild(g.editor);

  const apply = safely("weight", () => {
    const target = g.editing;
    if (!target) return;
    const parsed = grid.parseWeight(g.editorInput.value);
    if (parsed.error) {
      g.flash = parsed.error;
      render(node);
      return;
    }
    closeEditor(node);
    click(node, target.row, target.expert, { shift: true, weight: parsed.weight });
  });
  ok.addEventListener("click", apply);
  cancel.addEventListener("click", safely("weight cancel", () => closeEditor(node)));
  g.editorInput.addEventListener(
    "keydown",
    safely("weight key", (ev) => {
      ev.stopPropagation(); // keep ComfyUI's shortcuts out of the box
      if (ev.key === "Enter") apply();
      else if (ev.key === "Escape") closeEditor(node);
    }),
  );

  g.table.addEventListener(
    "click",
    safely("click", (ev) => {
      const cell = ev.target.closest?.("td[data-expert]");
      if (cell) {
        ev.preventDefault();
        ev.stopPropagation();
        const row = cell.dataset.row;
        const expert = Number(cell.dataset.expert);
        if (ev.shiftKey) openEditor(node, row, expert);
        else click(node, row, expert, {});
        return;
      }
      const toggle = ev.target.closest?.("[data-toggle]");
      if (toggle) setOpen(node, toggle.dataset.toggle, !g.open[toggle.dataset.toggle]);
    }),
  );
  return root;
}

function openEditor(node, row, expert) {
  const g = node.__imoleGrid;
  if (!g) return;
  const info = grid.cellInfo(grid.parseText(rulesText(node), layoutOf(node)).state, row, expert);
  g.editing = { row, expert };
  g.editorLabel.textContent = `Weight of expert ${expert} on ${row} (above 0, at most 100; blank: the mean):`;
  g.editorInput.value = info.state === "force" && info.weight !== null ? String(info.weight) : "";
  g.editor.classList.add("imole-on");
  fit(node);
  setTimeout(() => {
    try {
      g.editorInput.focus();
      g.editorInput.select();
    } catch (err) {
      warn("focus", err);
    }
  }, 0);
}

function closeEditor(node) {
  const g = node.__imoleGrid;
  if (!g) return;
  g.editing = null;
  g.editor.classList.remove("imole-on");
  fit(node);
}

function setOpen(node, kind, open) {
  const g = node?.__imoleGrid;
  if (!g || !(kind in g.open)) return;
  g.open[kind] = !!open;
  render(node, true);
}

function cellText(info) {
  if (info.state === "ban") return "✕";
  if (info.state === "force") return info.weight === null ? "F" : String(info.weight).replace(/^0\./, ".").slice(0, 4);
  return "·";
}

function describeCell(row, expert, info, overrides) {
  let what = info.state === "auto" ? "auto (the router decides)" : info.state === "ban" ? "banned" : "forced";
  if (info.state === "force") what += info.weight === null ? " (the council's mean weight)" : ` (weight ${info.weight})`;
  if (info.inherited) what += `, from the ${row.split(":")[0]} row`;
  let text = `${row}, expert ${expert}: ${what}. Click: auto → force → ban. Shift-click: weight.`;
  if (overrides) text += ` ${overrides} block row${overrides > 1 ? "s" : ""} override this cell.`;
  return text;
}

function renderTable(node, g, parsed, layout) {
  const table = g.table;
  table.replaceChildren();
  const head = el("tr");
  head.appendChild(el("th", "imole-rowname", "experts"));
  for (let e = 0; e < layout.numExperts; e++) head.appendChild(el("th", "", String(e)));
  table.appendChild(head);
  const addRow = (row, label, isBlock, kind) => {
    const tr = el("tr");
    const name = el("td", "imole-rowname" + (isBlock ? " imole-block" : ""));
    if (!isBlock) {
      const toggle = el("button", "imole-toggle", g.open[kind] ? "▾" : "▸");
      toggle.dataset.toggle = kind;
      toggle.setAttribute("aria-expanded", g.open[kind] ? "true" : "false");
      toggle.title = g.open[kind] ? "fold the block rows" : "unfold one row per block";
      name.appendChild(toggle);
      const n = Object.keys(parsed.state[kind].blocks).length;
      name.appendChild(document.createTextNode(label + (n ? ` (${n} block${n > 1 ? "s" : ""} differ)` : "")));
    } else {
      name.textContent = label;
    }
    tr.appendChild(name);
    for (let e = 0; e < layout.numExperts; e++) {
      const info = grid.cellInfo(parsed.state, row, e);
      const overrides = isBlock ? 0 : grid.overrides(parsed.state, kind, e);
      const td = el("td", "imole-cell" + (overrides ? " imole-ovr" : ""), cellText(info));
      td.dataset.row = row;
      td.dataset.expert = String(e);
      td.dataset.state = info.state;
      td.dataset.inherited = info.inherited ? "1" : "0";
      td.title = describeCell(row, e, info, overrides);
      tr.appendChild(td);
    }
    table.appendChild(tr);
  };
  for (const kind of grid.KINDS) {
    if (!layout[kind].length) continue;
    addRow(kind, kind, false, kind);
    if (g.open[kind]) for (const b of layout[kind]) addRow(`${kind}:${b}`, `${kind}:${b}`, true, kind);
  }
}

function renderStatus(node, g, parsed, layout) {
  const lines = [];
  const add = (cls, text, title) => lines.push([cls, text, title ?? text]);
  add("imole-layout", `${grid.describeLayout(layout)}.`);
  if (g.flash) add("imole-err", g.flash);
  if (rulesLinked(node)) add("imole-warn", "The rules come from a link: the grid shows only the text box.");
  if (parsed.error) add("imole-err", `⚠ ${parsed.error}`);
  for (const p of parsed.problems) add("imole-err", `⚠ ${p}`);
  for (const h of parsed.hazards) add("imole-warn", `⚠ ${h}`);
  const textRules = parsed.textRules.filter((r) => !r.noop);
  if (textRules.length) {
    const list = textRules.map((r) => r.text).join("; ");
    const after = parsed.textAfterGrid ? " (some after the grid's rules)" : "";
    add(
      "imole-text",
      `Text rules also apply${after}: ${list}`,
      textRules.map((r) => `${r.text}  —  ${r.reason}`).join("\n"),
    );
  }
  g.status.replaceChildren(
    ...lines.map(([cls, text, title]) => {
      const div = el("div", cls, text);
      div.title = title;
      return div;
    }),
  );
  g.status.dataset.textRules = String(textRules.length);
}

function render(node, resize = false) {
  const g = node?.__imoleGrid;
  if (!g) return;
  const layout = layoutOf(node);
  const text = rulesText(node);
  const parsed = grid.parseText(text, layout);
  g.lastText = text;
  g.lastLayout = layout;
  g.parsed = parsed;
  if (!g.autoOpened) {
    // Unfold a group at first sight when the text already has block rules for it.
    g.autoOpened = true;
    for (const kind of grid.KINDS) if (Object.keys(parsed.state[kind].blocks).length) g.open[kind] = true;
    resize = true;
  }
  renderStatus(node, g, parsed, layout);
  renderTable(node, g, parsed, layout);
  g.flash = null;
  if (resize) fit(node);
  node.setDirtyCanvas?.(true, false);
}

function estimateHeight(g) {
  const layout = g.lastLayout || grid.FLUX_LAYOUT;
  let rows = 1;
  for (const kind of grid.KINDS) if (layout[kind].length) rows += 1 + (g.open[kind] ? layout[kind].length : 0);
  const table = Math.min(rows * 17 + 4, MAX_SCROLL);
  const status = (g.status?.childElementCount || 1) * 15;
  const help = 30 + (g.root?.querySelector("details")?.open ? grid.HELP_LONG.length * 15 : 0) + 16;
  return table + status + help + (g.editing ? 26 : 0) + 12;
}

// Make the node tall enough for the grid (grow only: the user's size wins otherwise).
function fit(node) {
  const min = node.computeSize?.();
  if (!min || !node.size || typeof node.setSize !== "function") return;
  if (node.size[1] < min[1] || node.size[0] < min[0]) {
    node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  }
  node.setDirtyCanvas?.(true, true);
}

function setup(node) {
  if (!node || node.__imoleGrid) return;
  if (!rulesWidget(node) || typeof node.addDOMWidget !== "function") {
    warn("setup", new Error("no rules widget or no DOM widgets in this frontend"));
    return;
  }
  injectStyle();
  const g = { open: { double: false, single: false }, layout: null, lastText: null, editing: null, flash: null };
  node.__imoleGrid = g;
  g.root = buildElement(node, g);
  const widget = node.addDOMWidget(WIDGET_NAME, "instructmole_grid", g.root, {
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => estimateHeight(g),
    serialize: false, // the grid's state is the rules text: nothing of its own is saved or sent
    hideOnZoom: true,
  });
  if (widget) {
    widget.serialize = false;
    if (widget.options) widget.options.serialize = false;
  }
  g.widget = widget;
  bindTextBox(node);
  render(node, true);
}

// Typing in the rules box updates the grid at once (other changes, e.g. undo or loading a
// workflow, are caught on the next frame drawn: see onDrawForeground).
function bindTextBox(node) {
  const g = node.__imoleGrid;
  const widget = rulesWidget(node);
  const box = widget?.inputEl || widget?.element;
  if (!g || !box || g.box === box || typeof box.addEventListener !== "function") return;
  g.box = box;
  const update = safely("sync from text", () => {
    if (rulesText(node) !== g.lastText) render(node);
  });
  box.addEventListener("input", update);
  box.addEventListener("change", update);
}

function syncIfChanged(node) {
  const g = node?.__imoleGrid;
  if (!g) return;
  if (rulesText(node) !== g.lastText || layoutOf(node) !== g.lastLayout) {
    bindTextBox(node);
    render(node);
  }
}

// ---- clicks -------------------------------------------------------------------------------------

function click(node, row, expert, opts = {}) {
  const g = node?.__imoleGrid;
  if (!g) return null;
  if (rulesLinked(node)) {
    g.flash = "The rules come from a link; edit them at their source.";
    render(node);
    return null;
  }
  const r = grid.parseRow(row);
  const layout = layoutOf(node);
  if (!r || !Number.isInteger(expert) || expert < 0 || expert >= layout.numExperts) {
    throw new Error(`no cell ${row} / expert ${expert} in this grid`);
  }
  if (r.block !== null && !layout[r.kind].includes(r.block)) throw new Error(`no row ${row} in this layout`);
  const text = rulesText(node);
  const shift = !!opts.shift;
  if (shift && !("weight" in opts)) {
    openEditor(node, row, expert);
    return null;
  }
  const next = grid.clickText(text, layout, row, expert, { shift, weight: shift ? (opts.weight ?? null) : null });
  if (next !== text) setRules(node, next);
  render(node);
  return next === text ? null : next;
}

// ---- test hook ----------------------------------------------------------------------------------

function resolveNode(node) {
  if (node && typeof node === "object") return node;
  return app.graph?.getNodeById?.(node) ?? null;
}

function shownState(node) {
  return grid.parseText(rulesText(node), layoutOf(node)).state;
}

const hook = {
  version: 1,
  logic: grid,
  cellState: (node, row, expert) => grid.cellState(shownState(resolveNode(node)), row, expert),
  cellInfo: (node, row, expert) => grid.cellInfo(shownState(resolveNode(node)), row, expert),
  click: (node, row, expert, opts = {}) => click(resolveNode(node), row, expert, opts),
  rows: (node) => {
    const n = resolveNode(node);
    const g = n?.__imoleGrid;
    if (!g) return [];
    return grid.rowsOf(layoutOf(n)).filter((row) => !row.includes(":") || g.open[row.split(":")[0]]);
  },
  setOpen: (node, kind, open) => setOpen(resolveNode(node), kind, open),
  layout: (node) => layoutOf(resolveNode(node)),
  status: (node) => {
    const n = resolveNode(node);
    const p = grid.parseText(rulesText(n), layoutOf(n));
    return { error: p.error, hazards: p.hazards, problems: p.problems, textRules: p.textRules };
  },
};

try {
  window.InstructMoLEGrid = hook;
} catch (err) {
  warn("test hook", err);
}

// ---- the extension -----------------------------------------------------------------------------

function chain(proto, name, after) {
  const original = proto[name];
  proto[name] = function (...args) {
    const result = original?.apply(this, args);
    try {
      after.apply(this, args);
    } catch (err) {
      warn(name, err);
    }
    return result;
  };
}

try {
  app.registerExtension({
    name: "instructmole.expertGrid",
    async beforeRegisterNodeDef(nodeType, nodeData) {
      try {
        if (!nodeData || nodeData.name !== NODE_TYPE) return;
        const proto = nodeType.prototype;
        chain(proto, "onNodeCreated", function () {
          setup(this);
        });
        chain(proto, "onConfigure", function () {
          setup(this);
          if (this.__imoleGrid) this.__imoleGrid.autoOpened = false; // a loaded text may have block rules
          const node = this;
          setTimeout(
            safely("after load", () => syncIfChanged(node)),
            0,
          );
        });
        chain(proto, "onExecuted", function (message) {
          const layout = grid.layoutFromUi(message && message[UI_KEY]);
          if (!layout || !this.__imoleGrid) return;
          const before = layoutOf(this);
          const same =
            !before.assumed &&
            before.numExperts === layout.numExperts &&
            before.topK === layout.topK &&
            grid.KINDS.every((k) => before[k].join() === layout[k].join());
          if (!same) {
            this.__imoleGrid.layout = layout;
            render(this, true);
          }
        });
        chain(proto, "onDrawForeground", function () {
          syncIfChanged(this);
        });
      } catch (err) {
        warn("extension setup", err);
      }
    },
  });
} catch (err) {
  warn("registerExtension", err);
}
