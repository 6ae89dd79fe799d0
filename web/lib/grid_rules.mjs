// InstructMoLE expert grid: the pure logic behind web/expert_grid.js (no DOM, no ComfyUI imports,
// so Node's test runner can load it: tests/web/grid_rules.test.mjs). Not an extension itself: an
// .mjs file in web/lib/, because ComfyUI loads every *.js under WEB_DIRECTORY (subfolders too) as an
// extension; web/expert_grid.js imports it.
//
// The rule text (the Override Council node's `rules` widget) is the only state. This module
//   * checks the whole text with the same grammar and limits as instructmole/overrides.py
//     (parse_rules), so the grid can show the first mistake before the node runs;
//   * reads the grid-expressible subset into a grid state;
//   * renders a grid state back to canonical, minimal rules and merges them into the text,
//     keeping every other line verbatim.
//
// Grid-expressible: `force` and `ban` rules whose selector is a block kind (`double`, `single`,
// `double:*`: a group row) or block numbers of that kind (`double:3`, `single:0-5,9`: block rows),
// every block and expert existing in the layout, on a line with no comment and no other kind of
// rule. Everything else (scale, top, only, `all`, layer names, comments, mistakes) is a "text rule":
// kept verbatim, never rewritten, and reported so the grid can say "text rules also apply".
//
// Grid state: {double: {group: {E: CELL}, blocks: {N: {E: CELL}}}, single: {...}} where CELL is
// "force", "force:W" (W a decimal) or "ban"; a missing cell is auto. A block cell overrides its
// group's cell; block cells equal to the group's are dropped (state is always normalised).
//
// Order semantics match Python: rules apply in order; a later force/ban of an expert on a layer
// wins; force lifts a ban. Python's force keeps the council's size, so a force that does not
// relist an earlier forced expert may push it out: such typed texts are reported as hazards
// (the canonical rendering relists, so it never has one). A force without a weight into a council
// whose every expert is banned is refused by Python: reported as a problem.

export const ACTIONS = Object.freeze(["force", "only", "ban", "scale", "top"]);
export const KINDS = Object.freeze(["double", "single"]);
export const MAX_RULES_CHARS = 65536;
export const MAX_RULES = 1000;
export const MAX_BLOCK = 10000;
export const MAX_EXPERTS = 256;
export const MAX_WEIGHT = 100;
export const MAX_FACTOR = 100;
const MAX_NUMBER_CHARS = 32;

// Python's str.isspace() set and str.splitlines() boundaries (checked against Python in the tests).
const WS = "\\t\\n\\v\\f\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const WS_RUN = new RegExp(`[${WS}]+`, "g");
const WS_LEAD = new RegExp(`^[${WS}]+`);
const WS_TRAIL = new RegExp(`[${WS}]+$`);
const LINE_BREAK = /\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]/;
const DIGITS = /^[0-9]+$/;
const DECIMAL = /^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]{1,4})?$/;
const KIND_SEL = /^(double|single)(?::(.+))?$/;
const RANGE = /^([0-9]+)(?:-([0-9]+))?$/;
const DOUBLE_LAYER = /^transformer_blocks\.(\p{Nd}+)\.(.+)$/u;
const SINGLE_LAYER = /^single_transformer_blocks\.(\p{Nd}+)\.(.+)$/u;
const NOT_PRINTABLE = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}\p{Zs}]/u;

/** The layout assumed until the node has run: FLUX.1's 19 double and 38 single blocks, 8 experts. */
export const FLUX_LAYOUT = Object.freeze({
  double: Object.freeze(Array.from({ length: 19 }, (_, i) => i)),
  single: Object.freeze(Array.from({ length: 38 }, (_, i) => i)),
  numExperts: 8,
  topK: null,
  assumed: true,
});

export const HELP_SHORT =
  "Click a cell: auto → force → ban. Shift-click: weight of a forced expert. " +
  "Rules: <layers> <action> <args>, one per line or ';'.";

export const HELP_LONG = [
  "Layers: all, double, single, double:0-5,9, single:*, or a layer name (a rule without layers means all).",
  "Actions: force 1,5 (1:0.5 gives a weight) · only 2,3 · ban 2 · scale 1.5 · top 2.",
  "ban 2: the expert filling in takes over 2's weight (the layer keeps its strength); 'ban 2 routed' keeps the newcomer's own routed weight.",
  "Rules apply in order; '#' starts a comment. Forced weights: above 0, at most 100 (blank: the council's mean).",
  "The grid writes double/single force and ban rules; other lines are kept as typed and also apply.",
  "A block row overrides its group row; faint cells are inherited from the group.",
];

// ---- small helpers ------------------------------------------------------------------------------

function pyStrip(s) {
  return s.replace(WS_LEAD, "").replace(WS_TRAIL, "");
}

/** Python's ``s.split(None, maxsplit)``. */
function pySplit(s, maxsplit = -1) {
  const out = [];
  let rest = s.replace(WS_LEAD, "");
  while (rest) {
    if (maxsplit >= 0 && out.length === maxsplit) {
      out.push(rest);
      break;
    }
    WS_RUN.lastIndex = 0;
    const m = WS_RUN.exec(rest);
    if (!m) {
      out.push(rest);
      break;
    }
    out.push(rest.slice(0, m.index));
    rest = rest.slice(m.index + m[0].length);
  }
  return out;
}

function removeWs(s) {
  return s.replace(WS_RUN, "");
}

function quote(text, limit = 60) {
  const t = String(text);
  const short = t.length > limit ? t.slice(0, limit - 1) + "…" : t;
  return `'${short.replace(/[\x00-\x1f\x7f\u2028\u2029]/g, " ")}'`;
}

function smallInt(digits) {
  return digits.length <= 6 ? Number(digits) : null;
}

function shownInt(digits) {
  return digits.length <= 12 ? digits : digits.slice(0, 12) + "…";
}

/** A weight as the rules write it: JavaScript's shortest round-trip form (Python reads the same float). */
export function formatNumber(x) {
  return String(x);
}

/** A forced weight typed by a person: {weight: number|null} (blank = the council's mean) or {error}. */
export function parseWeight(text) {
  const t = pyStrip(String(text ?? ""));
  if (!t) return { weight: null };
  if (t.length > MAX_NUMBER_CHARS || !DECIMAL.test(t)) {
    return { error: `${quote(t, 20)} is not a number; a forced weight is above 0 and at most ${MAX_WEIGHT}` };
  }
  const w = Number(t);
  if (!(Number.isFinite(w) && w > 0 && w <= MAX_WEIGHT)) {
    return { error: `weight ${t} is not possible; a forced weight is above 0 and at most ${MAX_WEIGHT}` };
  }
  return { weight: w };
}

class RuleError extends Error {}

// ---- the grammar (mirrors overrides.py) -------------------------------------------------------------

function parseRanges(spec) {
  if (spec === "*") return null;
  const picked = [];
  for (const rawPart of spec.split(",")) {
    const part = pyStrip(rawPart);
    const m = RANGE.exec(part);
    if (!m) throw new RuleError(`block range ${quote(rawPart)} is not valid; write N, N-M or *`);
    const block = (digits) => {
      const n = smallInt(digits);
      if (n === null || n > MAX_BLOCK) {
        throw new RuleError(
          `block range ${quote(rawPart)} is not valid; block numbers are whole numbers from 0 to ${MAX_BLOCK}`,
        );
      }
      return n;
    };
    const lo = block(m[1]);
    const hi = m[2] !== undefined ? block(m[2]) : lo;
    if (hi < lo) throw new RuleError(`block range ${quote(rawPart)} runs backwards; write ${hi}-${lo}`);
    picked.push([lo, hi]);
  }
  return mergeRanges(picked);
}

function mergeRanges(ranges) {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const merged = [];
  for (const [lo, hi] of sorted) {
    const last = merged[merged.length - 1];
    if (last && lo <= last[1] + 1) last[1] = Math.max(last[1], hi);
    else merged.push([lo, hi]);
  }
  return merged;
}

function isPrintable(s) {
  for (const ch of s) if (ch !== " " && NOT_PRINTABLE.test(ch)) return false;
  return true;
}

function parseSelector(text) {
  if (text.length > MAX_RULES_CHARS) {
    throw new RuleError(`layer selector is ${text.length} characters long; the limit is ${MAX_RULES_CHARS} characters`);
  }
  const t = pyStrip(text);
  if (t === "all") return { kind: "all", text: t };
  const m = KIND_SEL.exec(t);
  if (m) {
    return { kind: m[1], ranges: parseRanges(m[2] ?? "*"), text: t };
  }
  if (t.includes(".") && (DOUBLE_LAYER.test(t) || SINGLE_LAYER.test(t))) {
    if (isPrintable(t) && !new RegExp(`[${WS}]`).test(t)) return { kind: "name", name: t, text: t };
  }
  throw new RuleError(
    `selector ${quote(t)} is not valid; write all, double, single, double:0-5, single:*, or a layer name of this adapter`,
  );
}

function parseExpertList(text, withWeights) {
  const out = new Map();
  const want = withWeights
    ? `E or E:W (expert number, optional weight above 0 and at most ${MAX_WEIGHT})`
    : "an expert number";
  for (const rawPart of text.split(",")) {
    const part = pyStrip(rawPart);
    const colon = part.indexOf(":");
    const number = colon < 0 ? part : part.slice(0, colon);
    const weight = colon < 0 ? "" : part.slice(colon + 1);
    if (!DIGITS.test(number) || (colon >= 0 && !withWeights)) throw new RuleError(`${quote(part)} is not ${want}`);
    const e = smallInt(number);
    if (e === null || e >= MAX_EXPERTS) {
      throw new RuleError(
        `expert ${shownInt(number)} does not exist; experts are numbered 0 to ${MAX_EXPERTS - 1} at most`,
      );
    }
    if (out.has(e)) throw new RuleError(`expert ${e} is listed twice; list each expert once`);
    let w = null;
    if (colon >= 0) {
      if (weight.length > MAX_NUMBER_CHARS || !DECIMAL.test(weight)) throw new RuleError(`${quote(part)} is not ${want}`);
      w = Number(weight);
      if (!(Number.isFinite(w) && w > 0 && w <= MAX_WEIGHT)) {
        throw new RuleError(
          `weight ${formatNumber(w)} of expert ${e} is not possible; a forced weight is a number above 0 and at most ` +
            `${MAX_WEIGHT} (to remove an expert, ban it)`,
        );
      }
    }
    out.set(e, w);
  }
  return out;
}

/** One rule (a non-empty, stripped part of a line): {selector, action, experts|factor|k} or throws. */
function parseRule(text) {
  let tokens = pySplit(text, 2);
  if (ACTIONS.includes(tokens[0])) tokens = ["all", ...pySplit(text, 1)];
  if (tokens.length < 2 || !ACTIONS.includes(tokens[1])) {
    const bad = tokens.length > 1 ? quote(tokens[1], 20) : "(nothing)";
    throw new RuleError(`unknown action ${bad}; valid actions: ${ACTIONS.join(", ")}`);
  }
  const [selectorText, action] = tokens;
  const arg = tokens.length > 2 ? removeWs(tokens[2]) : "";
  if (!arg) {
    throw new RuleError(`'${action}' needs an argument, e.g. '${action} ${action === "scale" ? "1.5" : "2"}'`);
  }
  const selector = parseSelector(selectorText);
  const rule = { selector, action, text };
  if (action === "force" || action === "only") {
    rule.experts = parseExpertList(arg, true);
  } else if (action === "ban") {
    // "ban 2 routed": the newcomer keeps its routed weight (Python's ban(inherit=False)); a text rule.
    const words = pySplit(tokens[2]);
    rule.routed = words.length > 1 && words[words.length - 1] === "routed";
    rule.experts = parseExpertList(rule.routed ? words.slice(0, -1).join("") : arg, false);
  } else if (action === "scale") {
    if (arg.length > MAX_NUMBER_CHARS || !DECIMAL.test(arg)) {
      throw new RuleError(`scale needs a number, got ${quote(arg, 20)}; choose one from 0 to ${MAX_FACTOR}`);
    }
    const f = Number(arg);
    if (!(Number.isFinite(f) && f >= 0 && f <= MAX_FACTOR)) {
      throw new RuleError(`scale factor ${arg} is not possible; choose a number from 0 to ${MAX_FACTOR}`);
    }
    rule.factor = f;
  } else {
    if (!DIGITS.test(arg)) throw new RuleError(`top needs a whole number of experts, got ${quote(arg, 20)}`);
    const k = smallInt(arg);
    if (k === null || k < 1 || k > MAX_EXPERTS) {
      throw new RuleError(
        `top ${shownInt(arg)} is not possible; choose 1 to the adapter's number of experts (at most ${MAX_EXPERTS})`,
      );
    }
    rule.k = k;
  }
  return rule;
}

/**
 * The whole text checked like Python's parse_rules: {ok: true, rules} or {ok: false, error}.
 * (Expert numbers against the adapter, and selectors against its layers, are checked at run time.)
 */
export function checkRules(text) {
  if (typeof text !== "string") return { ok: false, error: "rules must be text" };
  if (text.length > MAX_RULES_CHARS) {
    return {
      ok: false,
      error: `the rules text is ${text.length} characters long; the limit is ${MAX_RULES_CHARS} characters`,
    };
  }
  const rules = [];
  for (const line of text.split(LINE_BREAK)) {
    for (const rawPart of line.split("#", 1)[0].split(";")) {
      const part = pyStrip(rawPart);
      if (!part) continue;
      if (rules.length >= MAX_RULES) {
        return { ok: false, error: `the rules text holds more than ${MAX_RULES} rules; the limit is ${MAX_RULES}` };
      }
      try {
        rules.push(parseRule(part));
      } catch (err) {
        if (!(err instanceof RuleError)) throw err;
        return { ok: false, error: `rule ${rules.length + 1} (${quote(part)}): ${err.message}` };
      }
    }
  }
  return { ok: true, rules };
}

// ---- layouts ----------------------------------------------------------------------------------------

function blockOf(name) {
  let m = /^transformer_blocks\.([0-9]+)\./.exec(name);
  if (m) return ["double", Number(m[1])];
  m = /^single_transformer_blocks\.([0-9]+)\./.exec(name);
  if (m) return ["single", Number(m[1])];
  m = /^(double|single):([0-9]+)$/.exec(name);
  if (m) return [m[1], Number(m[2])];
  return null;
}

/**
 * The layout from the node's ui output ``instructmole_council`` (a list holding one dict with
 * ``layers``, ``names``, ``num_experts``, ``top_k``), or null when it is missing or malformed.
 */
export function layoutFromUi(info) {
  if (Array.isArray(info)) info = info[0];
  if (!info || typeof info !== "object") return null;
  const n = info.num_experts;
  if (!Number.isInteger(n) || n < 1 || n > MAX_EXPERTS) return null;
  const blocks = { double: new Set(), single: new Set() };
  for (const key of ["layers", "names"]) {
    const list = info[key];
    if (!Array.isArray(list)) continue;
    for (const name of list) {
      const b = typeof name === "string" ? blockOf(name) : null;
      if (b && b[1] <= MAX_BLOCK) blocks[b[0]].add(b[1]);
    }
  }
  if (!blocks.double.size && !blocks.single.size) return null;
  const k = Number.isInteger(info.top_k) && info.top_k >= 1 ? info.top_k : null;
  return {
    double: [...blocks.double].sort((a, b) => a - b),
    single: [...blocks.single].sort((a, b) => a - b),
    numExperts: n,
    topK: k,
    assumed: false,
  };
}

export function describeLayout(layout) {
  const parts = KINDS.filter((k) => layout[k].length).map((k) => `${layout[k].length} ${k}`);
  const what = `${parts.join(" + ")} blocks, ${layout.numExperts} experts` + (layout.topK ? `, top-${layout.topK}` : "");
  return layout.assumed ? `Layout: FLUX.1 assumed (${what}) until the node runs` : `Layout from the last run: ${what}`;
}

// ---- rows and cells ---------------------------------------------------------------------------------

/** Row ids: "double" (a group row) or "double:3" (a block row). */
export function parseRow(row) {
  const m = /^(double|single)(?::([0-9]+))?$/.exec(String(row));
  if (!m) return null;
  return { kind: m[1], block: m[2] === undefined ? null : Number(m[2]) };
}

export function rowsOf(layout) {
  const rows = [];
  for (const kind of KINDS) {
    if (!layout[kind].length) continue;
    rows.push(kind);
    for (const b of layout[kind]) rows.push(`${kind}:${b}`);
  }
  return rows;
}

export function emptyState() {
  return { double: { group: {}, blocks: {} }, single: { group: {}, blocks: {} } };
}

function cloneState(state) {
  const out = emptyState();
  for (const kind of KINDS) {
    out[kind].group = { ...state[kind].group };
    for (const [b, cells] of Object.entries(state[kind].blocks)) out[kind].blocks[b] = { ...cells };
  }
  return out;
}

function forceCell(w) {
  return w === null || w === undefined ? "force" : `force:${formatNumber(w)}`;
}

/** "auto" | "force" | "force:W" | "ban" of a cell, as shown (a block row inherits its group). */
export function cellState(state, row, expert) {
  return cellInfo(state, row, expert).cell;
}

/** {cell, state: "auto"|"force"|"ban", weight: number|null, inherited: bool} of a cell. */
export function cellInfo(state, row, expert) {
  const r = parseRow(row);
  if (!r) throw new Error(`no grid row ${row}`);
  const group = state[r.kind].group[expert];
  const own = r.block === null ? group : state[r.kind].blocks[r.block]?.[expert];
  const cell = own ?? (r.block === null ? undefined : group) ?? "auto";
  const kind = cell.startsWith("force") ? "force" : cell;
  const weight = cell.startsWith("force:") ? Number(cell.slice(6)) : null;
  return { cell, state: kind, weight, inherited: r.block !== null && own === undefined && group !== undefined };
}

/** How many block rows of a group override expert `expert` (the grid marks the group cell). */
export function overrides(state, kind, expert) {
  let n = 0;
  for (const cells of Object.values(state[kind].blocks)) if (cells[expert] !== undefined) n += 1;
  return n;
}

function setCell(state, r, expert, cell) {
  const s = state[r.kind];
  if (r.block === null) {
    if (cell === "auto") delete s.group[expert];
    else s.group[expert] = cell;
  } else {
    const cells = (s.blocks[r.block] ??= {});
    if (cell === "auto") delete cells[expert];
    else cells[expert] = cell;
  }
  return normalize(state);
}

/** Drop block cells equal to their group's, and empty block maps. */
export function normalize(state) {
  for (const kind of KINDS) {
    const s = state[kind];
    for (const [b, cells] of Object.entries(s.blocks)) {
      for (const [e, cell] of Object.entries(cells)) if (s.group[e] === cell) delete cells[e];
      if (!Object.keys(cells).length) delete s.blocks[b];
    }
  }
  return state;
}

const CYCLE = ["auto", "force", "ban"];

/**
 * The state after a click on a cell: auto → force → ban → auto. A block row can only show auto
 * when its group cell is auto (no rule un-forces or un-bans a block), so under a forced or banned
 * group cell a block cell toggles between force and ban.
 */
export function cycleCell(state, row, expert) {
  const r = parseRow(row);
  if (!r) throw new Error(`no grid row ${row}`);
  const next = cloneState(state);
  const now = cellInfo(state, row, expert);
  const group = r.block === null ? "auto" : (state[r.kind].group[expert] ?? "auto");
  const groupState = group.startsWith("force") ? "force" : group;
  let i = CYCLE.indexOf(now.state);
  for (let step = 0; step < CYCLE.length; step++) {
    i = (i + 1) % CYCLE.length;
    const s = CYCLE[i];
    if (s === "auto" && groupState !== "auto") continue; // not expressible on a block
    const cell = s === groupState ? (r.block === null ? s : "inherit") : s;
    if (cell === "inherit") {
      const cells = next[r.kind].blocks[r.block];
      if (cells) delete cells[expert];
      return normalize(next);
    }
    return setCell(next, r, expert, cell);
  }
  return next;
}

/** The state with `expert` forced on `row` at `weight` (null: the council's mean weight). */
export function setForce(state, row, expert, weight) {
  const r = parseRow(row);
  if (!r) throw new Error(`no grid row ${row}`);
  if (weight !== null && !(Number.isFinite(weight) && weight > 0 && weight <= MAX_WEIGHT)) {
    throw new Error(`weight ${weight} is not above 0 and at most ${MAX_WEIGHT}`);
  }
  return setCell(cloneState(state), r, expert, forceCell(weight));
}

// ---- reading a text ---------------------------------------------------------------------------------

/** A parsed rule as a grid rule for `layout`: {kind, blocks (null: group), action, experts} or {reason}. */
function gridRule(rule, layout) {
  const { selector, action } = rule;
  if (action !== "force" && action !== "ban") return { reason: `${action} rules are text-only` };
  if (rule.routed) return { reason: "'ban … routed' is a text rule (the grid writes plain bans)" };
  if (selector.kind === "all") return { reason: "'all' is not a grid row (the rows are double and single)" };
  if (selector.kind === "name") return { reason: "a layer name is not a grid row" };
  const have = layout[selector.kind];
  if (!have.length) return { reason: `this adapter has no ${selector.kind} blocks` };
  let blocks = null;
  if (selector.ranges !== null) {
    blocks = [];
    const set = new Set(have);
    for (const [lo, hi] of selector.ranges) {
      if (hi - lo > have.length) return { reason: `${selector.text} names blocks this adapter lacks` };
      for (let b = lo; b <= hi; b++) {
        if (!set.has(b)) return { reason: `block ${selector.kind}:${b} is not in this adapter` };
        blocks.push(b);
      }
    }
  }
  for (const e of rule.experts.keys()) {
    if (e >= layout.numExperts) {
      return { reason: `expert ${e} does not exist (this adapter has experts 0-${layout.numExperts - 1})` };
    }
  }
  return { kind: selector.kind, blocks, action, experts: [...rule.experts.entries()] };
}

function effective(state, kind, block, expert) {
  return state[kind].blocks[block]?.[expert] ?? state[kind].group[expert] ?? "auto";
}

// `atRisk`: "kind:block:expert" -> the label of a force rule that did not relist that forced expert
// (Python's force may have pushed it out); a later rule on the same cell settles it.
function applyGridRule(state, g, layout, label, atRisk, problems) {
  const s = state[g.kind];
  const blocks = g.blocks ?? layout[g.kind];
  if (g.action === "force") {
    const listed = new Set(g.experts.map(([e]) => e));
    const needsMean = g.experts.find(([, w]) => w === null);
    let emptyAt = null;
    for (const b of blocks) {
      let allBanned = true;
      for (let e = 0; e < layout.numExperts; e++) {
        const cell = effective(state, g.kind, b, e);
        const key = `${g.kind}:${b}:${e}`;
        if (cell.startsWith("force") && !listed.has(e) && !atRisk.has(key)) atRisk.set(key, label);
        if (cell !== "ban") allBanned = false;
      }
      if (allBanned && emptyAt === null) emptyAt = b;
    }
    if (needsMean && emptyAt !== null) {
      problems.push(
        `${label}: every expert is banned on ${g.kind}:${emptyAt}, so forced expert ${needsMean[0]} has no mean ` +
          `weight to take; give it a weight (shift-click)`,
      );
    }
  }
  for (const [e, w] of g.experts) {
    const cell = g.action === "ban" ? "ban" : forceCell(w);
    for (const b of blocks) atRisk.delete(`${g.kind}:${b}:${e}`);
    if (g.blocks === null) {
      s.group[e] = cell;
      for (const cells of Object.values(s.blocks)) delete cells[e];
    } else {
      for (const b of g.blocks) (s.blocks[b] ??= {})[e] = cell;
    }
  }
}

function hazardsOf(atRisk) {
  const byLabel = new Map();
  for (const [key, label] of atRisk) {
    const [kind, block, expert] = key.split(":");
    if (!byLabel.has(label)) byLabel.set(label, []);
    byLabel.get(label).push(`${expert} on ${kind}:${block}`);
  }
  return [...byLabel].map(
    ([label, cells]) =>
      `${label} does not relist forced expert ${cells.slice(0, 3).join(", ")}${cells.length > 3 ? ", …" : ""}, ` +
      "which it may push out; a click on the grid rewrites the rules as one",
  );
}

/**
 * Read a rule text for `layout`. Returns
 *   state        the grid state of its grid lines (see the top of this file);
 *   lines        [{text, type: "grid"|"text"|"comment"|"blank"}];
 *   textRules    [{text, reason, noop}] rules the grid does not show (noop: `all scale 1`);
 *   error        the first mistake Python would refuse the text for, or null;
 *   hazards      typed force rules that may push out an earlier forced expert;
 *   problems     forces Python would refuse (no mean weight in an emptied council);
 *   textAfterGrid  whether a text rule follows a grid line (it may change what the grid shows).
 */
export function parseText(text, layout = FLUX_LAYOUT) {
  text = typeof text === "string" ? text : "";
  const check = checkRules(text);
  const state = emptyState();
  const lines = [];
  const textRules = [];
  const atRisk = new Map();
  const problems = [];
  let index = 0;
  let sawGrid = false;
  let textAfterGrid = false;
  for (const line of text.split(LINE_BREAK)) {
    const hash = line.indexOf("#");
    const code = hash < 0 ? line : line.slice(0, hash);
    const parts = code
      .split(";")
      .map(pyStrip)
      .filter((p) => p);
    if (!parts.length) {
      lines.push({ text: line, type: hash < 0 ? "blank" : "comment" });
      continue;
    }
    const parsed = parts.map((part) => {
      index += 1;
      try {
        const rule = parseRule(part);
        return { index, part, rule, grid: gridRule(rule, layout) };
      } catch (err) {
        if (!(err instanceof RuleError)) throw err;
        return { index, part, error: err.message };
      }
    });
    const isGrid = hash < 0 && index <= MAX_RULES && parsed.every((p) => p.grid && p.grid.kind);
    lines.push({ text: line, type: isGrid ? "grid" : "text" });
    if (isGrid) {
      sawGrid = true;
      for (const p of parsed) {
        applyGridRule(state, p.grid, layout, `rule ${p.index} (${quote(p.part)})`, atRisk, problems);
      }
      continue;
    }
    for (const p of parsed) {
      if (sawGrid) textAfterGrid = true;
      let reason;
      if (p.error) reason = `not valid: ${p.error}`;
      else if (p.grid.kind) reason = hash >= 0 ? "on a line with a comment" : "on a line with other text rules";
      else reason = p.grid.reason;
      const noop = !!p.rule && p.rule.action === "scale" && p.rule.factor === 1 && p.rule.selector.kind === "all";
      textRules.push({ text: p.part, reason, noop });
    }
  }
  return {
    state: normalize(state),
    lines,
    textRules,
    error: check.ok ? null : check.error,
    hazards: hazardsOf(atRisk),
    problems,
    textAfterGrid,
  };
}

// ---- writing a text ---------------------------------------------------------------------------------

function expertList(cells) {
  return Object.entries(cells)
    .map(([e, cell]) => [Number(e), cell])
    .sort((a, b) => a[0] - b[0])
    .map(([e, cell]) => (cell.startsWith("force:") ? `${e}:${cell.slice(6)}` : `${e}`))
    .join(",");
}

function pick(cells, want) {
  const out = {};
  for (const [e, cell] of Object.entries(cells)) if (want(cell)) out[e] = cell;
  return out;
}

const isForce = (cell) => cell.startsWith("force");
const isBan = (cell) => cell === "ban";

/** "0-5,9": sorted block numbers as ranges of consecutive numbers. */
export function formatRanges(numbers) {
  const sorted = [...numbers].sort((a, b) => a - b);
  const parts = [];
  for (let i = 0; i < sorted.length; ) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j] + 1) j++;
    parts.push(i === j ? `${sorted[i]}` : `${sorted[i]}-${sorted[j]}`);
    i = j + 1;
  }
  return parts.join(",");
}

function groupedRules(kind, byBlock, action) {
  const byList = new Map(); // expert list -> blocks, in first-block order
  for (const [b, list] of byBlock) {
    if (!byList.has(list)) byList.set(list, []);
    byList.get(list).push(b);
  }
  return [...byList.entries()]
    .sort((x, y) => x[1][0] - y[1][0])
    .map(([list, blocks]) => `${kind}:${formatRanges(blocks)} ${action} ${list}`);
}

/**
 * The canonical, minimal rules of a grid state, one per line: per kind, the group's force then ban
 * rule, then block force rules (each relisting the experts its group forces there, so Python's
 * force never pushes one out) and block ban rules, blocks with equal lists joined into ranges.
 */
export function renderState(state) {
  const out = [];
  for (const kind of KINDS) {
    const { group, blocks } = state[kind];
    const gForce = pick(group, isForce);
    const gBan = pick(group, isBan);
    if (Object.keys(gForce).length) out.push(`${kind} force ${expertList(gForce)}`);
    if (Object.keys(gBan).length) out.push(`${kind} ban ${expertList(gBan)}`);
    const forces = [];
    const bans = [];
    const numbers = Object.keys(blocks)
      .map(Number)
      .sort((a, b) => a - b);
    for (const b of numbers) {
      const cells = blocks[b];
      const own = pick(cells, isForce);
      if (Object.keys(own).length) {
        const eff = { ...pick(gForce, () => true) };
        for (const [e, cell] of Object.entries(cells)) {
          if (isForce(cell)) eff[e] = cell;
          else delete eff[e];
        }
        forces.push([b, expertList(eff)]);
      }
      const ban = pick(cells, isBan);
      if (Object.keys(ban).length) bans.push([b, expertList(ban)]);
    }
    out.push(...groupedRules(kind, forces, "force"), ...groupedRules(kind, bans, "ban"));
  }
  return out.join("\n");
}

/**
 * `text` with its grid lines replaced by the canonical rules of `state`: every other line (text
 * rules, comments, blank lines) is kept verbatim and in order; the grid's rules go where the first
 * grid line was, else at the end (before trailing blank lines). Line breaks become "\n".
 */
export function mergeText(text, state, layout = FLUX_LAYOUT) {
  const parsed = parseText(text, layout);
  const rendered = renderState(state);
  const out = [];
  let placed = false;
  for (const line of parsed.lines) {
    if (line.type !== "grid") {
      out.push(line.text);
    } else if (!placed) {
      placed = true;
      if (rendered) out.push(rendered);
    }
  }
  if (!placed && rendered) {
    let end = out.length;
    while (end > 0 && !pyStrip(out[end - 1])) end--;
    if (end === 0) return rendered; // a blank text: nothing to keep
    out.splice(end, 0, rendered);
  }
  return out.join("\n");
}

/**
 * The text after a click on a cell (shift: set the forced weight `weight`, null = mean) — the one
 * call the grid makes: parse the current text, change the cell, merge.
 */
export function clickText(text, layout, row, expert, { shift = false, weight = null } = {}) {
  const { state } = parseText(text, layout);
  const next = shift ? setForce(state, row, expert, weight) : cycleCell(state, row, expert);
  return mergeText(text, next, layout);
}
