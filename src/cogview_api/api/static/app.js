// cogview-api try-it page: builds a request from the form, creates a task, polls it, shows
// the result. Plain JS, no dependencies. Text from the server is inserted with textContent only.
"use strict";

(() => {
  const KEY_STORAGE = "cogview-api.api-key";
  const POLL_MS = 500;
  const BALANCE_DELAY_MS = 400;
  const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);

  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("form"),
    key: $("api-key"),
    prompt: $("prompt"),
    promptCount: $("prompt-count"),
    size: $("size"),
    quality: $("quality"),
    seed: $("seed"),
    negative: $("negative-prompt"),
    n: $("n"),
    submit: $("submit"),
    cancel: $("cancel"),
    width: $("width"),
    height: $("height"),
    customSize: $("custom-size"),
    customSizeHint: $("custom-size-hint"),
    promptMax: $("prompt-max"),
    price: $("price"),
    balance: $("balance"),
    task: $("task"),
    taskId: $("task-id"),
    modelName: $("model-name"),
    engineName: $("engine-name"),
    engineNote: $("engine-note"),
    engineNoteText: $("engine-note-text"),
    progress: $("progress"),
    status: $("status"),
    images: $("images"),
    error: $("error"),
    curl: $("curl"),
    copyCurl: $("copy-curl"),
  };

  // Each submit gets a number; a poll loop stops as soon as a newer run has started.
  let currentRun = 0;
  // The task being followed (its id and the key that made it), for the cancel button.
  let liveTask = null;
  // GET /api/v1/info: the model, prices, size rules and limits; null until it answers.
  let info = null;
  let promptMax = 1000;

  // -- the request ---------------------------------------------------------------------------

  function buildBody() {
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
    return body;
  }

  function chosenSize() {
    if (els.size.value !== "custom") return els.size.value;
    return `${els.width.value.trim()}*${els.height.value.trim()}`; // the server checks the rules
  }

  // POSIX shell single-quoting: ' becomes '\''
  function shellQuote(text) {
    return "'" + text.replace(/'/g, "'\\''") + "'";
  }

  function curlCommand(body, taskId) {
    const url = `${location.origin}/api/v1/images/generations`;
    const id = shellQuote(taskId || "paste the task_id here");
    return [
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
    ].join("\n");
  }

  function describePrice() {
    if (!info) return;
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

  function refreshForm() {
    // Counted as the server counts (code points, after trimming); never cut: an over-long
    // prompt is sent as it is and the server's refusal is shown.
    const count = Array.from(els.prompt.value.trim()).length;
    els.promptCount.textContent = String(count);
    els.promptCount.parentElement.classList.toggle("full", count > promptMax);
    const custom = els.size.value === "custom";
    els.customSize.hidden = !custom;
    els.customSizeHint.hidden = !custom;
    els.curl.textContent = curlCommand(buildBody(), liveTask && liveTask.taskId);
    describePrice();
  }

  // -- showing state -------------------------------------------------------------------------

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

  // The envelope's error object as one sentence, e.g. "Invalid API key (401 authentication_error)".
  function describeError(error, httpStatus) {
    if (!error || typeof error !== "object") return `Request failed with HTTP ${httpStatus}.`;
    const message = error.message || "Request failed.";
    const parts = [error.code || httpStatus, error.type].filter(Boolean).join(" ");
    const param = error.param ? `, param: ${error.param}` : "";
    return parts ? `${message} (${parts}${param})` : message;
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

  function showImages(task) {
    els.images.replaceChildren();
    (task.images || []).forEach((image, i) => {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = image.url;
      img.alt = `Generated image ${i + 1} for: ${task.request?.prompt ?? ""}`;
      img.width = image.width;
      img.height = image.height;
      const caption = document.createElement("figcaption");
      caption.append(`seed ${image.seed} · ${image.width}×${image.height} · ${image.format} · `);
      const link = document.createElement("a");
      link.href = image.url;
      link.target = "_blank";
      link.rel = "noopener";
      link.textContent = "open";
      caption.append(link);
      figure.append(img, caption);
      els.images.append(figure);
    });
  }

  // -- talking to the API --------------------------------------------------------------------

  async function callApi(method, path, key, body) {
    const headers = { Authorization: `Bearer ${key}` };
    const init = { method, headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let payload = null;
    try {
      payload = await response.json();
    } catch {
      payload = null;
    }
    return { response, payload };
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function retryAfterMs(response) {
    const seconds = Number(response.headers.get("Retry-After"));
    return Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : 2000;
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
        await sleep(retryAfterMs(response));
        continue;
      }
      if (!response.ok || !payload || !payload.data) {
        showError(describeError(payload && payload.error, response.status));
        setStatus(`Polling task ${taskId} failed.`);
        endTask();
        return;
      }
      const task = payload.data;
      setProgress(task.progress ? task.progress.percent : 0);
      setStatus(describeProgress(task));
      const status = String(task.status).toUpperCase();
      if (TERMINAL.has(status)) {
        endTask();
        refreshBalance();
        if (status === "COMPLETED") {
          showImages(task);
        } else if (status === "CANCELLED") {
          const refunded = task.credits ? task.credits.refunded : 0;
          setStatus(`CANCELLED · ${refunded} credits refunded`);
        } else if (task.error) {
          showError(describeError(task.error, response.status));
        } else {
          showError(`Task ${status.toLowerCase()}.`);
        }
        return;
      }
      await sleep(POLL_MS);
    }
  }

  async function submit(event) {
    event.preventDefault();
    const run = ++currentRun;
    const key = els.key.value.trim();
    clearError();
    els.images.replaceChildren();
    setProgress(0);
    endTask();
    showTaskId(null);
    if (key === "") {
      showError("Enter your API key first.");
      setStatus("Idle.");
      els.key.focus();
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
        refreshBalance();
        return;
      }
      const taskId = payload.data.task_id;
      liveTask = { taskId, key };
      showTaskId(taskId);
      els.cancel.disabled = false;
      refreshForm();
      refreshBalance();
      setStatus("Created; waiting…");
      await poll(run, taskId, key);
    } catch (err) {
      showError(`Could not reach the server: ${err.message}`);
      setStatus("Idle.");
    } finally {
      if (run === currentRun) els.submit.disabled = false;
    }
  }

  function showTaskId(taskId) {
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
      // 409: it ended first; the poll loop shows how. Otherwise the poll shows CANCELLED.
      if (!response.ok && response.status !== 409) {
        showError(describeError(payload && payload.error, response.status));
        if (liveTask && liveTask.taskId === taskId) els.cancel.disabled = false;
      }
    } catch (err) {
      showError(`Could not reach the server: ${err.message}`);
      if (liveTask && liveTask.taskId === taskId) els.cancel.disabled = false;
    }
  }

  // -- the key's balance and the server's facts --------------------------------------------

  let balanceTimer = null;
  let balanceAsked = 0;

  async function refreshBalance() {
    const asked = ++balanceAsked;
    const key = els.key.value.trim();
    if (key === "") {
      els.balance.textContent = "";
      return;
    }
    try {
      const { response, payload } = await callApi("GET", "/api/v1/account", key);
      if (asked !== balanceAsked) return; // a newer ask (another key) wins
      const ok = response.ok && payload && payload.data;
      els.balance.classList.toggle("error-text", !ok);
      els.balance.textContent = ok
        ? `Balance: ${payload.data.balance} credits`
        : `Balance unknown: ${describeError(payload && payload.error, response.status)}`;
    } catch {
      if (asked === balanceAsked) els.balance.textContent = "";
    }
  }

  function refreshBalanceSoon() {
    clearTimeout(balanceTimer);
    balanceTimer = setTimeout(refreshBalance, BALANCE_DELAY_MS);
  }

  async function loadInfo() {
    try {
      const response = await fetch("/api/v1/info");
      const payload = await response.json();
      if (!response.ok || !payload.data) throw new Error(`HTTP ${response.status}`);
      info = payload.data;
    } catch (err) {
      els.price.textContent = `Price unknown: the server did not answer /api/v1/info (${err.message}).`;
      return;
    }
    promptMax = info.max_prompt_chars;
    els.promptMax.textContent = String(promptMax);
    els.modelName.textContent = info.models[0];
    els.engineName.textContent = info.engine;
    els.engineNoteText.textContent = info.note || "";
    els.engineNote.hidden = !info.note;
    const rules = info.sizes;
    for (const input of [els.width, els.height]) {
      input.min = String(rules.min_side);
      input.max = String(rules.max_side);
      input.step = String(rules.side_multiple_of);
    }
    els.customSizeHint.textContent =
      `Custom: ${rules.min_side} to ${rules.max_side} per side, multiples of ` +
      `${rules.side_multiple_of}, at most ${rules.max_pixels} pixels. Smaller is quicker.`;
    refreshForm();
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

  // -- wiring ------------------------------------------------------------------------------

  try {
    els.key.value = localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    // storage may be disabled; the field still works
  }
  els.key.addEventListener("input", () => {
    try {
      localStorage.setItem(KEY_STORAGE, els.key.value.trim());
    } catch {
      // ignore
    }
    refreshBalanceSoon();
  });
  els.form.addEventListener("input", refreshForm);
  els.form.addEventListener("change", refreshForm);
  els.form.addEventListener("submit", submit);
  els.copyCurl.addEventListener("click", copyCurl);
  els.cancel.addEventListener("click", cancelTask);
  refreshForm();
  loadInfo();
  refreshBalance();
})();
