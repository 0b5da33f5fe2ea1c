// The Adapters view: every adapter the key may see, with placement and traffic, refreshed in place (rows and
// their buttons are kept, so keyboard focus survives a refresh); admins register, re-version and remove.
import { state, $, el, ApiError, api, describe, dash, count, bytes, seconds, percent, minutes, say } from "./core.js";

function adapterColumns(admin) {
  const columns = ["Adapter", "Version", "Rank", "Size"];
  if (admin) columns.push("Source");
  columns.push("State", "Replicas", "Requests", "Tokens in / out", "Errors", "Latency p50 / p99");
  if (admin) columns.push("Actions");
  return columns;
}

function ensureHead(admin) {
  const head = $("adapters-table").tHead;
  if (head.rows.length) return;
  head.append(el("tr", {}, adapterColumns(admin).map((name) => el("th", { scope: "col", text: name }))));
}

function stateOf(adapter) {
  const parts = adapter.pinned ? ["pinned"] : [];
  if (adapter.composite) {
    const made = adapter.composite.components.map((c) => `${c.name}×${c.weight}`).join(", ");
    parts.push(`composite ${adapter.composite.method}(${made})`);
  }
  if (adapter.rollout) parts.push(`rollout ${adapter.rollout.split}`);
  if (adapter.unusable) parts.push(`unusable: ${adapter.unusable}`);
  for (const warning of adapter.warnings || []) parts.push(`warning: ${warning}`);
  return parts.length ? parts.join("; ") : dash;
}

function replicasOf(placed) {
  if (!placed.length) return el("span", { class: "muted", text: "not installed" });
  return el(
    "ul",
    { class: "plain" },
    placed.map((p) =>
      el("li", {}, el("span", { class: p.resident ? "dot on" : "dot", "aria-hidden": "true" }),
        `${p.replica}${p.name.includes("@v") ? ` (${p.name})` : ""}: ${p.resident ? "resident" : "installed"}`),
    ),
  );
}

function statCells(stats) {
  return [
    count(stats.requests),
    `${count(stats.prompt_tokens)} / ${count(stats.completion_tokens)}`,
    percent(stats.error_rate),
    `${seconds(stats.p50_s)} / ${seconds(stats.p99_s)}`,
  ];
}

function fill(row, values) {
  values.forEach((value, i) => {
    const cell = row.cells[i];
    if (value instanceof Node) cell.replaceChildren(value);
    else if (cell.textContent !== value) cell.textContent = value;
  });
}

const STAT_COLUMNS = 4; // the last value cells of a row: requests, tokens, errors, latency

function newRow(name, cells, labels) {
  // data-label: a phone's width shows each row as a card, every value after its column's name
  const row = el("tr", { "data-name": name });
  cells.forEach((_, i) => {
    if (i === 0) row.append(el("th", { scope: "row", class: "name" }));
    else row.append(el("td", { class: i >= cells.length - STAT_COLUMNS ? "num" : null, "data-label": labels[i] }));
  });
  return row;
}

function adapterValues(adapter, admin) {
  const title = el("div", {}, el("strong", { text: adapter.name }), el("div", { class: "muted small", text: adapter.id }));
  const values = [title, `v${adapter.version}`, String(adapter.rank), bytes(adapter.size_bytes)];
  if (admin) values.push(el("code", { class: "source", text: adapter.source ?? dash }));
  values.push(stateOf(adapter), replicasOf(adapter.replicas));
  values.push(...statCells(adapter.stats));
  return values;
}

function actionsFor(name) {
  const cell = el("td", { class: "actions", "data-label": "Actions" });
  const idle = () => {
    cell.replaceChildren(
      el("button", { type: "button", "aria-label": `New version of ${name}`, text: "New version",
        onclick: () => newVersion(name) }),
      el("button", { type: "button", class: "danger", "aria-label": `Remove ${name}`, text: "Remove",
        onclick: () => askToRemove() }),
    );
  };
  const askToRemove = () => {
    const yes = el("button", { type: "button", class: "danger", text: `Yes, remove ${name}`, onclick: () => remove(name, idle) });
    cell.replaceChildren(
      yes,
      el("button", { type: "button", text: "Cancel", onclick: () => { idle(); cell.querySelector("button").focus(); } }),
    );
    yes.focus();
  };
  idle();
  return cell;
}

function newVersion(name) {
  $("register-name").value = name;
  $("register-source").value = "";
  say("register-error", "");
  say("register-done", "");
  $("register-source").focus();
}

async function remove(name, reset) {
  say("action-error", "");
  say("action-done", "");
  try {
    await api(`v1/adapters/${encodeURIComponent(name)}`, { method: "DELETE" });
    say("action-done", `Removed ${name}.`);
  } catch (error) {
    say("action-error", `Could not remove ${name}: ${describe(error)}`);
    reset();
  }
  await refreshAdapters();
}

export async function refreshAdapters() {
  const data = await api("v1/console/adapters");
  const admin = Boolean(state.me && state.me.key.admin);
  ensureHead(admin);
  const body = $("adapters-table").tBodies[0];
  const wanted = [];
  if (data.base) {
    const values = [el("div", {}, el("strong", { text: "base model" }), el("div", { class: "muted small", text: data.base.id })),
      dash, dash, dash];
    if (admin) values.push(dash);
    values.push(dash, dash, ...statCells(data.base.stats));
    wanted.push(["\u0000base", values]);
  }
  for (const adapter of data.data) wanted.push([adapter.name, adapterValues(adapter, admin)]);
  const keep = new Set(wanted.map(([name]) => name));
  for (const [name, row] of state.rows) {
    if (!keep.has(name)) {
      row.remove();
      state.rows.delete(name);
    }
  }
  let previous = null;
  for (const [name, values] of wanted) {
    let row = state.rows.get(name);
    if (!row) {
      row = newRow(name, values, adapterColumns(admin));
      if (admin) row.append(name === "\u0000base" ? el("td", { class: "empty" }) : actionsFor(name));
      state.rows.set(name, row);
    }
    fill(row, values);
    const place = previous ? previous.nextSibling : body.firstChild;
    if (place !== row) body.insertBefore(row, place);
    previous = row;
  }
  const shown = data.data.length;
  say("adapters-note", `${shown} adapter${shown === 1 ? "" : "s"}; traffic of the last ${minutes(data.window_s)} ` +
    "through this router replica, refreshed every few seconds.");
  say("adapters-more", data.has_more ? `Showing the first ${shown}; more are registered.` : "");
}

export function setUpRegisterForm() {
  $("register-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    say("register-error", "");
    say("register-done", "");
    const body = {
      name: $("register-name").value.trim(),
      source: $("register-source").value.trim(),
      pinned: $("register-pinned").checked,
    };
    const button = $("register-submit");
    button.disabled = true;
    try {
      const record = await api("v1/adapters", { method: "POST", body });
      say("register-done", `Registered ${record.name} v${record.version}.`);
      $("register-form").reset();
      await refreshAdapters();
    } catch (error) {
      const where = error.param ? ` (field: ${error.param})` : "";
      say("register-error", error instanceof ApiError && error.status === 400 ? `${error.message}${where}` : describe(error));
      const field = { name: "register-name", source: "register-source" }[error.param];
      if (field) $(field).setAttribute("aria-invalid", "true");
    } finally {
      button.disabled = false;
    }
  });
  for (const id of ["register-name", "register-source"]) {
    $(id).addEventListener("input", () => $(id).removeAttribute("aria-invalid"));
  }
}

