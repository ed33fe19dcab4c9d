// The swav-service dashboard: plain JavaScript (ES2020), no framework, no CDN.
//
// Three views, chosen by the URL hash: the jobs list (#/), a job (#/jobs/ID: curves,
// collapse diagnostics, checkpoints) and its explorer (#/jobs/ID/explore: a 2-D map of
// the dataset's embeddings, nearest neighbours of a dropped image). Everything comes from
// the JSON API with fetch, with the API key from the sign-in form as a Bearer header:
// the event stream (SSE) is read with fetch too, since EventSource cannot send headers,
// and images and downloads are fetched as blobs for the same reason. Text from the API
// is only ever set as text (textContent, attributes), never parsed as HTML.
"use strict";

const KEY_STORAGE = "swav.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                 "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const LIST_POLL_MS = 2000;
const JOB_POLL_MS = 2000;
const CHECKPOINT_POLL_MS = 5000;
const NEIGHBOURS = 12;

let apiKey = sessionStorage.getItem(KEY_STORAGE);
let view = null; // the current view's AbortController

// --------------------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function withAuth(headers) {
  const result = new Headers(headers || {});
  if (apiKey) result.set("Authorization", `Bearer ${apiKey}`);
  return result;
}

/** fetch() with the key; non-2xx answers throw ApiError (a 401 shows the sign-in form). */
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: withAuth(options.headers) });
  if (response.ok) return response;
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch (_) { /* not the envelope */ }
  if (response.status === 401) showLogin(apiKey ? "The API key was refused: sign in again." : "");
  throw new ApiError(response.status, error.code || `http_${response.status}`,
                     error.message || response.statusText);
}

async function getJSON(path, options) {
  return (await api(path, options)).json();
}

/** Every item of a paginated list (`data`, `next_cursor`), following the cursors. */
async function getAll(path, options, cursorParam = "cursor") {
  const items = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const url = cursor ? `${path}${sep}${cursorParam}=${encodeURIComponent(cursor)}` : path;
    const page = await getJSON(url, options);
    items.push(...page.data);
    cursor = page.next_cursor;
  } while (cursor);
  return items;
}

/**
 * Read a job's server-sent events with fetch (the key goes in a header), calling
 * onEvent for each. The server ends the stream once the job is finished and every event
 * was sent; if it ends or drops before `finished()` says so, it reconnects after the last
 * `seq` seen, so no event is lost or repeated.
 */
async function streamEvents(jobId, onEvent, signal, finished) {
  let after = 0;
  while (!signal.aborted) {
    try {
      const response = await api(`/v1/jobs/${jobId}/events?after=${after}`, {
        headers: { Accept: "text/event-stream" }, signal,
      });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data: "))
            .map((l) => l.slice(6)).join("\n");
          if (!data) continue; // a keepalive comment
          const event = JSON.parse(data);
          after = event.seq;
          onEvent(event);
        }
      }
      if (finished()) return;
    } catch (error) {
      if (signal.aborted || error.status === 401 || error.status === 404) throw error;
    }
    await sleep(2000, signal); // ended early or dropped: continue after the last seq
  }
}

/** An <img> whose src is fetched with the key (an <img src> request cannot carry it). */
function authImage(url, attrs, signal) {
  const img = h("img", attrs);
  api(url, { signal })
    .then((response) => response.blob())
    .then((blob) => {
      if (signal.aborted) return;
      const objectUrl = URL.createObjectURL(blob);
      img.src = objectUrl;
      signal.addEventListener("abort", () => URL.revokeObjectURL(objectUrl));
    })
    .catch(() => img.classList.add("broken"));
  return img;
}

/** A download link that works with a key: fetched as a blob, then saved. */
// The checkpoint's export_formats, as the download links name them.
const DOWNLOAD_LABELS = { full: ".pt", safetensors: "model" };

function downloadLink(url, label) {
  const link = h("a", { href: url, class: "download", "data-download": "" }, label);
  link.addEventListener("click", async (event) => {
    if (!apiKey) return; // no authentication: the plain link works
    event.preventDefault();
    link.classList.add("busy");
    try {
      const response = await api(url);
      const disposition = response.headers.get("Content-Disposition") || "";
      const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
      const objectUrl = URL.createObjectURL(await response.blob());
      const save = h("a", { href: objectUrl, download: match ? decodeURIComponent(match[1]) : "" });
      document.body.append(save);
      save.click();
      save.remove();
      setTimeout(() => URL.revokeObjectURL(objectUrl), 60_000);
    } catch (error) {
      toast(error.message);
    } finally {
      link.classList.remove("busy");
    }
  });
  return link;
}

// --------------------------------------------------------------------------- helpers

/**
 * An element: h("a", {href, class, onclick}, ...children); "svg:line" for SVG. `style` is
 * an object set through el.style, since the page's CSP refuses inline style attributes.
 */
function h(tag, attrs = {}, ...children) {
  const el = tag.startsWith("svg:")
    ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "style") Object.assign(el.style, value); // CSSOM: allowed by the CSP
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); });
  });
}

/** Run fn now and every ms until the view changes or fn returns false. */
function every(ms, fn, signal) {
  let timer = null;
  const tick = async () => {
    let again = true;
    try {
      again = (await fn()) !== false;
    } catch (error) {
      if (!signal.aborted && error.status !== 401) toast(error.message);
    }
    if (again && !signal.aborted) timer = setTimeout(tick, ms);
  };
  signal.addEventListener("abort", () => clearTimeout(timer));
  tick();
}

function toast(message) {
  const box = document.getElementById("toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e5)) {
    return value.toExponential(2);
  }
  return Number(value.toPrecision(digits)).toString();
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function bytes(size) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = size;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

function statusBadge(status) {
  return h("span", { class: `status status-${status}`, "data-status": status }, status);
}

function progressBar(progress) {
  const total = progress.total_steps || 0;
  const fraction = total ? Math.min(1, progress.step / total) : 0;
  return h("span", { class: "progress", title: `step ${progress.step} of ${total || "?"}` },
    h("span", { class: "bar" }, h("span", { class: "fill", style: { width: `${(100 * fraction).toFixed(1)}%` } })),
    h("span", { class: "muted" }, `${progress.step}/${total || "?"}`));
}

function labelColour(labels) {
  const known = [...new Set(labels.filter((l) => l !== null))].sort();
  return (label) => (label === null ? "#6b7280" : PALETTE[known.indexOf(label) % PALETTE.length]);
}

// --------------------------------------------------------------------------- charts

/**
 * A line chart as inline SVG: `points` are {x, y}; one polyline vertex per point (its
 * `data-count` says how many). `reference` draws a dashed horizontal line {y, label}.
 */
function lineChart(container, points, { title, reference, yMin, yMax, format = fmt } = {}) {
  const W = 440;
  const H = 190;
  const M = { top: 12, right: 14, bottom: 26, left: 52 };
  const finite = points.filter((p) => Number.isFinite(p.y));
  const ys = finite.map((p) => p.y).concat(reference ? [reference.y] : []);
  let lo = yMin ?? Math.min(...ys);
  let hi = yMax ?? Math.max(...ys);
  if (!finite.length) { lo = 0; hi = 1; }
  if (hi - lo < 1e-12) { lo -= Math.abs(lo) * 0.05 || 0.5; hi += Math.abs(hi) * 0.05 || 0.5; }
  const pad = (hi - lo) * 0.06;
  if (yMin === undefined) lo -= pad;
  if (yMax === undefined) hi += pad;
  const xs = finite.map((p) => p.x);
  const x0 = xs.length ? Math.min(...xs) : 0;
  const x1 = xs.length ? Math.max(...xs) : 1;
  const sx = (x) => M.left + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (W - M.left - M.right);
  const sy = (y) => H - M.bottom - ((y - lo) / (hi - lo)) * (H - M.top - M.bottom);

  const svg = h("svg:svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
                             "aria-label": title });
  for (let i = 0; i <= 3; i += 1) {
    const value = lo + ((hi - lo) * i) / 3;
    svg.append(h("svg:line", { x1: M.left, x2: W - M.right, y1: sy(value), y2: sy(value),
                               class: "grid" }),
               h("svg:text", { x: M.left - 6, y: sy(value) + 4, class: "tick", "text-anchor": "end" },
                 format(value)));
  }
  const xTicks = x1 > x0 ? [[x0, "start"], [Math.round((x0 + x1) / 2), "middle"], [x1, "end"]]
    : [[x0, "middle"]];
  for (const [x, anchor] of xTicks) {
    svg.append(h("svg:text", { x: sx(x), y: H - 8, class: "tick", "text-anchor": anchor },
      x === x1 && x1 > x0 ? `step ${x}` : String(x)));
  }
  if (reference) {
    svg.append(h("svg:line", { x1: M.left, x2: W - M.right, y1: sy(reference.y),
                               y2: sy(reference.y), class: "reference" }),
               h("svg:text", { x: W - M.right - 4, y: sy(reference.y) - 4, class: "tick reference-label",
                               "text-anchor": "end" }, reference.label));
  }
  const vertices = finite.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`);
  svg.append(h("svg:polyline", { points: vertices.join(" "), class: "line",
                                 "data-count": vertices.length }));
  if (finite.length <= 60) {
    for (const p of finite) svg.append(h("svg:circle", { cx: sx(p.x), cy: sy(p.y), r: 2.2, class: "dot" }));
  }
  // Hover: the nearest point's value.
  const marker = h("svg:circle", { r: 4, class: "hover", visibility: "hidden" });
  const readout = h("svg:text", { x: M.left + 6, y: M.top + 10, class: "readout" });
  svg.append(marker, readout);
  svg.addEventListener("mousemove", (event) => {
    if (!finite.length) return;
    const box = svg.getBoundingClientRect();
    const x = ((event.clientX - box.left) / box.width) * W;
    const nearest = finite.reduce((a, b) => (Math.abs(sx(b.x) - x) < Math.abs(sx(a.x) - x) ? b : a));
    marker.setAttribute("cx", sx(nearest.x));
    marker.setAttribute("cy", sy(nearest.y));
    marker.setAttribute("visibility", "visible");
    readout.textContent = `step ${nearest.x}: ${format(nearest.y)}`;
  });
  svg.addEventListener("mouseleave", () => {
    marker.setAttribute("visibility", "hidden");
    readout.textContent = "";
  });
  const last = finite.length ? format(finite[finite.length - 1].y) : "–";
  container.replaceChildren(
    h("div", { class: "chart-head" }, h("h3", {}, title), h("span", { class: "latest" }, last)),
    svg);
}

// --------------------------------------------------------------------------- views

function jobsView(main, signal) {
  const body = h("tbody");
  const empty = h("p", { class: "muted", hidden: true },
    "No jobs yet: submit one with POST /v1/jobs or `swav jobs submit`.");
  main.append(h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h1", {}, "Jobs"),
      h("span", { class: "muted live" }, "live")),
    h("table", { class: "table", id: "jobs-table" },
      h("thead", {}, h("tr", {}, ["Job", "Name", "Status", "Progress", "Epoch", "Loss",
                                  "Images/s", "ETA", "Created"].map((t) => h("th", {}, t)))),
      body),
    empty));
  every(LIST_POLL_MS, async () => {
    const page = await getJSON("/v1/jobs?limit=100", { signal });
    empty.hidden = page.data.length > 0;
    body.replaceChildren(...page.data.map((job) => h("tr", { "data-job-id": job.id },
      h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id)),
      h("td", {}, job.name || h("span", { class: "muted" }, "–")),
      h("td", { class: "status-cell" }, statusBadge(job.status)),
      h("td", {}, progressBar(job.progress)),
      h("td", {}, `${job.progress.epoch}/${job.progress.epochs}`),
      h("td", {}, fmt(job.metrics?.loss)),
      h("td", {}, fmt(job.metrics?.images_per_s)),
      h("td", {}, TERMINAL.has(job.status) ? "–" : duration(job.eta_s)),
      h("td", { class: "muted" }, when(job.created_at)))));
  }, signal);
}

const CHARTS = [
  { key: "loss", title: "Loss (swapped prediction, eq. 6)" },
  { key: "lr", title: "Learning rate", yMin: 0 },
  { key: "images_per_s", title: "Throughput (images/s)", yMin: 0 },
  { key: "code_entropy", title: "Code entropy (nats)" },
  { key: "prototype_usage", title: "Prototype usage", yMin: 0, yMax: 1 },
  { key: "loss_over_ln_k", title: "Loss / ln K" },
];

function jobView(main, jobId, signal) {
  const header = h("section", { class: "card", id: "job-header" }, h("p", { class: "muted" }, "Loading…"));
  const charts = h("section", { class: "charts", id: "charts" },
    CHARTS.map((c) => h("div", { class: "card chart-card", id: `chart-${c.key}` })));
  const warnings = h("ul", { class: "warnings", id: "warnings" });
  const checkpoints = h("tbody");
  const checkpointCard = h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "Checkpoints"),
      h("span", { class: "muted" }, "quality: kNN and linear-probe top-1 on the labelled dataset")),
    h("table", { class: "table", id: "checkpoints-table" },
      h("thead", {}, h("tr", {}, ["Step", "Epoch", "Kind", "Saved", "Size", "kNN top-1",
                                  "Linear top-1", "Loss", "Download"].map((t) => h("th", {}, t)))),
      checkpoints));
  main.append(header, warnings, charts, checkpointCard);

  let job = null;
  let lastState = null; // the status in the newest "state" event streamed
  const metrics = [];
  let drawPending = false;
  const draw = () => {
    drawPending = false;
    const lnK = job ? Math.log(job.config.n_prototypes) : null;
    for (const chart of CHARTS) {
      const points = metrics.filter((m) => typeof m[chart.key] === "number")
        .map((m) => ({ x: m.step, y: m[chart.key] }));
      let reference;
      if (chart.key === "loss_over_ln_k") reference = { y: 1, label: "constant scores (collapse)" };
      if (chart.key === "loss" && lnK) reference = { y: lnK, label: "ln K" };
      if (chart.key === "code_entropy" && lnK) reference = { y: lnK, label: "ln K: uniform codes" };
      lineChart(document.getElementById(`chart-${chart.key}`), points, { ...chart, reference });
    }
  };
  const redraw = () => {
    if (!drawPending) { drawPending = true; requestAnimationFrame(draw); }
  };
  redraw();

  const renderHeader = () => {
    const actions = [];
    if (!TERMINAL.has(job.status) && job.status !== "cancelling") {
      actions.push(h("button", { type: "button", class: "secondary", onclick: () => act("cancel") }, "Cancel"));
    }
    if (job.status === "cancelled" || job.status === "failed") {
      actions.push(h("button", { type: "button", class: "secondary", onclick: () => act("resume") }, "Resume"));
    }
    actions.push(h("a", { class: "button", href: `#/jobs/${job.id}/explore`, id: "explore-link" },
      "Explore embeddings"));
    const facts = [
      ["Progress", progressBar(job.progress)],
      ["Epoch", `${job.progress.epoch}/${job.progress.epochs}`],
      ["ETA", TERMINAL.has(job.status) ? "–" : duration(job.eta_s)],
      ["Compute", duration(job.compute_seconds)],
      ["Preset", job.preset || "paper defaults"],
      ["Backbone", job.config.backbone],
      ["Batch", job.config.batch_size],
      ["Prototypes (K)", job.config.n_prototypes],
      ["Dataset", h("span", { class: "mono" }, job.dataset_id)],
      ["Attempt", `${job.attempt}/${job.max_attempts}`],
    ];
    header.replaceChildren(...[
      h("div", { class: "card-head" },
        h("h1", {}, job.name || job.id, " ", statusBadge(job.status)),
        h("div", { class: "actions" }, actions)),
      h("p", { class: "muted mono" }, job.id, " · created ", when(job.created_at)),
      job.error ? h("p", { class: "error" }, `${job.error.code}: ${job.error.message || ""}`) : null,
      h("dl", { class: "facts" }, facts.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v)))),
    ].filter(Boolean));
  };

  const act = async (what) => {
    try {
      job = await getJSON(`/v1/jobs/${jobId}/${what}`, { method: "POST", signal });
      renderHeader();
      if (what === "resume") route(); // a new run: follow its events again
    } catch (error) {
      toast(error.message);
    }
  };

  every(JOB_POLL_MS, async () => {
    job = await getJSON(`/v1/jobs/${jobId}`, { signal });
    renderHeader();
    redraw();
    return !TERMINAL.has(job.status);
  }, signal);

  // The table is rebuilt only when the listing changed, so a link being clicked is never
  // swapped out under the pointer.
  let shownCheckpoints = null;
  const renderCheckpoints = async () => {
    const rows = await getAll(`/v1/jobs/${jobId}/checkpoints?limit=200`, { signal });
    const listing = JSON.stringify(rows);
    if (listing === shownCheckpoints) return rows;
    shownCheckpoints = listing;
    checkpoints.replaceChildren(...rows.sort((a, b) => b.step - a.step || b.final - a.final)
      .map((c) => h("tr", { "data-checkpoint-id": c.id },
        h("td", {}, c.step),
        h("td", {}, c.epoch),
        h("td", {}, c.final ? h("span", { class: "tag" }, "final") : "",
          c.best ? h("span", { class: "tag best" }, "best") : ""),
        h("td", { class: "muted" }, when(c.created_at)),
        h("td", {}, bytes(c.size_bytes)),
        h("td", { class: "quality knn" }, c.quality ? `${(100 * c.quality.knn_top1).toFixed(1)} %` : "–"),
        h("td", { class: "quality linear" }, c.quality ? `${(100 * c.quality.linear_top1).toFixed(1)} %` : "–"),
        h("td", {}, fmt(c.metrics?.loss)),
        h("td", { class: "downloads" },
          ...(c.export_formats || ["full"]).map((format) => downloadLink(
            `/v1/checkpoints/${c.id}/download?format=${format}`,
            DOWNLOAD_LABELS[format] || format))))));
    if (!rows.length) {
      checkpoints.append(h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No checkpoint yet.")));
    }
    return rows;
  };
  // Quality reports arrive after the checkpoint (a short-queue task): keep looking while
  // the job runs, then until every checkpoint has one (unlabelled datasets never do).
  let pollsAfterEnd = 0;
  every(CHECKPOINT_POLL_MS, async () => {
    const rows = await renderCheckpoints();
    if (!job || !TERMINAL.has(job.status)) return true;
    pollsAfterEnd += 1;
    return !rows.every((c) => c.quality) && pollsAfterEnd < 60;
  }, signal);

  streamEvents(jobId, (event) => {
    if (event.type === "metrics") {
      metrics.push(event.data);
      redraw();
    } else if (event.type === "checkpoint") {
      renderCheckpoints().catch(() => {});
    } else if (event.type === "state") {
      lastState = event.data.status;
    } else if (event.type === "warning") {
      warnings.append(h("li", { class: "warning" }, `step ${event.data.step}: `,
        event.data.message || event.data.code));
    } else if (event.type === "collapse_recovery") {
      warnings.append(h("li", { class: "warning" },
        `step ${event.data.collapsed_at_step}: `, event.data.message));
    } else if (event.type === "budget_fitted") {
      warnings.append(h("li", { class: "note" }, `step ${event.data.fitted_at_step}: `,
        `${event.data.total_steps} steps (${event.data.epochs} epochs) fit the `
        + `${Math.round(event.data.budget_s)} s budget`));
    }
  }, signal, () => TERMINAL.has(lastState))
    .catch((error) => { if (!signal.aborted) toast(error.message); });
}

function explorerView(main, jobId, signal) {
  const status = h("p", { class: "muted", id: "map-status" }, "Loading the map…");
  const mapBox = h("div", { id: "map", class: "map" });
  const legend = h("div", { class: "legend", id: "legend" });
  const input = h("input", { type: "file", id: "explorer-file", accept: "image/*" });
  const preview = h("div", { class: "preview", id: "preview" });
  const results = h("div", { class: "neighbours", id: "neighbours" });
  const drop = h("label", { class: "dropzone", id: "dropzone", for: "explorer-file" },
    h("strong", {}, "Drop an image here"), h("span", { class: "muted" }, "or click to choose a file"),
    input);
  main.append(
    h("section", { class: "card" },
      h("div", { class: "card-head" },
        h("h1", {}, "Explorer ", h("a", { href: `#/jobs/${jobId}`, class: "mono small" }, jobId)),
        h("span", { class: "muted", id: "map-checkpoint" })),
      status),
    h("div", { class: "explorer" },
      h("section", { class: "card" }, h("h2", {}, "Dataset map (PCA of the embeddings)"), mapBox, legend),
      h("section", { class: "card" }, h("h2", {}, "Nearest neighbours"), drop, preview, results)));

  let map = null;
  let checkpointId = null;
  let overlay = null;
  let project = null;

  const drawMap = () => {
    const W = 560;
    const H = 460;
    const M = 16;
    const points = map.points;
    const colour = labelColour(points.map((p) => p.label));
    const xs = points.map((p) => p.x);
    const ys = points.map((p) => p.y);
    const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    const sx = (x) => M + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (W - 2 * M);
    const sy = (y) => H - M - (y1 > y0 ? (y - y0) / (y1 - y0) : 0.5) * (H - 2 * M);
    project = { sx, sy };
    const svg = h("svg:svg", { viewBox: `0 0 ${W} ${H}`, class: "scatter", role: "img",
                               "aria-label": "2-D map of the dataset's embeddings" });
    for (const p of points) {
      svg.append(h("svg:circle", { cx: sx(p.x).toFixed(1), cy: sy(p.y).toFixed(1), r: 3.2,
                                   fill: colour(p.label), class: "point", "data-path": p.path },
        h("svg:title", {}, p.label ? `${p.path} (${p.label})` : p.path)));
    }
    overlay = h("svg:g", { class: "overlay" });
    svg.append(overlay);
    mapBox.replaceChildren(svg);
    const labels = [...new Set(points.map((p) => p.label))];
    legend.replaceChildren(...labels.map((l) => h("span", { class: "key" },
      h("span", { class: "swatch", style: { background: colour(l) } }), l ?? "unlabelled")));
    const [ex, ey] = map.explained_variance;
    status.textContent = `${map.num_images} images, ${points.length} shown; `
      + `x and y explain ${(100 * ex).toFixed(1)} % and ${(100 * ey).toFixed(1)} % of the variance.`;
  };

  every(2000, async () => {
    const query = new URLSearchParams({ limit: "2000" });
    if (checkpointId) query.set("checkpoint_id", checkpointId);
    const response = await api(`/v1/jobs/${jobId}/map?${query}`, { signal });
    const body = await response.json();
    checkpointId = body.checkpoint_id; // pinned: a newer checkpoint must not restart indexing
    document.getElementById("map-checkpoint").textContent = `checkpoint ${body.checkpoint_id}`;
    if (body.status !== "ready") {
      status.textContent = `Indexing the dataset with checkpoint ${body.checkpoint_id} `
        + `(embedding job ${body.embedding_job_id})…`;
      return true;
    }
    map = body;
    drawMap();
    return false;
  }, signal);

  const showNeighbours = (answer) => {
    overlay?.replaceChildren();
    if (project) {
      for (const n of answer.data) {
        overlay.append(h("svg:circle", { cx: project.sx(n.x), cy: project.sy(n.y), r: 6, class: "ring" }));
      }
      const [qx, qy] = [project.sx(answer.query[0]), project.sy(answer.query[1])];
      overlay.append(h("svg:path", { d: `M${qx - 7},${qy} L${qx + 7},${qy} M${qx},${qy - 7} L${qx},${qy + 7}`,
                                     class: "query" }, h("svg:title", {}, "the dropped image")));
    }
    const colour = labelColour((map?.points || []).map((p) => p.label));
    results.replaceChildren(...answer.data.map((n, rank) => h("figure",
      { class: "neighbour", "data-path": n.path, "data-score": n.score.toFixed(6) },
      authImage(n.thumbnail_url, { alt: n.path, class: "thumb" }, signal),
      h("figcaption", {},
        h("span", { class: "rank" }, `#${rank + 1}`), " ",
        h("span", { class: "score" }, n.score.toFixed(3)),
        n.label ? h("span", { class: "tag", style: { borderColor: colour(n.label) } }, n.label) : null,
        h("span", { class: "path mono" }, n.path)))));
  };

  let previewUrl = null;
  signal.addEventListener("abort", () => previewUrl && URL.revokeObjectURL(previewUrl));
  const search = async (file) => {
    if (!file) return;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.replaceChildren(h("img", { src: previewUrl, alt: file.name }),
      h("span", { class: "muted" }, `${file.name} · searching…`));
    const form = new FormData();
    form.append("file", file, file.name);
    const query = new URLSearchParams({ k: String(NEIGHBOURS) });
    if (checkpointId) query.set("checkpoint_id", checkpointId);
    for (let attempt = 0; attempt < 60 && !signal.aborted; attempt += 1) {
      try {
        const answer = await getJSON(`/v1/jobs/${jobId}/neighbours?${query}`,
          { method: "POST", body: form, signal });
        preview.lastChild.textContent = `${file.name} · ${answer.data.length} neighbours`;
        showNeighbours(answer);
        return;
      } catch (error) {
        if (error.code !== "index_not_ready") {
          preview.lastChild.textContent = `${file.name} · ${error.message}`;
          return;
        }
        await sleep(2000, signal);
      }
    }
  };

  input.addEventListener("change", () => search(input.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    search(event.dataTransfer.files[0]);
  });
}

// --------------------------------------------------------------------------- shell

function route() {
  view?.abort();
  view = new AbortController();
  const main = document.getElementById("main");
  main.replaceChildren();
  const path = location.hash.replace(/^#/, "") || "/";
  let match;
  if ((match = path.match(/^\/jobs\/([\w.-]+)\/explore$/))) explorerView(main, match[1], view.signal);
  else if ((match = path.match(/^\/jobs\/([\w.-]+)$/))) jobView(main, match[1], view.signal);
  else jobsView(main, view.signal);
}

function showLogin(message) {
  view?.abort();
  document.getElementById("main").replaceChildren();
  document.getElementById("login").hidden = false;
  const error = document.getElementById("login-error");
  error.textContent = message || "";
  error.hidden = !message;
  document.getElementById("api-key").focus();
  renderIdentity();
}

function renderIdentity() {
  document.getElementById("sign-out").hidden = !apiKey;
  document.getElementById("whoami").textContent = apiKey ? `key ${apiKey.slice(0, 13)}…` : "";
}

async function signIn(event) {
  event.preventDefault();
  const field = document.getElementById("api-key");
  apiKey = field.value.trim();
  try {
    await api("/v1/jobs?limit=1"); // a 401 shows the form again, with a message
  } catch (error) {
    if (error.status === 401) {
      field.value = "";
      apiKey = null;
      sessionStorage.removeItem(KEY_STORAGE);
      showLogin("That API key was refused (unknown or revoked).");
    } else {
      toast(error.message);
    }
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, apiKey);
  field.value = "";
  document.getElementById("login").hidden = true;
  renderIdentity();
  route();
}

function signOut() {
  apiKey = null;
  sessionStorage.removeItem(KEY_STORAGE);
  showLogin("");
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", signIn);
  document.getElementById("sign-out").addEventListener("click", signOut);
  window.addEventListener("hashchange", () => {
    if (document.getElementById("login").hidden) route();
  });
  renderIdentity();
  route(); // without a key, the first 401 shows the sign-in form
});
