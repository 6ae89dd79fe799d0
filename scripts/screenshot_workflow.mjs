// Screenshots UI-format workflows in the real ComfyUI frontend (headless Chromium), for the README.
// A maintainer's tool over tests/comfyui/browser_driver.mjs (the same loading, checks and picture as
// the browser tests): each file is opened with app.loadGraphData, converted with app.graphToPrompt,
// fitted to the view and saved as <out>/<stem>.png. Problems (a node type the frontend lacks, a
// failed load, console errors that mention InstructMoLE) are printed and make the exit status 1.
//
// The usual way to refresh docs/workflows/*.png is the browser test itself, which starts its own
// server: INSTRUCTMOLE_UPDATE_SCREENSHOTS=1 COMFYUI_PATH=... pytest tests/comfyui/test_browser.py
//
// This script instead uses a ComfyUI server you started with this pack (throwaway base directory:
// it writes a few UI settings to that server's user):
//   npm install --prefix /tmp/shot playwright-core        # any folder; uses the system Chromium
//   NODE_PATH=/tmp/shot/node_modules node scripts/screenshot_workflow.mjs --url http://127.0.0.1:8188 \
//     [--out docs/workflows] [workflows/2_creative_control.json ...]   # default: every workflows/*.json
// Options: --chromium PATH (default /usr/bin/chromium), --width 1600 --height 900.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const DRIVER = path.join(ROOT, "tests", "comfyui", "browser_driver.mjs");

const args = { files: [] };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i].startsWith("--")) args[argv[i].slice(2)] = argv[++i];
  else args.files.push(argv[i]);
}
const files = args.files.length
  ? args.files
  : fs.readdirSync(path.join(ROOT, "workflows")).filter((f) => f.endsWith(".json")).sort().map((f) => path.join(ROOT, "workflows", f));
const out = path.resolve(args.out || path.join(ROOT, "docs", "workflows"));

const work = fs.mkdtempSync(path.join(os.tmpdir(), "instructmole-shot-"));
const job = {
  url: (args.url || "http://127.0.0.1:8188").replace(/\/$/, ""),
  chromium: args.chromium || "/usr/bin/chromium",
  width: Number(args.width || 1600),
  height: Number(args.height || 900),
  shotsDir: out,
  workflows: files.map((f) => ({ stem: path.basename(f, ".json"), path: path.resolve(f) })),
  run: null,
};
fs.writeFileSync(path.join(work, "job.json"), JSON.stringify(job));
const done = spawnSync(process.execPath, [DRIVER, path.join(work, "job.json"), path.join(work, "result.json")], { stdio: "inherit" });
if (!fs.existsSync(path.join(work, "result.json"))) {
  console.error(`the driver wrote no result (exit ${done.status})`);
  process.exit(1);
}
const result = JSON.parse(fs.readFileSync(path.join(work, "result.json"), "utf8"));
const problems = result.error ? [result.error] : [];
console.log(`frontend ${result.frontendVersion ?? "(version unknown)"}`);
for (const [stem, entry] of Object.entries(result.workflows)) {
  if (entry.error) problems.push(`${stem}: ${entry.error}`);
  if (entry.missing.length) problems.push(`${stem}: node types the frontend lacks: ${entry.missing.join(", ")}`);
  for (const m of entry.console) if (/instructmole/i.test(JSON.stringify(m))) problems.push(`${stem}: [${m.type}] ${m.text}`);
  console.log(`${stem}: ${entry.nodes} nodes, graphToPrompt ${Object.keys(entry.prompt || {}).length} nodes -> ${entry.screenshot}`);
}
if (problems.length) {
  console.log("PROBLEMS:\n" + problems.join("\n"));
  process.exitCode = 1;
}
