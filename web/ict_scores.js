// Shows the score table of ICTScore / ICTSelectBest / ICTRerank on the node after it runs.
// The node sends ui = {ict_table: [{by, has_hp, rows: [{rank, index, ict, hp, value, picked, prompt, error}], notes}],
//                      text: [report]}.
import { app } from "../../scripts/app.js";

const NODES = ["ICTScore", "ICTSelectBest", "ICTRerank"];
const WIDGET = "ict_scores";

const STYLE = `
.ict-scores { font: 11px monospace; color: var(--input-text, #ddd); overflow: auto; max-height: 100%;
              padding: 2px 4px; box-sizing: border-box; }
.ict-scores table { border-collapse: collapse; width: 100%; }
.ict-scores th, .ict-scores td { padding: 1px 6px; text-align: right; white-space: nowrap; }
.ict-scores th { border-bottom: 1px solid #666; font-weight: normal; opacity: 0.7; }
.ict-scores td.prompt { text-align: left; opacity: 0.7; max-width: 16em; overflow: hidden; text-overflow: ellipsis; }
.ict-scores tr.picked td { color: #8f8; }
.ict-scores .note { color: #fc6; white-space: normal; margin-top: 3px; }
.ict-scores .error { color: #f88; text-align: left; }
`;

function addStyle() {
  if (document.getElementById("ict-scores-style")) return;
  const s = document.createElement("style");
  s.id = "ict-scores-style";
  s.textContent = STYLE;
  document.head.appendChild(s);
}

const fmt = (v) => (v === null || v === undefined ? "–" : Number(v).toFixed(4));

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function renderTable(box, table) {
  box.replaceChildren();
  const prompts = new Set(table.rows.map((r) => r.prompt));
  const t = el("table");
  const head = el("tr");
  const cols = ["rank", "#", "ict"].concat(table.has_hp ? ["hp"] : [], [table.by], prompts.size > 1 ? ["prompt"] : []);
  cols.forEach((c) => head.appendChild(el("th", c)));
  t.appendChild(head);
  for (const r of table.rows) {
    const tr = el("tr", undefined, r.picked ? "picked" : "");
    tr.appendChild(el("td", r.error ? "–" : (r.picked ? "★" : "") + r.rank));
    tr.appendChild(el("td", String(r.index)));
    if (r.error) {
      const td = el("td", "error: " + r.error, "error");
      td.colSpan = cols.length - 2;
      tr.appendChild(td);
    } else {
      tr.appendChild(el("td", fmt(r.ict)));
      if (table.has_hp) tr.appendChild(el("td", fmt(r.hp)));
      tr.appendChild(el("td", fmt(r.value)));
      if (prompts.size > 1) tr.appendChild(el("td", r.prompt, "prompt"));
    }
    t.appendChild(tr);
  }
  box.appendChild(t);
  for (const n of table.notes || []) box.appendChild(el("div", "note: " + n, "note"));
}

function showScores(node, message) {
  const table = message?.ict_table?.[0];
  const report = message?.text?.[0];
  if (!table && !report) return;
  let w = node.widgets?.find((x) => x.name === WIDGET);
  if (typeof node.addDOMWidget === "function") {
    if (!w) {
      addStyle();
      const box = el("div", undefined, "ict-scores");
      w = node.addDOMWidget(WIDGET, "ict_scores", box, { serialize: false, hideOnZoom: false });
      w.box = box;
      w.computeSize = (width) => [width, Math.min(24 + 16 * (w.rows || 1), 260)];
    }
    w.rows = (table?.rows.length || 1) + (table?.notes?.length || 0) + 1;
    if (table) renderTable(w.box, table);
    else w.box.textContent = report;
  } else if (report) {  // older frontends: a read-only text box
    if (!w) {
      w = node.addWidget("text", WIDGET, "", () => {}, { serialize: false });
    }
    w.value = report;
  }
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
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
