// The Train panel, shown when GET /api/lab says the lab is on: a form generated from the shipped configs' keys
// (GET /api/configs), "Find learning rate" (POST /api/lr-find), Start (POST /api/runs), the runs (GET /api/runs,
// with Stop and Resume), and the curves of the ticked runs, fed by each run's event stream and drawn with uPlot
// (vendored in static/vendor/uplot). It uses app.js's helpers: $, element, percent, write, columns, loadModels.
"use strict";

{
  const BUSY_POLL = 2000;    // ms between refreshes of the run list while a run is queued or running
  const IDLE_POLL = 15000;   // and otherwise (runs trained from a terminal show up too)
  const COLOURS = ["#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f", "#5d4037", "#ad1457"];
  const SIZE = { width: 460, height: 220 };

  let configs = [], keys = [];
  let initial = {};          // dotted key -> the text the form showed for the picked config
  let runs = [];             // the last GET /api/runs
  const rows = new Map();    // run id -> its row in the run list
  const traces = new Map();  // ticked run id -> { colour, progress, epochs (by epoch), end, source }
  let servedRuns = "";       // the served runs the columns were last loaded for
  let pollTimer = null, refreshing = null, refreshAgain = false;
  let charts = null, chartKey = "", drawPending = false;

  // ------------------------------------------------------------------------------------------ small helpers

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "";
    if (seconds < 10) return `${seconds.toFixed(1)} s`;  // a small run's epochs take a fraction of a second
    const s = Math.round(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function button(text, label, onClick) {
    const b = element("button", "", text);
    b.type = "button";
    if (label) b.setAttribute("aria-label", label);
    b.addEventListener("click", onClick);
    return b;
  }

  async function answerOf(response) {
    try {
      return await response.json();
    } catch {
      return { detail: `error ${response.status}` };
    }
  }

  // ------------------------------------------------------------------------------------------ the form

  // A value as the form shows it, and as it is sent when changed: the text the CLI's --set would take.
  function text(value) {
    return Array.isArray(value) ? JSON.stringify(value) : String(value);
  }

  function inputFor(key) {
    let input;
    if (key.type === "bool") {
      input = element("input");
      input.type = "checkbox";
    } else if (key.choices) {
      input = element("select");
      for (const choice of key.choices) input.append(new Option(choice, choice));
    } else if (key.type === "int" || key.type === "float") {
      input = element("input");
      input.type = "number";
      input.step = key.type === "int" ? "1" : "any";
    } else {
      input = element("input");
      input.type = "text";
      input.spellcheck = false;
      if (key.type === "list") input.classList.add("wide");
    }
    input.id = `lab-key-${key.key}`;
    input.name = key.key;
    input.dataset.key = key.key;
    return input;
  }

  function current(input) {
    return input.type === "checkbox" ? String(input.checked) : input.value;
  }

  function buildForm() {
    const config = configs.find((c) => c.name === $("lab-config").value);
    if (!config) return;
    $("lab-about").textContent = [config.description, config.summary].filter(Boolean).join(" · ");
    initial = {};
    const sections = new Map();
    for (const key of keys) {
      const name = key.key.split(".")[0];
      if (!sections.has(name)) {
        const details = element("details", "lab-section");
        details.open = !["augment", "adversarial"].includes(name);  // the rarely changed ones start closed
        details.append(element("summary", "", name));
        const grid = element("div", "lab-grid");
        details.append(grid);
        sections.set(name, { details, grid });
      }
      const input = inputFor(key);
      const value = config.values[key.key];
      if (value !== undefined) {
        if (input.type === "checkbox") input.checked = value === true;
        else input.value = text(value);
      }
      initial[key.key] = current(input);
      const label = element("label", "lab-field");
      label.htmlFor = input.id;
      label.append(element("span", "lab-key", key.key.slice(name.length + 1)));
      if (key.help) label.title = key.help;
      const error = element("span", "lab-field-error", "");
      error.id = `${input.id}-error`;
      input.setAttribute("aria-describedby", error.id);
      input.addEventListener("input", () => input.classList.toggle("changed", current(input) !== initial[key.key]));
      const field = element("div", "lab-field-row");
      field.dataset.key = key.key;
      field.append(label, input, error);
      sections.get(name).grid.append(field);
    }
    $("lab-fields").replaceChildren(...[...sections.values()].map((s) => s.details));
    clearErrors();
  }

  function fieldOf(key) {
    return document.getElementById(`lab-key-${key}`);
  }

  // The request's body: the config and only the fields changed, as typed; null (with the field marked) where a
  // number field holds text the browser could not read as a number, which it would otherwise send as "".
  function formBody() {
    clearErrors();
    const set = {};
    for (const key of keys) {
      const field = fieldOf(key.key);
      if (field.validity && field.validity.badInput) {
        showError(`${key.key}: not a number`);
        return null;
      }
      if (current(field) !== initial[key.key]) set[key.key] = current(field);
    }
    return { config: $("lab-config").value, set };
  }

  function clearErrors() {
    $("lab-form-error").textContent = "";
    for (const e of $("lab-fields").querySelectorAll(".lab-field-error")) e.textContent = "";
    for (const e of $("lab-fields").querySelectorAll("[aria-invalid]")) e.removeAttribute("aria-invalid");
  }

  // The key a message names first as a key, not as one of the overrides its source lists ("seed-b-fixed with
  // optimizer.lr="fast": optimizer.lr: expected float ..."): a key followed by "=" is an override.
  function namedKey(detail) {
    let found = null, at = Infinity;
    for (const { key } of keys) {
      const match = new RegExp(`(^|[^\\w.-])${key.replaceAll(".", "\\.")}(?![\\w=])`).exec(detail);
      if (match && match.index < at) [found, at] = [key, match.index];
    }
    return found;
  }

  // A refusal next to the field it names (its section opened, the field focused), else above the buttons.
  function showError(detail) {
    const key = namedKey(detail);
    const field = key && fieldOf(key);
    if (!field) {
      $("lab-form-error").textContent = detail;
      return;
    }
    field.closest("details").open = true;
    document.getElementById(`${field.id}-error`).textContent = detail;
    field.setAttribute("aria-invalid", "true");
    field.focus();
  }

  async function startRun(event) {
    event.preventDefault();
    const body = formBody();
    if (!body) return;
    $("lab-start").disabled = true;
    try {
      const response = await write("/api/runs", body);
      const answer = await answerOf(response);
      if (!response.ok) {
        showError(answer.detail || `error ${response.status}`);
        return;
      }
      tick(answer.id, true);
      await refreshRuns();
    } catch (error) {
      showError(`no answer from the server (${error.message})`);
    } finally {
      $("lab-start").disabled = false;
    }
  }

  // ------------------------------------------------------------------------------------------ lr-find

  async function findLr() {
    const body = formBody();
    if (!body) return;
    const note = $("lr-find-note");
    $("lr-find").hidden = false;
    $("lr-find-chart").replaceChildren();
    note.textContent = "Finding a learning rate: the rate rises from tiny to huge over at most one epoch…";
    $("lab-lr-find").disabled = true;
    try {
      const response = await write("/api/lr-find", body);
      const answer = await answerOf(response);
      if (!response.ok) {
        note.textContent = "";
        $("lr-find").hidden = true;
        showError(answer.detail || `error ${response.status}`);
        return;
      }
      const lr = Number(answer.suggested_lr.toPrecision(3));
      const field = fieldOf("optimizer.lr");
      field.value = String(lr);
      field.dispatchEvent(new Event("input"));
      note.textContent = `Suggested learning rate ${lr} (${answer.method}): optimizer.lr is set to it.`;
      lrChart(answer.points, lr);
      $("lr-find").dataset.suggested = String(lr);  // for tests
    } catch (error) {
      note.textContent = `no answer from the server (${error.message})`;
    } finally {
      $("lab-lr-find").disabled = false;
    }
  }

  // A dashed vertical line at each of `marks()` ([{x, colour}]): the suggested rate, a run's best epoch.
  function markers(marks) {
    return {
      hooks: {
        draw: [(u) => {
          const c = u.ctx;
          c.save();
          c.lineWidth = 2;
          c.setLineDash([6, 4]);
          for (const { x, colour } of marks()) {
            const px = Math.round(u.valToPos(x, "x", true));
            c.strokeStyle = colour;
            c.beginPath();
            c.moveTo(px, u.bbox.top);
            c.lineTo(px, u.bbox.top + u.bbox.height);
            c.stroke();
          }
          c.restore();
        }],
      },
    };
  }

  function lrChart(points, lr) {
    const options = {
      ...SIZE,
      scales: { x: { time: false, distr: 3 } },
      // Rates as 1e-7 ... 0.1: the default labels round the small ones to 0.
      axes: [{ label: "learning rate", values: (u, rates) => rates.map((r) => (r === null ? "" : r.toPrecision(1))) },
             { label: "loss" }],
      series: [{ label: "learning rate" }, { label: "loss", stroke: COLOURS[0], width: 1.5 }],
      plugins: [markers(() => [{ x: lr, colour: COLOURS[1] }])],
    };
    new uPlot(options, [points.map((p) => p[0]), points.map((p) => p[1])], $("lr-find-chart"));
  }

  // ------------------------------------------------------------------------------------------ the runs

  function refreshSoon(wait) {
    clearTimeout(pollTimer);
    pollTimer = setTimeout(refreshRuns, wait);
  }

  // GET /api/runs, one request at a time (a refresh asked for meanwhile follows it), then again in a while.
  async function refreshRuns() {
    if (refreshing) {
      refreshAgain = true;
      return refreshing;
    }
    refreshing = (async () => {
      try {
        const response = await fetch("/api/runs");
        if (response.ok) {
          runs = (await response.json()).runs;
          showRuns();
          await syncModels();
        }
      } catch { /* the server went away: the next refresh tries again */ }
    })();
    await refreshing;
    refreshing = null;
    if (refreshAgain) {
      refreshAgain = false;
      return refreshRuns();
    }
    const busy = runs.some((r) => r.status === "queued" || r.status === "running");
    refreshSoon(busy ? BUSY_POLL : IDLE_POLL);
  }

  // A run that finished joins the columns: the models are asked for again when the served runs change.
  async function syncModels() {
    const served = runs.filter((r) => r.served).map((r) => r.id).sort().join("\n");
    if (served === servedRuns) return;
    servedRuns = served;
    const shown = new Set(columns.map((c) => c.model.name));
    if (!runs.some((r) => r.served && !shown.has(r.id))) return;
    try {
      await loadModels();
    } catch {
      servedRuns = "";  // asked again at the next refresh
    }
  }

  function row(run) {
    let r = rows.get(run.id);
    if (r) return r;
    const tr = element("tr");
    tr.dataset.run = run.id;
    const show = element("input");
    show.type = "checkbox";
    show.setAttribute("aria-label", `Show ${run.id}'s curves`);
    show.addEventListener("change", () => tick(run.id, show.checked));
    const cells = {};
    for (const name of ["show", "id", "config", "status", "val", "test", "time", "actions"]) {
      cells[name] = element(name === "id" ? "th" : "td", `lab-${name}`);
      tr.append(cells[name]);
    }
    cells.id.scope = "row";
    cells.show.append(show);
    r = { tr, show, cells };
    rows.set(run.id, r);
    return r;
  }

  function timeOf(run) {
    if (run.status === "running") {
      const left = run.eta === null ? "" : `, about ${duration(run.eta)} left`;
      return `${duration(run.elapsed)} so far${left}`;
    }
    return run.epoch ? duration(run.seconds) : "–";
  }

  function showRuns() {
    const body = $("lab-runs").tBodies[0];
    for (const [id, r] of rows) {
      if (!runs.some((run) => run.id === id)) {
        r.tr.remove();
        rows.delete(id);
      }
    }
    for (const run of runs) {
      const r = row(run);
      r.show.checked = traces.has(run.id);
      r.cells.id.textContent = run.id;
      r.cells.id.title = run.description || "";
      r.cells.config.textContent = run.config;
      r.cells.status.textContent = run.status === "running" || run.status === "stopped"
        ? `${run.status} (epoch ${run.epoch} of ${run.epochs ?? "?"})` : run.status;
      if (run.reason) r.cells.status.append(element("span", "lab-reason", run.reason));
      r.cells.val.textContent = run.best_val_accuracy === null ? "–" : percent(run.best_val_accuracy);
      r.cells.test.textContent = run.test_accuracy === null ? "–" : percent(run.test_accuracy);
      r.cells.time.textContent = timeOf(run);
      const actions = `${run.status}|${run.resumable}`;
      if (r.tr.dataset.actions !== actions) {  // rebuilt only when they change, so that focus stays put
        r.tr.dataset.actions = actions;
        const list = [];
        if (run.status === "queued" || run.status === "running") {
          list.push(button("Stop", `Stop ${run.id}`, () => act(run.id, "stop")));
        } else if (run.resumable || run.status === "stopped") {  // stopped before its first epoch: starts again
          list.push(button("Resume", `Resume ${run.id}`, () => act(run.id, "resume")));
        }
        r.cells.actions.replaceChildren(...list);
      }
      r.tr.dataset.status = run.status;  // for tests
      // A ticked run that runs again (resumed, here or by another page) is followed live again.
      const trace = traces.get(run.id);
      if (trace && !trace.source && (run.status === "queued" || run.status === "running")) watch(run.id);
    }
    const order = runs.map((run) => rows.get(run.id).tr);
    if (order.some((tr, i) => body.children[i] !== tr)) body.append(...order);
    $("lab-runs-empty").hidden = runs.length > 0;
    showLive();
  }

  async function act(id, action) {
    $("lab-run-error").textContent = "";
    try {
      const response = await write(`/api/runs/${encodeURIComponent(id)}/${action}`, {});
      if (!response.ok) $("lab-run-error").textContent = (await answerOf(response)).detail;
      else if (action === "resume" && traces.has(id)) watch(id);
    } catch (error) {
      $("lab-run-error").textContent = `no answer from the server (${error.message})`;
    }
    await refreshRuns();
  }

  // ------------------------------------------------------------------------------------------ the curves

  function tick(id, on) {
    const trace = traces.get(id);
    if (on && !trace) {
      const used = new Set([...traces.values()].map((t) => t.colour));
      const colour = COLOURS.find((c) => !used.has(c)) ?? COLOURS[traces.size % COLOURS.length];
      traces.set(id, { colour, progress: [], epochs: new Map(), end: null, source: null });
      watch(id);
    } else if (!on && trace) {
      if (trace.source) trace.source.close();
      traces.delete(id);
    }
    const r = rows.get(id);
    if (r) r.show.checked = on;
    drawSoon();
  }

  // The run's event stream: everything so far, then what happens, then `end`. On every (re)connection the
  // server sends the history again, so what was kept is dropped first.
  function watch(id) {
    const trace = traces.get(id);
    if (trace.source) trace.source.close();
    const source = new EventSource(`/api/runs/${encodeURIComponent(id)}/events`);
    trace.source = source;
    const take = (type, handle) => source.addEventListener(type, (event) => {
      if (trace.source !== source) return;  // unticked, or replaced by a newer stream
      handle(JSON.parse(event.data));
      drawSoon();
    });
    source.addEventListener("open", () => {
      trace.progress = [];
      trace.epochs = new Map();
      trace.end = null;
    });
    take("progress", (p) => trace.progress.push(p));
    take("epoch", (record) => {
      trace.epochs.set(record.epoch, record);
      refreshRuns();
    });
    take("end", (end) => {
      trace.end = end;
      source.close();
      trace.source = null;
      refreshRuns();
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED && trace.source === source) trace.source = null;
    });
  }

  function drawSoon() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      drawCurves();
    });
  }

  // One table for uPlot: the union of every series' x (epochs, fractional within an epoch), null where a series
  // has no point (lines span the gaps).
  function aligned(series) {
    const xs = [...new Set(series.flatMap((s) => [...s.keys()]))].sort((a, b) => a - b);
    return [xs, ...series.map((s) => xs.map((x) => s.get(x) ?? null))];
  }

  // Per ticked run: train (within epochs, from progress events, then each epoch's figure), validation and test
  // (per epoch); loss in one chart, accuracy in percent in the other.
  function seriesOf(trace, metric, scale) {
    const train = new Map(), val = new Map(), test = new Map();
    for (const p of trace.progress) train.set(p.epoch - 1 + p.images / p.train_size, scale * p[`train_${metric}`]);
    for (const [epoch, r] of trace.epochs) {
      train.set(epoch, scale * r[`train_${metric}`]);
      if (r[`val_${metric}`] != null) val.set(epoch, scale * r[`val_${metric}`]);
      if (r[`test_${metric}`] != null) test.set(epoch, scale * r[`test_${metric}`]);
    }
    return [train, val, test];
  }

  function bestMarks() {
    return [...traces.values()]
      .filter((t) => t.end && t.end.best_epoch)
      .map((t) => ({ x: t.end.best_epoch, colour: t.colour }));
  }

  function chartOptions(title, label) {
    const series = [{ label: "epoch" }];
    for (const [id, trace] of traces) {
      series.push(
        { label: `${id} train`, stroke: trace.colour, width: 1, spanGaps: true, points: { show: false } },
        { label: `${id} val`, stroke: trace.colour, width: 2, spanGaps: true, points: { size: 6 } },
        { label: `${id} test`, stroke: trace.colour, width: 1.5, dash: [6, 4], spanGaps: true, points: { size: 5 } },
      );
    }
    const width = Math.max(280, Math.min(SIZE.width, ($("lab-curves").clientWidth - 24) / 2));
    return {
      title, width, height: SIZE.height,
      scales: { x: { time: false, range: (u, min, max) => [0, Math.max(1, Math.ceil(max))] } },  // from epoch 0
      axes: [{ label: "epoch" }, { label }],
      series,
      // uPlot's legend (each line's value under the cursor) for one run; with several, its three lines a run
      // crowd the charts out, and the list below the charts names the runs' colours instead.
      legend: { show: traces.size <= 1 },
      plugins: [markers(bestMarks)],
    };
  }

  function drawCurves() {
    const key = [...traces].map(([id, t]) => `${id}:${t.colour}`).join("|");
    const loss = aligned([...traces.values()].flatMap((t) => seriesOf(t, "loss", 1)));
    const acc = aligned([...traces.values()].flatMap((t) => seriesOf(t, "accuracy", 100)));
    if (key !== chartKey) {  // other runs ticked: new charts for the new set of series
      chartKey = key;
      if (charts) for (const chart of charts) chart.destroy();
      charts = traces.size
        ? [new uPlot(chartOptions("Loss", "loss"), loss, $("lab-loss")),
           new uPlot(chartOptions("Accuracy", "accuracy (%)"), acc, $("lab-acc"))]
        : null;
    } else if (charts) {
      charts[0].setData(loss);
      charts[1].setData(acc);
    }
    showLegend();
  }

  function showLegend() {
    let points = 0;
    $("lab-legend").replaceChildren(...[...traces].map(([id, trace]) => {
      const li = element("li");
      const swatch = element("span", "lab-swatch");
      swatch.style.background = trace.colour;
      const best = trace.end && trace.end.best_epoch ? `, best epoch ${trace.end.best_epoch} (dashed line)` : "";
      const epochs = trace.epochs.size;
      li.append(swatch, `${id}: ${epochs} epoch${epochs === 1 ? "" : "s"}${best}`);
      li.dataset.run = id;        // for tests: the epoch points drawn for this run, its best epoch once ended
      li.dataset.epochs = String(epochs);
      if (trace.end) li.dataset.best = String(trace.end.best_epoch);
      points += epochs;
      return li;
    }));
    $("lab-curves").dataset.epochs = String(points);
    $("lab-curves").classList.toggle("empty", traces.size === 0);
    showLive();
  }

  // Where the running run is: its epoch and how far into the next, the time so far and an estimate of what is left.
  function showLive() {
    const run = runs.find((r) => r.status === "running");
    if (!run) {
      $("lab-live").textContent = traces.size ? "Train: thin line, validation: thick, test: dashed." : "";
      return;
    }
    const trace = traces.get(run.id);
    const last = trace && trace.progress.at(-1);
    const share = last && Math.round((100 * last.images) / last.train_size);
    const within = last && last.epoch === run.epoch + 1 ? ` (${share}% into epoch ${last.epoch})` : "";
    const left = run.eta === null ? "" : `, about ${duration(run.eta)} left`;
    $("lab-live").textContent =
      `${run.id}: epoch ${run.epoch} of ${run.epochs ?? "?"} done${within}, ${duration(run.elapsed)} so far${left}.`;
  }

  // ------------------------------------------------------------------------------------------ start

  async function startLab() {
    let info;
    try {
      const response = await fetch("/api/lab");
      if (!response.ok) return;  // a server without the lab
      info = await response.json();
    } catch {
      return;
    }
    if (!info.enabled) {
      $("lab-off").textContent = `Training from the page is off: ${info.reason}`;
      $("lab-off").hidden = false;
      return;
    }
    $("lab-runs-dir").textContent = info.runs_dir;
    ({ configs, keys } = await (await fetch("/api/configs")).json());
    $("lab-config").replaceChildren(...configs.map((c) => new Option(c.name, c.name)));
    if (configs.some((c) => c.name === "seed-b-fixed")) $("lab-config").value = "seed-b-fixed";
    $("lab-config").addEventListener("change", () => {
      $("lr-find").hidden = true;
      buildForm();
    });
    $("lab-reset").addEventListener("click", buildForm);
    $("lab-form").addEventListener("submit", startRun);
    $("lab-lr-find").addEventListener("click", findLr);
    addEventListener("resize", () => {
      chartKey = "";  // rebuilt at the new width
      drawSoon();
    });
    buildForm();
    $("lab").hidden = false;
    await refreshRuns();
    $("lab").dataset.ready = "true";  // for tests
  }

  startLab();
}
