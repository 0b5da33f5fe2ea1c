// The Playground view: one prompt sent at once to several models, answers streamed side by side (SSE over
// fetch), with TTFT and tokens/s per column and the sampling settings shared.
import { state, $, el, ApiError, request, api, describe, banner, say } from "./core.js";

export async function loadModels() {
  const box = $("play-models");
  try {
    const models = (await api("v1/models")).data;
    const before = new Set([...box.querySelectorAll("input:checked")].map((input) => input.value));
    const fresh = before.size === 0;
    box.replaceChildren(
      ...models.map((model, i) => {
        const id = `model-${i}`;
        const checked = fresh ? i < 3 : before.has(model.id);
        return el("div", { class: "field check" },
          el("input", { type: "checkbox", id, value: model.id, checked }),
          el("label", { for: id, text: model.parent ? model.id.slice(model.parent.length + 1) : `${model.id} (base)` }));
      }),
    );
    if (!models.length) box.append(el("p", { class: "muted", text: "This key may use no model." }));
    banner("");
  } catch (error) {
    banner(describe(error));
  }
}

function sampling() {
  const greedy = $("play-greedy").checked;
  const body = { max_tokens: Number($("play-max-tokens").value) || 32 };
  if (greedy) body.temperature = 0;
  else {
    body.temperature = Number($("play-temperature").value);
    body.top_p = Number($("play-top-p").value);
  }
  if ($("play-seed").value !== "") body.seed = Number($("play-seed").value);
  return body;
}

function column(model) {
  const metrics = el("p", { class: "metrics", text: "waiting…" });
  const output = el("pre", { class: "output" });
  const node = el("section", { class: "column", "data-model": model, "data-state": "running", "aria-label": model },
    el("h3", { text: model }), metrics, output);
  return { node, metrics, output };
}

async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function runOne(model, mode, prompt, shared, signal, view) {
  const path = mode === "chat" ? "v1/chat/completions" : "v1/completions";
  const body = { model, stream: true, stream_options: { include_usage: true }, ...shared };
  if (mode === "chat") body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let tokens = null;
  const show = (done) => {
    const now = performance.now();
    const generated = tokens ?? chunks;
    const ttft = first === null ? "TTFT —" : `TTFT ${Math.round(first - started)} ms`;
    const rate = first !== null && generated > 1 && now > first ? ((generated - 1) * 1000) / (now - first) : null;
    view.metrics.textContent = `${ttft} · ${rate === null ? "— tok/s" : `${rate.toFixed(1)} tok/s`} · ${generated} tokens${done ? "" : " …"}`;
  };
  try {
    const response = await request(path, { method: "POST", body, signal });
    for await (const event of events(response)) {
      if (event.error) throw new ApiError(event.error.code === "overloaded" ? 503 : 500, event.error.message);
      if (event.usage) tokens = event.usage.completion_tokens;
      const choice = event.choices && event.choices[0];
      const piece = choice ? (mode === "chat" ? (choice.delta && choice.delta.content) || "" : choice.text || "") : "";
      if (piece) {
        if (first === null) first = performance.now();
        chunks += 1;
        view.output.textContent += piece;
        show(false);
      }
    }
    show(true);
    view.node.dataset.state = "done";
  } catch (error) {
    view.node.dataset.state = "error";
    view.metrics.textContent = error.name === "AbortError" ? "stopped" : describe(error);
    view.metrics.classList.add(error.name === "AbortError" ? "muted" : "error");
  }
}

export function setUpPlayground() {
  const greedy = $("play-greedy");
  const syncGreedy = () => {
    $("play-temperature").disabled = greedy.checked;
    $("play-top-p").disabled = greedy.checked;
  };
  greedy.addEventListener("change", syncGreedy);
  syncGreedy();
  $("play-stop").addEventListener("click", () => state.running && state.running.abort());
  $("play-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    say("play-error", "");
    const models = [...$("play-models").querySelectorAll("input:checked")].map((input) => input.value);
    const prompt = $("play-prompt").value;
    if (!models.length) return say("play-error", "Choose at least one model.");
    if (!prompt.trim()) return say("play-error", "Write a prompt.");
    const mode = document.querySelector('input[name="mode"]:checked').value;
    const shared = sampling();
    const views = models.map(column);
    $("play-columns").replaceChildren(...views.map((v) => v.node));
    state.running = new AbortController();
    $("play-run").disabled = true;
    $("play-stop").disabled = false;
    say("play-status", `Running ${models.length} models…`);
    await Promise.all(models.map((model, i) => runOne(model, mode, prompt, shared, state.running.signal, views[i])));
    state.running = null;
    $("play-run").disabled = false;
    $("play-stop").disabled = true;
    say("play-status", "Done.");
  });
}

