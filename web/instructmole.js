// InstructMoLE frontend extension: the council map (web/lib/council_map.mjs) on "InstructMoLE Council
// Preview" (from the start, filled when the node runs) and on "InstructMoLE Override Council" (after
// it runs: the edited council). Both read the nodes' "instructmole_council" ui output; the Preview
// also shows its summary text (ui "text") under the map, wrapped at the node's edge.
// The map is a DOM widget placed before ComfyUI's image preview, which draws from its widget's top
// to the node's bottom edge. It is never saved in the workflow nor sent to the server.
// Defensive on purpose: any failure here is logged and ignored, never thrown into the frontend.
import { app } from "../../scripts/app.js";
import { councilData, createCouncilMap, preferredHeight, summaryText } from "./lib/council_map.mjs";

const PREVIEW = "InstructMoLE_CouncilPreview";
const OVERRIDE = "InstructMoLE_OverrideCouncil";
const WIDGET_NAME = "council_map";

function addMapWidget(node) {
  if (node.instructmoleCouncilMap) return node.instructmoleCouncilMap;
  if (typeof node.addDOMWidget !== "function") return null;
  const map = createCouncilMap();
  const widget = node.addDOMWidget(WIDGET_NAME, "instructmole_council_map", map.element, {
    serialize: false, // output only: not in widgets_values, not in the prompt
    hideOnZoom: false,
    getMinHeight: () => preferredHeight(map.data, map.hasSummary),
    getHeight: () => preferredHeight(map.data, map.hasSummary),
    getMaxHeight: () => Math.max(preferredHeight(map.data, map.hasSummary), 40),
  });
  if (widget) widget.serialize = false;
  map.widget = widget;
  node.instructmoleCouncilMap = map;
  return map;
}

function makeRoom(node) {
  const min = node.computeSize?.();
  if (!min || !node.size || typeof node.setSize !== "function") return;
  node.setSize([Math.max(node.size[0], 440), Math.max(node.size[1], min[1])]);
}

function show(node, message, withSummary) {
  const data = councilData(message);
  const text = withSummary ? summaryText(message) : null;
  if (!data && text === null) return;
  const map = addMapWidget(node);
  if (!map) return;
  map.hasSummary = Boolean(text);
  map.update(data, text);
  map.element.dataset.nodeId = String(node.id); // the node's id now (it can change while a graph loads)
  makeRoom(node);
  node.setDirtyCanvas?.(true, true);
}

function wrap(nodeType, method, after) {
  const original = nodeType.prototype[method];
  nodeType.prototype[method] = function () {
    const result = original?.apply(this, arguments);
    try {
      after.apply(this, arguments);
    } catch (err) {
      console.warn(`[InstructMoLE] council map (${method}) failed:`, err);
    }
    return result;
  };
}

app.registerExtension({
  name: "instructmole.councilMap",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    try {
      const name = nodeData && nodeData.name;
      if (name === PREVIEW) {
        wrap(nodeType, "onNodeCreated", function () {
          addMapWidget(this);
        });
        wrap(nodeType, "onExecuted", function (message) {
          show(this, message, true);
        });
      } else if (name === OVERRIDE) {
        wrap(nodeType, "onExecuted", function (message) {
          show(this, message, false);
        });
      }
    } catch (err) {
      console.warn("[InstructMoLE] extension setup failed:", err);
    }
  },
});
