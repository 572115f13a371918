// Quill playground: plain JavaScript over Quill's OpenAI-compatible API (same origin, no build step).
//
// API used: GET /v1/models (loaded and stored models), GET /openapi.json (are the store's admin routes there?),
// POST /v1/completions and /v1/chat/completions with stream: true (SSE read from fetch's ReadableStream, so a
// POST can stream and an AbortController can stop it), POST /v1/models/{name}/load and /unload (admin key),
// GET /v1/hub/models and POST /v1/models/pull (admin key: the GPT-2 family from the Hugging Face Hub).
// Errors are OpenAI error JSON; `error.param` names the field, shown next to its control.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY = "quill.apiKey";
  const ADMIN_KEY = "quill.adminKey";
  const PARAM_FIELDS = {  // error.param (before any '.' or '[') -> the control's id
    prompt: "prompt", messages: "prompt", model: "model", max_tokens: "max_tokens",
    max_completion_tokens: "max_tokens", temperature: "temperature", top_k: "top_k", top_p: "top_p",
    repetition_penalty: "repetition_penalty", seed: "seed", stop: "stop", max_flops: "max_flops", dtype: "dtype",
    name: "model", response_format: "format", structured_outputs: "format",
  };
  const FORMAT_HINTS = {  // the format control's choice -> what its text box holds
    none: "The output is forced to match while decoding.", json: "Any JSON object.",
    json_schema: "A JSON schema the output follows.", regex: "A regular expression the whole output matches.",
    choice: "The output is one of these, one per line.",
  };
  const FINISH = {  // finish reason -> what it means
    stop: "end of text or a stop string", length: "max tokens reached", budget: "FLOP budget spent: Continue resumes",
    stopped: "cancelled with Stop", error: "see the error above",
  };

  const ui = {
    form: $("form"), model: $("model"), modelInfo: $("model-info"), prompt: $("prompt"), system: $("system"),
    generate: $("generate"), stop: $("stop-button"), cont: $("continue"), clear: $("clear"), busy: $("busy"),
    outPrompt: $("out-prompt"), outText: $("out-text"), output: $("output"), caret: $("caret"),
    tokens: $("tokens"), tokenPanel: $("token-panel"), tokenDetail: $("token-detail"),
    viewText: $("view-text"), viewTokens: $("view-tokens"), showTokens: $("show-tokens"),
    alert: $("alert"), alertText: $("alert-text"), status: $("server-status"),
    admin: $("admin"), adminKey: $("admin-key"), dtype: $("dtype"), load: $("load"), unload: $("unload"),
    adminStatus: $("admin-status"),
    hub: $("hub-controls"), hubModel: $("hub-model"), hubRepo: $("hub-repo"), pull: $("pull"),
    pullProgress: $("pull-progress"), pullStatus: $("pull-status"),
    keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("api-key"), keyReason: $("key-reason"),
  };

  const state = {
    models: [],          // model cards from GET /v1/models
    storeRoutes: false,  // the server has POST /v1/models/{name}/load and /unload
    hubRoutes: false,    // the server has POST /v1/models/pull and GET /v1/hub/models
    run: null,           // the generation in flight: {controller, ...}
    continuation: null,  // {handle, model} after finish_reason "budget"
    session: null,       // totals over a generation and its continuations
    tokens: [],          // token view entries {text, logprob, id, top}
    active: -1,          // token view: the token shown in the detail line
    view: "text",
  };

  // ---- formatting ----------------------------------------------------------------------------------------------

  function si(n, unit) {
    if (n === null || n === undefined || !isFinite(n)) return "–";
    const steps = [[1e15, "P"], [1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
    for (const [v, p] of steps) if (Math.abs(n) >= v) return `${(n / v).toPrecision(3)} ${p}${unit}`;
    return `${Math.round(n)} ${unit}`;
  }
  const fmtParams = (n) => si(n, "").trim().replace(" ", "").replace(/\.0+(?=[a-zA-Z]|$)/, "");
  function fmtBytes(n) {
    if (typeof n !== "number" || !isFinite(n) || n <= 0) return null;
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return `${n >= 100 || i === 0 ? Math.round(n) : n.toPrecision(3)} ${units[i]}`;
  }
  const PRECISION = { float32: "fp32", bfloat16: "bf16", float16: "fp16", int8: "int8", fp32: "fp32", bf16: "bf16" };
  // A loaded model's precision (`precision`), else the stored weights' dtype (`dtype`).
  const precisionOf = (m) => {
    const p = (isLoaded(m) ? m.precision ?? m.dtype : m.dtype ?? m.precision) ?? m.quantization ?? null;
    return p === null ? null : (PRECISION[p] || String(p));
  };
  const sizeOf = (m) => m.size_bytes ?? m.bytes ?? m.file_size ?? m.memory_bytes ?? (typeof m.size === "number" ? m.size : null);
  const isLoaded = (m) => (typeof m.loaded === "boolean" ? m.loaded
    : typeof m.status === "string" ? m.status === "loaded" : true);
  const visible = (s) => s.replace(/\n/g, "↵\n").replace(/\t/g, "→\t");

  // ---- API -----------------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      const e = (body && body.error) || {};
      super(e.message || `HTTP ${status}`);
      this.status = status;
      this.param = e.param ?? null;
      this.code = e.code ?? null;
    }
  }

  function bearer(admin) {
    const key = admin ? sessionStorage.getItem(ADMIN_KEY)
      : sessionStorage.getItem(KEY) || sessionStorage.getItem(ADMIN_KEY);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function errorBody(res) {
    const text = await res.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      if (body && body.error) return body;
      if (body && body.detail) return { error: { message: String(body.detail) } };
    } catch (_) { /* not JSON */ }
    return { error: { message: `${res.status} ${res.statusText}${text ? `: ${text.slice(0, 200)}` : ""}` } };
  }

  // fetch + OpenAI error JSON -> ApiError; a 401 asks for the API key (once per session) and retries.
  async function api(path, { method = "GET", body, admin = false, signal } = {}) {
    for (let attempt = 0; ; attempt++) {
      const headers = { ...bearer(admin) };
      if (body !== undefined) headers["Content-Type"] = "application/json";
      const res = await fetch(path, {
        method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
      });
      if (res.ok) return res;
      const err = await errorBody(res);
      if (res.status === 401 && !admin && attempt < 3 && await askKey(err.error.message)) continue;
      throw new ApiError(res.status, err);
    }
  }

  let keyPrompt = null;
  function askKey(message) {
    if (keyPrompt) return keyPrompt;
    const had = sessionStorage.getItem(KEY);
    ui.keyReason.textContent = !message ? "The API key this page sends (quill serve --api-key)."
      : had ? `The key was refused (${message}). Enter another one.` : "This server needs an API key.";
    ui.keyInput.value = "";
    keyPrompt = new Promise((resolve) => {
      const done = (ok) => {
        ui.keyForm.removeEventListener("submit", onSubmit);
        ui.keyDialog.removeEventListener("cancel", onCancel);
        if (ui.keyDialog.open) ui.keyDialog.close();
        keyPrompt = null;
        resolve(ok);
      };
      const onSubmit = (ev) => {
        ev.preventDefault();
        const key = ui.keyInput.value.trim();
        if (ev.submitter && ev.submitter.value === "cancel") return done(false);
        if (!key) { ui.keyInput.focus(); return; }
        sessionStorage.setItem(KEY, key);
        done(true);
      };
      const onCancel = (ev) => { ev.preventDefault(); done(false); };
      ui.keyForm.addEventListener("submit", onSubmit);
      ui.keyDialog.addEventListener("cancel", onCancel);
      ui.keyDialog.showModal();
      ui.keyInput.focus();
    });
    return keyPrompt;
  }

  // ---- errors --------------------------------------------------------------------------------------------------

  function showAlert(message) {
    ui.alertText.textContent = message;
    ui.alert.hidden = false;
  }
  function clearErrors() {
    ui.alert.hidden = true;
    for (const el of document.querySelectorAll(".field-error")) { el.hidden = true; el.textContent = ""; }
    for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    for (const el of document.querySelectorAll(".invalid")) el.classList.remove("invalid");
  }
  function fieldError(id, message) {
    const box = $(`${id}-error`);
    const control = $(id);
    if (!box || !control) return false;
    box.textContent = message;
    box.hidden = false;
    if (control.tagName === "FIELDSET") {
      control.classList.add("invalid");
      control.querySelector("input:checked")?.focus();
    } else {
      control.setAttribute("aria-invalid", "true");
      const described = (control.getAttribute("aria-describedby") || "").split(/\s+/);
      if (!described.includes(box.id)) control.setAttribute("aria-describedby", [...described, box.id].join(" ").trim());
      control.focus({ preventScroll: true });
    }
    control.closest(".field, fieldset")?.scrollIntoView({ block: "nearest" });
    return true;
  }
  // An error from the API next to the control that caused it; otherwise in the alert area.
  function showError(err, { admin = false } = {}) {
    if (err && err.name === "AbortError") return;
    let message = err && err.message ? err.message : String(err);
    if (err instanceof TypeError) message = `Cannot reach the server (${message}).`;
    if (err instanceof ApiError) {
      if (err.code === "chat_template_missing" && fieldError("mode", message)) return;
      const base = (err.param || "").split(/[.[]/)[0];
      if (admin && (err.status === 401 || err.status === 403) && fieldError("admin-key", message)) return;
      if (PARAM_FIELDS[base] && fieldError(PARAM_FIELDS[base], message)) return;
      if (err.status === 429) message = `The server is busy: ${message}`;
    }
    showAlert(message);
  }
  for (const el of document.querySelectorAll("input, select, textarea")) {
    el.addEventListener("input", () => {
      if (el.getAttribute("aria-invalid")) {
        el.removeAttribute("aria-invalid");
        const box = $(`${el.id}-error`);
        if (box) box.hidden = true;
      }
    });
  }

  // ---- models --------------------------------------------------------------------------------------------------

  const selected = () => state.models.find((m) => m.id === ui.model.value) || null;

  function optionLabel(m) {
    const bits = [m.id];
    if (m.parameters) bits.push(fmtParams(m.parameters));
    const p = precisionOf(m);
    if (p) bits.push(p);
    const size = fmtBytes(sizeOf(m));
    if (size) bits.push(size);
    return bits.join(" · ");
  }

  async function refreshModels(keep) {
    const res = await api("/v1/models");
    const body = await res.json();
    state.models = Array.isArray(body.data) ? body.data : [];
    const current = keep ?? ui.model.value;
    ui.model.replaceChildren();
    const loaded = state.models.filter(isLoaded);
    const stored = state.models.filter((m) => !isLoaded(m));
    const group = (label, list) => {
      if (!list.length) return;
      const g = document.createElement("optgroup");
      g.label = label;
      for (const m of list) g.append(new Option(optionLabel(m), m.id));
      ui.model.append(g);
    };
    group("Loaded", loaded);
    group("Stored (not loaded)", stored);
    if (state.models.some((m) => m.id === current)) ui.model.value = current;
    ui.status.textContent = `${loaded.length} model${loaded.length === 1 ? "" : "s"} loaded` +
      (stored.length ? `, ${stored.length} stored` : "");
    ui.status.classList.add("ok");
    if (!state.storeRoutes && state.models.some((m) => "loaded" in m || "status" in m)) state.storeRoutes = true;
    ui.admin.hidden = !state.storeRoutes && !state.hubRoutes;
    ui.hub.hidden = !state.hubRoutes;
    modelChanged();
  }

  async function detectStore() {
    try {
      const res = await fetch("/openapi.json");
      if (!res.ok) return;
      const paths = Object.keys((await res.json()).paths || {});
      state.storeRoutes = paths.some((p) => /\/models\/\{[^}]+\}\/load$/.test(p))
        && paths.some((p) => /\/models\/\{[^}]+\}\/unload$/.test(p));
      state.hubRoutes = paths.includes("/v1/models/pull") && paths.includes("/v1/hub/models");
    } catch (_) { /* no schema: guess from the model cards */ }
  }

  function modelChanged() {
    const m = selected();
    const bits = [];
    if (m) {
      if (!isLoaded(m)) bits.push("not loaded: load it first (admin)");
      if (m.parameters) bits.push(`${fmtParams(m.parameters)} parameters`);
      if (precisionOf(m)) bits.push(precisionOf(m));
      if (fmtBytes(sizeOf(m))) bits.push(`${fmtBytes(sizeOf(m))} on disk`);
      if (m.stored === false && state.storeRoutes) bits.push("not in the store");
      if (m.context_length) bits.push(`context ${m.context_length} tokens`);
      if (m.vocab_size) bits.push(`vocabulary ${m.vocab_size}`);
      if (m.has_chat_template === false) bits.push("no chat template");
      if (m.context_length) {
        const range = $("max_tokens-range");
        range.max = String(m.context_length);
        $("max_tokens").max = String(m.context_length);
      }
      if (state.shown !== m.id) {  // another model: the precision choice starts at its current one
        state.shown = m.id;
        const p = { fp32: "float32", bf16: "bfloat16" }[precisionOf(m)] ?? precisionOf(m);
        if (p && [...ui.dtype.options].some((o) => o.value === p)) ui.dtype.value = p;
      }
    }
    ui.modelInfo.textContent = bits.join(" · ");
    $("mode-hint").textContent = m && m.has_chat_template === false ? "(this model has no chat template)" : "";
    ui.load.disabled = !m || m.stored === false || !!state.adminBusy;  // only stored models can be (re)loaded
    ui.unload.disabled = !m || !isLoaded(m) || !!state.adminBusy;
    ui.load.textContent = m && isLoaded(m) ? "Reload" : "Load";
  }

  async function adminAction(action) {
    const m = selected();
    if (!m) return;
    clearErrors();
    sessionStorage.setItem(ADMIN_KEY, ui.adminKey.value.trim());
    if (!ui.adminKey.value.trim()) {
      fieldError("admin-key", "Enter the admin key (quill serve --admin-key) to load or unload models.");
      return;
    }
    const name = m.id;
    const dtype = ui.dtype.value;
    const label = ui.dtype.selectedOptions[0].textContent.split(" ")[0];
    const t0 = performance.now();
    state.adminBusy = true;
    modelChanged();
    const tick = setInterval(() => {
      ui.adminStatus.textContent = `${action === "load" ? `Loading ${name} as ${label}` : `Unloading ${name}`}… ` +
        `${((performance.now() - t0) / 1000).toFixed(0)} s`;
    }, 500);
    ui.adminStatus.textContent = action === "load" ? `Loading ${name} as ${label}…` : `Unloading ${name}…`;
    try {
      const path = `/v1/models/${encodeURIComponent(name).replace(/%2F/g, "/")}/${action}`;
      await api(path, { method: "POST", body: action === "load" ? { dtype } : {}, admin: true });
      const secs = ((performance.now() - t0) / 1000).toFixed(1);
      ui.adminStatus.textContent = action === "load" ? `Loaded ${name} (${label}) in ${secs} s.` : `Unloaded ${name}.`;
      await refreshModels(name);
    } catch (err) {
      ui.adminStatus.textContent = "";
      showError(err, { admin: true });
    } finally {
      clearInterval(tick);
      state.adminBusy = false;
      modelChanged();
    }
  }

  // ---- models from the Hugging Face Hub (admin) ----------------------------------------------------------------

  function adminKeyOrAsk(what) {
    const key = ui.adminKey.value.trim();
    sessionStorage.setItem(ADMIN_KEY, key);
    if (!key) fieldError("admin-key", `Enter the admin key (quill serve --admin-key) to ${what}.`);
    return key;
  }

  async function refreshHub() {
    if (!state.hubRoutes || !ui.adminKey.value.trim()) return null;
    const body = await (await api("/v1/hub/models", { admin: true })).json();
    const current = ui.hubModel.value;
    ui.hubModel.replaceChildren();
    for (const m of body.data || []) {
      const bits = [m.id, m.parameters];
      if (m.loaded) bits.push("loaded"); else if (m.cached) bits.push("downloaded");
      ui.hubModel.append(new Option(bits.join(" · "), m.id));
    }
    if (current && [...ui.hubModel.options].some((o) => o.value === current)) ui.hubModel.value = current;
    return body;
  }

  function showPull(p) {
    const total = p.bytes_total || 0;
    ui.pullProgress.hidden = p.status === "ready" || p.status === "failed";
    ui.pullProgress.max = Math.max(total, 1);
    ui.pullProgress.value = p.status === "loading" ? ui.pullProgress.max : p.bytes_done || 0;
    const words = { downloading: "Downloading", loading: "Loading", ready: "Ready:", failed: "Failed:" }[p.status];
    const amount = total ? ` ${fmtBytes(p.bytes_done) || "0 B"} of ${fmtBytes(total)}` : "";
    ui.pullStatus.textContent = `${words} ${p.id}${p.status === "downloading" ? amount : ""}` +
      (p.status === "ready" ? ` (${p.precision}), selected above.` : p.status === "loading" ? "…" : "");
  }

  async function pullModel() {
    clearErrors();
    if (!adminKeyOrAsk("download models")) return;
    const name = ui.hubRepo.value.trim() || ui.hubModel.value;
    if (!name) { fieldError("hub-model", "Choose a model to download."); return; }
    state.adminBusy = true;
    ui.pull.disabled = true;
    modelChanged();
    try {
      const res = await api("/v1/models/pull", { method: "POST", body: { name, dtype: ui.dtype.value }, admin: true });
      let p = await res.json();
      showPull(p);
      while (p.status === "downloading" || p.status === "loading") {
        await new Promise((r) => setTimeout(r, 400));
        const body = await (await api("/v1/hub/models", { admin: true })).json();
        p = (body.pulls || []).find((x) => x.id === name) || p;
        showPull(p);
      }
      if (p.status === "failed") throw new ApiError(p.error.status, { error: p.error });
      await refreshModels(name);
      await refreshHub();
    } catch (err) {
      ui.pullStatus.textContent = "";
      ui.pullProgress.hidden = true;
      if (!(err instanceof ApiError && err.param === "name" && fieldError("hub-model", err.message))) {
        showError(err, { admin: true });
      }
    } finally {
      state.adminBusy = false;
      ui.pull.disabled = false;
      modelChanged();
    }
  }

  // ---- the request ---------------------------------------------------------------------------------------------

  class FieldError extends Error {
    constructor(field, message) { super(message); this.field = field; }
  }

  function number(id) {
    const el = $(id);
    const raw = el.value.trim();
    if (raw === "") {
      if (el.validity && el.validity.badInput) throw new FieldError(id, "Enter a number.");
      return undefined;
    }
    const v = Number(raw);
    if (!isFinite(v)) throw new FieldError(id, "Enter a number.");
    return v;
  }

  function formatFields() {  // the format control as response_format (JSON) or structured_outputs
    const kind = $("format").value, spec = $("format-spec").value;
    if (kind === "json") return { response_format: { type: "json_object" } };
    if (kind === "json_schema") {
      let schema;
      try { schema = JSON.parse(spec); } catch (e) { throw new FieldError("format", "The schema is not valid JSON."); }
      return { response_format: { type: "json_schema", json_schema: { name: "schema", schema } } };
    }
    if (kind === "regex") return { structured_outputs: { regex: spec } };
    if (kind === "choice") return { structured_outputs: { choice: spec.split("\n").filter((c) => c !== "") } };
    return {};
  }

  function formatChanged() {
    const kind = $("format").value;
    $("format-spec").hidden = $("format-spec-label").hidden = kind === "none" || kind === "json";
    $("format-hint").textContent = FORMAT_HINTS[kind];
  }

  const unescape = (s) => s.replace(/\\(n|t|r|\\)/g, (_, c) => ({ n: "\n", t: "\t", r: "\r", "\\": "\\" })[c]);

  function requestBody(mode) {
    const body = { model: ui.model.value || undefined, stream: true, stream_options: { include_usage: true } };
    const maxTokens = number("max_tokens");
    body.max_tokens = maxTokens === undefined ? null : maxTokens;
    for (const id of ["temperature", "top_k", "top_p", "repetition_penalty", "seed"]) {
      const v = number(id);
      if (v !== undefined) body[id] = v;
    }
    const stops = $("stop").value.split("\n").filter((s) => s !== "").map(unescape);
    if (stops.length) body.stop = stops;
    const flops = number("max_flops");
    if (flops !== undefined) body.max_flops = flops;
    Object.assign(body, formatFields());
    if (mode === "chat") {
      const messages = [];
      if (ui.system.value.trim()) messages.push({ role: "system", content: ui.system.value });
      messages.push({ role: "user", content: ui.prompt.value });
      body.messages = messages;
      if (ui.showTokens.checked) { body.logprobs = true; body.top_logprobs = 1; }
    } else {
      body.prompt = ui.prompt.value;
      if (ui.showTokens.checked) body.logprobs = 1;
    }
    return body;
  }

  // ---- output --------------------------------------------------------------------------------------------------

  function resetOutput(promptText) {
    pending.text = "";
    pending.tokens = [];
    ui.outPrompt.textContent = promptText;
    ui.outText.textContent = "";
    state.tokens = [];
    state.active = -1;
    ui.tokens.replaceChildren();
    ui.tokens.removeAttribute("aria-activedescendant");
    ui.tokenDetail.textContent = "Hover a token, or focus the list and use the arrow keys.";
    state.continuation = null;
    ui.cont.hidden = true;
    for (const id of ["ttft", "speed", "tokens", "cached", "flops", "time", "finish", "model"]) {
      $(`stat-${id}`).textContent = id === "model" ? "" : "–";
      $(`stat-${id}`).title = "";
    }
    $("stat-finish").className = "";
    delete $("stat-finish").dataset.reason;
  }

  // Streamed text and tokens reach the DOM at most once a frame: one layout per frame, however fast the
  // tokens come, so the page stays responsive during long, fast generations.
  const pending = { text: "", tokens: [], scheduled: false, node: null };

  function queueOutput(text, entries) {
    pending.text += text;
    for (const t of entries) pending.tokens.push(t);
    if (pending.scheduled) return;
    pending.scheduled = true;
    const go = () => { if (pending.scheduled) flushOutput(); };
    requestAnimationFrame(go);
    setTimeout(go, 100);  // rAF does not fire in a hidden tab
  }

  function flushOutput() {
    pending.scheduled = false;
    if (pending.text) {
      const atBottom = ui.output.scrollHeight - ui.output.scrollTop - ui.output.clientHeight < 24;
      if (!pending.node || pending.node.parentNode !== ui.outText) {
        pending.node = document.createTextNode("");
        ui.outText.append(pending.node);
      }
      pending.node.appendData(pending.text);
      pending.text = "";
      if (atBottom) ui.output.scrollTop = ui.output.scrollHeight;
    }
    if (pending.tokens.length) {
      addTokens(pending.tokens);
      pending.tokens = [];
    }
    if (state.run) renderStats(state.run, false);
  }

  function tokenTitle(t) {
    const p = t.logprob === null || t.logprob === undefined ? null : Math.exp(t.logprob);
    const lines = [`"${t.text}"   id ${t.id ?? "n/a"}`];
    lines.push(p === null ? "p n/a" : `p = ${(100 * p).toFixed(1)} %   (logprob ${t.logprob.toFixed(3)})`);
    const alts = (t.top || []).filter(([text]) => text !== t.text);
    if (alts.length) lines.push("top: " + alts.map(([text, lp]) => `"${text}" ${(100 * Math.exp(lp)).toFixed(1)} %`).join(", "));
    return lines.join("\n");
  }

  function addTokens(entries) {
    const frag = document.createDocumentFragment();
    for (const t of entries) {
      const i = state.tokens.length;
      state.tokens.push(t);
      const span = document.createElement("span");
      span.className = "tok";
      span.id = `tok-${i}`;
      span.setAttribute("role", "option");
      span.dataset.i = String(i);
      const p = t.logprob === null || t.logprob === undefined ? null : Math.exp(t.logprob);
      if (p !== null) span.style.setProperty("--p", p.toFixed(3));
      else span.classList.add("nop");
      if (t.id !== null && t.id !== undefined) span.dataset.id = String(t.id);
      span.title = tokenTitle(t);
      span.textContent = t.text === "" ? "∅" : visible(t.text);
      frag.append(span);
    }
    ui.tokens.append(frag);
  }

  function showToken(i) {
    const t = state.tokens[i];
    if (!t) return;
    if (state.active >= 0) $(`tok-${state.active}`)?.classList.remove("active");
    state.active = i;
    const span = $(`tok-${i}`);
    span.classList.add("active");
    ui.tokens.setAttribute("aria-activedescendant", span.id);
    span.scrollIntoView({ block: "nearest" });
    ui.tokenDetail.textContent = `#${i + 1}  ` + tokenTitle(t).replace(/\n/g, "  ·  ");
  }

  // Token entries of a chunk's logprobs: completions' legacy shape or chat's `content` list.
  function tokenEntries(lp) {
    if (!lp) return [];
    if (Array.isArray(lp.content)) {
      return lp.content.map((c) => ({
        text: c.token, logprob: c.logprob, id: c.id ?? c.token_id ?? null,
        top: (c.top_logprobs || []).map((a) => [a.token, a.logprob]),
      }));
    }
    if (Array.isArray(lp.tokens)) {
      const ids = lp.token_ids || lp.ids || [];
      return lp.tokens.map((text, k) => ({
        text, logprob: lp.token_logprobs ? lp.token_logprobs[k] : null, id: ids[k] ?? null,
        top: lp.top_logprobs && lp.top_logprobs[k] ? Object.entries(lp.top_logprobs[k]) : [],
      }));
    }
    return [];
  }

  function setView(view) {
    state.view = view;
    ui.viewText.setAttribute("aria-pressed", String(view === "text"));
    ui.viewTokens.setAttribute("aria-pressed", String(view === "tokens"));
    ui.output.hidden = view !== "text";
    ui.tokens.hidden = view !== "tokens";
    ui.tokenPanel.hidden = view !== "tokens";
  }

  function renderStats(run, final) {
    const s = state.session;
    const now = run.tEnd ?? performance.now();
    if (run.model) $("stat-model").textContent = run.model;
    if (run.tFirst !== null) $("stat-ttft").textContent = `${Math.round(run.tFirst - run.t0)} ms`;
    const n = run.usage ? run.usage.completion_tokens ?? run.count : run.count;
    // Live: tokens arriving per second here; at the end: completion tokens / the server's seconds for the call.
    const serverSecs = run.usage && typeof run.usage.seconds === "number" ? run.usage.seconds : null;
    const rate = final && serverSecs ? n / serverSecs
      : run.tFirst !== null && n > 1 && now > run.tFirst ? (n - 1) / ((now - run.tFirst) / 1000) : null;
    if (rate !== null && n > 0) {
      $("stat-speed").textContent = `${rate >= 100 ? Math.round(rate) : rate.toFixed(1)} tokens/s`;
      $("stat-speed").title = final && serverSecs ? "completion tokens / server time of this call"
        : "tokens received per second";
    }
    const total = s.tokens + n;
    $("stat-tokens").textContent = s.calls ? `${total} (${s.calls + 1} calls)` : String(n);
    // prompt tokens the server's prefix cache held: their work was not done again, nor billed
    const details = run.usage && run.usage.prompt_tokens_details;
    if (details && typeof details.cached_tokens === "number") {
      $("stat-cached").textContent = `${details.cached_tokens} of ${run.usage.prompt_tokens} prompt`;
      $("stat-cached").title = "prompt tokens reused from the prefix cache (not computed again, not billed)";
    }
    const flops = run.usage && typeof run.usage.flops === "number" ? run.usage.flops : null;
    if (flops !== null || s.flops) {
      const sum = s.flops + (flops ?? 0);
      $("stat-flops").textContent = `${si(sum, "FLOP")}${flops === null && final ? " + ?" : ""}`;
      $("stat-flops").title = `${sum.toLocaleString("en")} floating-point operations`;
    } else if (final) {
      $("stat-flops").textContent = run.finish === "stopped" ? "not reported" : "–";
    }
    const secs = run.usage && typeof run.usage.seconds === "number" ? run.usage.seconds : (now - run.t0) / 1000;
    $("stat-time").textContent = `${(s.seconds + secs).toFixed(2)} s`;
    if (final) {
      const f = $("stat-finish");
      f.textContent = run.finish || "–";
      if (FINISH[run.finish]) {
        const small = document.createElement("small");
        small.textContent = FINISH[run.finish];
        f.append(small);
      }
      f.className = run.finish ? `finish-${run.finish}` : "";
      f.dataset.reason = run.finish || "";
      s.tokens = total;
      s.flops += flops ?? 0;
      s.seconds += secs;
      s.calls += 1;
    }
  }

  // ---- generating ----------------------------------------------------------------------------------------------

  function setBusy(busy) {
    ui.generate.disabled = busy;
    ui.cont.disabled = busy;
    ui.stop.disabled = !busy;
    ui.busy.hidden = !busy;
    if (busy) $("sr-status").textContent = "Generating…";
    ui.caret.hidden = !busy;
    ui.form.setAttribute("aria-busy", String(busy));
  }

  function handleChunk(chunk, run) {
    if (chunk.error) throw new ApiError(chunk.error.code === "internal_error" ? 500 : 400, chunk);
    if (chunk.model) run.model = chunk.model;
    if (typeof chunk.continuation === "string") run.handle = chunk.continuation;
    if (chunk.usage) run.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      if (choice.index) continue;  // one sample
      const text = choice.text ?? (choice.delta && choice.delta.content) ?? "";
      const entries = tokenEntries(choice.logprobs);
      if ((text || entries.length) && run.tFirst === null) run.tFirst = performance.now();
      if (text || entries.length) queueOutput(text, entries);
      run.count += entries.length || (text ? 1 : 0);
      if (typeof choice.continuation === "string") run.handle = choice.continuation;
      if (choice.finish_reason) run.finish = choice.finish_reason;
    }
  }

  async function readEvents(res, run) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        handleChunk(JSON.parse(data), run);
      }
    }
  }

  async function generate({ resume = false } = {}) {
    if (state.run) return;
    clearErrors();
    const mode = document.querySelector('input[name="mode"]:checked').value;
    let path, body;
    try {
      if (resume) {
        const c = state.continuation;
        if (!c) return;
        path = "/v1/completions";
        body = { model: c.model, continuation: c.handle, stream: true, stream_options: { include_usage: true } };
        const flops = number("max_flops");
        if (flops !== undefined) body.max_flops = flops;
      } else {
        path = mode === "chat" ? "/v1/chat/completions" : "/v1/completions";
        body = requestBody(mode);
      }
    } catch (err) {
      if (err instanceof FieldError) { fieldError(err.field, err.message); return; }
      throw err;
    }
    if (!resume) {
      resetOutput(mode === "chat" ? "" : ui.prompt.value);
      state.session = { tokens: 0, flops: 0, seconds: 0, calls: 0 };
    } else {
      ui.cont.hidden = true;
      flushOutput();
      const mark = document.createElement("span");  // where this piece begins (no text: textContent stays exact)
      mark.className = "resume-mark";
      mark.title = `resumed from the continuation handle (call ${state.session.calls + 1})`;
      ui.outText.append(mark);
      pending.node = null;
    }
    const run = {
      controller: new AbortController(), t0: performance.now(), tFirst: null, tEnd: null, count: 0,
      usage: null, finish: null, handle: null, model: body.model,
    };
    state.run = run;
    setBusy(true);
    try {
      const res = await api(path, { method: "POST", body, signal: run.controller.signal });
      await readEvents(res, run);
      if (!run.finish) run.finish = "stop";
    } catch (err) {
      if (err && err.name === "AbortError") {
        run.finish = "stopped";
      } else {
        run.finish = run.tFirst === null && !resume ? null : "error";
        showError(err);
      }
    } finally {
      run.tEnd = performance.now();
      state.run = null;
      flushOutput();
      setBusy(false);
      if (run.tFirst !== null || run.finish) renderStats(run, true);
      if (run.finish) {
        $("sr-status").textContent = `Finished: ${run.finish}, ${$("stat-tokens").textContent} tokens.`;
      }
      if (run.finish === "budget" && run.handle) {
        state.continuation = { handle: run.handle, model: run.model };
        ui.cont.hidden = false;
        ui.cont.disabled = false;
      } else if (run.finish === "budget") {
        showAlert("The FLOP budget ran out, but the server sent no continuation handle.");
      }
    }
  }

  // ---- wiring --------------------------------------------------------------------------------------------------

  function syncRange(id) {
    const number_ = $(id);
    const range = $(`${id}-range`);
    range.addEventListener("input", () => {
      number_.value = range.value;
      number_.dispatchEvent(new Event("input"));
    });
    number_.addEventListener("input", () => {
      if (number_.value !== "" && isFinite(Number(number_.value))) range.value = number_.value;
    });
  }
  syncRange("max_tokens");
  syncRange("temperature");

  ui.form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    generate().catch(showError);
  });
  ui.stop.addEventListener("click", () => state.run && state.run.controller.abort());
  ui.cont.addEventListener("click", () => generate({ resume: true }).catch(showError));
  $("format").addEventListener("change", formatChanged);
  ui.clear.addEventListener("click", () => { if (!state.run) { clearErrors(); resetOutput(""); } });
  ui.prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      ui.form.requestSubmit();
    }
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && state.run && !ui.keyDialog.open) state.run.controller.abort();
  });
  $("alert-close").addEventListener("click", () => { ui.alert.hidden = true; });
  ui.model.addEventListener("change", modelChanged);
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => {
      const chat = radio.value === "chat" && radio.checked;
      $("system-field").hidden = !chat;
      $("prompt-label").textContent = chat ? "Message" : "Prompt";
      $("mode").classList.remove("invalid");
      $("mode-error").hidden = true;
    });
  }
  ui.viewText.addEventListener("click", () => setView("text"));
  ui.viewTokens.addEventListener("click", () => setView("tokens"));
  ui.tokens.addEventListener("mouseover", (ev) => {
    const span = ev.target.closest(".tok");
    if (span) showToken(Number(span.dataset.i));
  });
  ui.tokens.addEventListener("focus", () => { if (state.active < 0 && state.tokens.length) showToken(0); });
  ui.tokens.addEventListener("keydown", (ev) => {
    const moves = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1, Home: -Infinity, End: Infinity };
    if (!(ev.key in moves) || !state.tokens.length) return;
    ev.preventDefault();
    const i = Math.min(state.tokens.length - 1, Math.max(0, (state.active < 0 ? 0 : state.active) + moves[ev.key]));
    showToken(Number.isFinite(i) ? i : 0);
  });
  ui.load.addEventListener("click", () => adminAction("load"));
  ui.unload.addEventListener("click", () => adminAction("unload"));
  ui.adminKey.value = sessionStorage.getItem(ADMIN_KEY) || "";
  ui.adminKey.addEventListener("change", () => {
    sessionStorage.setItem(ADMIN_KEY, ui.adminKey.value.trim());
    refreshHub().catch((err) => showError(err, { admin: true }));
  });
  ui.admin.addEventListener("toggle", () => {
    if (ui.admin.open) refreshHub().catch((err) => showError(err, { admin: true }));
  });
  ui.pull.addEventListener("click", pullModel);
  $("key-button").addEventListener("click", async () => {
    if (await askKey("")) refreshModels().catch(showError);
  });

  document.addEventListener("visibilitychange", () => {  // back to the tab: models may have changed meanwhile
    if (!document.hidden && !state.adminBusy && ui.status.classList.contains("ok")) refreshModels().catch(() => {});
  });

  setView("text");
  setBusy(false);
  resetOutput("");
  (async () => {
    await detectStore();
    try {
      await refreshModels();
    } catch (err) {
      ui.status.textContent = "not connected";
      ui.status.classList.remove("ok");
      showError(err);
    }
  })();
})();
