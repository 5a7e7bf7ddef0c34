// Talking to the API from the try-it page: JSON calls, the error envelope in words, and
// Server-Sent Events read with fetch (a browser's EventSource cannot send the bearer header).
// Plain JS, no dependencies.

export const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export async function callApi(method, path, key, body, headers = {}) {
  const init = { method, headers: { Authorization: `Bearer ${key}`, ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
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

// The envelope's error object as one sentence, e.g. "Invalid API key (401 authentication_error)".
export function describeError(error, httpStatus) {
  if (!error || typeof error !== "object") return `Request failed with HTTP ${httpStatus}.`;
  const message = error.message || "Request failed.";
  const parts = [error.code || httpStatus, error.type].filter(Boolean).join(" ");
  const param = error.param ? `, param: ${error.param}` : "";
  return parts ? `${message} (${parts}${param})` : message;
}

export function retryAfterSeconds(response) {
  const seconds = Number(response.headers.get("Retry-After"));
  return Number.isFinite(seconds) && seconds > 0 ? seconds : 2;
}

// An Idempotency-Key: random, and made without crypto.randomUUID, which plain-http pages
// (a server on the LAN) do not have.
export function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "page-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// POSIX shell single-quoting: ' becomes '\''
export function shellQuote(text) {
  return "'" + text.replace(/'/g, "'\\''") + "'";
}

export class HttpError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// Reads the event stream at `path` and calls onEvent(name, parsed data) for each frame, until
// the server closes it (resolves) or `signal` aborts it (rejects with an AbortError). A refusal
// before the stream starts (401, 404, 429: the usual JSON error) rejects with an HttpError.
export async function readEvents(path, key, onEvent, signal) {
  const response = await fetch(path, {
    headers: { Authorization: `Bearer ${key}`, Accept: "text/event-stream" },
    cache: "no-store",
    signal,
  });
  if (!response.ok || !response.body) {
    let payload = null;
    try {
      payload = await response.json();
    } catch {
      payload = null;
    }
    throw new HttpError(describeError(payload && payload.error, response.status), response.status);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // a keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const rest = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = rest;
        else if (field === "data") data.push(rest);
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

// The custom-size inputs take the server's rules (GET /api/v1/info's `sizes`); the server
// still checks them, and its message is what the user sees.
export function applySizeRules(rules, width, height, hint) {
  for (const input of [width, height]) {
    input.min = String(rules.min_side);
    input.max = String(rules.max_side);
    input.step = String(rules.side_multiple_of);
  }
  hint.textContent =
    `Custom: ${rules.min_side} to ${rules.max_side} per side, multiples of ` +
    `${rules.side_multiple_of}, at most ${rules.max_pixels} pixels. Smaller is quicker.`;
}
