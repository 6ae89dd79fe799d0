// InstructMoLE adapter card: what the loader nodes show of the chosen adapter file, as pure logic.
//
// The server (nodes/card_routes.py) answers GET /instructmole/card?name=<adapter> with
//   {name, card, lines, text, preview, preview_version, sha256}
// (card: the card as data or null for a file without one; lines: the few lines a node shows;
// text: the full card as `python -m instructmole info` prints it) and serves the preview PNG at
// /instructmole/preview?name=<adapter>. This module builds those URLs and turns an answer (or a
// failure) into what the node draws; web/adapter_card.js does the DOM. No side effects, no DOM, so
// node --test runs it (tests/web/adapter_card.test.mjs). An .mjs in web/lib/ because ComfyUI loads
// every *.js under WEB_DIRECTORY as an extension.

/** The loader nodes that choose an adapter file with an `adapter` combo. */
export const CARD_NODES = new Set([
  "InstructMoLE_LoadAdapter",
  "InstructMoLE_AdapterFile",
  "InstructMoLE_LoadKontext",
]);
export const ADAPTER_WIDGET = "adapter";
export const CARD_ROUTE = "/instructmole/card";
export const PREVIEW_ROUTE = "/instructmole/preview";
export const MAX_LINES = 12;
export const MAX_LINE = 160;
export const LINE_HEIGHT = 15;
export const PREVIEW_HEIGHT = 160;

/** The card request for adapter `name` (relative: api.fetchApi adds the server's base and /api). */
export function cardUrl(name) {
  return `${CARD_ROUTE}?name=${encodeURIComponent(String(name))}`;
}

/** The preview request; `version` (the file's mtime from the card answer) defeats a stale cache. */
export function previewUrl(name, version = "") {
  const v = version ? `&v=${encodeURIComponent(String(version))}` : "";
  return `${PREVIEW_ROUTE}?name=${encodeURIComponent(String(name))}${v}`;
}

function clip(text) {
  const s = String(text ?? "").replace(/\s+$/u, "");
  return s.length <= MAX_LINE ? s : `${s.slice(0, MAX_LINE - 1)}…`;
}

/** Whether a widget value names a file (a linked input or an empty list gives no name). */
export function adapterName(value) {
  return typeof value === "string" && value.trim() !== "" ? value : null;
}

/**
 * Whether `name` is one of the widget's choices (`values`: the combo's list; a list ComfyUI gives
 * as something else, or none, does not stop the request). A workflow from another machine names
 * files this server does not have: asking for them would only log 404s.
 */
export function isListed(name, values) {
  if (Array.isArray(values)) return values.includes(name);
  return true;
}

/**
 * What to draw for an answer: {state, lines, text, preview, previewVersion}.
 * state: "card" (a card), "none" (an adapter without a card), "error" (refused or unreadable),
 * "empty" (no adapter chosen). `status` is the HTTP status; `payload` the parsed JSON or null.
 * Never throws: anything malformed becomes an "error" view with one line.
 */
export function cardView(status, payload) {
  const ok = status === 200 && payload && typeof payload === "object" && !Array.isArray(payload);
  if (!ok) {
    const reason = payload && typeof payload === "object" && typeof payload.error === "string" ? payload.error : null;
    return {
      state: "error",
      lines: [clip(reason || `no card (the server answered ${status})`)],
      text: reason || "",
      preview: false,
      previewVersion: "",
    };
  }
  const hasCard = payload.card !== null && typeof payload.card === "object";
  let lines = Array.isArray(payload.lines) ? payload.lines.map(clip) : [];
  if (!hasCard) lines = ["no card: this adapter was made before adapter cards, or not by the InstructMoLE trainer"];
  if (lines.length > MAX_LINES) lines = [...lines.slice(0, MAX_LINES - 1), `… ${lines.length - MAX_LINES + 1} more`];
  const sha = typeof payload.sha256 === "string" && /^[0-9a-f]{64}$/u.test(payload.sha256) ? payload.sha256 : null;
  if (sha) lines.push(`sha256 ${sha.slice(0, 16)}…`);
  return {
    state: hasCard ? "card" : "none",
    lines,
    text: typeof payload.text === "string" ? payload.text : "",
    preview: payload.preview === true,
    previewVersion: typeof payload.preview_version === "string" ? payload.preview_version : "",
  };
}

/** The view for no chosen adapter. */
export function emptyView() {
  return { state: "empty", lines: [], text: "", preview: false, previewVersion: "" };
}

/** The widget's height for a view: the preview (when there is one) and the text lines. */
export function preferredHeight(view) {
  if (!view || view.state === "empty") return 0;
  return (view.preview ? PREVIEW_HEIGHT + 6 : 0) + view.lines.length * LINE_HEIGHT + 10;
}

/**
 * Ordering of answers: each request takes a ticket; only the answer to the newest ticket may be
 * drawn (choosing adapters quickly must not leave an older card on the node).
 */
export function createTickets() {
  let last = 0;
  return {
    take() {
      last += 1;
      return last;
    },
    isCurrent(ticket) {
      return ticket === last;
    },
  };
}
