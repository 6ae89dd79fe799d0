// Unit tests of web/lib/adapter_card.mjs without a DOM: the URLs the loader nodes ask, how answers
// of the card route (nodes/card_routes.py card_payload) become what a node draws, and that only
// the newest answer is drawn. Run: node --test tests/web/
import assert from "node:assert/strict";
import { test } from "node:test";

import * as m from "../../web/lib/adapter_card.mjs";

test("URLs encode the adapter name, so a name never adds a query key or a path", () => {
  assert.equal(m.cardUrl("a b/c&d=e.safetensors"), "/instructmole/card?name=a%20b%2Fc%26d%3De.safetensors");
  assert.equal(m.cardUrl("../x.safetensors"), "/instructmole/card?name=..%2Fx.safetensors");
  assert.equal(m.previewUrl("x.safetensors"), "/instructmole/preview?name=x.safetensors");
  assert.equal(m.previewUrl("x.safetensors", "123"), "/instructmole/preview?name=x.safetensors&v=123");
});

test("the three loaders are watched, through their adapter widget", () => {
  assert.deepEqual(
    [...m.CARD_NODES].sort(),
    ["InstructMoLE_AdapterFile", "InstructMoLE_LoadAdapter", "InstructMoLE_LoadKontext"],
  );
  assert.equal(m.ADAPTER_WIDGET, "adapter");
  assert.equal(m.adapterName("a.safetensors"), "a.safetensors");
  for (const v of [undefined, null, "", "  ", 3, ["a"]]) assert.equal(m.adapterName(v), null);
});

test("only names the widget lists are asked for (a shared workflow may name files this server lacks)", () => {
  assert.equal(m.isListed("a.safetensors", ["a.safetensors", "b.safetensors"]), true);
  assert.equal(m.isListed("elsewhere.safetensors", ["a.safetensors"]), false);
  assert.equal(m.isListed("a.safetensors", []), false);
  assert.equal(m.isListed("a.safetensors", undefined), true); // no list to check against: ask
});

const SHA = "ab".repeat(32);

test("a card answer shows its lines, the sha256 and the preview", () => {
  const view = m.cardView(200, {
    name: "a.safetensors",
    card: { title: "run step 2" },
    lines: ["run step 2", "base flux.1-kontext-dev", "step 2, 2025-01-01T00:00:00Z"],
    text: "title        run step 2\n...",
    preview: true,
    preview_version: "99",
    sha256: SHA,
  });
  assert.equal(view.state, "card");
  assert.deepEqual(view.lines, ["run step 2", "base flux.1-kontext-dev", "step 2, 2025-01-01T00:00:00Z", `sha256 ${"ab".repeat(8)}…`]);
  assert.equal(view.preview, true);
  assert.equal(view.previewVersion, "99");
  assert.equal(view.text, "title        run step 2\n...");
  assert.equal(m.preferredHeight(view), m.PREVIEW_HEIGHT + 6 + 4 * m.LINE_HEIGHT + 10);
});

test("an adapter without a card says so; no preview means no picture height", () => {
  const view = m.cardView(200, { card: null, lines: [], text: "card none", preview: false, sha256: null });
  assert.equal(view.state, "none");
  assert.equal(view.lines.length, 1);
  assert.match(view.lines[0], /^no card/);
  assert.equal(m.preferredHeight(view), m.LINE_HEIGHT + 10);
});

test("refusals and malformed answers become one error line, never a throw", () => {
  const refused = m.cardView(404, { error: "'../x' is not an adapter file in models/instructmole or models/loras" });
  assert.equal(refused.state, "error");
  assert.deepEqual(refused.lines, ["'../x' is not an adapter file in models/instructmole or models/loras"]);
  for (const [status, payload] of [[500, null], [200, null], [200, "text"], [200, [1, 2]], [0, undefined]]) {
    const view = m.cardView(status, payload);
    assert.equal(view.state, "error", JSON.stringify([status, payload]));
    assert.equal(view.lines.length, 1);
    assert.equal(view.preview, false);
  }
  const odd = m.cardView(200, { card: {}, lines: "not a list", preview: "yes", sha256: "nothex", preview_version: 5 });
  assert.equal(odd.state, "card");
  assert.deepEqual(odd.lines, []);
  assert.equal(odd.preview, false);
  assert.equal(odd.previewVersion, "");
});

test("long cards are cut to MAX_LINES lines of MAX_LINE characters", () => {
  const lines = Array.from({ length: 40 }, (_, i) => `${i} ${"x".repeat(400)}`);
  const view = m.cardView(200, { card: {}, lines, preview: false });
  assert.equal(view.lines.length, m.MAX_LINES);
  assert.ok(view.lines.every((l) => l.length <= m.MAX_LINE));
  assert.equal(view.lines.at(-1), `… ${40 - m.MAX_LINES + 1} more`);
  assert.equal(m.preferredHeight(m.emptyView()), 0);
});

test("only the newest request's answer is drawn", () => {
  const tickets = m.createTickets();
  const first = tickets.take();
  const second = tickets.take();
  assert.equal(tickets.isCurrent(first), false);
  assert.equal(tickets.isCurrent(second), true);
});
