// The chat page: talks to this server's own OpenAI-compatible API, streams replies, and shows the
// weights each reply was generated with. Text is only ever set with textContent (never parsed as HTML),
// and every message carries dir="auto" so right-to-left scripts such as Uyghur read right to left.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS_KEY = "trimix.settings";
const FIELDS = ["mode", "method", "select", "alpha", "beta", "gamma", "role", "temperature", "max_tokens",
  "top_p", "top_k", "min_p", "seed", "stop", "api_key"];

const state = { history: [], busy: false, controller: null };

function loadSettings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}"); } catch (e) { saved = {}; }
  for (const name of FIELDS) {
    if (typeof saved[name] === "string") $(name).value = saved[name];
  }
}

function saveSettings() {
  const out = {};
  for (const name of FIELDS) out[name] = $(name).value;
  try { localStorage.setItem(SETTINGS_KEY, JSON.stringify(out)); } catch (e) { /* private mode */ }
}

// Show only the inputs the chosen method uses (the server refuses settings a method would ignore).
function syncVisibility() {
  const method = $("method").value;
  const select = $("select").value;
  const trimixLike = method === "" || method === "trimix";
  const show = (cls, on) => document.querySelectorAll(cls).forEach((el) => el.classList.toggle("hidden", !on));
  show(".for-trimix", trimixLike);
  show(".for-alpha", (trimixLike && select === "fixed") || method === "trimix4");
  show(".for-beta", (trimixLike && select === "fixed") || ["trimix4", "proxy", "contrastive"].includes(method));
  show(".for-gamma", method === "trimix4");
  show(".for-role", method === "single");
  const t = parseFloat($("temperature").value);
  show(".for-sampling", Number.isFinite(t) && t > 0);
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

// The request's settings: only what the user set, so the server's profile decides the rest.
function settingsBody() {
  const body = {};
  const trimix = {};
  const method = $("method").value;
  if (method) trimix.method = method;
  if (visible("select") && $("select").value) trimix.select = $("select").value;
  for (const w of ["alpha", "beta", "gamma"]) {
    if (visible(w) && number(w) !== undefined) trimix[w] = number(w);
  }
  if (visible("role")) trimix.role = $("role").value;
  if (Object.keys(trimix).length) body.trimix = trimix;
  const t = number("temperature");
  if (t !== undefined && t > 0) {
    body.temperature = t;
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
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  $("hint")?.remove();
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.setAttribute("dir", "auto");
  const body = document.createElement("div");
  body.className = "body";
  body.setAttribute("dir", "auto");
  body.textContent = text;
  el.appendChild(body);
  $("log").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function fmt(x) {
  return String(Number.isInteger(x) ? x : Math.round(x * 1000) / 1000).replace("-", "−");
}

// "trimix · large_ins 0.1 · small_cpt 1 · small_base −0.1 · chosen by ppl · 24 tokens, 18.2 tok/s"
function describe(trimix, usage) {
  const bits = [trimix.method];
  for (const [role, w] of Object.entries(trimix.weights || {})) bits.push(`${role} ${fmt(w)}`);
  if (trimix.selection) bits.push(`chosen by ${trimix.selection.strategy}`);
  const t = trimix.timings || {};
  const tokens = usage ? usage.completion_tokens : t.gen_tokens;
  if (tokens !== undefined) {
    let s = `${tokens} tokens`;
    if (t.gen_tokens_per_s) s += `, ${fmt(Math.round(t.gen_tokens_per_s * 10) / 10)} tok/s`;
    bits.push(s);
  }
  if (trimix.finish_reason) bits.push(`stop: ${trimix.finish_reason}`);
  return bits.join(" · ");
}

function setMeta(el, text) {
  let meta = el.querySelector(".meta");
  if (!meta) {
    meta = document.createElement("div");
    meta.className = "meta";
    el.appendChild(meta);
  }
  meta.textContent = text;
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("stop-button").hidden = !busy;
}

async function errorText(res) {
  try {
    const data = await res.json();
    if (data && data.error && data.error.message) return data.error.message;
  } catch (e) { /* not JSON */ }
  return `HTTP ${res.status}`;
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

async function send(text) {
  const chat = $("mode").value === "chat";
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("waiting");
  const bodyEl = reply.querySelector(".body");
  reply.dataset.chunks = "0";
  const body = Object.assign(settingsBody(), { stream: true, stream_options: { include_usage: true } });
  if (chat) body.messages = state.history.concat([{ role: "user", content: text }]);
  else body.prompt = text;
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let trimix = null;
  let usage = null;
  let failed = false;
  try {
    const res = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) throw new Error(await errorText(res));
    await readEvents(res, (obj) => {
      if (obj.error) throw new Error(obj.error.message);
      if (obj.usage) usage = obj.usage;
      if (obj.trimix) trimix = obj.trimix;
      const choice = obj.choices && obj.choices[0];
      if (!choice) return;
      const piece = chat ? (choice.delta && choice.delta.content) : choice.text;
      if (piece) {
        reply.classList.remove("waiting");
        bodyEl.textContent += piece;
        reply.dataset.chunks = String(Number(reply.dataset.chunks) + 1);
        reply.scrollIntoView({ block: "end" });
      }
    });
    if (trimix) setMeta(reply, describe(trimix, usage));
    reply.dataset.done = "true";
  } catch (e) {
    failed = true;
    reply.classList.remove("waiting");
    if (e.name === "AbortError") {
      setMeta(reply, "stopped");
    } else {
      reply.classList.add("error");
      setMeta(reply, "error: " + e.message);
    }
    reply.dataset.done = "true";
  } finally {
    state.controller = null;
    setBusy(false);
  }
  if (chat && !failed) {
    state.history.push({ role: "user", content: text }, { role: "assistant", content: bodyEl.textContent });
  }
}

async function connect() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (res.status === 401) {
      $("model").textContent = "";
      $("status").textContent = "this server needs an API key: open Settings";
      return;
    }
    if (!res.ok) throw new Error(await errorText(res));
    const data = await res.json();
    const card = data.data[0];
    const files = card.trimix ? Object.entries(card.trimix.models).map(([r, f]) => `${r}: ${f}`).join(", ") : "";
    $("model").textContent = card.id + (files ? ` (${files})` : "");
    $("model").title = files;
    $("status").textContent = "";
  } catch (e) {
    $("status").textContent = "cannot reach the server: " + e.message;
  }
}

function init() {
  loadSettings();
  syncVisibility();
  $("settings-form").addEventListener("input", () => { syncVisibility(); saveSettings(); });
  $("settings-form").addEventListener("change", () => { syncVisibility(); saveSettings(); });
  $("api_key").addEventListener("change", connect);
  $("settings-toggle").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("log").replaceChildren();
  });
  $("stop-button").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value;
    if (!text.trim() || state.busy) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  connect();
}

document.addEventListener("DOMContentLoaded", init);
