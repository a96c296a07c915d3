// Shows the score table of ICTScore / ICTSelectBest / ICTRerank (and the ICTBestOfNSampler report) on the node after it runs.
// The node sends ui = {text: [report], ict_table: [{by, has_hp, rows: [...], notes}]}; the report is the
// same fixed-width table the CLI prints (kept images marked *), shown in a read-only text box.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES = ["ICTScore", "ICTSelectBest", "ICTRerank", "ICTBestOfNSampler"];
const WIDGET = "ict_scores";

function reportOf(message) {
  const report = message?.text?.[0];
  if (report) return report;
  const t = message?.ict_table?.[0];
  if (!t) return null;
  const f = (v) => (v === null || v === undefined ? "-" : Number(v).toFixed(4));
  return t.rows.map((r) => `${r.rank}${r.picked ? "*" : " "} #${r.index} ${f(r.value)}`).join("\n");
}

function showScores(node, message) {
  const text = reportOf(message);
  if (!text) return;
  let w = node.widgets?.find((x) => x.name === WIDGET);
  if (!w) {
    w = ComfyWidgets["STRING"](node, WIDGET, ["STRING", { multiline: true }], app).widget;
    w.serialize = false;  // display only: never saved into the workflow's widgets_values
    if (w.options) w.options.serialize = false;
    if (w.element) {
      w.element.readOnly = true;
      w.element.wrap = "off";  // one table row per line: the line count below is the height
      w.element.style.whiteSpace = "pre";
      w.element.style.overflowX = "auto";
      w.element.style.fontFamily = "monospace";
      w.element.style.fontSize = "11px";
      w.element.style.lineHeight = "14px";
    }
  }
  w.value = text;
  // The table's own height (14 px a row, room for a scrollbar) is its minimum, so the node's computed size
  // counts it next to the node's other widgets (prompt, k, score_by, ...) and the table is never cut off;
  // the node widens to its longest line (up to 480 px, then the box scrolls sideways).
  const rows = text.split("\n");
  const minHeight = 14 * rows.length + 30;
  if (w.options) w.options.getMinHeight = () => minHeight;
  const width = Math.min(480, 7 * Math.max(...rows.map((r) => r.length)) + 40);
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0], width), Math.max(node.size[1], size[1])]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "ict_reward.scores",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.includes(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      try {
        showScores(this, message);
      } catch (e) {
        console.error("ict_reward: cannot show the scores", e);
      }
    };
  },
});
