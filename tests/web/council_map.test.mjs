// Unit tests of web/lib/council_map.mjs without a DOM: the council map's numbers agree with the
// Python summary and heat map (instructmole/viz.py weight_text) and members come from the server's `chosen`
// mask, never from rounded weights. Run: node --test tests/web/
import assert from "node:assert/strict";
import { test } from "node:test";

import * as m from "../../web/lib/council_map.mjs";

const TINY = 3e-5; // a member whose weight rounds to 0 at 4 decimals

function message(extra = {}) {
  return {
    instructmole_council: [
      {
        layers: ["transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_out"],
        names: ["double:0", "single:0"],
        num_experts: 3,
        top_k: 2,
        label: "an edit",
        probs: [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]],
        weights: [[0.7, TINY, 0], [0, 0.5, 0.5]], // as the server sends it: rounded, but a member never to 0
        chosen: [[true, true, false], [false, true, true]],
        banned: null,
        instances: 1,
        ...extra,
      },
    ],
  };
}

test("weightText rounds like the Python summary and never shows a member as 0", () => {
  assert.deepEqual(
    [0.25, 1.5, 0, TINY, -TINY, 0.004, 0.005].map((w) => m.weightText(w, 2)),
    ["0.25", "1.50", "0.00", "<0.01", ">-0.01", "<0.01", "0.01"],
  );
  assert.equal(m.weightText(TINY, 4), "<0.0001");
  assert.equal(m.weightText(0.25, 2, true), ".25");
  assert.equal(m.weightText(TINY, 2, true), "<.01");
  assert.equal(m.weightText(-0.25, 2, true), "-.25");
});

test("the hover line of a member whose rounded weight is 0 still names it a member", () => {
  const data = m.councilData(message());
  const tip = m.describeCell(data, 0, 1);
  assert.match(tip, /expert 1 · probability 0\.3000 · weight <0\.0001$/);
  assert.match(m.describeCell(data, 0, 2), /not chosen \(weight 0\)$/);
  // without the mask (a server before it) a nonzero weight is a member
  const old = m.councilData(message({ chosen: undefined }));
  assert.match(m.describeCell(old, 0, 1), /weight <0\.0001$/);
});

test("a malformed chosen mask is refused like the other grids", () => {
  assert.equal(m.councilData(message({ chosen: [[true]] })), null);
});

test("the map of a FLUX.1 council (57 layers) with its summary wants 602 px", () => {
  // scripts/workflows.py sizes the shipped Council Previews for it (tests/test_workflow_layout.py)
  const layers = Array.from({ length: 57 }, (_, i) => `l${i}`);
  assert.equal(m.preferredHeight({ layers }, true), 602);
  assert.equal(m.preferredHeight(null, false), 40);
});
