// cogview-api try-it page: builds a request from the form, creates a task, polls it, shows
// the result. Plain JS, no dependencies. Text from the server is inserted with textContent only.
"use strict";

(() => {
  const KEY_STORAGE = "cogview-api.api-key";
  const POLL_MS = 500;
  const PROMPT_MAX = 1000;
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
    progress: $("progress"),
    status: $("status"),
    images: $("images"),
    error: $("error"),
    curl: $("curl"),
    copyCurl: $("copy-curl"),
  };

  // Each submit gets a number; a poll loop stops as soon as a newer run has started.
  let currentRun = 0;

  // -- the request ---------------------------------------------------------------------------

  function buildBody() {
    const body = {
      model: "cogview-4",
      prompt: els.prompt.value,
      size: els.size.value,
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

  // POSIX shell single-quoting: ' becomes '\''
  function shellQuote(text) {
    return "'" + text.replace(/'/g, "'\\''") + "'";
  }

  function curlCommand(body) {
    const url = `${location.origin}/api/v1/images/generations`;
    return [
      `curl -X POST ${url} \\`,
      `  -H "Authorization: Bearer $COGVIEW_API_KEY" \\`,
      `  -H "Content-Type: application/json" \\`,
      `  -d ${shellQuote(JSON.stringify(body, null, 2))}`,
    ].join("\n");
  }

  function refreshForm() {
    const count = els.prompt.value.length;
    els.promptCount.textContent = String(count);
    els.promptCount.parentElement.classList.toggle("full", count >= PROMPT_MAX);
    els.curl.textContent = curlCommand(buildBody());
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
        return;
      }
      const task = payload.data;
      setProgress(task.progress ? task.progress.percent : 0);
      setStatus(describeProgress(task));
      const status = String(task.status).toUpperCase();
      if (TERMINAL.has(status)) {
        if (status === "COMPLETED") {
          showImages(task);
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
        setStatus("The request was refused.");
        return;
      }
      const taskId = payload.data.task_id;
      setStatus(`Task ${taskId} created; waiting…`);
      await poll(run, taskId, key);
    } catch (err) {
      showError(`Could not reach the server: ${err.message}`);
      setStatus("Idle.");
    } finally {
      if (run === currentRun) els.submit.disabled = false;
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
  });
  els.form.addEventListener("input", refreshForm);
  els.form.addEventListener("change", refreshForm);
  els.form.addEventListener("submit", submit);
  els.copyCurl.addEventListener("click", copyCurl);
  refreshForm();
})();
