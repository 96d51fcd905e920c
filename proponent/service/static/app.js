// proponent influence explorer: vanilla JS against the same REST API (/v1/*), no build step, no CDN.
//
// Every request goes through api(): it sends the API key kept in sessionStorage as X-API-Key, asks for
// a key when a request answers 401 (then retries), and turns the server's error body
// {"error": {status, code, message, request_id}} into an ApiError whose message is shown on the page.
// Images need the key too, so they are fetched with it and shown through object URLs.
"use strict";

const KEY_STORE = "proponent.apiKey";
const MARKS_STORE = "proponent.marks.";
const HIT_PX = 96; // displayed hit size; the image endpoint upscales to about this (scale 1..16)

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

const S = {
  info: null, // GET /v1/index
  geom: null, // {c, h, w, flat}
  scale: 8, // image endpoint scale for hits
  uploadFile: null,
  uploadPreview: null, // URL of the uploaded file's preview
  drawn: false,
  querySeq: 0,
  history: [], // [{label, req, answer}]
  historyPos: -1,
  job: null, // JobInfo shown in the self-influence view
  pollTimer: 0,
  rankOffset: 0,
  rankLimit: 48,
  rankTotal: 0,
  marks: new Map(), // sample id -> ranked row, for the selected job
};

// ================================================================== DOM helpers
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid == null || kid === false) continue;
    el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}

function fmt(x, digits = 4) {
  if (typeof x !== "number") return String(x);
  if (!Number.isFinite(x)) return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(digits - 1);
  return String(Number(x.toPrecision(digits)));
}

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

const plural = (n, one, many = one + "s") => `${n.toLocaleString()} ${n === 1 ? one : many}`;

// ================================================================== API client
class ApiError extends Error {
  constructor(status, code, message, requestId) {
    super(message);
    this.status = status;
    this.code = code;
    this.requestId = requestId || null;
  }
}

async function readError(r) {
  const rid = r.headers.get("X-Request-ID");
  let text = "";
  try {
    text = await r.text();
    const body = JSON.parse(text);
    if (body && body.error && typeof body.error.message === "string") {
      const e = body.error;
      return new ApiError(e.status || r.status, e.code || "error", e.message, e.request_id || rid);
    }
  } catch (_) {
    /* not the JSON error body: fall through */
  }
  const msg = text && text.length < 300 ? text : r.statusText || "request failed";
  return new ApiError(r.status, "http_" + r.status, msg, rid);
}

const apiKey = () => sessionStorage.getItem(KEY_STORE) || "";

let keyPrompt = null; // one dialog for all requests that got 401 at the same time

function askForKey(message) {
  if (keyPrompt) return keyPrompt;
  const dlg = $("#key-dialog");
  keyPrompt = new Promise((resolve, reject) => {
    $("#key-message").textContent = message || "This server needs an API key.";
    const input = $("#key-input");
    input.value = "";
    const done = (ok) => {
      $("#key-form").removeEventListener("submit", onSubmit);
      $("#key-cancel").removeEventListener("click", onCancel);
      dlg.removeEventListener("cancel", onCancel);
      if (dlg.open) dlg.close();
      keyPrompt = null;
      if (ok) resolve();
      else reject(new ApiError(401, "unauthorized", `an API key is needed (${message})`, null));
    };
    const onSubmit = (ev) => {
      ev.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORE, key);
      updateKeyButton();
      done(true);
    };
    const onCancel = (ev) => {
      ev.preventDefault();
      done(false);
    };
    $("#key-form").addEventListener("submit", onSubmit);
    $("#key-cancel").addEventListener("click", onCancel);
    dlg.addEventListener("cancel", onCancel);
    dlg.showModal();
    input.focus();
  });
  return keyPrompt;
}

/** fetch() a path of this server (relative URL); returns parsed JSON (as="json"), a Blob or text. */
async function api(path, { method = "GET", body = undefined, json = undefined, as = "json" } = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = new Headers();
    const key = apiKey();
    if (key) headers.set("X-API-Key", key);
    let payload = body;
    if (json !== undefined) {
      headers.set("Content-Type", "application/json");
      payload = JSON.stringify(json);
    }
    let r;
    try {
      r = await fetch(path, { method, body: payload, headers, cache: "no-store" });
    } catch (e) {
      throw new ApiError(0, "network_error", `cannot reach the server (${e.message})`, null);
    }
    if (r.status === 401 && attempt < 8) {
      const err = await readError(r);
      await askForKey(err.message);
      continue;
    }
    if (r.status === 503 && method === "GET" && attempt < 30 && r.headers.get("Retry-After")) {
      await new Promise((res) => setTimeout(res, 1000 * Math.min(5, Number(r.headers.get("Retry-After")) || 1)));
      continue;
    }
    if (!r.ok) throw await readError(r);
    if (as === "blob") return r.blob();
    if (as === "text") return r.text();
    return r.json();
  }
}

// ================================================================== errors on the page
function showError(box, err) {
  box.replaceChildren();
  const status = err instanceof ApiError && err.status ? `Error ${err.status}` : "Error";
  const code = err instanceof ApiError && err.code ? ` (${err.code})` : "";
  box.append(
    h("button", { type: "button", class: "err-close", "aria-label": "dismiss", onclick: () => (box.hidden = true) }, "×"),
    h("span", { class: "err-head" }, status + code + ": "),
    h("span", { class: "err-message" }, err.message || String(err)),
  );
  if (err.requestId) box.append(h("span", { class: "err-rid" }, `request id ${err.requestId}`));
  box.hidden = false;
}

const clearError = (box) => {
  box.hidden = true;
  box.replaceChildren();
};

// ================================================================== images (fetched with the key)
const imageCache = new Map(); // "id@scale" -> Promise<object URL>, least recently used first
const IMAGE_CACHE_MAX = 1500;

/** The PNG of a stored sample; a dropped connection or a 5xx is retried twice (grids load many at once). */
async function fetchImage(id, scale) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await api(`v1/samples/${encodeURIComponent(id)}/image.png?scale=${scale}`, { as: "blob" });
    } catch (e) {
      console.warn(`image of sample ${id}: ${e.message} (attempt ${attempt + 1})`);
      if (attempt >= 2 || !(e.status === 0 || e.status >= 500)) throw e;
      await new Promise((res) => setTimeout(res, 300 * 3 ** attempt));
    }
  }
}

function sampleImageURL(id, scale) {
  const key = `${id}@${scale}`;
  let p = imageCache.get(key);
  if (p) {
    imageCache.delete(key);
    imageCache.set(key, p);
    return p;
  }
  p = fetchImage(id, scale).then((b) => URL.createObjectURL(b));
  p.catch(() => imageCache.delete(key));
  imageCache.set(key, p);
  while (imageCache.size > IMAGE_CACHE_MAX) {
    const [oldKey, old] = imageCache.entries().next().value;
    imageCache.delete(oldKey);
    old.then((u) => URL.revokeObjectURL(u), () => {});
  }
  return p;
}

function sampleImg(id, alt, cls = "") {
  const img = h("img", { alt: alt || `training sample ${id}`, class: cls, width: HIT_PX, height: HIT_PX });
  sampleImageURL(id, S.scale).then(
    (u) => (img.src = u),
    (e) => {
      img.classList.add("broken");
      img.title = e.message;
    },
  );
  return img;
}

// ================================================================== index info, geometry
function geometry(shape) {
  if (shape.length === 3) return { c: shape[0], h: shape[1], w: shape[2], flat: false };
  const d = shape[0];
  const s = Math.round(Math.sqrt(d));
  if (s * s === d) return { c: 1, h: s, w: s, flat: true };
  const t = Math.round(Math.sqrt(d / 3));
  if (3 * t * t === d) return { c: 3, h: t, w: t, flat: true };
  return { c: 1, h: 1, w: d, flat: true };
}

async function loadIndex() {
  const status = $("#server-status");
  try {
    S.info = await api("v1/index");
  } catch (e) {
    status.textContent = "not connected";
    status.className = "bad";
    const box = $("#global-error");
    showError(box, e);
    box.append(h("button", { type: "button", class: "link", onclick: () => loadIndex() }, "retry"));
    return;
  }
  clearError($("#global-error"));
  const info = S.info;
  S.geom = geometry(info.shape);
  S.scale = Math.max(1, Math.min(16, Math.round(HIT_PX / Math.max(S.geom.h, S.geom.w))));
  status.textContent = `${info.dataset_spec} · N=${info.n.toLocaleString()} · ${plural(info.checkpoints.length, "checkpoint")}`;
  status.className = "ok";
  setupQueryControls();
  setupDrawing();
  setupJobControls();
  renderIndex();
  document.body.dataset.ready = "1";
  if (!$("#view-self-influence").hidden) refreshJobList();
}

function checkpointChips(container, name) {
  container.replaceChildren(
    ...S.info.checkpoints.map((ck) =>
      h(
        "label",
        { title: `step ${ck.step}, epoch ${fmt(ck.epoch)}, lr ${fmt(ck.lr)}` },
        h("input", { type: "checkbox", name, value: ck.index, checked: true }),
        `${ck.index}`,
      ),
    ),
  );
}

/** The selected checkpoints, or null when all are selected (the server's default). */
function selectedCheckpoints(container) {
  const boxes = $$("input[type=checkbox]", container);
  const on = boxes.filter((b) => b.checked).map((b) => Number(b.value));
  return on.length === boxes.length ? null : on;
}

// ================================================================== query view
function setupQueryControls() {
  const info = S.info;
  const obj = $("#q-objective");
  obj.replaceChildren(...info.query_objectives.map((o) => h("option", { value: o }, o)));
  obj.value = info.query_objectives.includes("elbo") ? "elbo" : info.query_objectives[0];
  // Scoring: only when the server advertises scorings (e.g. ["raw", "cosine", "relatif"]).
  const scorings = Array.isArray(info.scorings) ? info.scorings : [];
  $("#scoring-field").hidden = scorings.length === 0;
  $("#q-scoring").replaceChildren(...scorings.map((s) => h("option", { value: s }, s)));
  if (scorings.length) $("#q-scoring").value = info.default_scoring || scorings[0];
  // Preconditioner: only when the index has a stored one besides "none" (`proponent precondition`).
  const preconditions = Array.isArray(info.preconditions) ? info.preconditions : [];
  $("#precondition-field").hidden = preconditions.length < 2;
  $("#q-precondition").replaceChildren(...preconditions.map((s) => h("option", { value: s }, s)));
  if (preconditions.length) $("#q-precondition").value = "none";
  // The ANN search option only where the index has an ANN (FAISS) index.
  $("#q-search-ann").hidden = !info.index_kind || info.index_kind === "none";
  $("#q-k").max = info.max_k;
  $("#sample-id").max = info.n - 1;
  checkpointChips($("#q-checkpoints"), "q-ck");
  const g = S.geom;
  $("#upload-hint").textContent =
    `PNG, JPEG, … or a .npy array; the index's input shape is [${info.shape.join(", ")}]` +
    (g.c === 1 ? " (grey)." : g.c === 3 ? " (RGB)." : ".");
  objectiveChanged();
}

function objectiveChanged() {
  const o = $("#q-objective").value;
  $("#beta-field").hidden = o !== "elbo_beta";
  $("#label-field").hidden = o !== "probe";
}

function currentSource() {
  return $("input[name=source]:checked").value;
}

function setSource(src) {
  const radio = $(`input[name=source][value=${src}]`);
  radio.checked = true;
  for (const pane of $$(".source-pane")) pane.hidden = pane.dataset.source !== src;
}

const numOrRaw = (v) => (v.trim() !== "" && Number.isFinite(Number(v)) ? Number(v) : v.trim());

/** The query parameters of the form; malformed values go to the server as typed, which names the problem. */
function queryParams() {
  const p = { k: numOrRaw($("#q-k").value), direction: $("#q-direction").value, objective: $("#q-objective").value };
  if (!$("#scoring-field").hidden && $("#q-scoring").value) p.scoring = $("#q-scoring").value;
  if (!$("#precondition-field").hidden && $("#q-precondition").value !== "none") p.precondition = $("#q-precondition").value;
  if (p.objective === "elbo_beta" && $("#q-beta").value !== "") p.beta = numOrRaw($("#q-beta").value);
  if (p.objective === "probe" && $("#q-label").value !== "") p.label = numOrRaw($("#q-label").value);
  const cks = selectedCheckpoints($("#q-checkpoints"));
  if (cks) p.checkpoints = cks;
  if ($("#q-convention").value !== "lr") p.convention = $("#q-convention").value;
  if ($("#q-seed").value !== "" && $("#q-seed").value !== "0") p.seed = numOrRaw($("#q-seed").value);
  if ($("#q-prefilter").value !== "") p.prefilter = numOrRaw($("#q-prefilter").value);
  if ($("#q-search").value !== "auto") p.search = $("#q-search").value;
  if ($("#q-features").value !== "recompute" && currentSource() === "sample") p.features = $("#q-features").value;
  return p;
}

/** The request of the form's current source: {kind, label, preview, ...}. */
async function requestFromForm() {
  const src = currentSource();
  const params = queryParams();
  if (src === "sample") {
    const raw = $("#sample-id").value.trim();
    if (!/^\d+$/.test(raw)) throw new ApiError(0, "input", `sample id must be a non-negative integer, got "${raw}"`);
    return { kind: "sample", id: Number(raw), params };
  }
  if (src === "upload") {
    if (!S.uploadFile) throw new ApiError(0, "input", "choose an image or .npy file to upload first");
    params.allow_resize = $("#q-allow-resize").checked;
    return { kind: "upload", file: S.uploadFile, preview: S.uploadPreview, params };
  }
  if (!S.drawn) throw new ApiError(0, "input", "draw something on the canvas first");
  return { kind: "draw", x: drawingArray(), preview: $("#draw-preview").toDataURL(), params };
}

function sendQuery(req) {
  if (req.kind === "sample") return api(`v1/influence/samples/${req.id}`, { method: "POST", json: req.params });
  if (req.kind === "draw") return api("v1/influence", { method: "POST", json: { x: req.x, ...req.params } });
  const form = new FormData();
  form.append("file", req.file, req.file.name || "upload");
  for (const [k, v] of Object.entries(req.params)) form.append(k, Array.isArray(v) ? v.join(",") : String(v));
  return api("v1/influence", { method: "POST", body: form });
}

function requestLabel(req) {
  if (req.kind === "sample") return `sample #${req.id}`;
  if (req.kind === "upload") return `upload ${req.file.name || ""}`.trim();
  return "drawing";
}

async function runQuery(req) {
  const seq = ++S.querySeq;
  const btn = $("#q-run");
  const box = $("#query-error");
  clearError(box);
  btn.classList.add("busy");
  $("#query-results").dataset.busy = "1";
  try {
    const answer = await sendQuery(req);
    if (seq !== S.querySeq) return; // a newer query was started meanwhile
    const entry = { label: requestLabel(req), req, answer };
    S.history = S.history.slice(0, S.historyPos + 1).concat([entry]).slice(-12);
    S.historyPos = S.history.length - 1;
    renderAnswer(entry);
  } catch (e) {
    if (seq === S.querySeq) showError(box, e);
  } finally {
    if (seq === S.querySeq) {
      btn.classList.remove("busy");
      delete $("#query-results").dataset.busy;
    }
  }
}

function queryImage(req) {
  if (req.kind === "sample") return sampleImg(req.id, `query: sample ${req.id}`, "query-image");
  return h("img", { class: "query-image", alt: `query: ${requestLabel(req)}`, src: req.preview || "data:," });
}

const APPROX_WORDS = [
  [/^random projection/, "Gradients are compressed by a seeded random projection: each score is an unbiased but noisy estimate of the full gradient inner product."],
  [/^layer subset/, "Only the gradients of some layers count."],
  [/^features stored as/, "The stored features have reduced precision."],
  [/^checkpoint subset/, "Only the selected checkpoints are summed, not the whole training trajectory."],
  [/^approximate nearest-neighbour index/, "The search ran over an approximate index: a stronger hit may be missing."],
  [/^latent pre-filter/, "Only the training samples nearest to the query in latent space were scored (fine for proponents, poor for opponents)."],
];

function exactnessNotice(ans) {
  const approx = ans.approximations || [];
  const wrap = h("div", { id: "exactness" });
  wrap.append(
    h(
      "p",
      { class: "notice " + (ans.exact ? "exact" : "approx"), dataset: { exact: String(!!ans.exact) } },
      ans.exact
        ? "Exact search: every training sample was scored, so these are the true top hits for the stored features."
        : "Approximate search: not every training sample was scored exactly, so a stronger proponent or opponent may be missing.",
    ),
  );
  if (approx.length === 0) {
    wrap.append(h("p", { class: "notice exact" }, "Nothing else is approximated: exact VAE-TracIn over all parameters and checkpoints."));
  } else {
    wrap.append(
      h(
        "div",
        { class: "notice approx" },
        "What the scores approximate:",
        h(
          "ul",
          { id: "approximations" },
          approx.map((a) => {
            const words = APPROX_WORDS.find(([re]) => re.test(a));
            return h("li", {}, words ? words[1] + " " : "", h("span", { class: "muted" }, `(${a})`));
          }),
        ),
      ),
    );
  }
  return wrap;
}

function renderAnswer(entry) {
  const { req, answer: ans } = entry;
  $("#query-empty").hidden = true;
  const q = ans.query || {};
  const cks = q.checkpoints || [];
  const t = ans.timings || {};
  const facts = [
    ["objective", q.objective + (req.params.beta != null && q.objective === "elbo_beta" ? ` (β = ${req.params.beta})` : "")],
    q.scoring || req.params.scoring ? ["scoring", q.scoring || req.params.scoring] : null,
    q.precondition && q.precondition !== "none" ? ["preconditioner", q.precondition] : null,
    ["checkpoints", cks.join(", ") + (cks.length === S.info.checkpoints.length ? " (all)" : "")],
    ["weights", q.convention],
    q.features ? ["query features", q.features === "stored" ? "the index's stored features" : "recomputed (fresh draws)"] : null,
    q.m != null ? ["draws m", q.m] : null,
    ["seed", q.seed],
    ["k", `${req.params.k} per direction`],
    ["time", `${fmt(t.total_ms, 3)} ms (featurize ${fmt(t.featurize_ms, 3)}, search ${fmt(t.search_ms, 3)})`],
  ].filter(Boolean);
  const title = q.sample_id != null ? `Stored sample #${q.sample_id}` : req.kind === "draw" ? "Drawing" : `Upload: ${req.file.name}`;
  const summary = $("#query-summary");
  summary.replaceChildren(
    queryImage(req),
    h(
      "div",
      {},
      h("h3", { id: "query-title", dataset: { sampleId: q.sample_id ?? "" } }, title),
      h("dl", {}, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))])),
      exactnessNotice(ans),
    ),
  );
  summary.hidden = false;
  for (const dir of ["proponents", "opponents"]) {
    const section = $(`#${dir}-section`);
    const hits = ans[dir];
    section.hidden = !Array.isArray(hits);
    if (!Array.isArray(hits)) continue;
    const pairs = unresolvedPairs(ans, dir, hits);
    const inPairs = new Set(pairs.flat());
    const grid = $(`#${dir}`);
    grid.replaceChildren(...hits.map((hit, i) => hitCard(hit, i, dir, cks, inPairs.has(i))));
    section.querySelector(".unresolved-list")?.remove();
    section.querySelector(".stderr-note")?.remove();
    if (hits.some((x) => typeof x.stderr === "number")) {
      section.append(h("p", { class: "hint stderr-note" }, "± is the standard error of each score (noise of the random draws)."));
    }
    if (pairs.length) {
      section.append(
        h(
          "div",
          { class: "unresolved-list", dataset: { direction: dir } },
          h("strong", {}, "Order not resolved by the standard errors: "),
          pairs
            .map(([a, b]) => `#${hits[a].id} and #${hits[b].id} (ranks ${hits[a].rank ?? a + 1} and ${hits[b].rank ?? b + 1})`)
            .join("; "),
          " may be swapped.",
        ),
      );
    }
  }
  renderTrail();
}

/** Unresolved adjacent pairs of one direction, as 0-based positions in hits. The answer's
 * {"unresolved": {"proponents": [[2, 3], ...]}} lists 1-based ranks (Hit.rank) whose order the standard errors
 * do not resolve; without it, a hit with separated_from_next === false pairs with the next one. */
function unresolvedPairs(ans, dir, hits) {
  const pos = new Map(hits.map((x, i) => [x.rank ?? i + 1, i]));
  const src = ans.unresolved && Array.isArray(ans.unresolved[dir]) ? ans.unresolved[dir] : null;
  const out = [];
  if (src) {
    for (const p of src) {
      if (Array.isArray(p) && p.length === 2 && pos.has(p[0]) && pos.has(p[1])) out.push([pos.get(p[0]), pos.get(p[1])]);
    }
  } else {
    hits.forEach((x, i) => {
      if (x.separated_from_next === false && i + 1 < hits.length) out.push([i, i + 1]);
    });
  }
  return out;
}

function hitCard(hit, i, dir, cks, unresolved) {
  const score = h("span", { class: "hit-score " + (hit.score < 0 ? "neg" : "pos") }, fmt(hit.score));
  const card = h(
    "figure",
    {
      class: "hit" + (unresolved ? " unresolved" : ""),
      tabindex: 0,
      role: "button",
      "aria-label": `sample ${hit.id}, score ${fmt(hit.score)}: query it`,
      dataset: { id: hit.id, rank: hit.rank ?? i + 1, score: hit.score },
    },
    h("span", { class: "rank" }, hit.rank ?? i + 1),
    sampleImg(hit.id, `sample ${hit.id}`),
    h(
      "figcaption",
      {},
      h("span", {}, h("span", { class: "hit-id" }, `#${hit.id}`), hit.label != null ? ` · label ${hit.label}` : ""),
      h(
        "span",
        {},
        score,
        typeof hit.stderr === "number" ? h("span", { class: "hit-stderr" }, ` ± ${fmt(hit.stderr, 2)}`) : null,
      ),
      hit.injected ? h("span", { class: "badge" }, "injected") : null,
    ),
  );
  card.addEventListener("mouseenter", () => showContributions(card, hit, cks));
  card.addEventListener("focus", () => showContributions(card, hit, cks));
  card.addEventListener("mouseleave", hideTooltip);
  card.addEventListener("blur", hideTooltip);
  const go = () => {
    hideTooltip();
    setSource("sample");
    $("#sample-id").value = hit.id;
    runQuery({ kind: "sample", id: hit.id, params: queryParams() });
  };
  card.addEventListener("click", go);
  card.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") {
      ev.preventDefault();
      go();
    }
  });
  return card;
}

function showContributions(card, hit, cks) {
  const tip = $("#tooltip");
  const c = hit.contributions || [];
  const max = Math.max(1e-300, ...c.map((v) => Math.abs(v)));
  const byIndex = new Map(S.info.checkpoints.map((ck) => [ck.index, ck]));
  tip.replaceChildren(
    h("div", { class: "tt-title" }, `#${hit.id}: score ${fmt(hit.score)}`, typeof hit.stderr === "number" ? ` ± ${fmt(hit.stderr, 2)}` : ""),
    h("div", { class: "muted", style: "color:#aab4c8;margin-bottom:.2rem" }, "per-checkpoint contributions w·⟨g(x), g(z)⟩"),
    h(
      "table",
      { id: "contrib-table" },
      c.map((v, j) => {
        const ck = byIndex.get(cks[j]);
        return h(
          "tr",
          { dataset: { checkpoint: cks[j] } },
          h("td", {}, `ckpt ${cks[j]}` + (ck ? ` (epoch ${fmt(ck.epoch, 3)})` : "")),
          h("td", { style: "text-align:right" }, fmt(v)),
          h(
            "td",
            { class: "bar-cell" },
            h("div", { class: "cbar" + (v < 0 ? " neg" : ""), style: `width:${(100 * Math.abs(v)) / max}%` }),
          ),
        );
      }),
    ),
  );
  tip.hidden = false;
  const r = card.getBoundingClientRect();
  const tw = tip.offsetWidth;
  const th = tip.offsetHeight;
  let x = r.right + 8;
  if (x + tw > window.innerWidth - 4) x = Math.max(4, r.left - tw - 8);
  let y = Math.min(r.top, window.innerHeight - th - 4);
  tip.style.left = `${x}px`;
  tip.style.top = `${Math.max(4, y)}px`;
}

function hideTooltip() {
  $("#tooltip").hidden = true;
}

function renderTrail() {
  const nav = $("#trail");
  nav.hidden = S.history.length < 2;
  nav.replaceChildren(
    h("span", { class: "muted" }, "History:"),
    ...S.history.map((e, i) =>
      h(
        "button",
        {
          type: "button",
          "aria-current": i === S.historyPos ? "true" : "false",
          onclick: () => {
            S.historyPos = i;
            renderAnswer(e);
          },
        },
        e.label,
      ),
    ),
  );
}

// ---------------------------------------------------------------- upload preview (images and .npy)
function parseNpy(buf) {
  const u8 = new Uint8Array(buf);
  if (u8.length < 10 || u8[0] !== 0x93 || String.fromCharCode(...u8.slice(1, 6)) !== "NUMPY") return null;
  const major = u8[6];
  const hstart = major === 1 ? 10 : 12;
  const hlen = major === 1 ? u8[8] | (u8[9] << 8) : new DataView(buf).getUint32(8, true);
  const header = new TextDecoder("latin1").decode(u8.slice(hstart, hstart + hlen));
  if (/'fortran_order':\s*True/.test(header)) return null;
  const descr = (/'descr':\s*'([^']+)'/.exec(header) || [])[1];
  const shape = ((/'shape':\s*\(([^)]*)\)/.exec(header) || [])[1] || "")
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean)
    .map(Number);
  const body = buf.slice(hstart + hlen);
  const types = { "|u1": [Uint8Array, 255], "<u1": [Uint8Array, 255], "<f4": [Float32Array, 1], "<f8": [Float64Array, 1] };
  if (!types[descr]) return null;
  const [T, div] = types[descr];
  return { shape, data: new T(body), div };
}

/** A data URL previewing an array (H,W), (C,H,W), (H,W,C) or flat; null when it cannot be drawn. */
function arrayPreview(arr) {
  let { shape } = arr;
  let c;
  let hh;
  let ww;
  let chw = true;
  if (shape.length === 1) {
    const g = geometry(shape);
    [c, hh, ww] = [g.c, g.h, g.w];
  } else if (shape.length === 2) [c, hh, ww] = [1, shape[0], shape[1]];
  else if (shape.length === 3 && [1, 3, 4].includes(shape[0])) [c, hh, ww] = shape;
  else if (shape.length === 3 && [1, 3, 4].includes(shape[2])) {
    [hh, ww, c] = shape;
    chw = false;
  } else return null;
  if (c * hh * ww !== arr.data.length || hh * ww > 4096 * 4096) return null;
  const cv = h("canvas", { width: ww, height: hh });
  const ctx = cv.getContext("2d");
  const img = ctx.createImageData(ww, hh);
  const at = (ch, y, x) => arr.data[chw ? (ch * hh + y) * ww + x : (y * ww + x) * c + ch] / arr.div;
  for (let y = 0; y < hh; y++)
    for (let x = 0; x < ww; x++) {
      const o = 4 * (y * ww + x);
      for (let ch = 0; ch < 3; ch++) img.data[o + ch] = Math.round(255 * Math.min(1, Math.max(0, at(c === 1 ? 0 : ch, y, x))));
      img.data[o + 3] = 255;
    }
  ctx.putImageData(img, 0, 0);
  return cv.toDataURL();
}

async function uploadChanged() {
  const file = $("#upload-file").files[0] || null;
  if (file && file === S.uploadFile) return; // unchanged: keep its preview
  S.uploadFile = file;
  S.uploadPreview = null;
  if (!file) return;
  const head = new Uint8Array(await file.slice(0, 6).arrayBuffer());
  if (head[0] === 0x93) {
    const arr = parseNpy(await file.arrayBuffer());
    S.uploadPreview = arr ? arrayPreview(arr) : null;
  } else {
    S.uploadPreview = URL.createObjectURL(file); // kept: the query history shows it
  }
}

// ---------------------------------------------------------------- drawing
let drawCtx = null;

function setupDrawing() {
  const g = S.geom;
  const canvas = $("#draw-canvas");
  const cell = Math.max(1, Math.floor(320 / Math.max(g.h, g.w)));
  canvas.width = g.w * cell;
  canvas.height = g.h * cell;
  canvas.style.aspectRatio = `${g.w} / ${g.h}`;
  const prev = $("#draw-preview");
  prev.width = g.w;
  prev.height = g.h;
  $("#draw-size").textContent = `${g.h}×${g.w}${g.c === 1 ? " grey" : ""}`;
  $("#ink-field").hidden = g.c === 1;
  drawCtx = canvas.getContext("2d", { willReadFrequently: true });
  clearDrawing();
}

function clearDrawing() {
  const canvas = $("#draw-canvas");
  drawCtx.fillStyle = "#000";
  drawCtx.fillRect(0, 0, canvas.width, canvas.height);
  S.drawn = false;
  updateDrawPreview();
}

function bindDrawing() {
  const canvas = $("#draw-canvas");
  let last = null;
  const pos = (ev) => {
    const r = canvas.getBoundingClientRect();
    return [((ev.clientX - r.left) * canvas.width) / r.width, ((ev.clientY - r.top) * canvas.height) / r.height];
  };
  const stroke = (a, b) => {
    drawCtx.strokeStyle = drawCtx.fillStyle = S.geom && S.geom.c === 1 ? "#fff" : $("#ink").value;
    drawCtx.lineWidth = Number($("#brush").value) * (canvas.width / S.geom.w); // in pixels of the input
    drawCtx.lineCap = "round";
    drawCtx.lineJoin = "round";
    drawCtx.beginPath();
    drawCtx.moveTo(a[0], a[1]);
    drawCtx.lineTo(b[0], b[1]);
    drawCtx.stroke();
  };
  canvas.addEventListener("pointerdown", (ev) => {
    if (!drawCtx) return;
    canvas.setPointerCapture(ev.pointerId);
    last = pos(ev);
    stroke(last, last);
    S.drawn = true;
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (!last) return;
    const p = pos(ev);
    stroke(last, p);
    last = p;
  });
  const end = () => {
    if (last) updateDrawPreview();
    last = null;
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  $("#draw-clear").addEventListener("click", () => drawCtx && clearDrawing());
}

/** The drawing block-averaged down to the index's input shape: nested lists in [0, 1]. */
function drawingArray() {
  const g = S.geom;
  const canvas = $("#draw-canvas");
  const cell = canvas.width / g.w;
  const px = drawCtx.getImageData(0, 0, canvas.width, canvas.height).data;
  const planes = [];
  const nch = g.c === 4 ? 3 : g.c;
  for (let ch = 0; ch < nch; ch++) {
    const rows = [];
    for (let y = 0; y < g.h; y++) {
      const row = [];
      for (let x = 0; x < g.w; x++) {
        let sum = 0;
        for (let dy = 0; dy < cell; dy++) {
          const base = ((y * cell + dy) * canvas.width + x * cell) * 4;
          for (let dx = 0; dx < cell; dx++) {
            const o = base + dx * 4;
            // grey: Pillow's convert("L") weights, as the server converts RGB uploads
            sum += g.c === 1 ? (0.299 * px[o] + 0.587 * px[o + 1] + 0.114 * px[o + 2]) : px[o + ch];
          }
        }
        row.push(Math.min(1, sum / (cell * cell * 255)));
      }
      rows.push(row);
    }
    planes.push(rows);
  }
  if (g.c === 4) planes.push(planes[0].map((r) => r.map(() => 1)));
  return g.flat ? planes.flat(2) : planes;
}

function updateDrawPreview() {
  if (!S.geom) return;
  const g = S.geom;
  const x = drawingArray();
  const prev = $("#draw-preview");
  const ctx = prev.getContext("2d");
  const img = ctx.createImageData(g.w, g.h);
  const v = (ch, yy, xx) => (g.flat ? x[(ch * g.h + yy) * g.w + xx] : x[ch][yy][xx]);
  for (let yy = 0; yy < g.h; yy++)
    for (let xx = 0; xx < g.w; xx++) {
      const o = 4 * (yy * g.w + xx);
      for (let ch = 0; ch < 3; ch++) img.data[o + ch] = Math.round(255 * v(g.c === 1 ? 0 : ch, yy, xx));
      img.data[o + 3] = 255;
    }
  ctx.putImageData(img, 0, 0);
}

// ================================================================== self-influence view
function setupJobControls() {
  checkpointChips($("#j-checkpoints"), "j-ck");
}

function jobLabel(j) {
  const when = new Date(j.created_at * 1000).toLocaleTimeString();
  const p = j.params || {};
  return `${j.id.slice(0, 8)} · ${j.state} · ${when} · ${p.convention || "lr"}${p.m ? `, m=${p.m}` : ""}${p.estimator && p.estimator !== "norm" ? `, ${p.estimator}` : ""}`;
}

async function refreshJobList() {
  if (!S.info) return;
  try {
    const jobs = await api("v1/jobs");
    const sel = $("#job-list");
    const keep = S.job ? S.job.id : sel.value;
    sel.replaceChildren(h("option", { value: "" }, jobs.length ? "— pick a job —" : "— none yet —"));
    for (const j of jobs.slice().reverse()) sel.append(h("option", { value: j.id }, jobLabel(j)));
    sel.value = jobs.some((j) => j.id === keep) ? keep : "";
  } catch (e) {
    showError($("#job-error"), e);
  }
}

async function startJob(ev) {
  ev.preventDefault();
  const box = $("#job-error");
  clearError(box);
  const m = $("#j-m").value.trim();
  const body = {
    convention: $("#j-convention").value,
    estimator: $("#j-estimator").value,
    m: m === "" ? null : numOrRaw(m),
    seed: numOrRaw($("#j-seed").value || "0"),
    checkpoints: selectedCheckpoints($("#j-checkpoints")),
  };
  try {
    const job = await api("v1/jobs/self-influence", { method: "POST", json: body });
    selectJob(job);
    refreshJobList();
  } catch (e) {
    showError(box, e);
  }
}

function selectJob(job) {
  clearTimeout(S.pollTimer);
  S.job = job;
  S.rankOffset = 0;
  S.marks = new Map(JSON.parse(sessionStorage.getItem(MARKS_STORE + job.id) || "[]"));
  updateMarks();
  $("#rank-grid").replaceChildren();
  $("#rank-toolbar").hidden = true;
  $("#rank-empty").hidden = false;
  showJob(job);
  if (job.state === "succeeded") loadRankPage(0);
  else if (job.state === "queued" || job.state === "running") S.pollTimer = setTimeout(pollJob, 300);
}

function showJob(job) {
  const st = $("#job-status");
  st.hidden = false;
  st.dataset.state = job.state;
  st.dataset.jobId = job.id;
  const p = job.progress || { done: 0, total: 0, fraction: 0 };
  $("#job-bar").style.width = `${Math.round(100 * (job.state === "succeeded" ? 1 : p.fraction))}%`;
  let text = `job ${job.id.slice(0, 8)}: ${job.state}`;
  if (job.state === "running" || job.state === "queued") text += ` · ${p.done} / ${p.total} chunks (${Math.round(100 * p.fraction)}%)`;
  if (job.state === "succeeded" && job.started_at && job.finished_at)
    text += ` in ${fmt(job.finished_at - job.started_at, 2)} s`;
  $("#job-state").textContent = text;
  $("#job-cancel").hidden = !(job.state === "running" || job.state === "queued");
  if (job.state === "failed") showError($("#job-error"), new ApiError(0, "job_failed", job.error || "the job failed"));
}

async function pollJob() {
  const job = S.job;
  if (!job) return;
  try {
    const fresh = await api(`v1/jobs/${job.id}`);
    if (!S.job || S.job.id !== fresh.id) return;
    S.job = fresh;
    showJob(fresh);
    if (fresh.state === "succeeded") {
      loadRankPage(0);
      refreshJobList();
    } else if (fresh.state === "queued" || fresh.state === "running") S.pollTimer = setTimeout(pollJob, 400);
    else refreshJobList();
  } catch (e) {
    showError($("#job-error"), e);
    S.pollTimer = setTimeout(pollJob, 2000);
  }
}

async function cancelJob() {
  if (!S.job) return;
  try {
    showJob(await api(`v1/jobs/${S.job.id}`, { method: "DELETE" }));
  } catch (e) {
    showError($("#job-error"), e);
  }
}

async function loadRankPage(offset) {
  const job = S.job;
  if (!job) return;
  const box = $("#job-error");
  try {
    const page = await api(`v1/jobs/${job.id}/result?offset=${Math.max(0, offset)}&limit=${S.rankLimit}`);
    if (!S.job || S.job.id !== job.id) return;
    clearError(box);
    S.rankOffset = page.offset;
    S.rankTotal = page.total;
    const grid = $("#rank-grid");
    grid.dataset.offset = page.offset;
    grid.replaceChildren(...page.items.map(rankCard));
    $("#rank-toolbar").hidden = false;
    $("#rank-empty").hidden = true;
    const last = Math.min(page.total, page.offset + page.items.length);
    $("#rank-range").textContent = `${page.offset + 1}–${last} of ${page.total.toLocaleString()}`;
    $("#rank-prev").disabled = page.offset <= 0;
    $("#rank-next").disabled = last >= page.total;
  } catch (e) {
    showError(box, e);
  }
}

function rankCard(row) {
  const marked = S.marks.has(row.id);
  const box = h("input", { type: "checkbox", class: "mark-box", "aria-label": `mark sample ${row.id}`, checked: marked });
  const card = h(
    "figure",
    {
      class: "hit rank-card" + (marked ? " marked" : ""),
      tabindex: 0,
      dataset: { id: row.id, rank: row.rank },
      title: "click to mark for review",
    },
    h("span", { class: "rank" }, row.rank),
    box,
    sampleImg(row.id, `sample ${row.id}`),
    h(
      "figcaption",
      {},
      h("span", {}, h("span", { class: "hit-id" }, `#${row.id}`), row.label != null ? ` · label ${row.label}` : ""),
      h("span", { class: "hit-score", title: "self-influence" }, `SI ${fmt(row.self_influence)}`),
      h("span", { class: "muted", title: "loss at the final checkpoint" }, `loss ${fmt(row.loss)}`),
      row.injected ? h("span", { class: "badge" }, "injected") : null,
      h(
        "button",
        {
          type: "button",
          class: "link query-link",
          onclick: (ev) => {
            ev.stopPropagation();
            location.hash = "#query";
            setSource("sample");
            $("#sample-id").value = row.id;
            runQuery({ kind: "sample", id: row.id, params: queryParams() });
          },
        },
        "influence →",
      ),
    ),
  );
  const toggle = () => {
    if (S.marks.has(row.id)) S.marks.delete(row.id);
    else S.marks.set(row.id, row);
    const on = S.marks.has(row.id);
    card.classList.toggle("marked", on);
    box.checked = on;
    updateMarks();
  };
  // the checkbox toggles itself (no preventDefault: a cancelled click would restore its old state)
  box.addEventListener("click", (ev) => ev.stopPropagation());
  box.addEventListener("change", () => {
    if (box.checked !== S.marks.has(row.id)) toggle();
  });
  card.addEventListener("click", toggle);
  card.addEventListener("keydown", (ev) => {
    if (ev.key === " " || ev.key === "Enter") {
      ev.preventDefault();
      toggle();
    }
  });
  return card;
}

function updateMarks() {
  const n = S.marks.size;
  $("#mark-count").textContent = `${n} marked`;
  $("#mark-download").disabled = n === 0;
  if (S.job) sessionStorage.setItem(MARKS_STORE + S.job.id, JSON.stringify(Array.from(S.marks.entries())));
}

function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: name, style: "display:none" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

function csvCell(v) {
  const s = v == null ? "" : String(v);
  return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function downloadMarks() {
  const rows = Array.from(S.marks.values()).sort((a, b) => a.rank - b.rank);
  const cols = ["id", "rank", "self_influence", "loss", "label", "source", "source_row", "injected"];
  const text = [cols.join(","), ...rows.map((r) => cols.map((c) => csvCell(r[c])).join(","))].join("\n") + "\n";
  download(new Blob([text], { type: "text/csv" }), `marked-${S.job ? S.job.id.slice(0, 8) : "samples"}.csv`);
}

async function downloadRanking() {
  if (!S.job) return;
  try {
    const blob = await api(`v1/jobs/${S.job.id}/result?format=csv`, { as: "blob" });
    download(blob, `self-influence-${S.job.id.slice(0, 8)}.csv`);
  } catch (e) {
    showError($("#job-error"), e);
  }
}

// ================================================================== index view
function kvTable(rows) {
  return h(
    "table",
    { class: "kv" },
    rows.filter(Boolean).map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, k), h("td", {}, v))),
  );
}

function panel(title, ...kids) {
  return h("div", { class: "panel" }, h("h3", {}, title), ...kids);
}

function renderIndex() {
  const info = S.info;
  const C = info.checkpoints.length;
  const proj = info.projection || {};
  const layers = Array.isArray(proj.layers) ? proj.layers : [];
  const fullDim = layers.reduce((s, l) => s + (l.in_dim || 0) * (l.out_dim || 0), 0);
  const bytes4 = info.n * info.dim * 4;
  const obj = info.objective || {};
  const served = kvTable([
    ["training samples N", h("span", { id: "index-n" }, info.n.toLocaleString())],
    ["input shape", `[${info.shape.join(", ")}]`],
    ["dataset", info.dataset_spec],
    ["fingerprint", h("code", { title: info.dataset_fingerprint }, info.dataset_fingerprint.slice(0, 16) + "…")],
    ["labels", info.has_labels ? "yes" : "no"],
    ["checkpoints", String(C)],
    ["featurizer", info.featurizer],
    info.whiten && typeof info.whiten === "object"
      ? ["whitened", h("span", { id: "index-whiten" }, `${info.whiten.kind} (α = ${info.whiten.alpha}): stored features are L G Rᵀ per layer, scores preconditioned`)]
      : ["whitened", h("span", { id: "index-whiten" }, "no (plain gradients)")],
    ["index", info.index_kind === "none" ? "exact scan (no ANN index)" : `${info.index_kind} (${info.exact ? "exact search" : "approximate search"})`],
    ["device", `${info.device}${info.faiss_gpu ? ", FAISS on GPU" : ""}`],
    ["query objectives", info.query_objectives.join(", ")],
    Array.isArray(info.scorings) ? ["scorings", info.scorings.join(", ")] : null,
    ["largest k", String(info.max_k)],
  ]);
  const st = info.storage && typeof info.storage === "object" ? info.storage : null;
  const sizes = kvTable([
    ["feature dimension D", info.dim.toLocaleString()],
    fullDim ? ["gradient dimension (projected layers)", `${fullDim.toLocaleString()} → D (×${fmt(fullDim / info.dim, 3)} smaller)`] : null,
    ["features per checkpoint", `${info.n.toLocaleString()} × ${info.dim.toLocaleString()}`],
    st && st.dtype ? ["stored as", String(st.dtype)] : null,
    st && st.bytes_per_sample_per_checkpoint != null
      ? ["per sample and checkpoint", fmtBytes(st.bytes_per_sample_per_checkpoint)]
      : null,
    st && st.features_bytes != null
      ? ["feature store", `${fmtBytes(st.features_bytes)} on disk`]
      : ["feature store", `${fmtBytes(bytes4)} per checkpoint, ${fmtBytes(bytes4 * C)} in all (at float32)`],
    st && st.input_encoding ? ["stored inputs", String(st.input_encoding)] : null,
  ]);
  const serving =
    info.serving && typeof info.serving === "object" && Object.keys(info.serving).length
      ? kvTable(Object.entries(info.serving).map(([k, v]) => [k.replace(/_/g, " "), /_bytes$/.test(k) && typeof v === "number" ? fmtBytes(v) : String(v)]))
      : null;
  const shards = Array.isArray(info.shards) && info.shards.length ? info.shards : null;
  const fid = info.fidelity && typeof info.fidelity === "object" ? info.fidelity : null;
  const fidelity = fid
    ? h(
        "div",
        { id: "fidelity" },
        fid.warning ? h("p", { class: "warn", id: "fidelity-warning" }, `⚠ ${fid.warning}`) : null,
        h(
          "table",
          { class: "data" },
          h("thead", {}, h("tr", {}, ["checkpoint", `recall@${fid.top} proponents`, "opponents", "relative score error", ""].map((t) => h("th", {}, t)))),
          h(
            "tbody",
            {},
            fid.checkpoints.map((c) =>
              h(
                "tr",
                {},
                h("td", {}, c.checkpoint),
                h("td", {}, fmt(c.recall_proponents, 2)),
                h("td", {}, fmt(c.recall_opponents, 2)),
                h("td", {}, fmt(c.relative_error, 3)),
                h("td", { class: "left" }, c.passed ? "passes" : "below the bar"),
              ),
            ),
          ),
        ),
        h(
          "p",
          { class: "hint" },
          `${fid.queries} rows of the index scored against ${fid.pool} others with the stored features and with exact gradients (medians over the queries); bar ${fmt(fid.bar_proponents, 2)} / ${fmt(fid.bar_opponents, 2)}.`,
        ),
      )
    : h("p", { class: "hint", id: "fidelity" }, "No fidelity check recorded (an index built before the check existed).");
  const objective = kvTable(Object.entries(obj).map(([k, v]) => [k, String(v)]));
  const projection = kvTable([
    ["kind", String(proj.kind)],
    proj.kind === "kron" && proj.k != null ? ["k per side", String(proj.k)] : null,
    proj.kind === "tensor" ? ["per layer", "a tensor sketch of each layer's gradient (dimensions by gradient energy)"] : null,
    proj.seed != null ? ["seed", String(proj.seed)] : null,
    ["dimension", String(proj.dim ?? info.dim)],
    typeof proj.layers === "number" ? ["layers", String(proj.layers)] : null,
  ]);
  const maxW = Math.max(1e-300, ...info.checkpoints.map((c) => c.weight_lr));
  const ckTable = h(
    "table",
    { class: "data", id: "checkpoint-table" },
    h("thead", {}, h("tr", {}, ["#", "step", "epoch", "lr", "batch", "Δsteps", "weight lr", "weight visits", "", "sha256"].map((t) => h("th", {}, t)))),
    h(
      "tbody",
      {},
      info.checkpoints.map((c) =>
        h(
          "tr",
          {},
          h("td", {}, c.index),
          h("td", {}, c.step),
          h("td", {}, fmt(c.epoch, 3)),
          h("td", {}, fmt(c.lr)),
          h("td", {}, c.batch_size),
          h("td", {}, c.steps_since_prev),
          h("td", {}, fmt(c.weight_lr)),
          h("td", {}, fmt(c.weight_visits)),
          h("td", { class: "left" }, h("span", { class: "wbar", style: `width:${Math.round((60 * c.weight_lr) / maxW)}px` })),
          h("td", { class: "left" }, h("code", { title: c.sha256 }, c.sha256.slice(0, 12))),
        ),
      ),
    ),
  );
  const layerTable = layers.length
    ? h(
        "details",
        {},
        h("summary", {}, `${plural(layers.length, "layer")}`),
        h(
          "table",
          { class: "data" },
          h("thead", {}, h("tr", {}, ["layer", "kind", "in → k", "out → k", "offset"].map((t) => h("th", {}, t)))),
          h(
            "tbody",
            {},
            layers.map((l) =>
              h(
                "tr",
                {},
                h("td", {}, l.name),
                h("td", { class: "left" }, l.kind),
                l.tensor
                  ? h("td", { colspan: 2 }, `${l.in_dim} × ${l.out_dim} → ${l.k_in} (tensor sketch)`)
                  : h("td", {}, `${l.in_dim} → ${l.projected_in ? l.k_in : "exact"}`),
                l.tensor ? null : h("td", {}, `${l.out_dim} → ${l.projected_out ? l.k_out : "exact"}`),
                h("td", {}, l.offset),
              ),
            ),
          ),
        ),
      )
    : null;
  const sources = h(
    "table",
    { class: "data" },
    h("thead", {}, h("tr", {}, ["source", "kind", "rows", "of", "offset", "injected"].map((t) => h("th", {}, t)))),
    h(
      "tbody",
      {},
      (info.dataset_sources || []).map((s) =>
        h(
          "tr",
          {},
          h("td", {}, s.spec),
          h("td", { class: "left" }, s.kind),
          h("td", {}, s.n),
          h("td", {}, s.n_total ?? ""),
          h("td", {}, s.offset ?? 0),
          h("td", {}, s.injected ? "yes" : "no"),
        ),
      ),
    ),
  );
  const panels = [
    panel("What is served", served),
    panel("Sizes", sizes, h("h3", { style: "margin-top:.8rem" }, "Training objective"), objective),
    h("div", { class: "panel span-all" }, h("h3", {}, "Checkpoints and their weights"), ckTable,
      h("p", { class: "hint" }, "Scores sum w_c⟨g_c(x), g_c(z)⟩ over checkpoints: lr weights w = η, visits weights w = η·B·Δsteps/N.")),
    panel("Projection", projection, layerTable),
    panel("Fidelity against exact gradients", fidelity),
    panel("Data sources", sources),
    serving ? panel("Serving", serving) : null,
    shards
      ? panel(
          `Shards (${shards.length})`,
          h("table", { class: "data" }, h("tbody", {}, shards.map((sh, i) => h("tr", {}, h("td", {}, i), h("td", { class: "left" }, JSON.stringify(sh)))))),
        )
      : null,
  ];
  $("#index-info").replaceChildren(...panels.filter(Boolean));
}

// ================================================================== views, wiring
const VIEWS = ["query", "self-influence", "index"];

function showView() {
  const name = location.hash.slice(1).split("/")[0];
  const view = VIEWS.includes(name) ? name : "query";
  for (const sec of $$(".view")) sec.hidden = sec.dataset.view !== view;
  for (const a of $$(".tabs a")) a.setAttribute("aria-current", a.dataset.view === view ? "page" : "false");
  hideTooltip();
  if (view === "self-influence") refreshJobList();
}

function updateKeyButton() {
  $("#forget-key").hidden = !apiKey();
}

function init() {
  for (const r of $$("input[name=source]")) r.addEventListener("change", () => setSource(currentSource()));
  $("#upload-file").addEventListener("change", () => uploadChanged());
  $("#q-objective").addEventListener("change", objectiveChanged);
  $("#sample-random").addEventListener("click", () => {
    if (S.info) $("#sample-id").value = Math.floor(Math.random() * S.info.n);
  });
  $("#query-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!S.info) return;
    try {
      if (currentSource() === "upload") await uploadChanged(); // the file input may have changed meanwhile
      runQuery(await requestFromForm());
    } catch (e) {
      showError($("#query-error"), e);
    }
  });
  bindDrawing();
  $("#job-form").addEventListener("submit", startJob);
  $("#job-cancel").addEventListener("click", cancelJob);
  $("#job-list").addEventListener("change", async () => {
    const id = $("#job-list").value;
    if (!id) return;
    try {
      selectJob(await api(`v1/jobs/${id}`));
    } catch (e) {
      showError($("#job-error"), e);
    }
  });
  $("#rank-prev").addEventListener("click", () => loadRankPage(S.rankOffset - S.rankLimit));
  $("#rank-next").addEventListener("click", () => loadRankPage(S.rankOffset + S.rankLimit));
  $("#rank-limit").addEventListener("change", () => {
    S.rankLimit = Number($("#rank-limit").value);
    loadRankPage(Math.floor(S.rankOffset / S.rankLimit) * S.rankLimit);
  });
  $("#mark-download").addEventListener("click", downloadMarks);
  $("#mark-clear").addEventListener("click", () => {
    S.marks.clear();
    for (const c of $$(".rank-card")) {
      c.classList.remove("marked");
      $(".mark-box", c).checked = false;
    }
    updateMarks();
  });
  $("#rank-csv").addEventListener("click", downloadRanking);
  $("#forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    updateKeyButton();
  });
  window.addEventListener("hashchange", showView);
  window.addEventListener("scroll", hideTooltip, { passive: true });
  updateKeyButton();
  showView();
  loadIndex();
}

init();
