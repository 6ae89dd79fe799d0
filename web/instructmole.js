// InstructMoLE frontend extension: after "InstructMoLE Council Preview" runs, show the council
// summary it returns (ui.text, a list of one string) in a read-only text box. The box sits above
// the heat map: ComfyUI draws an output image from its widget's top to the node's bottom edge, so
// any widget placed after it would be drawn over the image.
// Defensive on purpose: any failure here is logged and ignored, never thrown into the frontend.
import { app } from "../../scripts/app.js";

const NODE_TYPE = "InstructMoLE_CouncilPreview";
const WIDGET_NAME = "council_summary";

function summaryText(message) {
  const text = message && message.text;
  if (Array.isArray(text)) return text.map((t) => String(t ?? "")).join("\n");
  return typeof text === "string" ? text : null;
}

function findWidget(node) {
  return (node.widgets || []).find((w) => w && w.name === WIDGET_NAME) || null;
}

function addSummaryWidget(node) {
  // The same multiline STRING widget ComfyUI uses for prompts, made read-only.
  const make = app.widgets && app.widgets.STRING;
  if (typeof make !== "function") return null;
  const widget = make(node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
  if (!widget) return null;
  const el = widget.inputEl || widget.element;
  if (el) {
    el.readOnly = true;
    el.wrap = "off"; // one layer per line, scroll sideways
    el.placeholder = "council summary (after the node runs)";
    el.style.opacity = "0.85";
  }
  // Between 5 and 12 lines of text; the heat map below takes the rest of the node.
  if (widget.options) {
    widget.options.getMinHeight = () => 90;
    widget.options.getMaxHeight = () => 200;
  }
  // Output only: never saved in the workflow (serialize) nor sent to the server (options.serialize).
  widget.serialize = false;
  if (widget.options) widget.options.serialize = false;
  return widget;
}

// Make room once, when the box first appears: the text plus ComfyUI's image preview (220 high at least).
function makeRoom(node) {
  const min = node.computeSize?.();
  if (!min || !node.size || typeof node.setSize !== "function") return;
  node.setSize([Math.max(node.size[0], 420), Math.max(node.size[1], min[1] + 240)]);
}

function showSummary(node, text) {
  let widget = findWidget(node);
  if (!widget) {
    widget = addSummaryWidget(node);
    if (!widget) return;
    makeRoom(node);
  }
  widget.value = text;
  const el = widget.inputEl || widget.element;
  if (el && "value" in el) el.value = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "instructmole.councilPreview",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    try {
      if (!nodeData || nodeData.name !== NODE_TYPE) return;
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const result = onExecuted?.apply(this, arguments);
        try {
          const text = summaryText(message);
          if (text !== null) showSummary(this, text);
        } catch (err) {
          console.warn("[InstructMoLE] could not show the council summary:", err);
        }
        return result;
      };
    } catch (err) {
      console.warn("[InstructMoLE] extension setup failed:", err);
    }
  },
});
