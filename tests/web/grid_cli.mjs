// Helper for tests/test_web_logic.py (not a test file itself): reads one JSON object on stdin,
//   {layout: {double: [...], single: [...], numExperts}, states?: [state], texts?: [text], check?: [text]}
// and writes {rendered?, parsed?, checked?} on stdout, using web/lib/grid_rules.mjs.
import { readFileSync } from "node:fs";

import * as grid from "../../web/lib/grid_rules.mjs";

const input = JSON.parse(readFileSync(0, "utf8"));
const layout = { topK: null, ...input.layout, assumed: false };
const read = (text) => {
  const p = grid.parseText(text, layout);
  return {
    state: p.state,
    hazards: p.hazards,
    problems: p.problems,
    error: p.error,
    textRules: p.textRules,
    types: p.lines.map((l) => l.type),
  };
};
const out = {};
if (input.states) out.rendered = input.states.map((s) => ({ text: grid.renderState(s), ...read(grid.renderState(s)) }));
if (input.texts) out.parsed = input.texts.map(read);
if (input.check) {
  out.checked = input.check.map((t) => {
    const c = grid.checkRules(t);
    return { ok: c.ok, error: c.error ?? null, count: c.ok ? c.rules.length : null };
  });
}
process.stdout.write(JSON.stringify(out));
