// Unit tests of web/lib/grid_rules.mjs (the expert grid's pure logic). Run: node --test tests/web/
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import * as g from "../../web/lib/grid_rules.mjs";

const FLUX = g.FLUX_LAYOUT;
const SMALL = { double: [0, 1, 2, 3], single: [0, 1, 2, 4, 5], numExperts: 6, topK: 2, assumed: false };

function state(parts = {}) {
  const s = g.emptyState();
  for (const kind of g.KINDS) {
    if (!parts[kind]) continue;
    s[kind].group = { ...(parts[kind].group ?? {}) };
    s[kind].blocks = JSON.parse(JSON.stringify(parts[kind].blocks ?? {}));
  }
  return s;
}

// A small deterministic PRNG (mulberry32), so failures reproduce.
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function randomState(rand, layout) {
  const choice = (xs) => xs[Math.floor(rand() * xs.length)];
  const cells = ["force", "force", "ban", "force:0.5", "force:1.25", "force:0.1"];
  const s = g.emptyState();
  for (const kind of g.KINDS) {
    for (let e = 0; e < layout.numExperts; e++) if (rand() < 0.35) s[kind].group[e] = choice(cells);
    for (const b of layout[kind]) {
      if (rand() < 0.6) continue;
      for (let e = 0; e < layout.numExperts; e++) {
        if (rand() < 0.3) (s[kind].blocks[b] ??= {})[e] = choice(cells);
      }
    }
  }
  return g.normalize(s);
}

describe("checkRules (the grammar of instructmole/overrides.py)", () => {
  test("accepts the README examples", () => {
    const text = [
      "single:0-37 force 1,5     # comment",
      "double:* ban 2",
      "all scale 1.5",
      "double:3 only 0:0.6,4",
      "single top 2",
    ].join("\n");
    const r = g.checkRules(text);
    assert.equal(r.ok, true, r.error);
    assert.deepEqual(
      r.rules.map((x) => x.action),
      ["force", "ban", "scale", "only", "top"],
    );
  });

  test("a rule without a selector means all; whitespace inside args is dropped", () => {
    const r = g.checkRules("ban 1 ;force 1, 5:0.5");
    assert.equal(r.ok, true);
    assert.equal(r.rules[0].selector.kind, "all");
    assert.deepEqual([...r.rules[1].experts.entries()], [
      [1, null],
      [5, 0.5],
    ]);
    assert.deepEqual([...g.checkRules("force 1 5").rules[0].experts.keys()], [15]); // as Python: "15"
  });

  for (const [text, message] of [
    ["double:* bam 2", "rule 1 ('double:* bam 2'): unknown action 'bam'; valid actions: force, only, ban, scale, top"],
    ["all scale lots", "scale needs a number, got 'lots'"],
    ["double:3-1 ban 2", "block range '3-1' runs backwards"],
    ["double:x ban 2", "block range 'x' is not valid"],
    ["triple ban 2", "selector 'triple' is not valid"],
    ["all force 1:abc", "'1:abc' is not E or E:W"],
    ["ban 1:0.5", "'1:0.5' is not an expert number"],
    ["all top two", "top needs a whole number of experts, got 'two'"],
    ["all ban", "'ban' needs an argument"],
    ["force 1,1", "expert 1 is listed twice"],
    ["force 256", "expert 256 does not exist"],
    ["force 1:0", "weight 0 of expert 1 is not possible"],
    ["force 1:100.5", "is not possible"],
    ["scale 1e400", "scale factor 1e400 is not possible"],
    ["double:10001 ban 1", "block numbers are whole numbers from 0 to 10000"],
    ["ban 1; double:3 bam 2", "rule 2 ("],
  ]) {
    test(`refuses ${JSON.stringify(text)}`, () => {
      const r = g.checkRules(text);
      assert.equal(r.ok, false);
      assert.ok(r.error.includes(message), r.error);
    });
  }

  test("limits: characters and rules", () => {
    assert.equal(g.checkRules("ban 1;".repeat(1000)).ok, true);
    assert.match(g.checkRules("ban 1;".repeat(1001)).error, /more than 1000 rules/);
    assert.match(g.checkRules(" ".repeat(65537)).error, /65537 characters long/);
  });

  test("layer names are valid selectors", () => {
    assert.equal(g.checkRules("single_transformer_blocks.3.proj_out force 1").ok, true);
    assert.equal(g.checkRules("transformer_blocks.x.ff ban 1").ok, false);
  });
});

describe("parseText", () => {
  test("reads group and block rows, keeps other rules as text rules", () => {
    const p = g.parseText("all scale 1.0\ndouble force 1,5:0.5\nsingle:3 ban 2\nsingle top 2", FLUX);
    assert.deepEqual(p.state.double.group, { 1: "force", 5: "force:0.5" });
    assert.deepEqual(p.state.single.blocks, { 3: { 2: "ban" } });
    assert.deepEqual(
      p.textRules.map((r) => [r.text, r.noop]),
      [
        ["all scale 1.0", true],
        ["single top 2", false],
      ],
    );
    assert.deepEqual(
      p.lines.map((l) => l.type),
      ["text", "grid", "grid", "text"],
    );
    assert.equal(p.textAfterGrid, true);
    assert.equal(p.error, null);
  });

  test("what the grid cannot express stays text: all, names, only, ranges beyond the layout, big experts", () => {
    for (const text of [
      "all force 1",
      "force 1",
      "double:3 only 1",
      "single_transformer_blocks.3.proj_out ban 1",
      "double:0-19 ban 1",
      "double:25 ban 1",
      "double ban 8",
      "double ban 1 # a comment",
      "double ban 1; all scale 2",
      "double bam 1",
    ]) {
      const p = g.parseText(text, FLUX);
      assert.deepEqual(p.state, g.emptyState(), text);
      assert.equal(p.textRules.length >= 1, true, text);
      assert.ok(p.textRules.every((r) => r.reason), text);
    }
    assert.match(g.parseText("double ban 8", FLUX).textRules[0].reason, /expert 8 does not exist/);
    assert.match(g.parseText("double bam 1", FLUX).error, /unknown action/);
  });

  test("double:* is the group row; ranges set block rows", () => {
    const p = g.parseText("double:* ban 2\nsingle:0-2,5 force 3:0.25", FLUX);
    assert.deepEqual(p.state.double.group, { 2: "ban" });
    assert.deepEqual(Object.keys(p.state.single.blocks), ["0", "1", "2", "5"]);
    assert.equal(g.cellState(p.state, "single:5", 3), "force:0.25");
    assert.equal(g.cellState(p.state, "single:4", 3), "auto");
  });

  test("later rules win like in Python: a group rule after a block rule clears the block's cell", () => {
    let p = g.parseText("double:3 ban 1\ndouble force 1", FLUX);
    assert.equal(g.cellState(p.state, "double:3", 1), "force");
    assert.deepEqual(p.state.double.blocks, {});
    p = g.parseText("double force 1\ndouble:3 ban 1", FLUX);
    assert.equal(g.cellState(p.state, "double:3", 1), "ban");
    assert.equal(g.cellState(p.state, "double:4", 1), "force");
    p = g.parseText("double ban 2\ndouble force 2:0.5", FLUX);
    assert.equal(g.cellState(p.state, "double", 2), "force:0.5");
  });

  test("a block cell equal to its group's is inherited", () => {
    const p = g.parseText("double force 1,5\ndouble:3 force 1,3,5", FLUX);
    assert.deepEqual(p.state.double.blocks, { 3: { 3: "force" } });
    assert.deepEqual(p.hazards, []);
    assert.deepEqual(g.cellInfo(p.state, "double:3", 1), { cell: "force", state: "force", weight: null, inherited: true });
  });

  test("hazard: a force that does not relist an earlier forced expert", () => {
    assert.equal(g.parseText("double force 1\ndouble:3 force 2", FLUX).hazards.length, 1);
    assert.equal(g.parseText("double:3 force 2\ndouble force 1", FLUX).hazards.length, 1);
    assert.equal(g.parseText("double force 1\ndouble force 5", FLUX).hazards.length, 1);
    assert.equal(g.parseText("double force 1\ndouble:3 force 1,2\ndouble ban 3", FLUX).hazards.length, 0);
    // settled by a later rule on the same cell: the canonical form of a block that bans a group-forced expert
    assert.equal(g.parseText("double force 1\ndouble:3 force 2\ndouble:3 ban 1", FLUX).hazards.length, 0);
    // ... but re-forcing 1 on every double block may now push out the block's forced 2
    assert.deepEqual(g.parseText("double force 1\ndouble:3 force 2\ndouble force 1", FLUX).hazards, [
      "rule 3 ('double force 1') does not relist forced expert 2 on double:3, which it may push out; " +
        "a click on the grid rewrites the rules as one",
    ]);
  });

  test("problem: a force without weight after every expert is banned", () => {
    const layout = { ...SMALL };
    const p = g.parseText("double ban 0,1,2,3,4,5\ndouble:2 force 1", layout);
    assert.equal(p.problems.length, 1);
    assert.match(p.problems[0], /double:2/);
    assert.deepEqual(g.parseText("double ban 0,1,2,3,4,5\ndouble:2 force 1:0.5", layout).problems, []);
    assert.deepEqual(g.parseText("double:2 force 1\ndouble ban 0,1,2,3,4,5", layout).problems, []);
  });

  test("never throws on odd input", () => {
    for (const text of [null, undefined, 3, "", "\n\n", "#", ";;;", "double:", "\u2028double ban 1\x85"]) {
      assert.doesNotThrow(() => g.parseText(text, FLUX));
    }
    assert.deepEqual(g.parseText("\u2028double ban 1\x85single ban 2", FLUX).state.double.group, { 1: "ban" });
  });
});

describe("renderState", () => {
  test("canonical, minimal rules", () => {
    const s = state({ double: { group: { 1: "force", 5: "force:0.5" } }, single: { blocks: { 3: { 2: "ban" } } } });
    assert.equal(g.renderState(s), "double force 1,5:0.5\nsingle:3 ban 2");
    assert.equal(g.renderState(g.emptyState()), "");
  });

  test("block force rules relist the group's forced experts; equal lists join into ranges", () => {
    const s = state({
      double: {
        group: { 1: "force", 2: "ban" },
        blocks: { 0: { 3: "force" }, 1: { 3: "force" }, 2: { 3: "force" }, 5: { 3: "force", 1: "ban" }, 9: { 4: "ban" } },
      },
    });
    assert.equal(
      g.renderState(s),
      ["double force 1", "double ban 2", "double:0-2 force 1,3", "double:5 force 3", "double:5,9 ban 1", "double:9 ban 4"]
        .join("\n")
        .replace("double:5,9 ban 1\ndouble:9 ban 4", "double:5 ban 1\ndouble:9 ban 4"),
    );
  });

  test("round trip: parse(render(state)) == state, no hazards, accepted by the grammar", () => {
    const rand = rng(7);
    for (let i = 0; i < 300; i++) {
      const layout = i % 2 ? FLUX : SMALL;
      const s = randomState(rand, layout);
      const text = g.renderState(s);
      const p = g.parseText(text, layout);
      assert.deepEqual(p.state, s, text);
      assert.deepEqual(p.hazards, [], text);
      assert.equal(p.error, null, text);
      assert.deepEqual(p.textRules, [], text);
      assert.equal(g.renderState(p.state), text);
    }
  });

  test("formatRanges", () => {
    assert.equal(g.formatRanges([9, 0, 1, 2, 3, 4, 5]), "0-5,9");
    assert.equal(g.formatRanges([3]), "3");
    assert.equal(g.formatRanges([3, 4]), "3-4");
  });
});

describe("mergeText", () => {
  test("keeps every other line verbatim and in order; grid rules go where the first grid line was", () => {
    const text = "# my council\ndouble ban 2\nall scale 1.5  # stronger\n\nsingle:3 force 1\nsingle top 2 ; double:4 ban 1";
    const s = g.parseText(text, FLUX).state;
    const next = g.cycleCell(s, "double", 0);
    assert.equal(
      g.mergeText(text, next, FLUX),
      "# my council\ndouble force 0\ndouble ban 2\nsingle:3 force 1\nall scale 1.5  # stronger\n\nsingle top 2 ; double:4 ban 1",
    );
  });

  test("appends after text rules (before trailing blank lines) when there is no grid line yet", () => {
    assert.equal(g.clickText("all scale 1.0", FLUX, "double", 3), "all scale 1.0\ndouble force 3");
    assert.equal(g.clickText("all scale 1.0\n", FLUX, "double", 3), "all scale 1.0\ndouble force 3\n");
    assert.equal(g.clickText("", FLUX, "single:7", 0), "single:7 force 0");
    assert.equal(g.clickText("  \n", FLUX, "single:7", 0), "single:7 force 0");
  });

  test("an unchanged state leaves a canonical text unchanged; emptied grids drop their lines", () => {
    const text = "all scale 1.0\ndouble force 1,5:0.5\nsingle:3 ban 2";
    assert.equal(g.mergeText(text, g.parseText(text, FLUX).state, FLUX), text);
    assert.equal(g.mergeText(text, g.emptyState(), FLUX), "all scale 1.0");
  });

  test("typed grid rules are tidied on a click, hazards disappear", () => {
    const text = "double force 1\ndouble:3 force 2";
    assert.equal(g.parseText(text, FLUX).hazards.length, 1);
    const out = g.clickText(text, FLUX, "single", 0);
    assert.equal(out, "double force 1\ndouble:3 force 1,2\nsingle force 0");
    assert.deepEqual(g.parseText(out, FLUX).hazards, []);
  });
});

describe("clicks", () => {
  test("a group cell cycles auto -> force -> ban -> auto", () => {
    let text = "";
    const seen = [];
    for (let i = 0; i < 4; i++) {
      text = g.clickText(text, FLUX, "double", 2);
      seen.push(g.cellState(g.parseText(text, FLUX).state, "double", 2));
    }
    assert.deepEqual(seen, ["force", "ban", "auto", "force"]);
  });

  test("a block cell under an auto group cycles all three; under a forced one toggles force/ban", () => {
    let text = "";
    const seen = [];
    for (let i = 0; i < 3; i++) {
      text = g.clickText(text, FLUX, "single:4", 1);
      seen.push(g.cellState(g.parseText(text, FLUX).state, "single:4", 1));
    }
    assert.deepEqual(seen, ["force", "ban", "auto"]);
    assert.equal(text, "");
    text = "single force 1:0.5";
    text = g.clickText(text, FLUX, "single:4", 1);
    assert.equal(text, "single force 1:0.5\nsingle:4 ban 1");
    text = g.clickText(text, FLUX, "single:4", 1);
    assert.equal(text, "single force 1:0.5"); // back to the inherited force (and its weight)
    text = "single ban 1";
    text = g.clickText(text, FLUX, "single:4", 1);
    assert.equal(text, "single ban 1\nsingle:4 force 1");
    text = g.clickText(text, FLUX, "single:4", 1);
    assert.equal(text, "single ban 1");
  });

  test("shift-click sets a forced weight (null: the mean)", () => {
    let text = g.clickText("", FLUX, "double:3", 4, { shift: true, weight: 0.75 });
    assert.equal(text, "double:3 force 4:0.75");
    text = g.clickText(text, FLUX, "double:3", 4, { shift: true, weight: null });
    assert.equal(text, "double:3 force 4");
    text = g.clickText("double force 4:0.5", FLUX, "double:3", 4, { shift: true, weight: 0.5 });
    assert.equal(text, "double force 4:0.5"); // equal to the group: inherited
    assert.throws(() => g.setForce(g.emptyState(), "double", 1, 0));
    assert.throws(() => g.setForce(g.emptyState(), "double", 1, 101));
  });

  test("the group cell reports block overrides", () => {
    const s = g.parseText("double:3 ban 1\ndouble:4 force 1", FLUX).state;
    assert.equal(g.overrides(s, "double", 1), 2);
    assert.equal(g.overrides(s, "double", 2), 0);
  });
});

describe("weights and layouts", () => {
  test("parseWeight", () => {
    assert.deepEqual(g.parseWeight(" 0.5 "), { weight: 0.5 });
    assert.deepEqual(g.parseWeight(""), { weight: null });
    assert.deepEqual(g.parseWeight("1e-2"), { weight: 0.01 });
    for (const bad of ["0", "-1", "abc", "100.5", "nan", "inf", "1e400", "0x10"]) assert.ok(g.parseWeight(bad).error, bad);
  });

  test("layoutFromUi reads the node's ui output", () => {
    const ui = [
      {
        layers: ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2", "single_transformer_blocks.7.proj_out"],
        names: ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2", "single:7"],
        num_experts: 4,
        top_k: 2,
      },
    ];
    assert.deepEqual(g.layoutFromUi(ui), { double: [0], single: [7], numExperts: 4, topK: 2, assumed: false });
    assert.equal(g.layoutFromUi([{ layers: ["x"], num_experts: 4 }]), null);
    assert.equal(g.layoutFromUi([{ layers: ["single:1"], num_experts: 0 }]), null);
    assert.equal(g.layoutFromUi(undefined), null);
    assert.equal(g.layoutFromUi("nope"), null);
    assert.match(g.describeLayout(FLUX), /FLUX\.1 assumed \(19 double \+ 38 single blocks, 8 experts\) until the node runs/);
  });

  test("rowsOf lists group rows followed by their blocks", () => {
    assert.deepEqual(g.rowsOf(SMALL).slice(0, 6), ["double", "double:0", "double:1", "double:2", "double:3", "single"]);
    assert.equal(g.rowsOf(FLUX).length, 2 + 19 + 38);
  });

  test("a smaller layout turns rules beyond it into text rules, and clicks keep them", () => {
    const text = "double ban 7\ndouble:18 force 1";
    const tiny = { double: [0, 1], single: [], numExperts: 4, topK: 2, assumed: false };
    const p = g.parseText(text, tiny);
    assert.deepEqual(p.state, g.emptyState());
    assert.equal(p.textRules.length, 2);
    assert.equal(g.clickText(text, tiny, "double", 0), "double ban 7\ndouble:18 force 1\ndouble force 0");
  });
});
