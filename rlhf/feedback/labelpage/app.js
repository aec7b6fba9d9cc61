// The labelling page: one prompt at a time, its responses ranked best to worst by keyboard or mouse.
// Everything the model wrote is shown with textContent: it is never parsed as HTML, so it can run nothing.
"use strict";

const token = new URLSearchParams(location.search).get("token") || "";
let item = null;       // {index, sha, prompt: [{role, content}], responses: [text or episode messages]}
let groups = [];       // places so far, best first: each a list of response indices (a tie holds several)
let tieNext = false;   // "=" was pressed: the next response joins the last place
let busy = false;      // a save is on its way: no second answer until the server confirms

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(path, body) {
  const options = { headers: { "X-Label-Token": token } };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
  return data;
}

function placeOf(i) {
  return groups.findIndex((g) => g.includes(i));
}

function unplaced() {
  return item.responses.map((_, i) => i).filter((i) => placeOf(i) < 0);
}

function showStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.className = kind || "";
}

function showProgress(state) {
  // with --overlap N a prompt is done when N annotators have answered it
  const done = state.overlap
    ? `${state.complete} / ${state.total} with ${state.overlap} answer${state.overlap > 1 ? "s" : ""}`
    : `${state.answered_all} / ${state.total} answered`;
  $("progress").textContent = `${done} · ${state.annotator}: ${state.answered} · ${state.left} left for you`;
}

// A response: its text, or an episode (rlhf sample --env), each step on a line of its own: the assistant's words,
// its tool calls as name(arguments), each tool's result, and the final answer last.
function responseView(response) {
  if (typeof response === "string") return el("div", "text", response);
  const box = el("div", "episode");
  for (const m of response) {
    if (m.role === "tool") {
      box.append(el("div", "step result", `\u2190 ${m.name || "tool"} returned: ${m.content}`));
      continue;
    }
    if (m.content) box.append(el("div", "step text", m.content));
    for (const call of m.tool_calls || []) {
      const f = call.function || call;
      const args = Object.entries(f.arguments || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ");
      box.append(el("div", "step call", `\u2192 calls ${f.name}(${args})`));
    }
  }
  return box;
}

function render() {
  const conversation = $("conversation");
  const responses = $("responses");
  conversation.replaceChildren();
  responses.replaceChildren();
  if (!item) {
    conversation.append(el("p", "done", "Every prompt is answered. Thank you!"));
    for (const id of ["undo", "submit", "skip", "unacceptable"]) $(id).disabled = true;
    return;
  }
  for (const turn of item.prompt) {
    const box = el("div", "turn " + turn.role);
    box.append(el("div", "role", turn.role), el("div", "text", turn.content));
    conversation.append(box);
  }
  item.responses.forEach((text, i) => {
    const card = el("div", "response");
    card.dataset.index = String(i);
    const p = placeOf(i);
    if (p >= 0) card.classList.add("placed");
    const tie = p >= 0 && groups[p].length > 1 ? " (tie)" : "";
    const place = el("div", "place", p >= 0 ? `#${p + 1}${tie}` : "");
    place.dataset.role = "place";
    const next = el("button", "", "Next place");
    next.type = "button";
    next.disabled = p >= 0;
    next.addEventListener("click", () => choose(i, false));
    const tieButton = el("button", "", "Tie with previous");
    tieButton.type = "button";
    tieButton.disabled = p >= 0 || groups.length === 0;
    tieButton.addEventListener("click", () => choose(i, true));
    const body = el("div", "body");
    body.append(responseView(text));
    if (item.suggestion) {  // label serve --suggest: a scorer's view, shown beside the response, never applied
      const score = item.suggestion.scores[i];
      const placeShown = item.suggestion.ranking[i];
      body.append(el("div", "suggestion", score === null ? `${item.suggestion.by}: does not apply`
        : `${item.suggestion.by} suggests #${placeShown + 1} (score ${Number(score).toFixed(3)})`));
    }
    const buttons = el("div");
    buttons.append(next, tieButton);
    card.append(el("div", "key", String(i + 1)), place, body, buttons);
    responses.append(card);
  });
  $("submit").disabled = busy || unplaced().length > 0;
  $("undo").disabled = busy || groups.length === 0;
  $("skip").disabled = busy;
  $("unacceptable").disabled = busy;
}

function choose(i, tie) {
  if (!item || busy || placeOf(i) >= 0) return;
  if (tie && groups.length > 0) groups[groups.length - 1].push(i);
  else groups.push([i]);
  tieNext = false;
  const left = unplaced();
  if (left.length === 1) groups.push(left);  // the last one left is the worst: no key needed (Backspace, = ties it)
  showStatus(unplaced().length ? "" : "Ranked: Enter saves, Backspace undoes.");
  render();
}

function undo() {
  if (busy || groups.length === 0) return;
  const last = groups[groups.length - 1];
  last.pop();
  if (last.length === 0) groups.pop();
  showStatus("");
  render();
}

async function answer(status) {
  if (!item || busy) return;
  const body = { item: item.index, item_sha: item.sha, status };
  if (status === "ranked") {
    if (unplaced().length) return showStatus("Place every response first.", "error");
    body.ranking = item.responses.map((_, i) => placeOf(i));
  }
  busy = true;
  render();
  showStatus("Saving…");
  try {
    const state = await api("api/answer", body);
    showStatus(`Saved (${status}).`, "saved");
    load(state);
  } catch (error) {
    showStatus("Not saved: " + error.message, "error");
  } finally {
    busy = false;
    render();
  }
}

function load(state) {
  item = state.item;
  groups = [];
  tieNext = false;
  showProgress(state);
  render();
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || !item) return;
  const n = Number.parseInt(event.key, 10);
  if (!Number.isNaN(n) && n >= 1 && n <= item.responses.length) {
    choose(n - 1, tieNext);
  } else if (event.key === "=") {
    tieNext = groups.length > 0;
    showStatus(tieNext ? "Tie: press the number of the response that shares the last place." : "");
  } else if (event.key === "Backspace" || event.key === "u") {
    undo();
  } else if (event.key === "Enter") {
    answer("ranked");
  } else if (event.key === "s") {
    answer("skipped");
  } else if (event.key === "x") {
    answer("unacceptable");
  } else {
    return;
  }
  event.preventDefault();
});

$("undo").addEventListener("click", undo);
$("submit").addEventListener("click", () => answer("ranked"));
$("skip").addEventListener("click", () => answer("skipped"));
$("unacceptable").addEventListener("click", () => answer("unacceptable"));

api("api/next").then(load).catch((error) => showStatus("Cannot load: " + error.message, "error"));
