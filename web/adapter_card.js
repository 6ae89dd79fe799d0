// InstructMoLE adapter card on the loader nodes (Load Adapter, Adapter File, Load Kontext + Adapter):
// when the `adapter` widget changes (or a workflow loads), the node asks the pack's route
// (nodes/card_routes.py) for the file's card and draws its preview PNG and a few lines under the
// widgets: title, base model, step and date, the tasks with an example instruction, the sha256.
// Hovering the lines shows the whole card (as `python -m instructmole info` prints it).
// Only a file that has a card changes the node: the drawing (a DOM widget, never saved in the
// workflow nor sent to the server) is added when the first card arrives, so a workflow whose
// adapters have no card, or are not on this machine, keeps exactly the layout it was saved with;
// names the widget does not list are never asked for (no 404s in the console). The node's inputs
// and outputs are untouched. The logic (URLs, answers, heights, ordering) lives in
// web/lib/adapter_card.mjs. Defensive on purpose: any failure is logged and ignored.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  ADAPTER_WIDGET,
  CARD_NODES,
  PREVIEW_HEIGHT,
  adapterName,
  cardUrl,
  isListed,
  cardView,
  createTickets,
  emptyView,
  preferredHeight,
  previewUrl,
} from "./lib/adapter_card.mjs";

const WIDGET_NAME = "adapter_card";

function createBox() {
  const element = document.createElement("div");
  element.className = "instructmole-adapter-card";
  Object.assign(element.style, {
    display: "flex",
    flexDirection: "column",
    gap: "6px",
    overflow: "hidden",
    font: "11px/15px ui-monospace, SFMono-Regular, Menlo, monospace",
    color: "var(--descrip-text, #aaa)",
  });
  const image = document.createElement("img");
  image.alt = "adapter preview";
  Object.assign(image.style, { display: "none", maxHeight: `${PREVIEW_HEIGHT}px`, objectFit: "contain", width: "100%" });
  image.addEventListener("error", () => {
    image.style.display = "none";
  });
  const text = document.createElement("div");
  Object.assign(text.style, { whiteSpace: "pre", overflow: "hidden", textOverflow: "ellipsis" });
  element.append(image, text);
  return { element, image, text, view: emptyView(), widget: null };
}

/** The node's card drawing, made on first use (the first card that arrives). */
function addBox(node) {
  if (node.instructmoleAdapterCard) return node.instructmoleAdapterCard;
  if (typeof node.addDOMWidget !== "function") return null;
  const box = createBox();
  const height = () => preferredHeight(box.view);
  const widget = node.addDOMWidget(WIDGET_NAME, "instructmole_adapter_card", box.element, {
    serialize: false, // output only: not in widgets_values, not in the prompt
    hideOnZoom: false,
    getMinHeight: height,
    getHeight: height,
    getMaxHeight: () => Math.max(height(), 1),
  });
  if (widget) {
    widget.serialize = false;
    widget.computeSize = (width) => [width, height()];
  }
  box.widget = widget;
  node.instructmoleAdapterCard = box;
  return box;
}

function draw(node, name, view) {
  const box = view.state === "card" ? addBox(node) : node.instructmoleAdapterCard;
  if (!box) return; // nothing to show, and nothing shown before: the node stays as it is
  box.view = view.state === "card" ? view : emptyView();
  box.text.textContent = box.view.lines.join("\n"); // text only: card values come from a file
  box.text.title = box.view.text;
  box.element.dataset.state = view.state;
  box.element.dataset.nodeId = String(node.id);
  if (box.view.preview && name) {
    box.image.src = api.apiURL(previewUrl(name, box.view.previewVersion));
    box.image.style.display = "block";
  } else {
    box.image.removeAttribute("src");
    box.image.style.display = "none";
  }
  const min = node.computeSize?.();
  if (view.state === "card" && min && node.size && typeof node.setSize === "function") {
    node.setSize([Math.max(node.size[0], 320), Math.max(node.size[1], min[1])]);
  }
  node.setDirtyCanvas?.(true, true);
}

async function refresh(node) {
  const widget = node.widgets?.find((w) => w.name === ADAPTER_WIDGET);
  const name = adapterName(widget?.value);
  node.instructmoleCardTickets ??= createTickets();
  const ticket = node.instructmoleCardTickets.take();
  if (!name || !isListed(name, widget?.options?.values)) {
    draw(node, null, emptyView()); // no file, or one this server does not have: nothing to ask
    return;
  }
  let status = 0;
  let payload = null;
  try {
    const response = await api.fetchApi(cardUrl(name), { cache: "no-store" });
    status = response.status;
    payload = await response.json().catch(() => null);
  } catch (err) {
    payload = { error: `the card could not be fetched (${err?.message ?? err})` };
  }
  if (!node.instructmoleCardTickets.isCurrent(ticket)) return; // another adapter was chosen meanwhile
  const view = cardView(status, payload);
  if (view.state === "error") console.warn(`[InstructMoLE] adapter card of '${name}':`, view.lines[0]);
  draw(node, name, view);
}

function safely(what, fn) {
  try {
    const result = fn();
    if (result && typeof result.catch === "function") {
      result.catch((err) => console.warn(`[InstructMoLE] adapter card (${what}) failed:`, err));
    }
  } catch (err) {
    console.warn(`[InstructMoLE] adapter card (${what}) failed:`, err);
  }
}

function watchWidget(node) {
  const widget = node.widgets?.find((w) => w.name === ADAPTER_WIDGET);
  if (!widget || widget.instructmoleCardWatched) return;
  const original = widget.callback;
  widget.callback = function () {
    const result = original?.apply(this, arguments);
    safely("change", () => refresh(node));
    return result;
  };
  widget.instructmoleCardWatched = true;
}

function wrap(nodeType, method, after) {
  const original = nodeType.prototype[method];
  nodeType.prototype[method] = function () {
    const result = original?.apply(this, arguments);
    safely(method, () => after.apply(this, arguments));
    return result;
  };
}

app.registerExtension({
  name: "instructmole.adapterCard",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    try {
      if (!CARD_NODES.has(nodeData?.name)) return;
      wrap(nodeType, "onNodeCreated", function () {
        watchWidget(this);
        return refresh(this);
      });
      wrap(nodeType, "onConfigure", function () {
        watchWidget(this);
        return refresh(this); // a loaded workflow sets the value without calling the callback
      });
    } catch (err) {
      console.warn("[InstructMoLE] adapter card setup failed:", err);
    }
  },
});
