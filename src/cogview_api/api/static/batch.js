// The "Batch" tab: prompts pasted one a line become one POST /api/v1/batches; the batch's event
// stream (polling GET /api/v1/batches/{id} where the stream is refused or breaks) says when its
// counts move, and then the pages of GET /api/v1/batches/{id}/tasks that can have changed are
// read again to fill a grid of thumbnails. Cancel and the ZIP download use the same key.

import {
  HttpError,
  TERMINAL,
  applySizeRules,
  callApi,
  describeError,
  randomKey,
  readEvents,
  retryAfterSeconds,
  shellQuote,
  sleep,
} from "./api.js";

const PAGE = 100; // the tasks list's largest page
const POLL_MS = 1000;
const RUNNING_REFRESH_MS = 2000; // the batch's frames carry counts, not a running task's percent
const REFRESH_GAP_MS = 250; // at most about four task-page sweeps a second
const STREAM_TRIES = 3;
const ERRORS_SHOWN = 20;
const CURL_BODY_LINES = 10; // a longer batch's curl reads its body from a file

export function setupBatch(shared) {
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("batch-form"),
    prompts: $("batch-prompts"),
    count: $("batch-count"),
    size: $("batch-size"),
    quality: $("batch-quality"),
    width: $("batch-width"),
    height: $("batch-height"),
    customSize: $("batch-custom-size"),
    customSizeHint: $("batch-custom-size-hint"),
    n: $("batch-n"),
    negative: $("batch-negative"),
    cost: $("batch-cost"),
    submit: $("batch-submit"),
    cancel: $("batch-cancel"),
    error: $("batch-error"),
    progress: $("batch-progress"),
    line: $("batch-line"),
    id: $("batch-id"),
    status: $("batch-status"),
    credits: $("batch-credits"),
    download: $("batch-download"),
    grid: $("batch-grid"),
    curl: $("batch-curl"),
  };
  // The same size menu as the single tab's.
  for (const option of $("size").options) els.size.append(option.cloneNode(true));

  // The batch on screen: {id, key, lines, cells, batch, cursors, pageDone, abort, ended, ...}.
  let live = null;
  // The Idempotency-Key of a submit that got no answer (the network failed): sending the same
  // body again reuses it, so the server answers the batch it may have made, charged once.
  let unanswered = null;

  // -- the request -------------------------------------------------------------------------

  // The pasted lines worth sending, each with its line number in the box (1-based), so the
  // server's 0-based `index` can be named as the line the user sees.
  function promptLines() {
    const lines = [];
    els.prompts.value.split("\n").forEach((text, i) => {
      const prompt = text.trim();
      if (prompt !== "") lines.push({ line: i + 1, prompt });
    });
    return lines;
  }

  function chosenSize() {
    if (els.size.value !== "custom") return els.size.value;
    return `${els.width.value.trim()}*${els.height.value.trim()}`;
  }

  function imagesPerPrompt() {
    const n = Math.trunc(Number(els.n.value));
    return Number.isFinite(n) && n >= 1 ? n : 1;
  }

  function requestFor(prompt) {
    const request = {
      model: shared.info ? shared.info.models[0] : "cogview-4",
      prompt,
      size: chosenSize(),
      quality: els.quality.value,
    };
    const n = els.n.value.trim();
    if (n !== "" && Number(n) !== 1) {
      const num = Number(n);
      request.n = Number.isFinite(num) ? num : n; // the server explains a bad value
    }
    if (els.negative.value.trim() !== "") request.negative_prompt = els.negative.value;
    return request;
  }

  function describeCost(lines) {
    const info = shared.info;
    if (!info) {
      els.cost.textContent = shared.infoError ? `Cost unknown: ${shared.infoError}.` : "";
      return;
    }
    const quality = els.quality.value;
    const each = info.credits_per_image[quality];
    const n = imagesPerPrompt();
    const total = each * n * lines.length;
    const plural = (count, word) => `${count} ${word}${count === 1 ? "" : "s"}`;
    let text =
      `Cost: ${plural(lines.length, "prompt")} × ${plural(n, "image")} × ` +
      `${each} credits (${quality}) = ${total} credits.`;
    const balance = shared.balance;
    if (balance !== null && balance !== undefined) {
      text += ` Balance: ${balance} credits.`;
      if (total > balance) text += " That is more than the balance: the server will refuse it.";
    }
    els.cost.textContent = text + " Failed or cancelled tasks are refunded.";
    els.cost.classList.toggle("over", balance !== null && total > balance);
  }

  function curlCommand(lines) {
    const origin = location.origin;
    const auth = `  -H "Authorization: Bearer $COGVIEW_API_KEY"`;
    const out = ["# 1. Submit: the answer's data.batch_id names the batch"];
    if (lines.length <= CURL_BODY_LINES) {
      // One request a line, as a person would write it.
      const requests = lines.map((l) => `  ${JSON.stringify(requestFor(l.prompt))}`);
      out.push(
        `curl -X POST ${origin}/api/v1/batches \\`,
        `${auth} \\`,
        `  -H "Content-Type: application/json" \\`,
        `  -d ${shellQuote(`{"requests": [\n${requests.join(",\n")}\n]}`)}`,
      );
    } else {
      out.push(
        "# (batch.jsonl: one request a line, e.g. " +
          JSON.stringify(requestFor(lines[0].prompt)) +
          ")",
        `curl -X POST ${origin}/api/v1/batches \\`,
        `${auth} \\`,
        `  -H "Content-Type: application/jsonl" --data-binary @batch.jsonl`,
      );
    }
    const id = shellQuote(live ? live.id : "paste the batch_id here");
    out.push(
      "",
      "# 2. Its counts (or curl -N …/events for a stream of them) and its tasks, in line order",
      `BATCH_ID=${id}`,
      `curl ${origin}/api/v1/batches/$BATCH_ID \\`,
      auth,
      `curl "${origin}/api/v1/batches/$BATCH_ID/tasks?limit=100" \\`,
      auth,
      "",
      "# 3. The images finished so far and manifest.jsonl, as a ZIP",
      `curl -o "$BATCH_ID.zip" ${origin}/api/v1/batches/$BATCH_ID/archive \\`,
      auth,
    );
    return out.join("\n");
  }

  function refreshForm() {
    const lines = promptLines();
    els.count.textContent = String(lines.length);
    const custom = els.size.value === "custom";
    els.customSize.hidden = !custom;
    els.customSizeHint.hidden = !custom;
    describeCost(lines);
    els.curl.textContent = curlCommand(lines.length ? lines : [{ line: 1, prompt: "…" }]);
  }

  // -- errors in words ---------------------------------------------------------------------

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
  }

  function clearError() {
    els.error.textContent = "";
    els.error.hidden = true;
  }

  // A refused submit as sentences a user can act on; every bad line named by its line number.
  function explainRefusal(response, payload, lines) {
    const error = (payload && payload.error) || {};
    const server = describeError(payload && payload.error, response.status);
    const status = response.status;
    if (status === 400 && Array.isArray(error.errors) && error.errors.length) {
      const bad = error.errors;
      const head =
        `The batch was refused and nothing was charged: ` +
        `${bad.length === 1 ? "1 line needs" : `${bad.length} lines need`} fixing.`;
      const rows = bad.slice(0, ERRORS_SHOWN).map((e) => {
        const where = lines[e.index] ? `Line ${lines[e.index].line}` : `Request ${e.index + 1}`;
        const param = e.param ? ` (${e.param})` : "";
        return `${where}: ${e.message}${param}`;
      });
      if (bad.length > ERRORS_SHOWN) rows.push(`… and ${bad.length - ERRORS_SHOWN} more.`);
      return [head, ...rows].join("\n");
    }
    const lead = {
      400: "The batch was refused; nothing was charged.",
      401: "The server does not know this API key.",
      402: "Not enough credits for the whole batch; nothing was charged. Remove some lines, pick fewer images, or ask the operator for credits.",
      403: "This key may not submit.",
      404: "This server has no batch API.",
      413: "The batch is larger than the server accepts; split it into smaller batches.",
      429: `Too many requests from this key just now; try again in ${retryAfterSeconds(response)} s. Nothing was charged.`,
      503: `The server cannot take work right now; try again in ${retryAfterSeconds(response)} s. Nothing was charged.`,
    }[status];
    return lead ? `${lead}\nThe server said: ${server}` : server;
  }

  // -- the grid ----------------------------------------------------------------------------

  function makeCells(lines) {
    els.grid.replaceChildren();
    return lines.map((l, i) => {
      const cell = document.createElement("figure");
      cell.className = "cell";
      cell.dataset.index = String(i);
      cell.dataset.state = "queued";
      const thumb = document.createElement("div");
      thumb.className = "thumb";
      thumb.textContent = "queued";
      const caption = document.createElement("figcaption");
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = `line ${l.line}`;
      const prompt = document.createElement("span");
      prompt.className = "prompt";
      prompt.textContent = l.prompt;
      prompt.title = l.prompt;
      caption.append(label, prompt);
      cell.append(thumb, caption);
      els.grid.append(cell);
      return { cell, thumb, label, line: l.line, shown: "" };
    });
  }

  function updateCell(c, task) {
    const status = String(task.status).toUpperCase();
    const p = task.progress || {};
    const images = task.images || [];
    // What the cell shows, as one string: it is redrawn only when that changes.
    const shown = `${status}|${p.stage}|${Math.round(Number(p.percent) || 0)}|${images.length}`;
    if (shown === c.shown) return;
    c.shown = shown;
    c.cell.dataset.state = status === "IN_PROGRESS" ? p.stage || "queued" : status.toLowerCase();
    c.cell.dataset.taskId = task.task_id;
    if (status === "COMPLETED" && images.length) {
      c.thumb.replaceChildren();
      images.forEach((image, k) => {
        const link = document.createElement("a");
        link.href = image.url;
        link.target = "_blank";
        link.rel = "noopener";
        const img = document.createElement("img");
        img.src = image.url;
        img.loading = "lazy";
        img.alt = `Line ${c.line}, image ${k + 1}: ${task.request?.prompt ?? ""}`;
        img.width = image.width;
        img.height = image.height;
        link.append(img);
        c.thumb.append(link);
      });
      c.thumb.classList.toggle("multi", images.length > 1);
      c.label.textContent = `line ${c.line} · seed ${images[0].seed}`;
      return;
    }
    let text = status.toLowerCase();
    if (status === "IN_PROGRESS") {
      text = p.stage === "queued" || !p.stage ? "queued" : `${p.stage} ${Math.round(Number(p.percent) || 0)}%`;
    } else if (status === "FAILED" && task.error) {
      text = `failed: ${task.error.message}`;
    }
    c.thumb.textContent = text;
    c.thumb.title = text;
  }

  // Reads again the task pages that can have changed: from the first page with a task still in
  // progress, up to the first page whose tasks are all still queued (the batch's tasks are
  // taken in line order, so later pages are queued too); `final` reads to the end.
  async function refreshTasks(b, final) {
    for (let page = 0; page < b.cursors.length && b === live; page++) {
      if (b.pageDone[page]) continue;
      const query = new URLSearchParams({ limit: String(PAGE) });
      if (b.cursors[page]) query.set("cursor", b.cursors[page]);
      const { response, payload } = await callApi(
        "GET",
        `/api/v1/batches/${encodeURIComponent(b.id)}/tasks?${query}`,
        b.key,
      );
      if (!response.ok || !payload || !payload.data) {
        throw new HttpError(describeError(payload && payload.error, response.status), response.status);
      }
      const { tasks, next_cursor: next, has_more: more } = payload.data;
      let allEnded = true;
      let allQueued = true;
      tasks.forEach((task, j) => {
        const index = Number.isInteger(task.batch_index) ? task.batch_index : page * PAGE + j;
        const cell = b.cells[index];
        if (cell) updateCell(cell, task);
        const status = String(task.status).toUpperCase();
        if (!TERMINAL.has(status)) allEnded = false;
        if (status !== "IN_PROGRESS" || (task.progress && task.progress.stage !== "queued")) {
          allQueued = false;
        }
      });
      b.pageDone[page] = allEnded && (more || tasks.length > 0);
      if (more && next) b.cursors[page + 1] = next;
      if (!more) return;
      if (allQueued && !final) return;
    }
  }

  // Coalesces refresh requests: one sweep at a time, and one more after it if asked meanwhile.
  async function requestRefresh(b, final) {
    b.wanted = true;
    b.wantFinal = b.wantFinal || final;
    if (b.refreshing) return;
    b.refreshing = true;
    try {
      while (b.wanted && b === live) {
        const isFinal = b.wantFinal;
        b.wanted = false;
        b.wantFinal = false;
        try {
          await refreshTasks(b, isFinal);
        } catch (err) {
          if (b === live) showError(`Could not read the batch's tasks: ${err.message}`);
        }
        await sleep(REFRESH_GAP_MS);
      }
    } finally {
      b.refreshing = false;
    }
  }

  // -- the batch's state -------------------------------------------------------------------

  function describeBatch(batch) {
    const c = batch.counts || {};
    const images = batch.images || { done: 0, total: 0 };
    const ended = (c.completed || 0) + (c.failed || 0) + (c.cancelled || 0);
    const parts = [batch.status, `${ended} of ${batch.total} prompts ended`];
    if (batch.status === "IN_PROGRESS") {
      parts.push(`${c.running || 0} running`, `${c.queued || 0} queued`);
    }
    parts.push(`${c.completed || 0} completed`);
    if (c.failed) parts.push(`${c.failed} failed`);
    if (c.cancelled) parts.push(`${c.cancelled} cancelled`);
    parts.push(`${images.done} of ${images.total} images`);
    return parts.join(" · ");
  }

  function downloadLabel(batch) {
    const images = batch.images || { done: 0, total: 0 };
    return TERMINAL.has(String(batch.status).toUpperCase())
      ? `Download ZIP (${images.done} images + manifest)`
      : `Download ZIP (${images.done} of ${images.total} images so far)`;
  }

  function onBatch(b, batch) {
    if (b !== live) return;
    const before = b.batch;
    b.batch = batch;
    const images = batch.images || { done: 0, total: 0 };
    els.progress.value = images.total ? Math.round((100 * images.done) / images.total) : 0;
    els.status.textContent = describeBatch(batch);
    const credits = batch.credits || { charged: 0, refunded: 0 };
    els.credits.textContent = `Charged ${credits.charged} credits, refunded ${credits.refunded}.`;
    els.credits.hidden = false;
    const ended = TERMINAL.has(String(batch.status).toUpperCase());
    els.cancel.disabled = ended;
    els.download.hidden = false;
    if (!b.downloading) {
      els.download.disabled = false;
      els.download.textContent = downloadLabel(batch);
    }
    if (ended && !b.ended) {
      b.ended = true;
      if (b.abort) b.abort.abort();
      shared.refreshBalance();
      requestRefresh(b, true);
    } else if (!before || JSON.stringify(before.counts) !== JSON.stringify(batch.counts)) {
      requestRefresh(b, false);
    }
  }

  async function follow(b) {
    b.ticker = setInterval(() => {
      if (b.ended || b !== live) clearInterval(b.ticker);
      else if (b.batch && b.batch.counts && b.batch.counts.running > 0) requestRefresh(b, false);
    }, RUNNING_REFRESH_MS);
    for (let attempt = 0; attempt < STREAM_TRIES && !b.ended && b === live; attempt++) {
      b.abort = new AbortController();
      try {
        await readEvents(
          `/api/v1/batches/${encodeURIComponent(b.id)}/events`,
          b.key,
          (name, batch) => {
            if (name === "batch") onBatch(b, batch);
          },
          b.abort.signal,
        );
      } catch (err) {
        if (b.ended || b !== live) return;
        if (err instanceof HttpError && err.status !== 429) break; // not a stream here: poll
      }
      if (b.ended || b !== live) return;
      await sleep(POLL_MS);
    }
    await poll(b);
  }

  async function poll(b) {
    let failures = 0;
    while (!b.ended && b === live) {
      try {
        const { response, payload } = await callApi(
          "GET",
          `/api/v1/batches/${encodeURIComponent(b.id)}`,
          b.key,
        );
        failures = 0;
        if (response.status === 429 || response.status === 503) {
          await sleep(retryAfterSeconds(response) * 1000);
          continue;
        }
        if (!response.ok || !payload || !payload.data) {
          showError(`Could not follow the batch: ${describeError(payload && payload.error, response.status)}`);
          return;
        }
        onBatch(b, payload.data);
      } catch (err) {
        failures += 1;
        if (failures >= 5) {
          showError(`Lost contact with the server: ${err.message}`);
          return;
        }
      }
      await sleep(POLL_MS);
    }
  }

  // -- actions -----------------------------------------------------------------------------

  async function submit(event) {
    event.preventDefault();
    clearError();
    const key = shared.key();
    const lines = promptLines();
    if (key === "") {
      showError("Enter your API key first.");
      document.getElementById("api-key").focus();
      return;
    }
    if (lines.length === 0) {
      showError("Paste at least one prompt, one a line.");
      els.prompts.focus();
      return;
    }
    const body = { requests: lines.map((l) => requestFor(l.prompt)) };
    const text = JSON.stringify(body);
    const idempotency = unanswered && unanswered.text === text ? unanswered.key : randomKey();
    els.submit.disabled = true;
    els.status.textContent = `Submitting ${lines.length} prompts…`;
    let response;
    let payload;
    try {
      ({ response, payload } = await callApi("POST", "/api/v1/batches", key, body, {
        "Idempotency-Key": idempotency,
      }));
    } catch (err) {
      unanswered = { text, key: idempotency };
      showError(
        `Could not reach the server: ${err.message}. Submitting the same lines again cannot ` +
          "charge twice.",
      );
      els.status.textContent = live ? describeBatch(live.batch) : "No batch yet.";
      els.submit.disabled = false;
      return;
    }
    unanswered = null;
    els.submit.disabled = false;
    if (!response.ok || !payload || !payload.data || !payload.data.batch_id) {
      showError(explainRefusal(response, payload, lines));
      els.status.textContent = live ? describeBatch(live.batch) : "No batch yet.";
      shared.refreshBalance();
      return;
    }
    if (live && live.abort) live.abort.abort();
    const batch = payload.data;
    live = {
      id: batch.batch_id,
      key,
      lines,
      cells: makeCells(lines),
      batch: null,
      cursors: [null],
      pageDone: [],
      abort: null,
      ended: false,
      refreshing: false,
      wanted: false,
      wantFinal: false,
      downloading: false,
      ticker: null,
    };
    els.id.textContent = live.id;
    els.line.hidden = false;
    refreshForm();
    shared.refreshBalance();
    onBatch(live, batch);
    follow(live);
  }

  async function cancelBatch() {
    const b = live;
    if (!b || b.ended) return;
    els.cancel.disabled = true;
    try {
      const { response, payload } = await callApi(
        "POST",
        `/api/v1/batches/${encodeURIComponent(b.id)}/cancel`,
        b.key,
      );
      if (response.ok && payload && payload.data) {
        onBatch(b, payload.data);
      } else if (response.status !== 409) {
        // 409: it ended first, and its stream says how.
        showError(`Could not cancel: ${describeError(payload && payload.error, response.status)}`);
        els.cancel.disabled = b.ended;
      }
    } catch (err) {
      showError(`Could not reach the server: ${err.message}`);
      els.cancel.disabled = b.ended;
    }
  }

  // The archive needs the key, so it is fetched here and handed to the browser as a file. The
  // browser holds it in memory until saved: for very large batches curl (below) streams it.
  async function download() {
    const b = live;
    if (!b) return;
    b.downloading = true;
    els.download.disabled = true;
    els.download.textContent = "Preparing the ZIP…";
    try {
      const response = await fetch(`/api/v1/batches/${encodeURIComponent(b.id)}/archive`, {
        headers: { Authorization: `Bearer ${b.key}` },
      });
      if (!response.ok) {
        let payload = null;
        try {
          payload = await response.json();
        } catch {
          payload = null;
        }
        showError(`Could not download the ZIP: ${describeError(payload && payload.error, response.status)}`);
        return;
      }
      const blob = await response.blob();
      const disposition = response.headers.get("Content-Disposition") || "";
      const named = /filename="?([^";]+)"?/.exec(disposition);
      const link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = named ? named[1] : `${b.id}.zip`;
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
    } catch (err) {
      showError(`Could not download the ZIP: ${err.message}`);
    } finally {
      b.downloading = false;
      if (b === live) {
        els.download.disabled = false;
        els.download.textContent = downloadLabel(b.batch);
      }
    }
  }

  let rulesApplied = false;
  shared.onChange(() => {
    if (shared.info && !rulesApplied) {
      rulesApplied = true;
      applySizeRules(shared.info.sizes, els.width, els.height, els.customSizeHint);
    }
    refreshForm();
  });
  els.form.addEventListener("input", refreshForm);
  els.form.addEventListener("change", refreshForm);
  els.form.addEventListener("submit", submit);
  els.cancel.addEventListener("click", cancelBatch);
  els.download.addEventListener("click", download);
  refreshForm();
}
