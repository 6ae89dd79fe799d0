// Drives the real ComfyUI frontend (headless Chromium through playwright-core) for
// tests/comfyui/test_card_browser.py: the adapter card on a loader node (web/adapter_card.js).
//
//   node tests/comfyui/card_browser.mjs JOB.json RESULT.json
//
// JOB: { url, chromium, carded, plain, missing, shot }: adapter names (one with a card and a preview,
// one without a card, one the server does not have) and where to put a screenshot.
// RESULT: { steps: {name: {...}}, console: [...], error }. Each step sets the Adapter File node's
// widget as a user would (value + the widget's callback) or loads a workflow naming it, then reads
// what the node shows. playwright-core is found through NODE_PATH (CommonJS resolution).
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const require = createRequire(path.join(process.cwd(), "noop.js"));
const { chromium } = require("playwright-core");

const [jobPath, resultPath] = process.argv.slice(2);
const job = JSON.parse(fs.readFileSync(jobPath, "utf8"));
const result = { steps: {}, console: [], error: null };

const SETTINGS = {
  "Comfy.TutorialCompleted": true,
  "Comfy.Minimap.Visible": false,
  "Comfy.Workflow.ShowMissingModelsWarning": false,
};

// What the Adapter File node (id 1) shows: its card widget, the image, the lines, its size.
async function read(page) {
  return page.evaluate(() => {
    const node = window.app.graph.getNodeById(1);
    const box = node?.instructmoleAdapterCard;
    return {
      hasBox: Boolean(box),
      widgetNames: (node?.widgets || []).map((w) => w.name),
      state: box?.element.dataset.state ?? null,
      lines: box ? box.text.textContent.split("\n") : [],
      title: box?.text.title ?? "",
      image: box ? { shown: box.image.style.display !== "none", src: box.image.getAttribute("src"),
        naturalWidth: box.image.naturalWidth, complete: box.image.complete } : null,
      size: node ? Array.from(node.size).map(Number) : null,
      min: node?.computeSize ? Array.from(node.computeSize()).map(Number) : null,
      prompt: null,
    };
  });
}

async function choose(page, name) {
  await page.evaluate((name) => {
    const widget = window.app.graph.getNodeById(1).widgets.find((w) => w.name === "adapter");
    widget.value = name;
    widget.callback?.(name);
  }, name);
}

async function waitState(page, want) {
  await page.waitForFunction(
    (want) => window.app.graph.getNodeById(1)?.instructmoleAdapterCard?.element?.dataset.state === want,
    want, { timeout: 30000, polling: 100 },
  );
}

const browser = await chromium.launch({
  executablePath: job.chromium || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
});
try {
  await fetch(`${job.url}/api/settings`, { method: "POST", body: JSON.stringify(SETTINGS) });
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") result.console.push({ type: m.type(), text: m.text(), url: m.location()?.url || "" });
  });
  page.on("pageerror", (e) => result.console.push({ type: "pageerror", text: String(e.message), url: "" }));
  await page.goto(job.url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.InstructMoLE_AdapterFile, null, { timeout: 90000 });
  await page.waitForTimeout(1000);

  // 1. a workflow whose adapter the server does not have: nothing asked, nothing drawn, size kept
  const missing = { "1": { class_type: "InstructMoLE_AdapterFile", inputs: { adapter: job.missing } } };
  await page.evaluate(async (p) => window.app.loadApiJson(p, "card_missing"), missing);
  await page.waitForTimeout(1500);
  result.steps.missing = await read(page);

  // 2. a workflow naming an adapter with a card: the card and the preview appear
  const carded = { "1": { class_type: "InstructMoLE_AdapterFile", inputs: { adapter: job.carded } } };
  await page.evaluate(async (p) => window.app.loadApiJson(p, "card_loaded"), carded);
  await waitState(page, "card");
  await page.waitForFunction(() => {
    const img = window.app.graph.getNodeById(1).instructmoleAdapterCard.image;
    return img.complete && img.naturalWidth > 0;
  }, null, { timeout: 30000 });
  result.steps.loaded = await read(page);
  result.steps.loaded.prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
  if (job.shot) await page.screenshot({ path: job.shot });

  // 3. the user picks an adapter without a card: the card goes, 4. and back: it returns
  await choose(page, job.plain);
  await waitState(page, "none");
  result.steps.plain = await read(page);
  await choose(page, job.carded);
  await waitState(page, "card");
  result.steps.back = await read(page);
} catch (err) {
  result.error = String(err?.stack || err);
} finally {
  await browser.close();
  fs.writeFileSync(resultPath, JSON.stringify(result, null, 1));
}
