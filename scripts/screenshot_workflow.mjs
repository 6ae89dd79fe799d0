// Screenshots a UI-format workflow in the real ComfyUI frontend (headless Chromium), and checks it
// round-trips: loadGraphData without errors, graphToPrompt gives every node. With --build it first
// builds workflows/kontext_instructmole_edit.json with the frontend's own API (so the file is in
// exactly the format the frontend saves). A maintainer's tool: no test or CI needs it.
//
// How to run (from the repo root):
//   npm install --prefix /tmp/shot playwright-core      # any folder; uses the system Chromium
//   # a ComfyUI server with this pack, on loopback, whose folders list the model names the
//   # workflow uses (empty placeholder files are enough: nothing is executed), e.g. with
//   # tests/comfyui/server.py: start_server(comfyui, base, custom_nodes={"instructmole": Path(".")}).
//   # Use a throwaway base directory: the script writes a few UI settings to that server's user.
//   NODE_PATH=/tmp/shot/node_modules node scripts/screenshot_workflow.mjs --url http://127.0.0.1:8188 \
//     --workflow workflows/kontext_instructmole_edit.json --png docs/workflow.png [--build]
// Options: --chromium PATH (default /usr/bin/chromium), --width 1600 --height 900.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const require = createRequire(path.join(process.cwd(), "noop.js"));
const { chromium } = require("playwright-core");

// --name value, or a bare --flag (true).
const args = {};
const argv = process.argv.slice(2);
argv.forEach((a, i) => {
  if (!a.startsWith("--")) return;
  const next = argv[i + 1];
  args[a.slice(2)] = next === undefined || next.startsWith("--") ? true : next;
});
const url = args.url || "http://127.0.0.1:8188";
const workflowPath = args.workflow || "workflows/kontext_instructmole_edit.json";
const pngPath = args.png || "docs/workflow.png";
const width = Number(args.width || 1600);
const height = Number(args.height || 900);

const INSTRUCTION = "Make the sky a stormy purple at dusk, keep everything else unchanged";
const NOTE = [
  "InstructMoLE on FLUX.1 Kontext [dev] - two ways to use it:",
  "",
  "1. Auto (per image): connect the MODEL output of 'Load InstructMoLE Adapter' straight to",
  "   KSampler's model input. Each image is routed from its own conditioning; use",
  "   'InstructMoLE Text Encode' for the prompt so routing is exactly as trained.",
  "",
  "2. Fixed / merged (this graph): 'InstructMoLE Route' picks the council (experts per layer)",
  "   for one instruction, 'Override Council' edits it by rules (e.g. 'single:* force 1,5',",
  "   'double ban 2', 'all scale 1.5'), 'Council Preview' shows it, and 'Apply Council' puts it",
  "   on the model. mode=merged folds it into weight patches (costs exactly the base model,",
  "   stacks with other LoRAs); mode=fixed applies it on the fly.",
  "",
  "Keep the same instruction in the Text Encode and Route nodes.",
].join("\n");

// The graph, API format (ids are the node ids the frontend will use); positions come after.
const API = {
  1: { class_type: "UNETLoader", inputs: { unet_name: "flux1-kontext-dev.safetensors", weight_dtype: "default" } },
  2: { class_type: "DualCLIPLoader", inputs: { clip_name1: "clip_l.safetensors", clip_name2: "t5xxl_fp16.safetensors", type: "flux", device: "default" } },
  3: { class_type: "VAELoader", inputs: { vae_name: "ae.safetensors" } },
  4: { class_type: "LoadImage", inputs: { image: "example.png" } },
  5: { class_type: "InstructMoLE_LoadAdapter", inputs: { model: [1, 0], adapter: "instructmole_kontext.safetensors", lora_strength: 1.0, expert_strength: 1.0 } },
  6: { class_type: "InstructMoLE_TextEncode", inputs: { clip: [2, 0], text: INSTRUCTION }, _meta: { title: "InstructMoLE Text Encode (instruction)" } },
  7: { class_type: "CLIPTextEncode", inputs: { clip: [2, 0], text: "" }, _meta: { title: "CLIP Text Encode (negative, empty)" } },
  8: { class_type: "FluxKontextImageScale", inputs: { image: [4, 0] } },
  9: { class_type: "VAEEncode", inputs: { pixels: [8, 0], vae: [3, 0] } },
  10: { class_type: "ReferenceLatent", inputs: { conditioning: [6, 0], latent: [9, 0] } },
  11: { class_type: "ReferenceLatent", inputs: { conditioning: [7, 0], latent: [9, 0] } },
  12: { class_type: "FluxGuidance", inputs: { conditioning: [10, 0], guidance: 2.5 } },
  13: { class_type: "InstructMoLE_Route", inputs: { adapter: [5, 1], clip: [2, 0], text: INSTRUCTION } },
  14: { class_type: "InstructMoLE_OverrideCouncil", inputs: { council: [13, 0], rules: "all scale 1.0" } },
  15: { class_type: "InstructMoLE_CouncilPreview", inputs: { council: [14, 0] } },
  16: { class_type: "InstructMoLE_ApplyCouncil", inputs: { model: [5, 0], council: [14, 0], mode: "merged" } },
  17: { class_type: "KSampler", inputs: { model: [16, 0], seed: 0, steps: 20, cfg: 1.0, sampler_name: "euler", scheduler: "simple", positive: [12, 0], negative: [11, 0], latent_image: [9, 0], denoise: 1.0 } },
  18: { class_type: "VAEDecode", inputs: { samples: [17, 0], vae: [3, 0] } },
  19: { class_type: "SaveImage", inputs: { images: [18, 0], filename_prefix: "instructmole_edit" } },
};

// Layout: three bands of rows; each band has cells per column, a cell's nodes stacked top down.
// Band A: model + adapter, the council; band B: text, sampling; band C: the image to edit.
// Sampling (columns 3-4) hangs down from band B into band C, which is empty there.
const BANDS = [
  [[1], [5], [13], [14, 16], [15]],
  [[2], [6, 7], [10, 11, 12], [17], [18, 19]],
  [[3, 4], [8, 9]],
];
const BAND_HEIGHT_COLUMNS = [5, 3, 5]; // how many columns (from the left) set each band's height
const SIZES = {
  1: [320, 0], 2: [320, 0], 3: [320, 0], 4: [320, 300], 8: [300, 0], 9: [300, 0], 5: [380, 0], 6: [380, 150], 7: [380, 90],
  10: [300, 0], 11: [300, 0], 12: [300, 0], 13: [360, 150], 14: [340, 110], 15: [380, 330], 16: [340, 0],
  17: [340, 0], 18: [220, 0], 19: [380, 330],
};
const GROUPS = [
  ["Model + InstructMoLE adapter", [1, 5], "#3f789e"],
  ["Council: the fixed / merged way", [13, 14, 16, 15], "#8A8"],
  ["Text", [2, 6, 7, 10, 11, 12], "#b58b2a"],
  ["Sampling", [17, 18, 19], "#a1309b"],
  ["Image to edit", [3, 4, 8, 9], "#88A"],
];

async function build(page) {
  return page.evaluate(({ API, BANDS, BAND_HEIGHT_COLUMNS, SIZES, GROUPS, NOTE }) => {
    const { app } = window;
    const LG = window.LiteGraph;
    app.loadApiJson(API, "kontext_instructmole_edit");
    const graph = app.graph;
    const node = (id) => graph.getNodeById(id);
    const GAP_X = 70, GAP_Y = 45, BAND_GAP = 100, TITLE = LG.NODE_TITLE_HEIGHT || 30;
    for (const [id, [w, h]] of Object.entries(SIZES)) {
      const n = node(Number(id));
      const computed = n.computeSize();
      n.size = [Math.max(w, computed[0]), Math.max(h, computed[1])];
    }
    // Column x: the widest node of each column over all bands.
    const columns = Math.max(...BANDS.map((b) => b.length));
    const colX = [];
    let x = 0;
    for (let c = 0; c < columns; c++) {
      colX.push(x);
      x += Math.max(...BANDS.map((b) => (b[c] || []).map((id) => node(id).size[0])).flat(), 0) + GAP_X;
    }
    let y = TITLE;
    BANDS.forEach((band, b) => {
      let bandHeight = 0;
      band.forEach((ids, c) => {
        let cy = y;
        for (const id of ids) {
          const n = node(id);
          n.pos = [colX[c], cy];
          cy += n.size[1] + TITLE + GAP_Y;
        }
        if (c < BAND_HEIGHT_COLUMNS[b]) bandHeight = Math.max(bandHeight, cy - y - GAP_Y);
      });
      y += bandHeight + BAND_GAP;
    });
    // The note in the free corner: band C, from column 2 to the right edge, under Sampling.
    const note = LG.createNode("Note");
    note.title = "How to use InstructMoLE";
    note.widgets[0].value = NOTE;
    graph.add(note);
    const right = node(19).pos[0] + node(19).size[0];
    const top = Math.max(node(19).pos[1] + node(19).size[1], node(12).pos[1] + node(12).size[1]) + TITLE + BAND_GAP + 10;
    note.pos = [colX[2], top];
    note.size = [right - colX[2], Math.max(node(4).pos[1] + node(4).size[1] - top, 300)];
    // Groups around the nodes of each concern (padding, room for the group title).
    for (const [title, ids, color] of GROUPS) {
      const g = new LG.LGraphGroup(title);
      g.color = color;
      let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      for (const id of ids) {
        const n = node(id);
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - TITLE);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
      }
      g.pos = [x0 - 20, y0 - 55];
      g.size = [x1 - x0 + 40, y1 - y0 + 75];
      graph.add(g);
    }
    graph.setDirtyCanvas(true, true);
    return graph.serialize();
  }, { API, BANDS, BAND_HEIGHT_COLUMNS, SIZES, GROUPS, NOTE });
}

const browser = await chromium.launch({
  executablePath: args.chromium || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
});
const problems = [];
try {
  const page = await browser.newPage({ viewport: { width, height } });
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning" || /instructmole/i.test(m.text())) console.log(`[browser ${m.type()}] ${m.text()}`);
  });
  page.on("pageerror", (e) => console.log(`[browser pageerror] ${e.message}`));
  // Settings for a clean picture: no template dialog, no minimap, no missing-model pop-up.
  const settings = { "Comfy.TutorialCompleted": true, "Comfy.Minimap.Visible": false, "Comfy.Workflow.ShowMissingModelsWarning": false, "Comfy.Graph.CanvasInfo": false, "Comfy.TextareaWidget.FontSize": 16 };
  await fetch(`${url}/api/settings`, { method: "POST", body: JSON.stringify(settings) });
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.InstructMoLE_CouncilPreview, null, { timeout: 90000 });
  await page.waitForTimeout(1500);

  if (args.build) {
    const workflow = await build(page);
    fs.mkdirSync(path.dirname(workflowPath), { recursive: true });
    fs.writeFileSync(workflowPath, JSON.stringify(workflow, null, 2) + "\n");
    console.log(`wrote ${workflowPath}: ${workflow.nodes.length} nodes, ${workflow.links.length} links`);
  }

  // Load the saved file the way a user opens it, and convert it the way Queue does.
  const workflow = JSON.parse(fs.readFileSync(workflowPath, "utf8"));
  const check = await page.evaluate(async (wf) => {
    const errors = [];
    const origError = console.error;
    console.error = (...a) => { errors.push(a.map(String).join(" ")); origError(...a); };
    try {
      await window.app.loadGraphData(wf, true, true, "kontext_instructmole_edit");
      const { output } = await window.app.graphToPrompt();
      return { errors, prompt: output, nodes: window.app.graph.nodes.length };
    } catch (err) {
      return { errors: [...errors, String(err?.stack || err)], prompt: null };
    } finally {
      console.error = origError;
    }
  }, workflow);
  // Invalid workflows are reported in toasts (e.g. the frontend's schema check), not in the console.
  const toasts = await page.evaluate(() => [...document.querySelectorAll(".p-toast-message")].map((t) => t.innerText.trim()));
  if (toasts.length) problems.push(...toasts.map((t) => `toast: ${t}`));
  if (check.errors.length) problems.push(...check.errors.map((e) => `load: ${e}`));
  const real = workflow.nodes.filter((n) => n.type !== "Note" && n.type !== "MarkdownNote");
  const inPrompt = Object.keys(check.prompt || {});
  if (inPrompt.length !== real.length) problems.push(`graphToPrompt gave ${inPrompt.length} nodes, expected ${real.length}`);
  console.log(`loaded ${check.nodes} nodes; graphToPrompt: ${inPrompt.length} nodes`);
  fs.writeFileSync(path.join(process.env.TMPDIR || "/tmp", "kontext_instructmole_edit.api.json"), JSON.stringify(check.prompt, null, 2));

  // Hide the menus and fit the graph to the window, then take the picture.
  await page.evaluate(async () => {
    const { app } = window;
    try { await app.extensionManager?.command?.execute?.("Workspace.ToggleFocusMode"); } catch {}
    await new Promise((r) => setTimeout(r, 300));
    const canvas = app.canvas;
    const nodes = app.graph.nodes, groups = app.graph.groups || [];
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const item of [...nodes, ...groups]) {
      const [bx, by, bw, bh] = item.boundingRect || [item.pos[0], item.pos[1], item.size[0], item.size[1]];
      x0 = Math.min(x0, bx); y0 = Math.min(y0, by); x1 = Math.max(x1, bx + bw); y1 = Math.max(y1, by + bh);
    }
    const pad = 20, el = canvas.canvas;
    const w = el.clientWidth || el.width, h = el.clientHeight || el.height;
    const scale = Math.min((w - 2 * pad) / (x1 - x0), (h - 2 * pad) / (y1 - y0));
    canvas.ds.scale = scale;
    canvas.ds.offset = [(w / scale - (x1 - x0)) / 2 - x0, (h / scale - (y1 - y0)) / 2 - y0];
    canvas.setDirty(true, true);
  });
  if (args.build) {
    // Save with the fitted view (extra.ds) so the file opens showing the whole graph.
    const saved = await page.evaluate(() => {
      const wf = window.app.graph.serialize();
      wf.id = crypto.randomUUID();
      const { scale, offset } = window.app.canvas.ds;
      wf.extra = { ...(wf.extra || {}), ds: { scale: Math.round(scale * 1000) / 1000, offset: offset.map((v) => Math.round(v)) } };
      return wf;
    });
    fs.writeFileSync(workflowPath, JSON.stringify(saved, null, 2) + "\n");
  }
  await page.addStyleTag({ content: ".graph-canvas-panel .p-buttongroup, .comfy-menu-hamburger { display: none !important; }" });
  await page.waitForTimeout(1000);
  fs.mkdirSync(path.dirname(pngPath), { recursive: true });
  await page.screenshot({ path: pngPath });
  console.log(`wrote ${pngPath}`);
} finally {
  await browser.close();
}
if (problems.length) {
  console.log("PROBLEMS:\n" + problems.join("\n"));
  process.exitCode = 1;
}
