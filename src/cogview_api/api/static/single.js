// The "One prompt" tab: builds a request from the form, creates a task, follows it on its event
// stream (polling GET /api/v1/tasks/{id} where the stream is refused or breaks), shows its
// previews as they arrive and the images when it completes.

import {
  TERMINAL,
  applySizeRules,
  callApi,
  describeError,
  readEvents,
  retryAfterSeconds,
  shellQuote,
  sleep,
} from "./api.js";

const POLL_MS = 500;
const PREVIEWS = 3;

export function setupSingle(shared) {
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("form"),
    prompt: $("prompt"),
    promptCount: $("prompt-count"),
    promptMax: $("prompt-max"),
    size: $("size"),
    quality: $("quality"),
    seed: $("seed"),
    negative: $("negative-prompt"),
    n: $("n"),
    previews: $("previews"),
    submit: $("submit"),
    cancel: $("cancel"),
    width: $("width"),
    height: $("height"),
    customSize: $("custom-size"),
    customSizeHint: $("custom-size-hint"),
    price: $("price"),
    task: $("task"),
    taskId: $("task-id"),
    progress: $("progress"),
    status: $("status"),
    previewStrip: $("previews-strip"),
    images: $("images"),
    error: $("error"),
    curl: $("curl"),
    copyCurl: $("copy-curl"),
  };

  // Each submit gets a number; a follow loop stops as soon as a newer run has started.
  let currentRun = 0;
  // Aborts the event stream of the run before.
  let streamAbort = null;
  // The task being followed (its id and the key that made it), for the cancel button.
  let liveTask = null;
  // The task id on show, from the submit's answer until the next submit (also in the curl).
  let shownTaskId = null;

  // -- the request -------------------------------------------------------------------------

  function buildBody() {
    const info = shared.info;
    const body = {
      model: info ? info.models[0] : "cogview-4",
      prompt: els.prompt.value,
      size: chosenSize(),
      quality: els.quality.value,
    };
    const seed = els.seed.value.trim();
    if (seed !== "") {
      const num = Number(seed);
      body.seed = Number.isFinite(num) ? num : seed; // the server explains a bad value
    }
    const negative = els.negative.value;
    if (negative.trim() !== "") body.negative_prompt = negative;
    const n = els.n.value.trim();
    if (n !== "" && Number(n) !== 1) {
      const num = Number(n);
      body.n = Number.isFinite(num) ? num : n;
    }
    if (els.previews.checked) body.previews = PREVIEWS;
    return body;
  }

  function chosenSize() {
    if (els.size.value !== "custom") return els.size.value;
    return `${els.width.value.trim()}*${els.height.value.trim()}`; // the server checks the rules
  }

  function curlCommand(body, taskId) {
    const url = `${location.origin}/api/v1/images/generations`;
    const id = shellQuote(taskId || "paste the task_id here");
    const lines = [
      "# 1. Submit: the answer's data.task_id names the task",
      `curl -X POST ${url} \\`,
      `  -H "Authorization: Bearer $COGVIEW_API_KEY" \\`,
      `  -H "Content-Type: application/json" \\`,
      `  -d ${shellQuote(JSON.stringify(body, null, 2))}`,
      "",
      "# 2. Poll until data.status is COMPLETED, FAILED or CANCELLED",
      `TASK_ID=${id}`,
      `curl ${location.origin}/api/v1/tasks/$TASK_ID \\`,
      `  -H "Authorization: Bearer $COGVIEW_API_KEY"`,
    ];
    if (body.previews) {
      lines.push(
        "",
        "# Or watch it: one event per change, data.previews growing as they are decoded",
        `curl -N ${location.origin}/api/v1/tasks/$TASK_ID/events \\`,
        `  -H "Authorization: Bearer $COGVIEW_API_KEY"`,
      );
    }
    return lines.join("\n");
  }

  function describePrice() {
    const info = shared.info;
    if (!info) {
      if (shared.infoError) els.price.textContent = `Price unknown: ${shared.infoError}.`;
      return;
    }
    const quality = els.quality.value;
    const each = info.credits_per_image[quality];
    const n = Math.trunc(Number(els.n.value));
    const count = Number.isFinite(n) && n >= 1 ? n : 1;
    const total = each * count;
    els.price.textContent =
      `Price: ${each} credits per ${quality} image` +
      (count > 1 ? `; ${count} images cost ${total} credits.` : ".") +
      " A failed or cancelled task is refunded.";
  }

  function promptMax() {
    return shared.info ? shared.info.max_prompt_chars : 1000;
  }

  function refreshForm() {
    // Counted as the server counts (code points, after trimming); never cut: an over-long
    // prompt is sent as it is and the server's refusal is shown.
    const count = Array.from(els.prompt.value.trim()).length;
    els.promptCount.textContent = String(count);
    els.promptCount.parentElement.classList.toggle("full", count > promptMax());
    const custom = els.size.value === "custom";
    els.customSize.hidden = !custom;
    els.customSizeHint.hidden = !custom;
    els.curl.textContent = curlCommand(buildBody(), shownTaskId);
    describePrice();
  }

  // -- showing state -----------------------------------------------------------------------

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
  }

  function clearError() {
    els.error.textContent = "";
    els.error.hidden = true;
  }

  function setProgress(percent) {
    const value = Math.max(0, Math.min(100, Number(percent) || 0));
    els.progress.value = value;
    els.progress.setAttribute("aria-valuenow", String(value));
  }

  function setStatus(text) {
    els.status.textContent = text;
  }

  function describeProgress(task) {
    const p = task.progress || {};
    const parts = [task.status];
    if (p.stage) parts.push(p.stage);
    if (p.queue_position !== null && p.queue_position !== undefined && p.stage === "queued") {
      parts.push(`queue position ${p.queue_position}`);
    }
    if (p.total_steps) parts.push(`step ${p.step ?? 0}/${p.total_steps}`);
    parts.push(`${Math.round(Number(p.percent) || 0)}%`);
    return parts.join(" · ");
  }

  function figure(src, alt, width, height, captionText, href) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = src;
    img.alt = alt;
    if (width && height) {
      img.width = width;
      img.height = height;
    }
    const caption = document.createElement("figcaption");
    caption.append(captionText);
    if (href) {
      const link = document.createElement("a");
      link.href = href;
      link.target = "_blank";
      link.rel = "noopener";
      link.textContent = "open";
      caption.append(" · ", link);
    }
    fig.append(img, caption);
    return fig;
  }

  function showImages(task) {
    els.images.replaceChildren();
    (task.images || []).forEach((image, i) => {
      els.images.append(
        figure(
          image.url,
          `Generated image ${i + 1} for: ${task.request?.prompt ?? ""}`,
          image.width,
          image.height,
          `seed ${image.seed} · ${image.width}×${image.height} · ${image.format}`,
          image.url,
        ),
      );
    });
  }

  // Each preview of `task.previews` not shown yet joins the strip, in the order decoded.
  function showPreviews(task) {
    const previews = Array.isArray(task.previews) ? task.previews : [];
    const total = task.progress && task.progress.total_steps;
    for (const preview of previews) {
      const key = String(preview.index);
      if (els.previewStrip.querySelector(`figure[data-index="${CSS.escape(key)}"]`)) continue;
      const step = total ? `step ${preview.step}/${total}` : `step ${preview.step}`;
      const fig = figure(
        preview.url,
        `Preview ${preview.index + 1} at ${step}`,
        0,
        0,
        `preview ${preview.index + 1} · ${step}`,
        null,
      );
      fig.dataset.index = key;
      els.previewStrip.append(fig);
    }
    els.previewStrip.hidden = els.previewStrip.childElementCount === 0;
  }

  function showTask(task) {
    setProgress(task.progress ? task.progress.percent : 0);
    setStatus(describeProgress(task));
    showPreviews(task);
  }

  // The task has ended: its images, its refund, or its error.
  function finish(task) {
    endTask();
    shared.refreshBalance();
    const status = String(task.status).toUpperCase();
    if (status === "COMPLETED") {
      showImages(task);
    } else if (status === "CANCELLED") {
      const refunded = task.credits ? task.credits.refunded : 0;
      setStatus(`CANCELLED · ${refunded} credits refunded`);
    } else if (task.error) {
      showError(describeError(task.error, 200));
    } else {
      showError(`Task ${status.toLowerCase()}.`);
    }
  }

  // -- following the task ------------------------------------------------------------------

  async function follow(run, taskId, key) {
    const abort = new AbortController();
    streamAbort = abort;
    let last = null;
    try {
      await readEvents(
        `/api/v1/tasks/${encodeURIComponent(taskId)}/events`,
        key,
        (name, task) => {
          if (name !== "task" || run !== currentRun) return;
          last = task;
          showTask(task);
        },
        abort.signal,
      );
    } catch {
      // refused (e.g. 429: too many streams), cut off, or aborted by a newer run: poll instead
    }
    if (run !== currentRun) return;
    if (last && TERMINAL.has(String(last.status).toUpperCase())) {
      finish(last);
      return;
    }
    await poll(run, taskId, key);
  }

  async function poll(run, taskId, key) {
    let networkFailures = 0;
    while (run === currentRun) {
      let result;
      try {
        result = await callApi("GET", `/api/v1/tasks/${encodeURIComponent(taskId)}`, key);
        networkFailures = 0;
      } catch (err) {
        networkFailures += 1;
        if (networkFailures >= 5) {
          showError(`Lost contact with the server: ${err.message}`);
          endTask();
          return;
        }
        await sleep(POLL_MS * 2);
        continue;
      }
      if (run !== currentRun) return;
      const { response, payload } = result;
      if (response.status === 429 || response.status === 503) {
        await sleep(retryAfterSeconds(response) * 1000);
        continue;
      }
      if (!response.ok || !payload || !payload.data) {
        showError(describeError(payload && payload.error, response.status));
        setStatus(`Polling task ${taskId} failed.`);
        endTask();
        return;
      }
      const task = payload.data;
      showTask(task);
      if (TERMINAL.has(String(task.status).toUpperCase())) {
        finish(task);
        return;
      }
      await sleep(POLL_MS);
    }
  }

  async function submit(event) {
    event.preventDefault();
    const run = ++currentRun;
    if (streamAbort) streamAbort.abort();
    const key = shared.key();
    clearError();
    els.images.replaceChildren();
    els.previewStrip.replaceChildren();
    els.previewStrip.hidden = true;
    setProgress(0);
    endTask();
    showTaskId(null);
    if (key === "") {
      showError("Enter your API key first.");
      setStatus("Idle.");
      document.getElementById("api-key").focus();
      return;
    }
    els.submit.disabled = true;
    setStatus("Submitting…");
    try {
      const { response, payload } = await callApi(
        "POST",
        "/api/v1/images/generations",
        key,
        buildBody(),
      );
      if (!response.ok || !payload || !payload.data || !payload.data.task_id) {
        showError(describeError(payload && payload.error, response.status));
        setStatus("The request was refused; nothing was charged.");
        shared.refreshBalance();
        return;
      }
      const taskId = payload.data.task_id;
      liveTask = { taskId, key };
      showTaskId(taskId);
      els.cancel.disabled = false;
      refreshForm();
      shared.refreshBalance();
      setStatus("Created; waiting…");
      await follow(run, taskId, key);
    } catch (err) {
      showError(`Could not reach the server: ${err.message}`);
      setStatus("Idle.");
    } finally {
      if (run === currentRun) els.submit.disabled = false;
    }
  }

  function showTaskId(taskId) {
    shownTaskId = taskId;
    els.taskId.textContent = taskId || "";
    els.task.hidden = !taskId;
  }

  function endTask() {
    liveTask = null;
    els.cancel.disabled = true;
  }

  async function cancelTask() {
    if (!liveTask) return;
    const { taskId, key } = liveTask;
    els.cancel.disabled = true;
    setStatus("Cancelling…");
    try {
      const { response, payload } = await callApi(
        "POST",
        `/api/v1/tasks/${encodeURIComponent(taskId)}/cancel`,
        key,
      );
      // 409: it ended first; the stream (or poll) shows how. Otherwise it shows CANCELLED.
      if (!response.ok && response.status !== 409) {
        showError(describeError(payload && payload.error, response.status));
        if (liveTask && liveTask.taskId === taskId) els.cancel.disabled = false;
      }
    } catch (err) {
      showError(`Could not reach the server: ${err.message}`);
      if (liveTask && liveTask.taskId === taskId) els.cancel.disabled = false;
    }
  }

  async function copyCurl() {
    const text = els.curl.textContent;
    try {
      await navigator.clipboard.writeText(text);
      els.copyCurl.textContent = "Copied";
    } catch {
      // Clipboard API needs a secure context; fall back to selecting the text.
      const range = document.createRange();
      range.selectNodeContents(els.curl);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      els.copyCurl.textContent = "Selected: press Ctrl+C";
    }
    setTimeout(() => {
      els.copyCurl.textContent = "Copy";
    }, 2000);
  }

  let rulesApplied = false;
  shared.onChange(() => {
    const info = shared.info;
    if (info && !rulesApplied) {
      rulesApplied = true;
      els.promptMax.textContent = String(info.max_prompt_chars);
      applySizeRules(info.sizes, els.width, els.height, els.customSizeHint);
    }
    refreshForm();
  });

  els.form.addEventListener("input", refreshForm);
  els.form.addEventListener("change", refreshForm);
  els.form.addEventListener("submit", submit);
  els.copyCurl.addEventListener("click", copyCurl);
  els.cancel.addEventListener("click", cancelTask);
  refreshForm();
}
