// The chat page: streams /v1/chat/completions with fetch + ReadableStream, keeps the history, and shows
// under each reply what the server reported (tokens, cache reuse, worker) and what we measured (TTFT,
// tokens/s). Stop aborts the fetch, which closes the connection: the server aborts the request.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop");
let history = [];      // [{role, content}] of finished turns
let controller = null; // AbortController of the reply in flight
let model = null;

$("api-key").value = localStorage.getItem(KEY_STORE) || "";
$("api-key").addEventListener("input", (e) => {
  if (e.target.value) localStorage.setItem(KEY_STORE, e.target.value);
  else localStorage.removeItem(KEY_STORE);
});

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: authHeaders() });
    const body = await r.json();
    if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
    const m = body.data[0];
    model = m.id;
    $("model").textContent = `${m.id} · ${m.backend || ""} · context ${m.max_model_len || "?"} tokens`;
  } catch (e) {
    $("model").textContent = "model list unavailable: " + e.message;
  }
}

// Markdown-safe rendering: ``` fences become <pre>, `code` spans <code>, everything else plain text.
// Every piece goes in through textContent, so nothing the model writes is ever parsed as HTML.
function render(body, text) {
  body.replaceChildren();
  const parts = text.split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const nl = part.indexOf("\n");
      body.appendChild(el("pre", null, nl >= 0 ? part.slice(nl + 1) : part));
      return;
    }
    part.split("`").forEach((span, j) => body.appendChild(j % 2 ? el("code", null, span) : document.createTextNode(span)));
  });
}

function addMessage(role, text) {
  $("empty") && $("empty").remove();
  const msg = el("div", "msg " + role);
  msg.appendChild(el("div", "who", role === "user" ? "You" : "Assistant"));
  const body = el("div", "body");
  render(body, text);
  msg.appendChild(body);
  log.appendChild(msg);
  log.scrollTop = log.scrollHeight;
  return msg;
}

function stat(label, value, cls) {
  const s = el("span", cls || "");
  s.appendChild(document.createTextNode(label + " "));
  s.appendChild(el("b", null, value));
  return s;
}

function showStats(msg, r) {
  const box = el("div", "stats");
  box.dataset.cached = r.cached;
  box.dataset.finish = r.finish;
  box.appendChild(stat("TTFT", r.ttft == null ? "–" : `${Math.round(r.ttft)} ms`));
  box.appendChild(stat("speed", r.tps == null ? "–" : `${r.tps.toFixed(1)} tok/s`));
  // a stopped reply never got the final usage chunk: show only what the page itself counted
  if (r.prompt != null) box.appendChild(stat("prompt", r.prompt));
  if (r.cached != null) box.appendChild(stat("cached", r.cached, "cached"));
  box.appendChild(stat("completion", r.completion ?? "–"));
  box.appendChild(stat("finish", r.finish, r.finish === "stopped" ? "stopped" : ""));
  if (r.worker != null) box.appendChild(stat("worker", r.worker));
  msg.appendChild(box);
}

function setBusy(busy) {
  sendBtn.disabled = busy;
  stopBtn.disabled = !busy;
  input.disabled = busy;
}

async function send(text) {
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history, [{ role: "user", content: text }]);
  addMessage("user", text);
  const msg = addMessage("assistant", "");
  msg.classList.add("streaming");
  const body = msg.querySelector(".body");
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  const result = { finish: "?", ttft: null, tps: null, chunks: 0 };
  let reply = "";
  const t0 = performance.now();
  let tFirst = null, tLast = null;
  controller = new AbortController();
  setBusy(true);
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model: model || undefined, messages, stream: true, stream_options: { include_usage: true },
                             temperature: isNaN(temperature) ? 0 : temperature, max_tokens: isNaN(maxTokens) ? 256 : maxTokens }),
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || `HTTP ${r.status}`);
    }
    await readSSE(r, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        const now = performance.now();
        if (tFirst === null) { tFirst = now; result.ttft = now - t0; }
        tLast = now;
        result.chunks += 1;
        reply += choice.delta.content;
        render(body, reply);
        log.scrollTop = log.scrollHeight;
      }
      if (choice && choice.finish_reason) result.finish = choice.finish_reason;
      if (chunk.usage) {
        result.prompt = chunk.usage.prompt_tokens;
        result.completion = chunk.usage.completion_tokens;
        result.cached = (chunk.usage.prompt_tokens_details || {}).cached_tokens ?? 0;
        result.worker = chunk.worker_id;
      }
    });
  } catch (e) {
    if (e.name === "AbortError") {
      result.finish = "stopped";
    } else {
      result.finish = "error";
      body.appendChild(el("div", "error", "Error: " + e.message));
    }
  } finally {
    controller = null;
    msg.classList.remove("streaming");
    // decode speed: tokens after the first over the time they took (the first one is the TTFT)
    const tokens = typeof result.completion === "number" ? result.completion : result.chunks;
    if (tFirst !== null && tLast > tFirst && tokens > 1) result.tps = (tokens - 1) / ((tLast - tFirst) / 1000);
    if (result.completion === undefined && result.chunks) result.completion = `≈${result.chunks}`;
    showStats(msg, result);
    if (reply) history.push({ role: "user", content: text }, { role: "assistant", content: reply });
    setBusy(false);
    input.focus();
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
stopBtn.addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  log.replaceChildren(el("div", "empty", "New conversation."));
  log.firstChild.id = "empty";
});
loadModel();
input.focus();
