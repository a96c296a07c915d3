// Shows the score table of ICT Score / Select Best / Rerank and the Best-of-N Sampler's report on the node.
// The nodes send ui = {text: [report], ict_table: [...]} (nodes/v3.py); the report is the fixed-width table
// the CLI prints (kept images marked *). It goes into a read-only DOM widget (node.addDOMWidget), which the
// classic canvas and the Vue renderer ("Nodes 2.0") both show; the node is sized so every line is visible
// and no line scrolls sideways (long lines wrap). Outputs arrive through the extension hook
// onNodeOutputsUpdated (run, cached run, reopened queue item) and the api's "executed" event (older frontends).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODES = new Set(["ICTScore", "ICTSelectBest", "ICTRerank", "ICTBestOfNSampler"]);
const WIDGET = "ict_scores";
const FONT_PX = 11;
const LINE_PX = 14;
const PAD_PX = 12;          // the box's padding and border, both sides together
const MARGIN_PX = 4;        // between the box and the node's edge (the DOM widget's margin)
const MAX_WIDTH = 560;      // wider reports wrap rather than scroll
const MAX_LINES = 40;       // a longer report scrolls vertically inside its box
const FONT = `${FONT_PX}px ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace`;

let charWidth = 0;
function charPx() {
  if (!charWidth) {
    const ctx = document.createElement("canvas").getContext("2d");
    ctx.font = FONT;
    charWidth = ctx.measureText("0123456789").width / 10 || 7;
  }
  return charWidth;
}

function reportOf(output) {
  const text = output?.text;
  return Array.isArray(text) ? text.filter((t) => t != null).join("\n\n") : text ? String(text) : "";
}

function makeBox() {
  const box = document.createElement("pre");
  box.className = "ict-scores";
  box.setAttribute("data-ict-scores", "");
  Object.assign(box.style, {
    margin: "0", padding: "4px 5px", boxSizing: "border-box", width: "100%", height: "100%",
    overflowX: "hidden", overflowY: "auto", whiteSpace: "pre-wrap", overflowWrap: "anywhere",
    font: FONT, lineHeight: `${LINE_PX}px`, color: "var(--input-text, #ddd)",
    background: "var(--comfy-input-bg, #222)", border: "1px solid var(--border-color, #444)",
    borderRadius: "4px", userSelect: "text", cursor: "text", pointerEvents: "auto",
  });
  return box;
}

function widgetOf(node) {
  let w = node.widgets?.find((x) => x.name === WIDGET);
  if (w) return w;
  const box = makeBox();
  const state = { lines: 1 };
  w = node.addDOMWidget(WIDGET, "ict_scores", box, {
    serialize: false,     // display only: never saved into the workflow's widgets_values
    hideOnZoom: false,
    margin: MARGIN_PX,
    getValue: () => box.textContent,
    setValue: (v) => { box.textContent = v ?? ""; },
    getMinHeight: () => state.lines * LINE_PX + PAD_PX + 2 * MARGIN_PX,
    getMaxHeight: () => state.lines * LINE_PX + PAD_PX + 2 * MARGIN_PX,
  });
  w.serialize = false;
  w.ictState = state;
  return w;
}

// Lines the report takes in a box `width` px wide (wrapped lines count for each row they fill).
function visualLines(text, width) {
  const perLine = Math.max(20, Math.floor((width - PAD_PX) / charPx()));
  return text.split("\n").reduce((n, line) => n + Math.max(1, Math.ceil(line.length / perLine)), 0);
}

function show(node, output) {
  const text = reportOf(output);
  if (!text) return;
  const w = widgetOf(node);
  w.value = text;
  const longest = Math.max(...text.split("\n").map((l) => l.length));
  const margin = 2 * MARGIN_PX;
  const width = Math.min(MAX_WIDTH, Math.ceil(longest * charPx()) + PAD_PX + margin + 2);
  const nodeWidth = Math.max(node.size[0], width);
  w.ictState.lines = Math.min(MAX_LINES, visualLines(text, nodeWidth - margin));
  const size = node.computeSize ? node.computeSize([nodeWidth, node.size[1]]) : node.size;
  node.setSize([nodeWidth, Math.max(size[1], 40)]);
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

// A node by the id ComfyUI reports: "12" in the root graph, "5:12" inside subgraph node 5.
function nodeById(id) {
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    node = graph?.getNodeById?.(Number(part)) ?? graph?.getNodeById?.(part);
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

function update(id, output) {
  const node = nodeById(id);
  if (!node || !NODES.has(node.comfyClass ?? node.type)) return;
  try {
    show(node, output);
  } catch (e) {
    console.error("ict_reward: cannot show the scores", e);
  }
}

app.registerExtension({
  name: "ict_reward.scores",
  onNodeOutputsUpdated(outputs) {
    for (const [id, output] of Object.entries(outputs ?? {})) update(id, output);
  },
  setup() {
    api.addEventListener("executed", ({ detail }) => {
      if (detail?.node != null && detail.output) update(detail.display_node ?? detail.node, detail.output);
    });
  },
});
