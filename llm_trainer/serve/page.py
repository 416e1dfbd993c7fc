"""The web chat page served at ``/``: one self-contained HTML file (no external scripts, styles or fonts).

It keeps the conversation in the browser, sends it to ``/v1/chat/completions`` with ``stream: true`` and appends
the server-sent deltas to the answer as they arrive (``fetch`` + a stream reader; ``Stop`` aborts the request,
which frees the server's slot). Settings: system prompt, temperature, max tokens; a VLM server also gets an image
picker (images are sent as base64 data URLs). For the tests, the page counts the deltas it rendered
(``window.llmChat.chunks``) and marks each answer ``data-state="streaming" | "done" | "error"``.
"""
from __future__ import annotations

import json

__all__ = ["chat_page"]

_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>llm_trainer chat</title>
<style>
 body{font-family:system-ui,sans-serif;margin:0;background:#f4f4f6;color:#1d1d1f;display:flex;flex-direction:column;height:100vh}
 header{padding:10px 16px;background:#23272f;color:#fff;display:flex;gap:12px;align-items:center}
 header h1{font-size:16px;margin:0;font-weight:600} header span{opacity:.7;font-size:13px}
 #log{flex:1;overflow-y:auto;padding:16px;display:flex;flex-direction:column;gap:10px}
 .msg{max-width:75%;padding:8px 12px;border-radius:10px;white-space:pre-wrap;word-wrap:break-word;line-height:1.4}
 .user{align-self:flex-end;background:#2f6feb;color:#fff} .assistant{align-self:flex-start;background:#fff;border:1px solid #ddd}
 .assistant[data-state=error]{border-color:#d33;color:#a11} .msg img{max-width:160px;display:block;margin-bottom:4px}
 form{display:flex;gap:8px;padding:10px 16px;background:#fff;border-top:1px solid #ddd;align-items:flex-end}
 textarea{flex:1;resize:none;height:48px;font:inherit;padding:6px} button{font:inherit;padding:8px 14px}
 details{padding:6px 16px;background:#fafafa;border-top:1px solid #eee;font-size:13px}
 details label{margin-right:14px} details input[type=number]{width:70px} #system{width:60%}
</style></head>
<body>
<header><h1>llm_trainer chat</h1><span id="model"></span></header>
<div id="log" aria-live="polite"></div>
<details><summary>Settings</summary>
 <label>System prompt <input id="system" type="text" placeholder="(none)"></label>
 <label>Temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
 <label>Max tokens <input id="max_tokens" type="number" min="1" step="1" value="256"></label>
</details>
<form id="form">
 <input id="image" type="file" accept="image/*" hidden>
 <textarea id="input" placeholder="Message (Enter to send, Shift+Enter for a new line)"></textarea>
 <button id="send" type="submit">Send</button><button id="stop" type="button" disabled>Stop</button>
 <button id="reset" type="button">Reset</button>
</form>
<script>
const CONFIG = __CONFIG__;
const $ = (id) => document.getElementById(id);
const state = {history: [], controller: null};
window.llmChat = {chunks: 0, answers: 0};
$("model").textContent = CONFIG.model + " (" + CONFIG.kind + ")";
if (CONFIG.kind === "vlm") $("image").hidden = false;

function bubble(role, text, imageUrl) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (imageUrl) { const img = document.createElement("img"); img.src = imageUrl; div.appendChild(img); }
  div.appendChild(document.createTextNode(text));
  $("log").appendChild(div); $("log").scrollTop = $("log").scrollHeight;
  return div;
}
function readImage() {
  const file = $("image").files && $("image").files[0];
  if (!file) return Promise.resolve(null);
  return new Promise((ok, fail) => { const r = new FileReader(); r.onload = () => ok(r.result);
                                     r.onerror = () => fail(r.error); r.readAsDataURL(file); });
}
async function send(text) {
  const imageUrl = await readImage();
  $("image").value = "";
  const content = imageUrl ? [{type: "image_url", image_url: {url: imageUrl}}, {type: "text", text: text}] : text;
  state.history.push({role: "user", content: content});
  bubble("user", text, imageUrl);
  const div = bubble("assistant", "");
  div.dataset.state = "streaming";
  const messages = ($("system").value ? [{role: "system", content: $("system").value}] : []).concat(state.history);
  const body = {model: CONFIG.model, messages: messages, stream: true,
                temperature: Number($("temperature").value), max_tokens: Number($("max_tokens").value)};
  state.controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  let answer = "";
  try {
    const resp = await fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
                                                      body: JSON.stringify(body), signal: state.controller.signal});
    if (!resp.ok) { const e = await resp.json(); throw new Error(e.error ? e.error.message : resp.statusText); }
    const reader = resp.body.getReader(); const decoder = new TextDecoder(); let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
          if (delta) { answer += delta; div.lastChild.textContent = answer; window.llmChat.chunks += 1;
                       $("log").scrollTop = $("log").scrollHeight; }
        }
      }
    }
    div.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") { div.dataset.state = "done"; }
    else { div.dataset.state = "error"; div.lastChild.textContent = answer + (answer ? "\n" : "") + "Error: " + err.message; }
  } finally {
    state.history.push({role: "assistant", content: answer});
    window.llmChat.answers += 1;
    state.controller = null; $("send").disabled = false; $("stop").disabled = true;
  }
}
$("form").addEventListener("submit", (e) => { e.preventDefault(); const text = $("input").value;
  if (!text.trim() || state.controller) return; $("input").value = ""; send(text); });
$("input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault();
  $("form").requestSubmit(); } });
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("reset").addEventListener("click", () => { if (state.controller) state.controller.abort();
  state.history = []; $("log").replaceChildren(); });
</script>
</body></html>
"""


def chat_page(model: str, kind: str) -> bytes:
    """The page for a server of ``model`` (its name) of ``kind`` (``llm``/``vlm``/``reward``)."""
    config = json.dumps({"model": model, "kind": kind}).replace("<", "\\u003c")
    return _PAGE.replace("__CONFIG__", config).encode("utf-8")
