// cogview-api try-it page: the parts both tabs share (the key, its balance, the server's facts
// from /api/v1/info, the tabs), then the two tabs: one prompt (single.js) and a batch
// (batch.js). Plain JS modules, no build step, no dependencies. Text from the server is
// inserted with textContent only.

import { callApi, describeError } from "./api.js";
import { setupSingle } from "./single.js";
import { setupBatch } from "./batch.js";

const KEY_STORAGE = "cogview-api.api-key";
const BALANCE_DELAY_MS = 400;

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
const balanceLine = $("balance");

// What the tabs read: the key, GET /api/v1/info (null until it answers), the balance (null
// while unknown); `changed` listeners run when info or the balance changes.
const shared = {
  key: () => keyInput.value.trim(),
  info: null,
  infoError: null,
  balance: null,
  listeners: [],
  onChange(fn) {
    this.listeners.push(fn);
  },
  changed() {
    for (const fn of this.listeners) fn();
  },
  refreshBalance,
};

let balanceTimer = null;
let balanceAsked = 0;

async function refreshBalance() {
  const asked = ++balanceAsked;
  const key = shared.key();
  if (key === "") {
    balanceLine.textContent = "";
    shared.balance = null;
    shared.changed();
    return;
  }
  try {
    const { response, payload } = await callApi("GET", "/api/v1/account", key);
    if (asked !== balanceAsked) return; // a newer ask (another key) wins
    const ok = response.ok && payload && payload.data;
    balanceLine.classList.toggle("error-text", !ok);
    balanceLine.textContent = ok
      ? `Balance: ${payload.data.balance} credits`
      : `Balance unknown: ${describeError(payload && payload.error, response.status)}`;
    shared.balance = ok ? payload.data.balance : null;
  } catch {
    if (asked !== balanceAsked) return;
    balanceLine.textContent = "";
    shared.balance = null;
  }
  shared.changed();
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
    shared.info = payload.data;
  } catch (err) {
    shared.infoError = `the server did not answer /api/v1/info (${err.message})`;
    shared.changed();
    return;
  }
  const info = shared.info;
  $("model-name").textContent = info.models[0];
  $("engine-name").textContent = info.engine;
  $("engine-note-text").textContent = info.note || "";
  $("engine-note").hidden = !info.note;
  shared.changed();
}

// -- tabs: "One prompt" and "Batch"; the URL's #batch opens the second ---------------------

const tabs = [
  { tab: $("tab-single"), panel: $("single"), hash: "" },
  { tab: $("tab-batch"), panel: $("batch"), hash: "#batch" },
];

function selectTab(chosen, focus) {
  for (const t of tabs) {
    const on = t === chosen;
    t.tab.setAttribute("aria-selected", String(on));
    t.tab.tabIndex = on ? 0 : -1;
    t.panel.hidden = !on;
  }
  if (focus) chosen.tab.focus();
  if (location.hash !== chosen.hash) {
    history.replaceState(null, "", chosen.hash || location.pathname + location.search);
  }
}

tabs.forEach((t, i) => {
  t.tab.addEventListener("click", () => selectTab(t, false));
  t.tab.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (step) selectTab(tabs[(i + step + tabs.length) % tabs.length], true);
  });
});

// -- wiring ------------------------------------------------------------------------------

try {
  keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
} catch {
  // storage may be disabled; the field still works
}
keyInput.addEventListener("input", () => {
  try {
    localStorage.setItem(KEY_STORAGE, keyInput.value.trim());
  } catch {
    // ignore
  }
  refreshBalanceSoon();
});
// Enter in the key field submits nothing: each tab has its own button.
$("key-form").addEventListener("submit", (event) => event.preventDefault());
selectTab(location.hash === "#batch" ? tabs[1] : tabs[0], false);
setupSingle(shared);
setupBatch(shared);
loadInfo();
refreshBalance();
