// The draw-a-digit page: a canvas drawn with Pointer Events, live predictions from POST /api/predict (at most
// one request in flight, the latest drawing always sent next), one column per served model.
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
  body.predictions.forEach((p, i) => columns[i].show(p));
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
  if (model.test_accuracy !== null) return `test accuracy ${percent(model.test_accuracy)}`;
  if (model.members_test_accuracy.length) return `members' test accuracy ${model.members_test_accuracy.map(percent).join(", ")}`;
  return "test accuracy not recorded";
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
  $("models").append(root);
  return {
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
// the session (sessionStorage: gone when the tab closes); a wrong one is forgotten and asked for again.
const TOKEN = "mnistlab-token";

async function write(url, body) {
  for (let asked = false; ; asked = true) {
    const token = sessionStorage.getItem(TOKEN);
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch(url, { method: "POST", body, headers });
    if (response.status !== 401 || asked) return response;
    sessionStorage.removeItem(TOKEN);
    const given = prompt("This server needs its token to save drawings (ask whoever runs it):");
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

async function start() {
  const info = await (await fetch("/api/models")).json();
  columns = info.models.map(column);
  const uncalibrated = info.models.filter((m) => !m.calibrated).map((m) => m.name);
  const flagging = info.models.filter((m) => m.outlier_threshold !== null);
  const unflagging = info.models.filter((m) => m.outlier_threshold === null).map((m) => m.name);
  const items = [...new Set(flagging.map((m) => m.item))];
  $("meaning").textContent =
    "Percentages are calibrated on held-out images the models never trained on: of the answers given with 90%, about 9 in 10 are right." +
    (uncalibrated.length ? ` Not calibrated (older model files): ${uncalibrated.join(", ")}.` : "") +
    (flagging.length ? ` “Doesn't look like a ${items.join("/")}” (its answer greyed): the image is unlike what that model was trained on, a flag that at most 1% of held-out ${items.map((i) => `${i}s`).join("/")} get.` : "") +
    (flagging.length && unflagging.length ? ` No such flag (older model files): ${unflagging.join(", ")}.` : "");
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
