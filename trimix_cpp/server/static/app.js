// The chat page: talks to this server's own OpenAI-compatible API, streams replies, keeps conversations
// in this browser (localStorage), and shows how each reply was fused: the weights, the perplexity grid
// the weights were chosen from, each model's own perplexity and the sampling settings with the seed.
//
// Rules this file keeps:
// - text is only ever set with textContent (never parsed as HTML), and every message carries dir="auto"
//   so right-to-left scripts such as Uyghur read right to left;
// - what is sent is exactly what is shown: a stopped reply is kept as shown and marked, a failed one
//   is not kept (its error is shown instead, with a Retry);
// - nothing is loaded from anywhere but this server (the page's Content-Security-Policy says so too).
"use strict";

const $ = (id) => document.getElementById(id);
const KEYS = {
  settings: "trimix.settings",
  conversations: "trimix.conversations",
  current: "trimix.current",
  apiKey: "trimix.apiKey",
};
const FIELDS = ["mode", "method", "select", "alpha", "beta", "gamma", "role", "temperature", "max_tokens",
  "top_p", "top_k", "min_p", "seed", "stop"];
const METHOD_NAMES = {
  trimix: "TriMix: a·large-ins + b·small-cpt + (1−a−b)·small-base",
  trimix4: "TriMix with a large base model (Eq. 1)",
  proxy: "proxy tuning: large-ins + b·(small-cpt − small-base)",
  contrastive: "contrastive decoding (the small models)",
  single: "one model alone",
};
const SELECT_NAMES = { ppl: "lowest perplexity", ent: "lowest entropy", fixed: "fixed weights" };
// The compare action: the same turn answered by the large model alone, by proxy tuning and by TriMix.
const COMPARE = [
  { label: "large-ins alone", trimix: { method: "single", role: "large_ins" }, needs: "single" },
  { label: "proxy tuning", trimix: { method: "proxy" }, needs: "proxy" },
  { label: "TriMix", trimix: { method: "trimix" }, needs: "trimix" },
];
// Fonts to install per script, named as each system ships them (checked: Debian's fonts-noto-core
// holds "Noto Serif Tibetan", "Noto Sans Mongolian", "Noto Naskh Arabic" and "Noto Sans Arabic").
const SCRIPTS = [
  {
    name: "Tibetan",
    test: /[\u0F00-\u0FFF]/u,
    fonts: "Debian or Ubuntu: the fonts-noto-core package (font “Noto Serif Tibetan”); Windows: “Microsoft " +
      "Himalaya” (part of Windows); macOS: “Kailasa” (part of macOS)",
  },
  {
    name: "Mongolian",
    test: /[\u1800-\u18AF]/u,
    fonts: "Debian or Ubuntu: the fonts-noto-core package (font “Noto Sans Mongolian”); Windows: “Mongolian " +
      "Baiti” (part of Windows); macOS: install “Noto Sans Mongolian”",
  },
  {
    name: "Arabic-script (Uyghur)",
    test: /[\u0600-\u06FF\u0750-\u077F\uFB50-\uFDFF\uFE70-\uFEFF]/u,
    fonts: "Debian or Ubuntu: the fonts-noto-core package (fonts “Noto Naskh Arabic”, “Noto Sans Arabic”); " +
      "Windows: “Microsoft Uighur” (part of Windows); macOS: “Geeza Pro” (part of macOS)",
  },
  {
    name: "Cyrillic (Kazakh)",
    test: /[\u0400-\u04FF]/u,
    fonts: "Debian or Ubuntu: the fonts-dejavu-core or fonts-noto-core package",
  },
];

const state = {
  card: null, // the server's /v1/models card: name, model files, methods, defaults
  conversations: {}, // id -> {id, title, mode, created, updated, turns: [...]}
  current: null, // the shown conversation's id, or null for a new, empty one
  live: null, // the reply being streamed: {controller, conv, turn}
  comparing: 0,
  offline: false,
  pollTimer: null,
};

// -- storage ---------------------------------------------------------------------------------------

function readJSON(key, fallback) {
  try {
    const v = JSON.parse(localStorage.getItem(key));
    return v === null || v === undefined ? fallback : v;
  } catch (e) {
    return fallback;
  }
}

function writeJSON(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch (e) {
    showNotice("This browser refused to save the conversation (its storage is full, or it is in private " +
      "mode). It stays on screen until the page is reloaded; export it to keep it.");
    return false;
  }
}

function saveConversations() {
  const out = {};
  for (const [id, c] of Object.entries(state.conversations)) {
    const turns = c.turns.filter((t) => !t.live); // a reply still streaming is saved when it ends
    if (turns.length) out[id] = Object.assign({}, c, { turns });
  }
  writeJSON(KEYS.conversations, out);
  writeJSON(KEYS.current, state.current);
}

function loadSettings() {
  const saved = readJSON(KEYS.settings, {});
  for (const name of FIELDS) if (typeof saved[name] === "string") $(name).value = saved[name];
  $("api_key").value = readJSON(KEYS.apiKey, "") || "";
}

function saveSettings() {
  const out = {};
  for (const name of FIELDS) out[name] = $(name).value;
  writeJSON(KEYS.settings, out);
}

function apiKey() {
  return $("api_key").value.trim();
}

function setApiKey(key) {
  $("api_key").value = key;
  writeJSON(KEYS.apiKey, key);
}

// -- the server's card: what it loaded and its defaults ---------------------------------------------

function defaults() {
  return (state.card && state.card.trimix && state.card.trimix.defaults) || {};
}

function methodsLoaded() {
  return (state.card && state.card.trimix && state.card.trimix.methods) || [];
}

function rolesLoaded() {
  return state.card && state.card.trimix ? Object.keys(state.card.trimix.models) : [];
}

function chatAvailable() {
  return !(state.card && state.card.trimix && state.card.trimix.chat === false);
}

function defaultMode() {
  const page = defaults().page;
  if (page === "complete" || !chatAvailable()) return "complete";
  return page || "chat";
}

function chosenMode() {
  const m = $("mode").value;
  if (m === "chat" && !chatAvailable()) return "complete";
  return m || defaultMode();
}

function describeDefault(d) {
  if (!d.method) return "server default";
  let s = d.method;
  if (d.select && d.select !== "fixed") s += `, weights by ${SELECT_NAMES[d.select] || d.select}`;
  else if (d.alpha !== undefined || d.beta !== undefined) {
    s += ["alpha", "beta", "gamma"].filter((k) => d[k] !== undefined).map((k) => ` ${k} ${fmt(d[k])}`).join("");
  }
  return `server default (${s})`;
}

// Offer only the methods and roles the server loaded; say what "server default" means.
function applyCard() {
  const d = defaults();
  const method = $("method");
  const kept = method.value;
  method.replaceChildren(option("", describeDefault(d)));
  for (const m of methodsLoaded()) method.appendChild(option(m, METHOD_NAMES[m] || m));
  method.value = [...method.options].some((o) => o.value === kept) ? kept : "";
  const role = $("role");
  const keptRole = role.value;
  role.replaceChildren(...rolesLoaded().map((r) => option(r, r.replace("_", "-"))));
  if ([...role.options].some((o) => o.value === keptRole)) role.value = keptRole;
  const mode = $("mode");
  mode.options[0].textContent = `server default (${defaultMode() === "chat" ? "chat" : "continue text"})`;
  mode.querySelector("option[value='chat']").disabled = !chatAvailable();
  $("temperature").placeholder = `server default: ${fmt(d.temperature || 0)}${d.temperature ? "" : " (greedy)"}`;
  syncVisibility();
  renderModelInfo();
  render();
}

function option(value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  return o;
}

function renderModelInfo() {
  const box = $("model-info");
  box.replaceChildren();
  if (!state.card) return;
  const t = state.card.trimix || {};
  const dl = document.createElement("dl");
  const row = (k, v) => dl.append(el("dt", "", k), el("dd", "", v));
  row("model", state.card.id);
  for (const [r, f] of Object.entries(t.models || {})) row(r.replace("_", "-"), f);
  if (t.n_ctx) row("context", `${t.n_ctx} tokens per request`);
  if (t.parallel) row("parallel", `${t.parallel} requests decode together`);
  if (t.methods) row("methods", t.methods.join(", "));
  row("defaults", describeDefault(defaults()).replace(/^server default \((.*)\)$/, "$1") +
    `; temperature ${fmt(defaults().temperature || 0)}; page starts in ${defaultMode() === "chat" ? "chat" : "text continuation"} mode`);
  if (t.chat === false) row("chat", "off: the models have no chat template (text continuation only)");
  box.appendChild(dl);
}

// -- settings ----------------------------------------------------------------------------------------

function effectiveMethod() {
  return $("method").value || defaults().method || "trimix";
}

function effectiveTemperature() {
  const t = number("temperature");
  return t === undefined ? defaults().temperature || 0 : t;
}

// Show only the inputs the chosen method uses (the server refuses settings a method would ignore).
function syncVisibility() {
  const method = effectiveMethod();
  const select = $("select").value;
  const trimixLike = method === "trimix";
  const explicit = $("method").value !== "";
  const show = (cls, on) => document.querySelectorAll(cls).forEach((e) => e.classList.toggle("hidden", !on));
  show(".for-trimix", trimixLike);
  show(".for-alpha", (trimixLike && select === "fixed") || method === "trimix4");
  show(".for-beta", (trimixLike && select === "fixed") || ["trimix4", "proxy", "contrastive"].includes(method));
  show(".for-gamma", method === "trimix4");
  show(".for-role", method === "single" && explicit);
  show(".for-sampling", effectiveTemperature() > 0);
}

function number(id) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const v = Number(raw);
  return Number.isFinite(v) ? v : undefined;
}

function visible(id) {
  const label = $(id).closest("label");
  return !label.closest(".hidden") && !label.classList.contains("hidden");
}

function unescapeStop(s) {
  return s.replace(/\\(n|t|r|\\)/g, (_, c) => ({ n: "\n", t: "\t", r: "\r", "\\": "\\" })[c]);
}

// The request's settings: only what the user set, so the server's defaults decide the rest.
function settingsBody() {
  const body = {};
  const trimix = {};
  const method = $("method").value;
  if (method) trimix.method = method;
  if (visible("select") && $("select").value) trimix.select = $("select").value;
  for (const w of ["alpha", "beta", "gamma"]) {
    if (visible(w) && number(w) !== undefined) trimix[w] = number(w);
  }
  if (visible("role") && $("role").value) trimix.role = $("role").value;
  if (Object.keys(trimix).length) body.trimix = trimix;
  const t = number("temperature");
  if (t !== undefined) body.temperature = t;
  if (effectiveTemperature() > 0) {
    for (const k of ["top_p", "min_p"]) if (number(k) !== undefined) body[k] = number(k);
    for (const k of ["top_k", "seed"]) if (number(k) !== undefined) body[k] = Math.trunc(number(k));
  }
  const n = number("max_tokens");
  if (n !== undefined) body.max_tokens = Math.trunc(n);
  const stop = $("stop").value;
  if (stop !== "") body.stop = [unescapeStop(stop)];
  return body;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// -- small DOM helpers -------------------------------------------------------------------------------

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function button(text, onClick, label) {
  const b = el("button", "", text);
  b.type = "button";
  if (label) b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function fmt(x) {
  if (typeof x !== "number") return String(x);
  const r = Number.isInteger(x) ? x : Math.abs(x) >= 100 ? Math.round(x * 10) / 10 : Math.round(x * 1000) / 1000;
  return String(r).replace("-", "−");
}

function sig(x) {
  return x >= 1000 ? String(Math.round(x)) : x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
}

// -- conversations -------------------------------------------------------------------------------------

function current() {
  return state.current ? state.conversations[state.current] : null;
}

function newConversation(mode) {
  const id = Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  const c = { id, title: "", mode, created: Date.now(), updated: Date.now(), turns: [] };
  state.conversations[id] = c;
  state.current = id;
  return c;
}

function titleOf(c) {
  if (c.title) return c.title;
  const first = c.turns.find((t) => t.role === "user");
  if (!first) return "New conversation";
  const line = first.content.trim().split("\n")[0];
  return line.length > 48 ? line.slice(0, 47) + "…" : line || "New conversation";
}

function openConversation(id) {
  state.current = id;
  const c = current();
  if (c) {
    $("mode").value = c.mode; // the mode select shows the open conversation's mode
    saveSettings();
  }
  writeJSON(KEYS.current, state.current);
  render();
  if (window.matchMedia("(max-width: 999px)").matches) togglePanel("chats", false);
}

function renderList() {
  const list = $("chat-list");
  list.replaceChildren();
  const all = Object.values(state.conversations)
    .filter((c) => c.turns.length)
    .sort((a, b) => b.updated - a.updated);
  if (!all.length) list.appendChild(el("li", "empty", "No saved conversations yet."));
  for (const c of all) {
    const li = el("li", c.id === state.current ? "current" : "");
    li.dataset.id = c.id;
    const open = button(titleOf(c), () => openConversation(c.id));
    open.className = "open";
    open.dir = "auto";
    if (c.id === state.current) open.setAttribute("aria-current", "true");
    const rename = button("", () => startRename(li, c), `Rename “${titleOf(c)}”`);
    rename.className = "icon";
    rename.appendChild(icon("M4 20h4L19 9l-4-4L4 16z"));
    const del = button("", () => confirmDelete(del, c), `Delete “${titleOf(c)}”`);
    del.className = "icon";
    del.appendChild(icon("M5 7h14M10 7V4h4v3M7 7l1 13h8l1-13"));
    li.append(open, rename, del);
    list.appendChild(li);
  }
  const none = !current() || !current().turns.length;
  $("export-json").disabled = none;
  $("export-md").disabled = none;
}

// An icon: a copy of the header's menu icon (an SVG element the HTML parser made) with another path.
function icon(d) {
  const svg = document.querySelector("#chats-toggle svg").cloneNode(true);
  svg.querySelector("path").setAttribute("d", d);
  return svg;
}

function startRename(li, c) {
  const input = el("input", "rename-input");
  input.value = titleOf(c);
  input.dir = "auto";
  input.setAttribute("aria-label", "New name of the conversation");
  const done = (keep) => {
    if (keep && input.value.trim()) {
      c.title = input.value.trim().slice(0, 120);
      saveConversations();
    }
    renderList();
  };
  const save = button("Save", () => done(true));
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") { ev.preventDefault(); done(true); }
    if (ev.key === "Escape") done(false);
  });
  li.replaceChildren(input, save);
  input.focus();
  input.select();
}

function confirmDelete(btn, c) {
  if (btn.dataset.armed !== "true") {
    btn.dataset.armed = "true";
    btn.replaceChildren(document.createTextNode("Delete?"));
    btn.classList.remove("icon");
    btn.setAttribute("aria-label", `Delete? Press again to delete “${titleOf(c)}”`);
    setTimeout(() => { if (btn.isConnected) renderList(); }, 4000);
    return;
  }
  if (state.live && state.live.conv === c) state.live.controller.abort();
  delete state.conversations[c.id];
  if (state.current === c.id) state.current = null;
  saveConversations();
  render();
}

// -- rendering the conversation ------------------------------------------------------------------------

function render() {
  const log = $("log");
  log.replaceChildren();
  const c = current();
  if (!c || !c.turns.length) {
    const mode = c ? c.mode : chosenMode();
    log.appendChild(el("p", "hint", mode === "chat"
      ? "Write in Tibetan, Uyghur, Kazakh, Mongolian or any other language. The reply streams in as the fused " +
        "models write it; under it, the weights that produced it and how they were chosen."
      : "Text continuation: write the start of a text and the fused models continue it. Each text is " +
        "continued on its own; under each continuation, the weights that produced it and how they were chosen."));
  } else {
    c.turns.forEach((t, i) => log.appendChild(turnElement(c, t, i)));
  }
  renderList();
  scheduleFontCheck();
}

function isLastReply(c, i) {
  return i === c.turns.length - 1 && c.turns[i].role === "assistant";
}

function turnElement(c, t, i) {
  const box = el("article", "msg " + t.role);
  box.dir = "auto";
  box.dataset.index = String(i);
  const who = t.role === "user" ? (c.mode === "chat" ? "You" : "Your text") : "Reply";
  box.setAttribute("aria-label", who);
  const body = el("div", "body", t.content);
  body.dir = "auto";
  box.appendChild(body);
  if (t.role === "assistant") {
    box.dataset.chunks = String(t.chunks || 0);
    if (t.live) {
      box.classList.add("live");
      if (!t.content) box.classList.add("waiting");
    } else {
      box.dataset.done = "true";
    }
    if (t.stopped) box.classList.add("stopped");
    const meta = describe(t);
    if (meta) box.appendChild(el("div", "meta", meta));
  }
  const panel = t.role === "assistant" && t.info && !t.live ? detailsElement(c, t, i) : null;
  box.appendChild(turnActions(c, t, i, box, panel));
  if (panel) {
    panel.hidden = true;
    box.appendChild(panel);
  }
  if (t.compare) box.appendChild(compareElement(c, t, i));
  return box;
}

function turnActions(c, t, i, box, panel) {
  const bar = el("div", "actions");
  if (t.live) {
    bar.appendChild(button("Stop", () => state.live && state.live.controller.abort(), "Stop this reply"));
    return bar;
  }
  const busy = Boolean(state.live);
  bar.appendChild(button("Copy", (ev) => copyText(ev.currentTarget, t.content)));
  if (t.role === "user") {
    const edit = button("Edit", () => startEdit(box, c, i), "Edit and send again");
    edit.disabled = busy;
    bar.appendChild(edit);
  } else {
    if (isLastReply(c, i)) {
      const again = button("Regenerate", () => regenerate(c), "Regenerate this reply");
      again.disabled = busy;
      again.classList.add("regenerate");
      bar.appendChild(again);
    }
    if (panel) {
      const toggle = button("Details", () => {
        panel.hidden = !panel.hidden;
        toggle.setAttribute("aria-expanded", String(!panel.hidden));
      }, "Details of how this reply was made");
      toggle.setAttribute("aria-expanded", "false");
      toggle.classList.add("details-toggle");
      bar.appendChild(toggle);
    }
    if (compareMethods().length >= 2 && i > 0) {
      const cmp = button("Compare", () => compareTurn(c, i), "Compare methods on this turn");
      cmp.disabled = busy || state.comparing > 0;
      cmp.classList.add("compare-button");
      bar.appendChild(cmp);
    }
  }
  const del = button("Delete", () => {
    c.turns.splice(i, 1);
    c.updated = Date.now();
    saveConversations();
    render();
  }, t.role === "user" ? "Delete this message" : "Delete this reply");
  del.disabled = busy;
  bar.appendChild(del);
  return bar;
}

// "trimix · large_ins 0.1 · small_cpt 0.9 · small_base 0 · chosen by ppl · 24 tokens, 18.2 tok/s · seed 7"
function describe(t) {
  const bits = [];
  const info = t.info;
  if (info) {
    bits.push(info.method);
    for (const [role, w] of Object.entries(info.weights || {})) bits.push(`${role} ${fmt(w)}`);
    if (info.selection) bits.push(`chosen by ${info.selection.strategy}`);
    const tm = info.timings || {};
    const tokens = t.usage ? t.usage.completion_tokens : tm.gen_tokens;
    if (tokens !== undefined) {
      let s = `${tokens} tokens`;
      if (tm.gen_tokens_per_s) s += `, ${fmt(Math.round(tm.gen_tokens_per_s * 10) / 10)} tok/s`;
      bits.push(s);
    }
    const sp = info.sampling || {};
    bits.push(sp.seed !== undefined ? `temperature ${fmt(sp.temperature)}, seed ${sp.seed}` : "greedy");
    if (info.finish_reason) bits.push(`stop: ${info.finish_reason}`);
  }
  if (t.stopped) bits.push("stopped by you (kept as shown)");
  return bits.join(" · ");
}

function copyText(btn, text) {
  const done = (ok) => {
    btn.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { btn.textContent = "Copy"; }, 1500);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(() => done(true), () => done(fallbackCopy(text)));
  } else {
    done(fallbackCopy(text));
  }
}

// Pages served over plain http on a local network have no clipboard API: copy through a selection.
function fallbackCopy(text) {
  const area = el("textarea", "visually-hidden");
  area.value = text;
  area.setAttribute("aria-hidden", "true");
  document.body.appendChild(area);
  area.select();
  let ok = false;
  try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
  area.remove();
  return ok;
}

function startEdit(box, c, i) {
  const t = c.turns[i];
  const area = el("textarea", "edit");
  area.value = t.content;
  area.dir = "auto";
  area.setAttribute("aria-label", "Edit the message");
  const later = c.turns.length - i - 1;
  const note = el("p", "small", later ? `Sending replaces the ${later} turn${later > 1 ? "s" : ""} after this one.` : "");
  const bar = el("div", "actions");
  bar.append(
    button("Send", () => {
      if (!area.value.trim() || state.live) return;
      c.turns.splice(i, c.turns.length - i, { role: "user", content: area.value });
      c.updated = Date.now();
      saveConversations();
      render();
      reply(c);
    }, "Send the edited message"),
    button("Cancel", () => render(), "Cancel editing"),
  );
  box.replaceChildren(area, note, bar);
  area.focus();
}

// -- the fusion, made visible -----------------------------------------------------------------------------

function detailsElement(c, t, i) {
  const info = t.info;
  const box = el("div", "details");
  box.appendChild(el("h3", "", "Weights"));
  const dl = el("dl");
  const row = (k, v) => dl.append(el("dt", "", k), el("dd", "", v));
  row("method", info.method);
  for (const [role, w] of Object.entries(info.weights || {})) row(role, fmt(w));
  box.appendChild(dl);
  const sel = info.selection;
  if (sel) {
    box.appendChild(el("h3", "", sel.strategy === "ppl" ? "Chosen by perplexity" : "Chosen by entropy"));
    const how = el("dl");
    how.append(el("dt", "", "chosen"), el("dd", "", `alpha ${fmt(sel.chosen.alpha)}, beta ${fmt(sel.chosen.beta)}`));
    if (sel.prompt_tokens) how.append(el("dt", "", "prompt"), el("dd", "", `${sel.prompt_tokens} tokens`));
    if (sel.note) how.append(el("dt", "", "note"), el("dd", "", sel.note));
    box.appendChild(how);
    if (sel.grid && sel.grid.length) box.appendChild(heatmap(sel));
    const own = sel.single_ppl || {};
    if (Object.keys(own).length) {
      box.appendChild(el("h3", "", "Each model's own perplexity of the prompt"));
      const table = el("table", "own-ppl");
      for (const [role, p] of Object.entries(own)) {
        const tr = el("tr");
        const th = el("th", "", role);
        th.scope = "row";
        tr.append(th, el("td", "", sig(p)));
        table.appendChild(tr);
      }
      box.appendChild(table);
    }
  }
  box.appendChild(el("h3", "", "Sampling"));
  const sp = info.sampling || {};
  const sd = el("dl");
  const srow = (k, v) => sd.append(el("dt", "", k), el("dd", "", v));
  if (sp.seed === undefined) srow("decoding", "greedy (temperature 0)");
  else {
    srow("temperature", fmt(sp.temperature));
    srow("top-k", sp.top_k ? String(sp.top_k) : "off");
    srow("top-p", sp.top_p < 1 ? fmt(sp.top_p) : "off");
    srow("min-p", sp.min_p > 0 ? fmt(sp.min_p) : "off");
    srow("seed", String(sp.seed));
  }
  const tm = info.timings || {};
  if (t.usage) srow("tokens", `prompt ${t.usage.prompt_tokens}, reply ${t.usage.completion_tokens}`);
  if (tm.gen_tokens_per_s) srow("speed", `${fmt(Math.round(tm.gen_tokens_per_s * 10) / 10)} tokens/s`);
  if (info.finish_reason) srow("ended", info.finish_reason);
  box.appendChild(sd);
  if (sp.seed !== undefined && isLastReply(c, i) && t.request) {
    const again = button(`Repeat with seed ${sp.seed}`, () => regenerate(c, sp.seed));
    again.disabled = Boolean(state.live);
    again.classList.add("repeat-seed");
    box.appendChild(again);
  }
  return box;
}

// The alpha x beta grid as a table: rows alpha, columns beta, each cell coloured by log perplexity
// (darker is lower) and the chosen cell outlined.
function heatmap(sel) {
  const ppl = sel.strategy === "ppl";
  const alphas = [...new Set(sel.grid.map((g) => g.alpha))];
  const betas = [...new Set(sel.grid.map((g) => g.beta))];
  const value = (g) => (ppl ? g.ppl : g.entropy);
  const score = (g) => (ppl ? g.nll : g.entropy);
  const finite = sel.grid.map(score).filter(Number.isFinite);
  const lo = Math.min(...finite);
  const hi = Math.max(...finite);
  const fig = el("figure", "heatmap");
  const table = el("table");
  table.appendChild(el("caption", "", ppl
    ? "Perplexity of the prompt under each (alpha, beta); the outlined cell is the one chosen."
    : "Entropy of the first token under each (alpha, beta); the outlined cell is the one chosen."));
  const head = el("tr");
  const corner = el("th", "", "α \\ β");
  corner.scope = "col";
  head.appendChild(corner);
  for (const b of betas) {
    const th = el("th", "", fmt(b));
    th.scope = "col";
    head.appendChild(th);
  }
  table.appendChild(head);
  for (const a of alphas) {
    const tr = el("tr");
    const th = el("th", "", fmt(a));
    th.scope = "row";
    tr.appendChild(th);
    for (const b of betas) {
      const g = sel.grid.find((x) => x.alpha === a && x.beta === b);
      const td = el("td");
      if (g) {
        const v = value(g);
        const s = score(g);
        const f = Number.isFinite(s) && hi > lo ? (s - lo) / (hi - lo) : 0;
        td.style.background = `hsl(155, 45%, ${Math.round(58 + 36 * f)}%)`;
        td.textContent = Number.isFinite(v) ? sig(v) : "∞";
        td.dataset.alpha = String(a);
        td.dataset.beta = String(b);
        if (a === sel.chosen.alpha && b === sel.chosen.beta) {
          td.classList.add("chosen");
          td.appendChild(el("span", "visually-hidden", " (chosen)"));
        }
      }
      tr.appendChild(td);
    }
    table.appendChild(tr);
  }
  fig.appendChild(table);
  return fig;
}

// -- sending -------------------------------------------------------------------------------------------------

// The conversation as sent: exactly the turns shown (a stopped reply as shown; errors are not turns).
function requestMessages(c, upTo) {
  return c.turns.slice(0, upTo).map((t) => ({ role: t.role, content: t.content }));
}

function requestFor(c, upTo, settings) {
  const body = Object.assign({}, settings);
  if (c.mode === "chat") body.messages = requestMessages(c, upTo);
  else body.prompt = c.turns[upTo - 1].content;
  return body;
}

function sendText(text) {
  let c = current();
  if (!c) c = newConversation(chosenMode());
  if (!c.turns.length) c.mode = chosenMode(); // a conversation keeps the mode it started in
  c.turns.push({ role: "user", content: text });
  c.updated = Date.now();
  saveConversations();
  render();
  reply(c);
}

function regenerate(c, seed) {
  if (state.live) return;
  const last = c.turns[c.turns.length - 1];
  if (!last || last.role !== "assistant") return;
  let settings = null;
  if (seed !== undefined && last.request) settings = Object.assign({}, last.request, { seed });
  c.turns.pop();
  render();
  reply(c, settings);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop-button").hidden = !busy;
}

// Stream a reply to the conversation's last (user) turn.
async function reply(c, settings) {
  clearNotices();
  const settingsUsed = settings || settingsBody();
  const body = Object.assign(requestFor(c, c.turns.length, settingsUsed), {
    stream: true,
    stream_options: { include_usage: true },
  });
  const turn = { role: "assistant", content: "", live: true, chunks: 0, request: settingsUsed };
  c.turns.push(turn);
  const controller = new AbortController();
  state.live = { controller, conv: c, turn };
  setBusy(true);
  render();
  const chat = c.mode === "chat";
  let failure = null;
  try {
    const res = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) throw await httpFailure(res);
    markOnline();
    await readEvents(res, (obj) => {
      if (obj.error) throw serverFailure(obj.error, 200, null);
      if (obj.usage) turn.usage = obj.usage;
      if (obj.trimix) turn.info = obj.trimix;
      const choice = obj.choices && obj.choices[0];
      if (!choice) return;
      const piece = chat ? choice.delta && choice.delta.content : choice.text;
      if (piece) {
        turn.content += piece;
        turn.chunks += 1;
        showLive(c, turn);
      }
    });
  } catch (e) {
    if (e.name === "AbortError") turn.stopped = true;
    else failure = e.plain ? e : networkFailure(e);
  } finally {
    state.live = null;
    setBusy(false);
  }
  delete turn.live;
  const i = c.turns.indexOf(turn);
  if (failure || (turn.stopped && !turn.content)) {
    if (i >= 0) c.turns.splice(i, 1); // nothing shown is kept, and nothing unshown is sent later
  }
  c.updated = Date.now();
  saveConversations();
  if (state.current === c.id) render();
  if (failure) showFailure(failure, () => reply(c, settings));
}

function showLive(c, turn) {
  if (state.current !== c.id) return;
  const box = document.querySelector("#log .msg.live");
  if (!box) return;
  box.classList.remove("waiting");
  box.querySelector(".body").textContent = turn.content;
  box.dataset.chunks = String(turn.chunks);
  const log = $("log");
  if (log.scrollHeight - log.scrollTop - log.clientHeight < 120) log.scrollTop = log.scrollHeight;
}

// Read server-sent events from a fetch response; call onData with each parsed JSON payload.
async function readEvents(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

// -- compare: one turn, several methods, sent together so the server decodes them in one batch -------

function compareMethods() {
  const have = methodsLoaded();
  const roles = rolesLoaded();
  return COMPARE.filter((m) => have.includes(m.needs) && (m.needs !== "single" || roles.includes("large_ins")));
}

async function compareTurn(c, i) {
  if (state.live || state.comparing) return;
  const t = c.turns[i];
  const upTo = t.role === "assistant" ? i : i + 1;
  const base = settingsBody();
  const methods = compareMethods();
  t.compare = methods.map((m) => ({ label: m.label, method: m.trimix.method, content: "", waiting: true }));
  state.comparing += 1;
  render();
  const one = async (m, slot) => {
    const settings = Object.assign({}, base, { trimix: Object.assign({}, m.trimix) });
    const body = requestFor(c, upTo, settings);
    try {
      const res = await fetch(c.mode === "chat" ? "/v1/chat/completions" : "/v1/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body),
      });
      if (!res.ok) throw await httpFailure(res);
      const data = await res.json();
      const choice = data.choices[0];
      slot.content = c.mode === "chat" ? choice.message.content : choice.text;
      slot.info = data.trimix;
      slot.usage = data.usage;
    } catch (e) {
      const f = e.plain ? e : networkFailure(e);
      slot.error = f.message;
    }
    delete slot.waiting;
  };
  await Promise.all(methods.map((m, k) => one(m, t.compare[k])));
  state.comparing -= 1;
  c.updated = Date.now();
  saveConversations();
  if (state.current === c.id) render();
}

function compareElement(c, t, i) {
  const box = el("section", "compare");
  box.setAttribute("aria-label", "The same turn answered by several methods");
  for (const slot of t.compare) {
    const col = el("div", "compare-col" + (slot.waiting ? " waiting" : "") + (slot.error ? " failed" : ""));
    col.dataset.method = slot.method;
    col.appendChild(el("h3", "", slot.label));
    const body = el("div", "body", slot.error ? slot.error : slot.content);
    body.dir = "auto";
    col.appendChild(body);
    if (slot.info) col.appendChild(el("div", "meta", describe(slot)));
    if (!slot.waiting && !slot.error && t.role === "assistant") {
      col.appendChild(button("Use this answer", () => {
        t.content = slot.content;
        t.info = slot.info;
        t.usage = slot.usage;
        delete t.stopped;
        delete t.request; // "repeat with this seed" would repeat another method's request
        c.updated = Date.now();
        saveConversations();
        render();
      }, `Use this answer (${slot.label}) as the reply`));
    }
    box.appendChild(col);
  }
  return box;
}

// -- errors, in plain words ------------------------------------------------------------------------------------

function plainError(message, extra) {
  const e = new Error(message);
  e.plain = true;
  return Object.assign(e, extra || {});
}

function networkFailure() {
  markOffline();
  return plainError("The trimix server cannot be reached: it may have stopped, or this device may be off the " +
    "network. Your conversation is kept in this browser; press Retry once the server is back.", { kind: "offline" });
}

async function httpFailure(res) {
  let err = {};
  try {
    const data = await res.json();
    err = (data && data.error) || {};
  } catch (e) { /* not JSON */ }
  return serverFailure(err, res.status, res.headers.get("Retry-After"));
}

function serverFailure(err, status, retryAfter) {
  const code = err.code || "";
  const said = err.message || `HTTP ${status}`;
  if (status === 401 || code === "invalid_api_key") {
    askForKey(Boolean(apiKey()));
    return plainError(apiKey()
      ? "The server did not accept the API key saved in this browser. Enter the right key in the box at the top."
      : "This server needs an API key. Enter it in the box at the top (it is kept in this browser only).",
    { kind: "key" });
  }
  if (code === "server_busy") {
    const s = Number(retryAfter) || 5;
    return plainError(`The server is busy with other people's requests. Try again in ${s} second${s === 1 ? "" : "s"}.`,
      { kind: "busy", wait: s });
  }
  if (code === "loading") return plainError("The models are still loading. Try again in a few seconds.", { kind: "busy", wait: 3 });
  if (code === "server_shutdown") {
    markOffline();
    return plainError("The server is shutting down. Your conversation is kept; retry when it is back.", { kind: "offline" });
  }
  if (code === "context_length_exceeded") {
    return plainError("This conversation is now longer than the models can read at once. Start a new " +
      `conversation, or delete early turns. (The server said: ${said})`, { kind: "context" });
  }
  if (code === "chat_template") {
    return plainError(`The conversation cannot be written in the model's chat format: ${said}`, { kind: "request" });
  }
  if (status === 413) return plainError("The conversation is too large for the server to accept. Start a new one.", { kind: "request" });
  if (status >= 500) return plainError(`The server failed on this request (${said}). Try again.`, { kind: "server" });
  return plainError(`The server refused the request: ${said}. Check the settings.`, { kind: "request" });
}

function clearNotices() {
  document.querySelectorAll("#log .notice").forEach((n) => n.remove());
}

function showNotice(text, actions) {
  const box = el("div", "notice");
  box.setAttribute("role", "alert");
  box.appendChild(el("p", "", text));
  if (actions) {
    const bar = el("div", "actions");
    bar.append(...actions);
    box.appendChild(bar);
  }
  $("log").appendChild(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function showFailure(f, retry) {
  const again = button("Retry", () => { box.remove(); retry(); }, "Retry: send this turn again");
  const box = showNotice(f.message, [again]);
  box.dataset.kind = f.kind || "";
  if (f.kind === "busy" && f.wait) {
    again.disabled = true;
    let left = f.wait;
    const tick = setInterval(() => {
      left -= 1;
      again.textContent = left > 0 ? `Retry (${left})` : "Retry";
      if (left <= 0 || !box.isConnected) {
        again.disabled = false;
        clearInterval(tick);
      }
    }, 1000);
  }
}

// -- connection and the API key ---------------------------------------------------------------------------

function banner(text, opts) {
  const o = opts || {};
  $("banner").hidden = !text;
  $("banner-text").textContent = text || "";
  $("key-form").hidden = !o.key;
  $("banner-retry").hidden = !o.retry;
}

function askForKey(wrong) {
  banner(wrong
    ? "The API key saved in this browser was not accepted. Enter the key the server's operator gave you."
    : "This server needs an API key. Enter the key the server's operator gave you; it is kept in this browser only.",
  { key: true });
  $("model").textContent = "API key needed";
}

function markOffline() {
  state.offline = true;
  $("model").classList.add("offline");
  $("model").textContent = "server unreachable";
  banner("The trimix server cannot be reached (it may have stopped, or this device is off the network). " +
    "Checking again every 5 seconds.", { retry: true });
  if (!state.pollTimer) state.pollTimer = setInterval(connect, 5000);
}

function markOnline() {
  if (!state.offline) return;
  state.offline = false;
  $("model").classList.remove("offline");
  if (state.pollTimer) clearInterval(state.pollTimer);
  state.pollTimer = null;
  banner("");
}

async function connect() {
  let res;
  try {
    res = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    markOffline();
    return;
  }
  markOnline();
  if (res.status === 401) {
    askForKey(Boolean(apiKey()));
    return;
  }
  if (res.status === 503) {
    banner("The models are still loading; this page connects as soon as they are ready.");
    $("model").textContent = "loading…";
    setTimeout(connect, 2000);
    return;
  }
  if (!res.ok) {
    const f = await httpFailure(res);
    banner(f.message);
    return;
  }
  const data = await res.json();
  state.card = data.data[0];
  const files = state.card.trimix ? Object.values(state.card.trimix.models).join(", ") : "";
  $("model").textContent = state.card.id;
  $("model").title = files;
  banner("");
  applyCard();
}

// -- the font note: a script this browser has no font for ---------------------------------------------------

let fontTimer = null;
const glyphCache = new Map();
let canvas = null;

function scheduleFontCheck() {
  clearTimeout(fontTimer);
  fontTimer = setTimeout(checkFonts, 150);
}

// A character is missing when it draws exactly like a code point no font has (U+0378 is unassigned):
// the same ".notdef" box. Measured on a canvas in the page's own font stack.
function glyphPixels(ch) {
  if (!canvas) canvas = document.createElement("canvas");
  canvas.width = 48;
  canvas.height = 48;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.clearRect(0, 0, 48, 48);
  ctx.font = `32px ${getComputedStyle(document.body).fontFamily}`;
  ctx.fillStyle = "#000";
  ctx.textBaseline = "middle";
  ctx.fillText(ch, 6, 24);
  return ctx.getImageData(0, 0, 48, 48).data;
}

function missing(ch) {
  if (glyphCache.has(ch)) return glyphCache.get(ch);
  if (!glyphCache.has("ref")) glyphCache.set("ref", glyphPixels("\u0378"));
  const ref = glyphCache.get("ref");
  const px = glyphPixels(ch);
  let same = true;
  for (let k = 0; k < px.length; k += 1) {
    if (px[k] !== ref[k]) { same = false; break; }
  }
  glyphCache.set(ch, same);
  return same;
}

function checkFonts() {
  const c = current();
  const text = ((c ? c.turns.map((t) => t.content).join("\n") : "") + "\n" + $("input").value).slice(0, 20000);
  const lacking = [];
  for (const script of SCRIPTS) {
    if (!script.test.test(text)) continue;
    const letters = [...new Set([...text].filter((ch) => script.test.test(ch) && !/\p{M}/u.test(ch)))].slice(0, 24);
    if (letters.some(missing)) lacking.push(script);
  }
  const note = $("font-note");
  note.hidden = !lacking.length;
  note.textContent = lacking.map((s) =>
    `This device has no font for ${s.name} text, so it shows as boxes. Install one: ${s.fonts}; then reload.`,
  ).join(" ");
  note.dataset.scripts = lacking.map((s) => s.name).join(",");
}

// -- export -----------------------------------------------------------------------------------------------------

function download(name, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = el("a");
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function fileName(c, ext) {
  const stem = titleOf(c).replace(/[\\/:*?"<>|\s]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 40) || "conversation";
  return `trimix-${stem}.${ext}`;
}

function exportJSON() {
  const c = current();
  if (!c) return;
  const out = Object.assign({}, c, { title: titleOf(c), exported: new Date().toISOString() });
  download(fileName(c, "json"), "application/json", JSON.stringify(out, null, 2));
}

function exportMarkdown() {
  const c = current();
  if (!c) return;
  const lines = [`# ${titleOf(c)}`, "", `trimix, ${c.mode === "chat" ? "chat" : "text continuation"}, exported ${new Date().toISOString()}`, ""];
  for (const t of c.turns) {
    if (t.role === "user") lines.push(c.mode === "chat" ? "**You**" : "**Text**", "", t.content, "");
    else {
      const meta = describe(t);
      lines.push(`**trimix**${meta ? ` (${meta})` : ""}`, "", t.content, "");
    }
  }
  download(fileName(c, "md"), "text/markdown", lines.join("\n"));
}

// -- panels ------------------------------------------------------------------------------------------------------

function togglePanel(id, open) {
  const panel = $(id);
  const show = open === undefined ? panel.hidden : open;
  panel.hidden = !show;
  const toggle = { chats: "chats-toggle", settings: "settings-toggle", "model-info": "model" }[id];
  $(toggle).setAttribute("aria-expanded", String(show));
  if (show && window.matchMedia("(max-width: 999px)").matches) {
    // one overlay at a time on a small screen
    for (const other of ["chats", "settings", "model-info"]) if (other !== id && !$(other).hidden) togglePanel(other, false);
  }
}

function init() {
  loadSettings();
  const saved = readJSON(KEYS.conversations, {});
  state.conversations = saved && typeof saved === "object" ? saved : {};
  const cur = readJSON(KEYS.current, null);
  state.current = cur && state.conversations[cur] ? cur : null;
  syncVisibility();
  const onChange = () => { syncVisibility(); saveSettings(); };
  $("settings-form").addEventListener("input", onChange);
  $("settings-form").addEventListener("change", onChange);
  $("settings-form").addEventListener("submit", (ev) => ev.preventDefault());
  $("mode").addEventListener("change", () => {
    // another mode is another conversation: the open one keeps its own
    const c = current();
    if (c && c.turns.length && c.mode !== chosenMode()) state.current = null;
    else if (c) c.mode = chosenMode();
    render();
  });
  $("api_key").addEventListener("change", () => { setApiKey(apiKey()); connect(); });
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    setApiKey($("key-input").value.trim());
    $("key-input").value = "";
    connect();
  });
  $("banner-retry").addEventListener("click", connect);
  $("settings-toggle").addEventListener("click", () => togglePanel("settings"));
  $("settings-close").addEventListener("click", () => togglePanel("settings", false));
  $("chats-toggle").addEventListener("click", () => togglePanel("chats"));
  $("chats-close").addEventListener("click", () => togglePanel("chats", false));
  $("model").addEventListener("click", () => togglePanel("model-info"));
  $("export-json").addEventListener("click", exportJSON);
  $("export-md").addEventListener("click", exportMarkdown);
  $("new-chat").addEventListener("click", () => {
    state.current = null;
    writeJSON(KEYS.current, null);
    render();
    $("input").focus();
  });
  $("stop-button").addEventListener("click", () => { if (state.live) state.live.controller.abort(); });
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value;
    if (!text.trim() || state.live) return;
    $("input").value = "";
    sendText(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    // Enter sends on a keyboard; on a touch screen Enter is a new line and the Send button sends
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && !window.matchMedia("(pointer: coarse)").matches) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("input").addEventListener("input", scheduleFontCheck);
  if (window.matchMedia("(min-width: 1000px)").matches) togglePanel("chats", true);
  render();
  connect();
}

document.addEventListener("DOMContentLoaded", init);
