// The loraplex web console: plain JavaScript modules, no framework, no build step. It talks only to this
// server's API (paths relative to /ui/), sending the API key the user gave as the bearer key; the key lives in
// this tab's session storage. This module connects, switches views and refreshes the one shown.
import { KEY_ITEM, VIEWS, state, $, ApiError, api, describe, banner, say } from "./core.js";
import { refreshAdapters, setUpRegisterForm } from "./adapters.js";
import { loadModels, setUpPlayground } from "./playground.js";
import { refreshServer } from "./server.js";

const REFRESH_MS = { adapters: 3000, server: 5000 };

function serverIsOpen() {
  const meta = document.querySelector('meta[name="loraplex-auth"]');
  return meta !== null && meta.content === "open";
}

function showKeyPanel(message) {
  stopRefresh();
  state.me = null;
  for (const view of VIEWS) $(`view-${view}`).hidden = true;
  $("tabs").hidden = true;
  $("key-panel").hidden = false;
  $("change-key").hidden = true;
  say("key-error", message);
  $("who").textContent = "not connected";
  $("key-input").focus();
}

async function connect() {
  try {
    state.me = await api("v1/console/server");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      sessionStorage.removeItem(KEY_ITEM);
      state.key = null;
      showKeyPanel(describe(error));
    } else {
      banner(describe(error));
    }
    return false;
  }
  banner("");
  $("key-panel").hidden = true;
  $("tabs").hidden = false;
  const me = state.me.key;
  $("who").textContent = me.open ? "open server (no key)" : `key ${me.name}${me.admin ? " (admin)" : ""}`;
  $("change-key").hidden = me.open;
  $("admin-panel").hidden = !me.admin;
  state.rows.clear();
  $("adapters-table").tHead.replaceChildren();
  $("adapters-table").tBodies[0].replaceChildren();
  const wanted = location.hash.slice(1);
  showView(VIEWS.includes(wanted) ? wanted : state.view);
  return true;
}

function setUpKeyForm() {
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) {
      say("key-error", "Enter an API key (it starts with lpx-).");
      return;
    }
    state.key = key;
    sessionStorage.setItem(KEY_ITEM, key);
    say("key-error", "");
    if (await connect()) $("key-input").value = "";
  });
  $("change-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_ITEM);
    state.key = null;
    banner("");
    showKeyPanel("");
  });
}


function showView(view) {
  state.view = view;
  for (const name of VIEWS) {
    const tab = $(`tab-${name}`);
    const selected = name === view;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(`view-${name}`).hidden = !selected;
  }
  if (location.hash !== `#${view}`) history.replaceState(null, "", `#${view}`);
  stopRefresh();
  if (view === "playground") loadModels();
  else refreshLoop(view);
}

function setUpTabs() {
  const tabs = VIEWS.map((name) => $(`tab-${name}`));
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => showView(VIEWS[i]));
    tab.addEventListener("keydown", (event) => {
      const moves = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 };
      if (!(event.key in moves)) return;
      event.preventDefault();
      const next = (moves[event.key] + tabs.length) % tabs.length;
      tabs[next].focus();
      showView(VIEWS[next]);
    });
  });
}

function stopRefresh() {
  clearTimeout(state.timer);
  state.timer = null;
}

async function refreshLoop(view) {
  if (state.view !== view || state.me === null) return;
  if (!document.hidden && !state.busy) {
    state.busy = true;
    try {
      if (view === "adapters") await refreshAdapters();
      else await refreshServer();
      banner("");
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        showKeyPanel(describe(error));
        return;
      }
      banner(describe(error));
    } finally {
      state.busy = false;
    }
  }
  if (state.view === view && state.me !== null) {
    stopRefresh();
    state.timer = setTimeout(() => refreshLoop(view), REFRESH_MS[view]);
  }
}


function start() {
  setUpTabs();
  setUpKeyForm();
  setUpRegisterForm();
  setUpPlayground();
  window.addEventListener("hashchange", () => {
    const wanted = location.hash.slice(1);
    if (state.me !== null && VIEWS.includes(wanted) && wanted !== state.view) showView(wanted);
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && state.me !== null && state.view !== "playground") refreshLoop(state.view);
  });
  const saved = sessionStorage.getItem(KEY_ITEM);
  if (saved) state.key = saved;
  if (saved || serverIsOpen()) connect();
  else showKeyPanel("");
}

start();
