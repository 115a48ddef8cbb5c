// lmforge chat page: a plain-JS client of the server's OpenAI-style API (no framework, no CDN).
// Answers stream over SSE (fetch + ReadableStream) and are appended token by token; ratings and
// side-by-side choices go to POST /v1/feedback. Every server error is shown, never swallowed.
"use strict";

const KEY_STORAGE = "lmforge.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  history: [], // chat mode: the conversation sent with every turn
  busy: false,
  contexts: {}, // model id -> its context window in tokens (/v1/models max_model_len)
};

// ---- talking to the server -------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The OpenAI error body's message ({"error": {"message": ...}}), or the status line.
async function errorMessage(response) {
  let text = "";
  try {
    text = await response.text();
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
    if (body && body.detail) return `${response.status}: ${JSON.stringify(body.detail)}`;
  } catch (_) {
    // not JSON: fall through to the raw text
  }
  return `${response.status} ${response.statusText}${text ? `: ${text.slice(0, 300)}` : ""}`;
}

async function request(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: headers() });
  } catch (err) {
    throw new Error(`cannot reach the server (${err.message})`);
  }
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

// Yields each parsed `data:` payload of an SSE body until `data: [DONE]`.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const payload = JSON.parse(data);
      if (payload.error) throw new Error(payload.error.message || JSON.stringify(payload.error));
      yield payload;
    }
  }
  throw new Error("the stream ended before [DONE]");
}

// The "Max tokens" field for `model`, capped by its context window: a value that cannot fit
// (a micro model's context is shorter than the default 128) is left out of the request, and the
// server answers with all the room the prompt leaves.
function maxTokens(model) {
  const asked = Number($("max-tokens").value) || 128;
  const context = state.contexts[model];
  return context && asked >= context ? undefined : asked;
}

// Streams one chat completion into `view`; resolves to {id, text, finish}.
async function streamChat(model, messages, seed, view) {
  const body = {
    model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
  };
  const limit = maxTokens(model);
  if (limit !== undefined) body.max_tokens = limit;
  if (seed !== null) body.seed = seed;
  if (!$("use-kb").checked) body.kb = false; // on by default when the server has a knowledge base
  const response = await request("/v1/chat/completions", {
    method: "POST",
    body: JSON.stringify(body),
  });
  const result = { id: null, text: "", finish: null, usage: null };
  for await (const chunk of sseEvents(response)) {
    if (chunk.id && !result.id) view.setId(chunk.id);
    result.id = result.id || chunk.id || null;
    if (chunk.sources) view.setSources(chunk.sources);
    if (chunk.usage) result.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      const delta = (choice.delta && choice.delta.content) || "";
      if (delta) {
        result.text += delta;
        view.append(delta);
      }
      if (choice.finish_reason) result.finish = choice.finish_reason;
    }
  }
  view.finish(result);
  return result;
}

async function sendFeedback(body) {
  const response = await request("/v1/feedback", { method: "POST", body: JSON.stringify(body) });
  return response.json();
}

// ---- page pieces -----------------------------------------------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function userBubble(text) {
  const p = document.createElement("p");
  p.className = "user";
  p.textContent = text;
  return p;
}

// One streamed answer: text appended delta by delta, its id, sources, finish reason, errors.
function answerView(label) {
  const node = $("answer-template").content.firstElementChild.cloneNode(true);
  const text = node.querySelector(".text");
  node.querySelector(".meta").textContent = label;
  node.setAttribute("aria-busy", "true"); // screen readers read the answer once, when complete
  return {
    node,
    setId(id) {
      node.dataset.responseId = id;
    },
    append(delta) {
      text.append(document.createTextNode(delta)); // one text node per token as it arrives
    },
    setSources(sources) {
      const box = node.querySelector(".sources");
      const list = box.querySelector("ol");
      list.replaceChildren();
      for (const s of sources) {
        const item = document.createElement("li");
        const where = document.createElement("strong");
        where.textContent = `${s.source} (score ${Number(s.score).toPrecision(3)})`;
        const quote = document.createElement("blockquote");
        quote.textContent = s.text;
        item.append(where, quote);
        list.append(item);
      }
      box.hidden = sources.length === 0;
    },
    finish(result) {
      const tokens = result.usage ? `, ${result.usage.completion_tokens} tokens` : "";
      const note = result.finish === "content_filter" ? " (refused by the safety filter)" : "";
      node.querySelector(".finish").textContent = `finish: ${result.finish}${tokens}${note}`;
      node.classList.add("done");
      node.setAttribute("aria-busy", "false");
    },
    fail(message) {
      const box = node.querySelector(".answer-error");
      box.textContent = message;
      box.hidden = false;
      node.classList.add("failed");
      node.setAttribute("aria-busy", "false");
    },
  };
}

function feedbackButtons(buttons, makeBody) {
  const bar = document.createElement("div");
  bar.className = "feedback";
  const status = document.createElement("span");
  status.className = "feedback-status";
  status.setAttribute("role", "status");
  for (const [label, value, aria] of buttons) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.setAttribute("aria-label", aria);
    button.addEventListener("click", async () => {
      for (const b of bar.querySelectorAll("button")) b.disabled = true;
      try {
        const saved = await sendFeedback(makeBody(value));
        status.textContent = `saved (#${saved.feedback_id})`;
        bar.classList.add("sent");
      } catch (err) {
        status.textContent = "";
        showError(`feedback not saved: ${err.message}`);
        for (const b of bar.querySelectorAll("button")) b.disabled = false;
      }
    });
    bar.append(button);
  }
  bar.append(status);
  return bar;
}

// ---- one turn --------------------------------------------------------------------------------

async function chatTurn(prompt) {
  const model = $("model-a").value;
  const turn = document.createElement("section");
  turn.className = "turn";
  const view = answerView(model);
  turn.append(userBubble(prompt), view.node);
  $("log").append(turn);
  const messages = [...state.history, { role: "user", content: prompt }];
  try {
    const result = await streamChat(model, messages, null, view);
    state.history = [...messages, { role: "assistant", content: result.text }];
    if (result.id) {
      const rate = [
        ["↑ Good", 1, "Good answer"],
        ["↓ Bad", -1, "Bad answer"],
      ];
      view.node.append(feedbackButtons(rate, (rating) => ({ response_id: result.id, rating })));
    }
  } catch (err) {
    view.fail(err.message);
    showError(err.message);
  }
}

async function sideBySideTurn(prompt) {
  const models = [$("model-a").value, $("model-b").value];
  const seedA = Math.floor(Math.random() * 2 ** 31);
  const turn = document.createElement("section");
  turn.className = "turn";
  const pair = document.createElement("div");
  pair.className = "pair";
  const views = models.map((m, i) => answerView(`${"AB"[i]}: ${m}${models[0] === models[1] ? ` (seed ${seedA + i})` : ""}`));
  pair.append(...views.map((v) => v.node));
  turn.append(userBubble(prompt), pair);
  $("log").append(turn);
  const messages = [{ role: "user", content: prompt }];
  const results = await Promise.allSettled(
    views.map((view, i) => streamChat(models[i], messages, seedA + i, view)),
  );
  results.forEach((r, i) => {
    if (r.status === "rejected") {
      views[i].fail(r.reason.message);
      showError(r.reason.message);
    }
  });
  const ids = results.map((r) => (r.status === "fulfilled" ? r.value.id : null));
  if (ids[0] && ids[1]) {
    const choose = [
      ["A is better", 0, "Answer A is better"],
      ["B is better", 1, "Answer B is better"],
    ];
    turn.append(
      feedbackButtons(choose, (winner) => ({
        chosen_id: ids[winner],
        rejected_id: ids[1 - winner],
      })),
    );
  }
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || state.busy) return;
  if (!$("model-a").value) {
    showError("no model to send to: the model list is empty (check the API key)");
    return;
  }
  showError("");
  state.busy = true;
  $("send").disabled = true;
  $("prompt").value = "";
  try {
    await ($("side-by-side").checked ? sideBySideTurn(prompt) : chatTurn(prompt));
  } finally {
    state.busy = false;
    $("send").disabled = false;
    $("prompt").focus();
  }
}

// ---- setup -----------------------------------------------------------------------------------

async function loadModels() {
  try {
    const body = await (await request("/v1/models")).json();
    // embedding-only models (tasks without "generate") cannot chat: not offered
    const chat = body.data.filter((m) => !m.tasks || m.tasks.includes("generate"));
    const ids = chat.map((m) => m.id);
    state.contexts = Object.fromEntries(chat.map((m) => [m.id, m.max_model_len]));
    for (const [n, select] of [$("model-a"), $("model-b")].entries()) {
      const previous = select.value;
      select.replaceChildren(
        ...ids.map((id) => {
          const option = document.createElement("option");
          option.value = option.textContent = id;
          return option;
        }),
      );
      const fallback = ids[Math.min(n, ids.length - 1)];
      select.value = ids.includes(previous) ? previous : fallback;
    }
    const none = body.data.length ? "the server serves embedding models only" : "the server serves no model";
    showError(ids.length ? "" : none);
  } catch (err) {
    showError(`models: ${err.message}`);
  }
  updateHint();
}

function updateHint() {
  const sbs = $("side-by-side").checked;
  const selected = sbs ? [$("model-a").value, $("model-b").value] : [$("model-a").value];
  const contexts = selected.map((m) => state.contexts[m]).filter(Boolean);
  $("max-tokens").title = contexts.length
    ? `context ${Math.min(...contexts)} tokens: a larger value answers with what the prompt leaves`
    : "";
  $("model-b-label").hidden = !sbs;
  const same = sbs && $("model-a").value === $("model-b").value;
  const hint = $("sbs-hint");
  hint.hidden = !same;
  hint.textContent =
    Number($("temperature").value) === 0
      ? "Same model twice at temperature 0 gives the same answer twice: raise the temperature."
      : "Same model twice: the two answers are samples with different seeds.";
}

function init() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, key.value.trim());
    loadModels();
  });
  for (const id of ["side-by-side", "model-a", "model-b", "temperature"]) {
    $(id).addEventListener("change", updateHint);
  }
  $("settings").addEventListener("submit", (e) => e.preventDefault());
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("clear").addEventListener("click", () => {
    state.history = [];
    $("log").replaceChildren();
    showError("");
  });
  loadModels();
}

init();
