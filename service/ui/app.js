// The playground at GET /ui: a form over /generate/stream's body, its bounds read from /docs.json and its
// adapters from /info; each request's Server-Sent Events read from a fetch() body (EventSource cannot POST);
// the session's results kept in memory with the server's PNG bytes, unchanged, for download.
"use strict";

const TOKEN_KEY = "spo-serve.token";  // sessionStorage: this tab only, gone when it closes
const STREAM = "/generate/stream";
const $ = (id) => document.getElementById(id);

const state = {
  schema: null,      // GenerateStreamBody's JSON schema, from /docs.json
  info: null,        // the last /info
  initImage: null,   // a data: URL
  runs: new Set(),   // running requests, each {ctrl, node}
  count: 0,
  sized: false,      // the preset's default size put in the form (once)
  loraTouched: false,
};

// -- calls --------------------------------------------------------------------------------------

function headers(json) {
  const h = {};
  if (json) h["content-type"] = "application/json";
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) h.authorization = `Bearer ${token}`;
  return h;
}

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers(false) });
  if (!resp.ok) throw await errorBody(resp);
  return resp.json();
}

// The one error body {"error", "status", "detail": [{"loc": [field], "msg", "type"}]}, or one made for an
// answer that has another shape (a proxy's page, say).
async function errorBody(resp) {
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  if (body && typeof body.error === "string" && Array.isArray(body.detail)) return body;
  const text = `HTTP ${resp.status} ${resp.statusText}`.trim();
  return { error: text, status: resp.status, detail: [{ loc: [], msg: text, type: "http" }] };
}

// Server-Sent Events from a response body: yields {event, data} with data parsed as JSON.
async function* sse(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let end;
    while ((end = buf.search(/\r?\n\r?\n/)) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end).replace(/^\r?\n\r?\n/, "");
      let event = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = val;
        else if (field === "data") data.push(val);
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

// -- the form and its bounds ----------------------------------------------------------------------

// A property of the body's schema with its non-null branch merged in (pydantic writes `int | None` as anyOf).
function prop(name) {
  const p = state.schema && state.schema.properties && state.schema.properties[name];
  if (!p) return null;
  const branch = (p.anyOf || []).find((b) => b.type !== "null") || {};
  return { ...p, ...branch };
}

function range(p) {
  return p && p.minimum !== undefined && p.maximum !== undefined ? `${p.minimum}–${p.maximum}` : "";
}

function applySchema() {
  for (const name of ["seed", "num_inference_steps", "guidance_scale", "best_of", "width", "height", "lora_scale", "strength"]) {
    const p = prop(name);
    const el = $(name);
    if (!p) continue;
    if (p.maximum !== undefined) el.max = p.maximum;
    if (p.minimum !== undefined) el.min = p.exclusiveMinimum === true ? el.step : p.minimum;
    if (p.multipleOf !== undefined) el.step = p.multipleOf;
    if (p.description) el.title = p.description;
  }
  $("num_inference_steps-hint").textContent = range(prop("num_inference_steps"));
  $("guidance_scale-hint").textContent = `${range(prop("guidance_scale"))}; ≤ 1 turns guidance off`;
  $("best_of-hint").textContent = `${range(prop("best_of"))} candidates; the preference model picks one`;
  const size = prop("width");
  if (size) $("size-hint").textContent = `Width and height: ${range(size)} px, multiples of ${size.multipleOf || 1} (this preset's range).`;
  const sched = prop("scheduler");
  if (sched && sched.enum) {
    const select = $("scheduler");
    select.replaceChildren(...sched.enum.map((v) => new Option(v, v, v === sched.default, v === sched.default)));
  }
}

function applyInfo(info) {
  state.info = info;
  const e = info.engine || {};
  $("server").textContent = info.ready
    ? `${info.preset} preset · ${info.device} · ${info.dtype} · running ${e.running}, waiting ${e.waiting} · v${info.version}`
    : `${info.failure ? `failed: ${info.failure}` : "the model is loading…"} (v${info.version})`;
  if (!info.ready) return;
  const select = $("adapter");
  const chosen = select.value;
  select.replaceChildren(new Option(`server default (${info.default_adapter || "none"})`, ""),
    ...(info.adapters || []).map((a) => new Option(`${a.name} (rank ${a.rank})`, a.name)));
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
  if (!state.loraTouched) setRange("lora_scale", info.default_lora_scale);
  // the preset's size once, at the first answer: a size emptied later stays empty (the preset's default,
  // or an init image's own size), whatever /info says after each result
  if (!state.sized) for (const side of ["width", "height"]) if ($(side).value === "") $(side).value = info.default_size;
  state.sized = true;
}

async function refreshInfo() {
  try {
    const info = await getJSON("/info");
    applyInfo(info);
    if (!info.ready && !info.failure) setTimeout(refreshInfo, 2000);
  } catch (err) {
    $("server").textContent = `/info: ${err.error || err}`;
  }
}

function setRange(id, value) {
  $(id).value = value;
  $(`${id}-value`).textContent = Number($(id).value).toFixed(2);
}

// A number field: "" is sent as null so that the server names the field rather than a default hiding it.
function num(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function body() {
  const b = { prompt: $("prompt").value };
  if ($("negative_prompt").value !== "") b.negative_prompt = $("negative_prompt").value;
  if (!$("seed-random").checked) b.seed = num("seed");
  b.num_inference_steps = num("num_inference_steps");
  b.guidance_scale = num("guidance_scale");
  if ($("best_of").value.trim() !== "1") b.best_of = num("best_of");  // absent: one image, as before
  b.scheduler = $("scheduler").value;
  for (const side of ["width", "height"]) if ($(side).value.trim() !== "") b[side] = num(side);
  if ($("adapter").value) b.adapter = $("adapter").value;
  b.lora_scale = Number($("lora_scale").value);
  if (state.initImage) {
    b.init_image = state.initImage;
    b.strength = Number($("strength").value);
  }
  return b;
}

// The form as a result's request left it (a click on a result in the gallery).
function fill(req, seed) {
  $("prompt").value = req.prompt;
  $("negative_prompt").value = req.negative_prompt || "";
  $("seed-random").checked = false;
  $("seed").disabled = false;
  $("seed").value = seed;
  for (const id of ["num_inference_steps", "guidance_scale", "width", "height"]) $(id).value = req[id] ?? "";
  $("best_of").value = req.best_of ?? 1;
  $("scheduler").value = req.scheduler;
  $("adapter").value = [...$("adapter").options].some((o) => o.value === (req.adapter || "")) ? (req.adapter || "") : "";
  state.loraTouched = true;
  setRange("lora_scale", req.lora_scale);
  setInitImage(req.init_image || null);
  if (req.strength !== undefined) setRange("strength", req.strength);
  clearErrors();
  $("prompt").focus();
}

function setInitImage(url) {
  state.initImage = url;
  $("init-thumb").src = url || "";
  $("init-preview").hidden = !url;
  $("strength").disabled = !url;
  if (!url) $("init_image").value = "";
}

// -- errors ----------------------------------------------------------------------------------------

const FIELD_ERRORS = ["prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "best_of", "scheduler",
  "width", "height", "adapter", "lora_scale", "init_image", "strength", "authorization"];

function clearErrors() {
  for (const name of FIELD_ERRORS) {
    const out = $(`${name}-error`);
    out.hidden = true;
    out.textContent = "";
    const control = name === "authorization" ? $("token") : $(name);
    control.removeAttribute("aria-invalid");
  }
  $("form-error").hidden = true;
  $("form-error").textContent = "";
}

// Each detail next to its field (the first such field gets the focus); the whole message above the button.
function showError(err) {
  let first = null;
  for (const d of err.detail || []) {
    const field = d.loc && d.loc.length ? String(d.loc[0]) : "";
    if (!FIELD_ERRORS.includes(field)) continue;
    const out = $(`${field}-error`);
    out.textContent = `${field}: ${d.msg.replace(new RegExp(`^${field}: `), "")}`;
    out.hidden = false;
    const control = field === "authorization" ? $("token") : $(field);
    control.setAttribute("aria-invalid", "true");
    if (field === "authorization") $("auth").open = true;
    first = first || control;
  }
  $("form-error").textContent = `${err.status || "error"}: ${err.error}`;
  $("form-error").hidden = false;
  if (first) first.focus();
}

function announce(text) {
  $("announce").textContent = text;
}

// -- running requests -------------------------------------------------------------------------------

function eta(s) {
  if (!(s > 0)) return "0 s";
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function addRun(req) {
  const node = $("run-template").content.firstElementChild.cloneNode(true);
  const n = ++state.count;
  const title = `#${n} ${req.prompt.slice(0, 60)}`;
  node.querySelector(".run-title").textContent = title;
  node.querySelector("progress").setAttribute("aria-label", `progress of ${title}`);
  const run = { ctrl: new AbortController(), node, title, done: false };
  const button = node.querySelector(".cancel");
  button.setAttribute("aria-label", `Cancel ${title}`);
  button.addEventListener("click", () => (run.done ? finish(run) : run.ctrl.abort()));
  $("runs").prepend(node);
  state.runs.add(run);
  $("runs-empty").hidden = true;
  return run;
}

function setStatus(run, text) {
  run.node.querySelector(".run-status").textContent = text;
}

// A run that ended badly stays in the list with its message until dismissed; a finished one leaves at once.
function end(run, text, failed) {
  run.done = true;
  state.runs.delete(run);
  run.node.classList.add(failed ? "failed" : "ended");
  setStatus(run, text);
  const button = run.node.querySelector(".cancel");
  button.textContent = "Dismiss";
  button.setAttribute("aria-label", `Dismiss ${run.title}`);
  announce(`${run.title}: ${text}`);
  refreshInfo();
}

function finish(run) {
  run.node.remove();
  state.runs.delete(run);
  $("runs-empty").hidden = $("runs").children.length > 0;
}

async function generate(event) {
  event.preventDefault();
  clearErrors();
  const req = body();
  const preview = $("preview").checked;
  const run = addRun(req);
  setStatus(run, "sending…");
  try {
    const resp = await fetch(STREAM, { method: "POST", headers: headers(true), signal: run.ctrl.signal,
                                       body: JSON.stringify({ ...req, preview }) });
    if (!resp.ok) {
      const err = await errorBody(resp);
      showError(err);
      return end(run, `${err.status}: ${err.error}`, true);
    }
    for await (const { event: kind, data } of sse(resp.body)) {
      if (kind === "queued") {
        setStatus(run, `queued: ${data.position} image(s) ahead`);
      } else if (kind === "step") {
        const bar = run.node.querySelector("progress");
        bar.value = data.i / data.n;
        setStatus(run, `step ${data.i}/${data.n} · ETA ${eta(data.eta_s)}`);
        if (data.preview) {
          const img = run.node.querySelector(".run-preview");
          img.src = `data:image/png;base64,${data.preview}`;
          img.alt = `latent preview of ${run.title} at step ${data.i}`;
          img.hidden = false;
        }
      } else if (kind === "done") {
        addResult(req, data);
        finish(run);
        announce(`${run.title}: done, seed ${data.seed}`);
        refreshInfo();
        return;
      } else if (kind === "error") {
        showError(data);
        return end(run, `${data.status}: ${data.error}`, true);
      }
    }
    end(run, "the stream ended without an image", true);
  } catch (err) {
    if (err.name === "AbortError") end(run, "cancelled", false);
    else end(run, `failed: ${err.message || err}`, true);
  }
}

// -- the gallery ---------------------------------------------------------------------------------------

function bytes(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function addResult(req, done) {
  const url = URL.createObjectURL(new Blob([bytes(done.image)], { type: `image/${done.format}` }));
  const node = $("result-template").content.firstElementChild.cloneNode(true);
  const img = node.querySelector("img");
  img.src = url;
  img.alt = `result, seed ${done.seed}: ${req.prompt}`;
  const reuse = node.querySelector(".reuse");
  reuse.setAttribute("aria-label", `Reuse the parameters of seed ${done.seed}: ${req.prompt.slice(0, 80)}`);
  reuse.addEventListener("click", () => fill(req, done.seed));
  const params = [
    ["prompt", req.prompt],
    ...(req.negative_prompt !== undefined ? [["negative", req.negative_prompt]] : []),
    ["seed", done.seed],
    ["steps", req.num_inference_steps],
    ["guidance", req.guidance_scale],
    ["scheduler", req.scheduler],
    ["size", req.width && req.height ? `${req.width}×${req.height}` : "preset default"],
    ["adapter", done.adapter || "none"],
    ["LoRA scale", done.lora_scale],
    ...(req.init_image ? [["strength", req.strength]] : []),
    ...(done.best_of > 1 ? [["best of", `${done.best_of} (score ${Number(done.preference_score).toFixed(3)})`]] : []),
    ["time", `${(done.ms / 1000).toFixed(1)} s`],
  ];
  const dl = node.querySelector(".params");
  for (const [k, v] of params) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = String(v);
    dl.append(dt, dd);
  }
  const link = node.querySelector(".download");
  link.href = url;
  link.download = `spo-${done.seed}-${done.request_id.slice(0, 8)}.${done.format}`;
  link.setAttribute("aria-label", `Download PNG of seed ${done.seed}`);
  node.dataset.seed = done.seed;
  node.dataset.requestId = done.request_id;
  $("gallery").prepend(node);
  $("gallery-empty").hidden = true;
}

// -- start -----------------------------------------------------------------------------------------

function wire() {
  const token = $("token");
  token.value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("auth").open = Boolean(token.value);
  token.addEventListener("input", () => {
    if (token.value) sessionStorage.setItem(TOKEN_KEY, token.value);
    else sessionStorage.removeItem(TOKEN_KEY);
  });
  token.addEventListener("change", refreshInfo);
  $("seed-random").addEventListener("change", (e) => { $("seed").disabled = e.target.checked; });
  $("lora_scale").addEventListener("input", () => { state.loraTouched = true; setRange("lora_scale", $("lora_scale").value); });
  $("strength").addEventListener("input", () => setRange("strength", $("strength").value));
  $("init_image").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (!file) return setInitImage(null);
    const reader = new FileReader();
    reader.onload = () => setInitImage(reader.result);  // a data: URL, which the server accepts as is
    reader.readAsDataURL(file);
  });
  $("init-clear").addEventListener("click", () => setInitImage(null));
  $("form").addEventListener("submit", generate);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && $("form").contains(e.target)) {
      e.preventDefault();
      $("form").requestSubmit();
    } else if (e.key === "Escape" && state.runs.size) {
      [...state.runs].at(-1).ctrl.abort();  // the newest
    }
  });
}

async function start() {
  wire();
  try {
    const doc = await getJSON("/docs.json");
    state.schema = doc.paths[STREAM].post.requestBody.content["application/json"].schema;
    applySchema();
  } catch (err) {
    showError(err.detail ? err : { error: `/docs.json: ${err}`, detail: [] });
  }
  await refreshInfo();
  document.body.dataset.ready = "true";
}

start();
