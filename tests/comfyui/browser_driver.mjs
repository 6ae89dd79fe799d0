// Drives the real ComfyUI frontend (headless Chromium through playwright-core) for
// tests/comfyui/test_browser.py, and for maintainers through scripts/screenshot_workflow.mjs.
//
//   node tests/comfyui/browser_driver.mjs JOB.json RESULT.json
//
// JOB: { url, chromium, width, height, shotsDir,
//        workflows: [{ stem, path }],                     // UI-format files to load and screenshot
//        run: { prompt, previewId, overrideId, timeoutMs } | null }   // an API prompt to queue
// RESULT: { frontendVersion, startup: {console}, workflows: {stem: {..., layout: [node sizes]}}, run: {...} | null, error }
// Every console error/warning and page error is recorded with the phase it happened in; the test
// decides which are ours. playwright-core is found through NODE_PATH (CommonJS resolution).
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const require = createRequire(path.join(process.cwd(), "noop.js"));
const { chromium } = require("playwright-core");

const [jobPath, resultPath] = process.argv.slice(2);
const job = JSON.parse(fs.readFileSync(jobPath, "utf8"));
const width = job.width || 1600;
const height = job.height || 900;
const result = { frontendVersion: null, startup: { console: [] }, workflows: {}, run: null, error: null };
let sink = result.startup.console;

// Settings for a clean, quiet page: no template dialog, no minimap, no missing-model pop-up
// (the shipped workflows name real model files the test server does not have).
const SETTINGS = {
  "Comfy.TutorialCompleted": true,
  "Comfy.Minimap.Visible": false,
  "Comfy.Workflow.ShowMissingModelsWarning": false,
  "Comfy.Graph.CanvasInfo": false,
  "Comfy.TextareaWidget.FontSize": 14,
  "LiteGraph.Canvas.MinFontSizeForLOD": 0, // draw text at any zoom: the fitted graphs are zoomed out
  "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0,
};

async function fitView(page) {
  // Hide menus (focus mode) and fit every node and group into the canvas.
  await page.evaluate(async () => {
    const { app } = window;
    const canvas = app.canvas;
    const nodes = app.graph.nodes, groups = app.graph.groups || [];
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const item of [...nodes, ...groups]) {
      const r = item.boundingRect;
      const [bx, by, bw, bh] = r && r.length === 4 ? r : [item.pos[0], item.pos[1], item.size[0], item.size[1]];
      x0 = Math.min(x0, bx); y0 = Math.min(y0, by); x1 = Math.max(x1, bx + bw); y1 = Math.max(y1, by + bh);
    }
    if (!Number.isFinite(x0)) return;
    // Full-quality drawing when zoomed out (the settings above, for frontends that lack them).
    if ("low_quality_zoom_threshold" in canvas) canvas.low_quality_zoom_threshold = 0;
    if ("min_font_size_for_lod" in canvas) canvas.min_font_size_for_lod = 0;
    const pad = 24, el = canvas.canvas;
    const w = el.clientWidth || el.width, h = el.clientHeight || el.height;
    const scale = Math.min((w - 2 * pad) / (x1 - x0), (h - 2 * pad) / (y1 - y0), 1.5);
    canvas.ds.scale = scale;
    canvas.ds.offset = [(w / scale - (x1 - x0)) / 2 - x0, (h / scale - (y1 - y0)) / 2 - y0];
    canvas.setDirty(true, true);
  });
  await page.waitForTimeout(700);
}

// Each node as the frontend holds it after loading: its size, the least size it needs
// (computeSize: slots, widgets, the DOM widgets' minimum heights) and, for the pack's DOM widgets
// (expert grid, council map), whether their content fits: the root's scroll height against its
// height, and the grid's block-row table against the height it may take before it scrolls.
const OUR_DOM_WIDGETS = ["instructmole_expert_grid", "council_map"];

async function measureNodes(page) {
  return page.evaluate((ours) => window.app.graph.nodes.map((n) => ({
    id: Number(n.id),
    type: n.type,
    size: Array.from(n.size).map(Number),
    min: typeof n.computeSize === "function" ? Array.from(n.computeSize()).map(Number) : null,
    dom: (n.widgets || [])
      .filter((w) => w && ours.includes(w.name) && w.element instanceof HTMLElement)
      .map((w) => {
        const scroll = w.element.querySelector(".imole-scroll");
        return {
          name: w.name,
          shown: w.element.offsetParent !== null,
          scrollHeight: w.element.scrollHeight,
          clientHeight: w.element.clientHeight,
          table: scroll ? { clientHeight: scroll.clientHeight, scrollHeight: scroll.scrollHeight,
            maxHeight: parseFloat(getComputedStyle(scroll).maxHeight) || null } : null,
        };
      }),
  })), OUR_DOM_WIDGETS);
}

// What a FLUX.1 council (19 double + 38 single layers, 8 experts, top-2) does to each Council
// Preview of the loaded workflow: its map and summary are shown as after a run (the node's own
// onExecuted, with the message the server sends) and the node's size is read back.
async function previewsAfterFluxRun(page) {
  return page.evaluate(() => {
    const layers = [
      ...Array.from({ length: 19 }, (_, i) => `transformer_blocks.${i}.ff.net.2`),
      ...Array.from({ length: 38 }, (_, i) => `single_transformer_blocks.${i}.proj_out`),
    ];
    const names = layers.map((_, i) => (i < 19 ? `double:${i}` : `single:${i - 19}`));
    const weights = layers.map(() => [0.6, 0.4, 0, 0, 0, 0, 0, 0]);
    const data = {
      layers, names, num_experts: 8, top_k: 2, adapter_id: "", label: "a FLUX.1 council", instances: 1, banned: null,
      probs: layers.map(() => [0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]), weights,
      chosen: weights.map((r) => r.map((w) => w !== 0)),
    };
    const text = ["a FLUX.1 council", ...names.map((n) => `  ${n}  0:0.60, 1:0.40`)].join("\n");
    return window.app.graph.nodes.filter((n) => n.type === "InstructMoLE_CouncilPreview").map((n) => {
      n.onExecuted?.({ instructmole_council: [data], text: [text] });
      return { id: Number(n.id), size: Array.from(n.size).map(Number), min: Array.from(n.computeSize()).map(Number) };
    });
  });
}

async function toasts(page) {
  return page.evaluate(() => [...document.querySelectorAll(".p-toast-message")].map((t) => t.innerText.trim()));
}

async function closeToasts(page) {
  await page.evaluate(() => document.querySelectorAll(".p-toast-message .p-toast-close-button, .p-toast-icon-close").forEach((b) => b.click()));
}

const browser = await chromium.launch({
  executablePath: job.chromium || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
});
try {
  await fetch(`${job.url}/api/settings`, { method: "POST", body: JSON.stringify(SETTINGS) });
  const page = await browser.newPage({ viewport: { width, height } });
  page.on("console", (m) => {
    if (m.type() !== "error" && m.type() !== "warning") return;
    const loc = m.location() || {};
    sink.push({ type: m.type(), text: m.text(), url: loc.url || "" });
  });
  page.on("pageerror", (e) => sink.push({ type: "pageerror", text: String(e.message), url: "", stack: String(e.stack || "") }));
  await page.goto(job.url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.LiteGraph?.registered_node_types?.InstructMoLE_CouncilPreview, null, { timeout: 90000 });
  await page.waitForTimeout(1500);
  result.frontendVersion = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ || null);
  try { await page.evaluate(() => window.app.extensionManager?.command?.execute?.("Workspace.ToggleFocusMode")); } catch {}
  await page.addStyleTag({ content: ".graph-canvas-panel .p-buttongroup, .comfy-menu-hamburger { display: none !important; }" });
  await page.waitForTimeout(300);

  for (const { stem, path: file } of job.workflows || []) {
    const entry = { console: [], toasts: [], missing: [], prompt: null, nodes: 0, screenshot: null, error: null };
    result.workflows[stem] = entry;
    sink = entry.console;
    const workflow = JSON.parse(fs.readFileSync(file, "utf8"));
    const loaded = await page.evaluate(async ({ wf, stem }) => {
      const { app } = window;
      try {
        await app.loadGraphData(wf, true, true, stem);
        const registered = window.LiteGraph.registered_node_types;
        const missing = app.graph.nodes.filter((n) => !registered[n.type]).map((n) => n.type);
        const { output } = await app.graphToPrompt();
        return { missing, prompt: output, nodes: app.graph.nodes.length, error: null };
      } catch (err) {
        return { missing: [], prompt: null, nodes: 0, error: String(err?.stack || err) };
      }
    }, { wf: workflow, stem });
    Object.assign(entry, loaded);
    await fitView(page);
    entry.layout = await measureNodes(page);
    entry.toasts = await toasts(page);
    if (job.shotsDir) {
      fs.mkdirSync(job.shotsDir, { recursive: true });
      entry.screenshot = path.join(job.shotsDir, `${stem}.png`);
      await page.screenshot({ path: entry.screenshot });
    }
    entry.previewsAfterRun = await previewsAfterFluxRun(page); // after the picture: it changes the graph
    await closeToasts(page);
  }

  if (job.run) {
    const run = { console: [], toasts: [], queued: null, map: null, overrideMap: null, hover: null, screenshot: null, error: null };
    result.run = run;
    sink = run.console;
    const { prompt, previewId, overrideId, timeoutMs } = job.run;
    // Loaded and queued the way a user's graph is: the frontend converts it and posts it with its
    // own client id, so the server's "executed" messages come back to this page.
    run.queued = await page.evaluate(async (prompt) => {
      const { app } = window;
      try {
        await app.loadApiJson(prompt, "council_map_run");
        await app.queuePrompt(0, 1);
        return true;
      } catch (err) {
        return String(err?.stack || err);
      }
    }, prompt);
    const readMap = (id) => page.evaluate((id) => {
      const node = window.app.graph.getNodeById(Number(id));
      const map = node?.instructmoleCouncilMap;
      if (!map) return null;
      const el = map.element;
      return {
        data: map.data,
        state: el.dataset.state,
        cells: el.querySelectorAll(".imole-cell").length,
        chosen: [...el.querySelectorAll(".imole-cell.chosen")].map((c) => [Number(c.dataset.layer), Number(c.dataset.expert), c.textContent]),
        banned: el.querySelectorAll(".imole-cell.banned").length,
        rows: [...el.querySelectorAll(".imole-row")].map((r) => r.textContent),
        summary: el.querySelector(".imole-summary")?.textContent ?? null,
        summaryWraps: (() => {
          const s = el.querySelector(".imole-summary");
          return s ? getComputedStyle(s).whiteSpace === "pre-wrap" && s.scrollWidth <= s.clientWidth + 1 : null;
        })(),
      };
    }, id);
    try {
      await page.waitForFunction((id) => window.app.graph.getNodeById(Number(id))?.instructmoleCouncilMap?.element?.dataset.state === "ready",
        String(previewId), { timeout: timeoutMs || 120000, polling: 250 });
    } catch (err) {
      run.error = `the council map did not appear: ${err.message}`;
    }
    await fitView(page);
    run.map = await readMap(previewId);
    run.overrideMap = overrideId != null ? await readMap(overrideId) : null;
    run.toasts = await toasts(page);
    // Hover the first chosen cell of the Preview's map: the tip names the layer, expert, p, weight.
    const selector = `.instructmole-council-map[data-node-id="${previewId}"] .imole-cell.chosen`;
    try {
      const cell = page.locator(selector).first();
      await cell.scrollIntoViewIfNeeded({ timeout: 5000 });
      await cell.hover({ timeout: 5000, force: true });
      await page.waitForTimeout(200);
      run.hover = await page.evaluate((previewId) => {
        const el = document.querySelector(`.instructmole-council-map[data-node-id="${previewId}"] .imole-tip`);
        return el ? el.textContent : null;
      }, String(previewId));
    } catch (err) {
      run.hover = null;
      run.error = run.error || `hover failed: ${err.message}`;
    }
    // The expert grid on the Override node, after the run gave it the adapter's layout: a real
    // mouse click, a click through the test hook, and typed rules, each read back both ways.
    if (overrideId != null) {
      const id = Number(overrideId);
      const rules = () => page.evaluate((id) => window.app.graph.getNodeById(id).widgets.find((w) => w.name === "rules").value, id);
      const state = (row, expert) => page.evaluate(([id, row, expert]) => window.InstructMoLEGrid.cellState(id, row, expert), [id, row, expert]);
      const grid = { before: await rules(), layout: null, clicked: null, clickedState: null, second: null, secondState: null, typedState: null, error: null };
      run.grid = grid;
      try {
        grid.layout = await page.evaluate((id) => window.InstructMoLEGrid.layout(id), id);
        await page.locator('[data-instructmole-grid] td[data-row="double"][data-expert="2"]').first().click({ force: true, timeout: 5000 });
        await page.waitForTimeout(200);
        grid.clicked = await rules();
        grid.clickedState = await state("double", 2);
        await page.evaluate((id) => window.InstructMoLEGrid.click(id, "double", 2), id);
        await page.waitForTimeout(200);
        grid.second = await rules();
        grid.secondState = await state("double", 2);
        await page.evaluate((id) => {
          const widget = window.app.graph.getNodeById(id).widgets.find((w) => w.name === "rules");
          const box = widget.inputEl || widget.element;
          box.value = "single ban 3";
          box.dispatchEvent(new Event("input", { bubbles: true }));
        }, id);
        await page.waitForTimeout(300);
        grid.typedState = await state("single", 3);
        grid.typedOther = await state("double", 2);
      } catch (err) {
        grid.error = String(err?.stack || err);
      }
    }
    if (job.shotsDir) {
      run.screenshot = path.join(job.shotsDir, "council_map_run.png");
      await page.screenshot({ path: run.screenshot });
    }
  }
} catch (err) {
  result.error = String(err?.stack || err);
} finally {
  await browser.close();
  fs.writeFileSync(resultPath, JSON.stringify(result, null, 1));
}
