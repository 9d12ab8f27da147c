// The draw-a-digit page: a canvas drawn with Pointer Events, live predictions from POST /api/predict (at most
// one request in flight, the latest drawing always sent next), one column per served model; and, asked for only
// when the drawing pauses, each model's explanations: "Why?" (its attribution map over the 28x28 view and the
// nearest training digits) and "Inside" (what its layers computed), from /api/explain, /api/neighbours and
// /api/activations, one request at a time on a lane of their own, so that they never delay a prediction.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas"), ctx = canvas.getContext("2d");
const BRUSH = 24;        // canvas pixels (of 280): about the stroke width of an MNIST digit at this scale
const INTERVAL = 80;     // ms between predictions while drawing

let history = [];        // what is drawn, oldest first: strokes (arrays of points) or {image} for an upload
let stroke = null, pointer = null;
let file = null;         // an uploaded file, sent as it is until the drawing changes
let version = 0, cleared = 0;  // answers to drawings from before the last clear are dropped
let inFlight = false, pending = false, lastSent = 0, timer = null;
let columns = [];

// ---------------------------------------------------------------------------------------------- drawing

function redraw() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (const item of history) {
    if (item.image) drawImage(item.image);
    else for (let i = 0; i < item.length; i++) segment(item[Math.max(0, i - 1)], item[i]);
  }
}

function segment(from, to) {
  ctx.fillStyle = ctx.strokeStyle = "#000";
  ctx.lineWidth = BRUSH;
  ctx.lineCap = "round";
  ctx.beginPath();
  if (from.x === to.x && from.y === to.y) {  // a dot: a zero-length line draws nothing in some browsers
    ctx.arc(to.x, to.y, BRUSH / 2, 0, 2 * Math.PI);
    ctx.fill();
    return;
  }
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
}

function drawImage(image) {
  const scale = Math.min(canvas.width / image.width, canvas.height / image.height);
  const w = image.width * scale, h = image.height * scale;
  ctx.drawImage(image, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
}

function point(event) {
  const box = canvas.getBoundingClientRect();
  return { x: (event.clientX - box.left) * canvas.width / box.width,
           y: (event.clientY - box.top) * canvas.height / box.height };
}

canvas.addEventListener("pointerdown", (event) => {
  if (stroke || event.button !== 0) return;  // one pointer draws at a time
  event.preventDefault();
  canvas.setPointerCapture(event.pointerId);
  pointer = event.pointerId;
  stroke = [point(event)];
  history.push(stroke);
  segment(stroke[0], stroke[0]);
  changed();
});

canvas.addEventListener("pointermove", (event) => {
  if (!stroke || event.pointerId !== pointer) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const e of events.length ? events : [event]) {
    const p = point(e);
    segment(stroke[stroke.length - 1], p);
    stroke.push(p);
  }
  changed();
});

for (const type of ["pointerup", "pointercancel"]) {
  canvas.addEventListener(type, (event) => {
    if (event.pointerId === pointer) stroke = pointer = null;
  });
}

function changed() {
  file = null;
  version++;
  predictSoon();
  explainSoon();
}

function undo() {
  if (stroke || !history.length) return;
  history.pop();
  redraw();
  if (history.length) changed();
  else clear();
}

function clear() {
  history = [];
  stroke = pointer = file = null;
  cleared = ++version;
  redraw();
  showBlank("Draw a digit in the square.");
  for (const c of columns) c.why.reset();
  $("layers").replaceChildren();
  explainSoon();
}

$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", clear);
document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key === "z") { event.preventDefault(); undo(); }
  else if (event.key === "Escape") clear();
});

// ---------------------------------------------------------------------------------------------- uploads

async function useFile(chosen) {
  if (!chosen) return;
  clear();
  try {
    history = [{ image: await createImageBitmap(chosen) }];
    redraw();
  } catch { /* a format the browser cannot show: the server may still read it, or say why not */ }
  file = chosen;
  version++;
  predictSoon();
  explainSoon();
}

$("upload").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", () => { useFile($("file").files[0]); $("file").value = ""; });
canvas.addEventListener("dragover", (event) => { event.preventDefault(); canvas.classList.add("dropping"); });
canvas.addEventListener("dragleave", () => canvas.classList.remove("dropping"));
canvas.addEventListener("drop", (event) => {
  event.preventDefault();
  canvas.classList.remove("dropping");
  useFile(event.dataTransfer.files[0]);
});

// ---------------------------------------------------------------------------------------------- predicting

function image() {
  return file ? Promise.resolve(file) : new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

function predictSoon() {
  pending = true;
  if (inFlight || timer) return;
  const wait = lastSent + INTERVAL - performance.now();
  if (wait > 0) timer = setTimeout(() => { timer = null; if (pending) predictSoon(); }, wait);
  else predict();
}

async function predict() {
  pending = false;
  if (!history.length && !file) return;
  inFlight = true;
  lastSent = performance.now();
  const sent = version;
  const form = new FormData();
  form.append("image", await image(), "drawing.png");
  try {
    const response = await fetch("/api/predict", { method: "POST", body: form });
    const body = await response.json();
    if (sent <= cleared) return;  // cleared while on its way
    if (response.ok) show(body);
    else showBlank(body.detail || `error ${response.status}`, true);
  } catch (error) {
    showBlank(`no answer from the server (${error.message})`, true);
  } finally {
    inFlight = false;
    if (pending) predictSoon();
  }
}

function show(body) {
  status("");
  drawSaw(body.preprocessed);
  // By name: a model that joined while this request was on its way answers the next one.
  for (const p of body.predictions) columns.find((c) => c.model.name === p.model)?.show(p);
  canvas.dataset.answered = version;  // for tests: which drawing the page shows the answer to
}

function showBlank(message, error = false) {
  status(message, error);
  $("saw").getContext("2d").clearRect(0, 0, 224, 224);
  for (const column of columns) column.show(null);
}

function status(message, error = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", error);
}

// The 28x28 image, each pixel a square with a gap around it, so the pixels stay visible.
function drawSaw(base64) {
  const img = new Image();
  img.onload = () => {
    const small = document.createElement("canvas");
    small.width = small.height = 28;
    small.getContext("2d").drawImage(img, 0, 0);
    const pixels = small.getContext("2d").getImageData(0, 0, 28, 28).data;
    const saw = $("saw").getContext("2d");
    saw.fillStyle = "#555";
    saw.fillRect(0, 0, 224, 224);
    for (let i = 0; i < 28 * 28; i++) {
      const v = pixels[4 * i];
      saw.fillStyle = `rgb(${v},${v},${v})`;
      saw.fillRect((i % 28) * 8, Math.floor(i / 28) * 8, 7, 7);
    }
  };
  img.src = `data:image/png;base64,${base64}`;
}

// ---------------------------------------------------------------------------------------------- models

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function percent(x) { return `${(100 * x).toFixed(1)}%`; }

function accuracy(model) {
  // The calibration error says how far its percentages are from how often it is right (on its test split).
  const ece = model.test_ece === null ? "" : ` · calibration error ${(100 * model.test_ece).toFixed(2)}%`;
  if (model.test_accuracy !== null) return `test accuracy ${percent(model.test_accuracy)}${ece}`;
  if (model.members_test_accuracy.length) return `members' test accuracy ${model.members_test_accuracy.map(percent).join(", ")}${ece}`;
  return `test accuracy not recorded${ece}`;
}

function column(model) {
  const root = element("article", "model");
  root.dataset.model = model.name;
  root.classList.toggle("words", model.classes.some((name) => name.length > 2)); // "Ankle boot", not "7": smaller
  root.append(element("h2", "", model.name), element("p", "arch", model.architecture), element("p", "acc", accuracy(model)));
  const answer = element("p", "answer");
  const digit = element("span", "digit", "–"), confidence = element("span", "confidence", "");
  answer.append(digit, confidence);
  // Its line is kept (empty) while nothing is flagged, so that the bars stay put when it fills.
  const flag = model.outlier_threshold === null ? null : element("p", "flag", "");
  const bars = element("ol", "bars");
  const rows = model.classes.map((name) => {
    const li = element("li"), fill = element("span", "fill"), p = element("span", "p", "");
    const track = element("span", "track");
    track.append(fill);
    li.append(element("span", "label", name), track, p);
    bars.append(li);
    return { li, fill, p };
  });
  root.append(...[answer, flag, bars].filter(Boolean));
  const why = whyParts(model, root);
  $("models").append(root);
  return {
    model,
    why,
    root,
    show(prediction) {
      const flagged = prediction !== null && prediction.outlier === true;
      root.classList.toggle("outlier", flagged);  // the answer stays, greyed
      if (flag) {
        flag.textContent = flagged ? `doesn't look like a ${model.item}` : "";
        flag.title = flagged ? `outlier score ${prediction.outlier_score} (flagged above ${model.outlier_threshold})` : "";
      }
      digit.textContent = prediction ? model.classes[prediction.label] : "–";
      confidence.textContent = prediction ? percent(prediction.confidence) : "";
      rows.forEach((row, i) => {
        const p = prediction ? prediction.probabilities[i] : 0;
        row.fill.style.width = `${100 * p}%`;
        row.p.textContent = prediction ? percent(p) : "";
        row.li.classList.toggle("top", prediction !== null && i === prediction.label);
      });
    },
  };
}

// A write (POST): with the token the server asked for, which the page asks the person for once and keeps for
// the session (sessionStorage: gone when the tab closes); a wrong one is forgotten and asked for again. `body` is
// a form, or anything else to send as JSON (the Train panel's requests).
const TOKEN = "mnistlab-token";

async function write(url, body) {
  const json = !(body instanceof FormData);
  for (let asked = false; ; asked = true) {
    const token = sessionStorage.getItem(TOKEN);
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    if (json) headers["Content-Type"] = "application/json";
    const response = await fetch(url, { method: "POST", body: json ? JSON.stringify(body) : body, headers });
    if (response.status !== 401 || asked) return response;
    sessionStorage.removeItem(TOKEN);
    const given = prompt("This server needs its token for saving drawings and training (ask whoever runs it):");
    if (!given || !/^[!-~]+$/.test(given.trim())) return response;  // no token, or none a header can carry
    sessionStorage.setItem(TOKEN, given.trim());
  }
}

async function collect(label) {
  if (!history.length && !file) { status("Draw a digit first.", true); return; }
  const form = new FormData();
  form.append("image", await image(), "drawing.png");
  form.append("label", label);
  try {
    const response = await write("/api/collect", form);
    const body = await response.json();
    if (!response.ok) { status(body.detail || `error ${response.status}`, true); return; }
    clear();
    status(`Saved as ${body.saved} (${body.count} in that folder). Draw the next one.`);
  } catch (error) {
    status(`not saved: ${error.message}`, true);
  }
}

// ---------------------------------------------------------------------------------------------- explanations
// Asked for when the drawing has paused for PAUSE ms, or at once when a control asks: one request at a time (a
// lane of their own beside the predictions'), each for the drawing as it is when sent; an answer to an older
// drawing is dropped, and whatever the newest drawing still lacks is asked for next.

const PAUSE = 400;       // ms without a change before explanations are asked for
const NEIGHBOURS = 5;
let explainTimer = null, explaining = false;
let insideModel = null;  // the model whose layers the Inside panel shows, or null: closed
const explanations = {}; // by model: the last /api/explain answer shown (for tests and the curious)

function explainSoon() {
  clearTimeout(explainTimer);
  explainTimer = setTimeout(() => { explainTimer = null; explainNext(); }, PAUSE);
  for (const c of columns) c.why.stale();
  $("inside").classList.add("stale");
}

// What the drawing as it is now still lacks: an explanation and neighbours per "Why?" column, the Inside
// panel's layers; each a request, the first one not done for this drawing (and method) next.
function jobs() {
  const method = $("method").value, list = [];
  for (const c of columns) {
    if (!c.why.open) continue;
    list.push({ path: "/api/explain", model: c.model.name, key: `${version}|${method}`, fields: { method },
                show: (body) => c.why.showMaps(body), fail: (m) => c.why.failMaps(m), done: c.why.done, part: "maps" });
  }
  if (insideModel) {
    list.push({ path: "/api/activations", model: insideModel, key: `${version}`, fields: {},
                show: showLayers, fail: failLayers, done: insideDone, part: "layers" });
  }
  for (const c of columns) {  // last: a model's first neighbours wait for its index to be built (seconds)
    if (!c.why.open) continue;
    list.push({ path: "/api/neighbours", model: c.model.name, key: `${version}`, fields: { k: NEIGHBOURS },
                show: (body) => c.why.showNeighbours(body), fail: (m) => c.why.failNeighbours(m), done: c.why.done,
                part: "neighbours" });
  }
  const now = performance.now();
  return list.filter((job) => job.done[job.part] !== job.key && !((notBefore[job.path + job.model] ?? 0) > now));
}
const insideDone = {};  // the Inside panel's `done`, as a column's
// When a request the server asked to come back later (503 with Retry-After: a neighbour index being built) may
// be sent again, by path and model; meanwhile the other requests go ahead.
const notBefore = {};

async function explainNext() {
  if (explaining || explainTimer) return;  // one at a time; while drawing, wait for the pause
  if (!history.length && !file) return;
  const job = jobs()[0];
  if (!job) return;
  explaining = true;
  const sent = version;
  try {
    const form = new FormData();
    form.append("image", await image(), "drawing.png");
    form.append("model", job.model);
    for (const [name, value] of Object.entries(job.fields)) form.append(name, value);
    const response = await fetch(job.path, { method: "POST", body: form });
    const body = await response.json();
    // Still wanted: the drawing unchanged, the panel still open, the method the same.
    const wanted = sent === version && jobs().some((j) => j.path === job.path && j.model === job.model && j.key === job.key);
    const retry = response.status === 503 && Number(response.headers.get("Retry-After"));
    if (retry) {
      notBefore[job.path + job.model] = performance.now() + 1000 * retry;
      setTimeout(explainNext, 1000 * retry + 10);
    }
    if (wanted) {
      if (!retry) job.done[job.part] = job.key;
      if (response.ok) job.show(body);
      else job.fail(body.detail || `error ${response.status}`);
    }
  } catch (error) {
    job.done[job.part] = job.key;  // not asked again for this drawing: the next change tries again
    job.fail(`no answer from the server (${error.message})`);
  } finally {
    explaining = false;
    explainNext();
  }
}

function png(base64, className, alt) {
  const img = element("img", className);
  img.src = `data:image/png;base64,${base64}`;
  img.alt = alt;
  return img;
}

// The 28x28 view in grey with a map over it, 3 screen pixels per pixel.
function drawMap(target, view, overlay) {
  const images = [view, overlay].map((base64) => new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.src = `data:image/png;base64,${base64}`;
  }));
  Promise.all(images).then(([digit, map]) => {
    const ctx = target.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, target.width, target.height);
    ctx.globalAlpha = 0.45;  // the ink faint, so that the colours read
    ctx.drawImage(digit, 0, 0, target.width, target.height);
    ctx.globalAlpha = 1;
    ctx.drawImage(map, 0, 0, target.width, target.height);
  });
}

// A column's "Why?" toggle and what it opens: the answer's and the runner-up's maps, and the nearest training
// digits.
function whyParts(model, root) {
  const tools = element("div", "explain-tools");
  const toggle = element("button", "why-toggle", "Why?");
  toggle.type = "button";
  toggle.setAttribute("aria-pressed", "false");
  toggle.setAttribute("aria-label", `Why? ${model.name}'s evidence, pixel by pixel`);
  toggle.title = "Which pixels spoke for the answer (red) and against it (blue); the nearest training digits";
  const inside = element("button", "inside-toggle", "Inside");
  inside.type = "button";
  inside.setAttribute("aria-pressed", "false");
  inside.setAttribute("aria-label", `Inside ${model.name}: what its layers computed`);
  inside.title = "What each layer of this model computed for the drawing";
  tools.append(toggle, inside);
  const panel = element("div", "why");
  panel.hidden = true;
  const maps = element("div", "maps"), note = element("p", "why-note", "");
  const near = element("div", "neighbours");
  near.setAttribute("aria-label", `${model.name}'s nearest training digits`);
  panel.append(maps, note, element("p", "near-title", "Nearest training digits"), near);
  root.append(tools, panel);
  const parts = {
    open: false,
    insideButton: inside,
    done: {},
    stale() { panel.classList.add("stale"); },
    reset() {
      maps.replaceChildren();
      near.replaceChildren();
      note.textContent = "";
      delete explanations[model.name];
      parts.done = {};
    },
    showMaps(body) {
      explanations[model.name] = body;
      maps.replaceChildren();
      for (const a of body.attributions.slice(0, 2)) {
        const figure = element("figure", "map");
        const canvas = element("canvas");
        canvas.width = canvas.height = 84;
        canvas.setAttribute("role", "img");
        canvas.setAttribute("aria-label", `${body.method} map for ${a.class} (${a.role}): red for, blue against`);
        drawMap(canvas, body.preprocessed, a.overlay);
        figure.append(canvas, element("figcaption", "", `${a.role === "answer" ? "for" : a.role} ${a.class}`));
        maps.append(figure);
      }
      const error = body.attributions[0].completeness_error;
      note.textContent = [
        "red: for, blue: against",
        body.members > 1 ? `${body.members} members averaged` : "",
        error === null ? "" : `sums to the score within ${(100 * error).toPrecision(2)}%`,
      ].filter(Boolean).join("; ");
      panel.classList.remove("stale");
      root.dataset.explained = version;  // for tests: which drawing the maps explain
    },
    failMaps(message) {
      maps.replaceChildren();
      note.textContent = message;
      panel.classList.remove("stale");
    },
    showNeighbours(body) {
      near.replaceChildren(...body.neighbours.map((n) => {
        const figure = element("figure", "neighbour");
        figure.title = `training image ${n.index}, distance ${n.distance.toPrecision(3)}`;
        figure.append(png(n.image, "", `a training ${model.item} labelled ${n.class}`),
                      element("figcaption", "", n.class));
        return figure;
      }));
      root.dataset.neighbours = version;
    },
    failNeighbours(message) { near.replaceChildren(element("p", "why-note", message)); },
  };
  toggle.addEventListener("click", () => {
    parts.open = !parts.open;
    toggle.setAttribute("aria-pressed", String(parts.open));
    panel.hidden = !parts.open;
    if (!parts.open) parts.reset();
    explainNext();
  });
  inside.addEventListener("click", () => openInside(insideModel === model.name ? null : model.name));
  return parts;
}

// ------------------------------------------------------------------------------------- the Inside panel

function openInside(name) {
  insideModel = name;
  for (const c of columns) c.why.insideButton.setAttribute("aria-pressed", String(c.model.name === name));
  $("inside").hidden = name === null;
  $("inside-model").textContent = name || "";
  $("layers").replaceChildren();
  delete $("inside").dataset.shown;
  delete insideDone.layers;
  explainNext();
}

function failLayers(message) {
  $("layers").replaceChildren(element("p", "why-note", message));
  $("inside").classList.remove("stale");
}

function showLayers(body) {
  const layers = body.layers.map((layer) => {
    const figure = element("figure", "layer");
    figure.dataset.kind = layer.kind;
    figure.append(element("figcaption", "", layer.name));
    if (layer.kind === "maps") {
      const tiles = element("div", "tiles");
      tiles.append(...layer.tiles.map((tile, i) => png(tile, "tile", `${layer.name}: map ${i + 1}`)));
      figure.append(tiles);
    } else {
      const bars = element("ol", "units");
      bars.setAttribute("aria-label", `${layer.name}: the most active units`);
      for (const unit of layer.top_units.slice(0, 12)) {
        const value = layer.values[unit];
        const li = element("li"), track = element("span", "track"), fill = element("span", "fill");
        fill.style.width = `${layer.maximum > 0 ? 100 * Math.max(0, value) / layer.maximum : 0}%`;
        track.append(fill);
        li.append(element("span", "label", `#${unit}`), track, element("span", "p", value.toPrecision(3)));
        bars.append(li);
      }
      figure.append(bars);
      if (layer.unit_weights) {
        const weights = element("div", "weights");
        weights.append(element("p", "note", "What the most active units look for (their weights: red +, blue −):"));
        layer.unit_weights.forEach((w, i) => weights.append(png(w, "weight", `unit ${layer.top_units[i]}'s weights`)));
        figure.append(weights);
      }
    }
    return figure;
  });
  const member = body.layers.find((layer) => layer.member !== null);
  if (member) layers.unshift(element("p", "note", `An ensemble: the layers of its member ${member.member + 1}.`));
  $("layers").replaceChildren(...layers);
  $("inside").classList.remove("stale");
  $("inside").dataset.shown = version;  // for tests
}

// The columns, one per served model in the order served: those already shown are kept as they are (their "Why?"
// panels open), a model that joined (a run the Train panel finished) gets a new column and the drawing is asked
// about again, so that it answers at once. Returns /api/models' answer. An answer older than one already shown
// is not shown (it could lack a model that joined meanwhile).
let modelsAsked = 0, modelsShown = 0;

async function loadModels() {
  const asked = ++modelsAsked;
  const info = await (await fetch("/api/models")).json();
  if (asked < modelsShown) return info;
  modelsShown = asked;
  const known = new Map(columns.map((c) => [c.model.name, c]));
  const joined = info.models.some((m) => !known.has(m.name));
  for (const c of columns) if (!info.models.some((m) => m.name === c.model.name)) c.root.remove();
  columns = info.models.map((m) => known.get(m.name) ?? column(m));
  $("models").append(...columns.map((c) => c.root));  // in the order served
  showMeaning(info);
  if (joined && (history.length || file)) {
    version++;
    predictSoon();
    explainSoon();
  }
  return info;
}

function showMeaning(info) {
  const uncalibrated = info.models.filter((m) => !m.calibrated).map((m) => m.name);
  const flagging = info.models.filter((m) => m.outlier_threshold !== null);
  const unflagging = info.models.filter((m) => m.outlier_threshold === null).map((m) => m.name);
  const items = [...new Set(flagging.map((m) => m.item))];
  $("meaning").textContent =
    "Percentages are calibrated on held-out images the models never trained on: of the answers given with 90%, about 9 in 10 are right." +
    (uncalibrated.length ? ` Not calibrated (older model files): ${uncalibrated.join(", ")}.` : "") +
    (flagging.length ? ` “Doesn't look like a ${items.join("/")}” (its answer greyed): the image is unlike what that model was trained on, a flag that at most 1% of held-out ${items.map((i) => `${i}s`).join("/")} get.` : "") +
    (flagging.length && unflagging.length ? ` No such flag (older model files): ${unflagging.join(", ")}.` : "");
}

async function start() {
  const info = await loadModels();
  $("method").addEventListener("change", explainNext);
  $("inside-close").addEventListener("click", () => openInside(null));
  if (info.collect) {
    info.models[0].classes.forEach((name, i) => {
      const button = element("button", "", name);
      button.type = "button";
      button.title = `Save the drawing as a ${name}`;
      button.addEventListener("click", () => collect(i));
      $("labels").append(button);
    });
    $("collect").hidden = false;
  }
  redraw();
  document.body.dataset.ready = "true";
}

start();
