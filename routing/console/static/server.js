// The Server view: the base model, the engine replicas and their load, the fair-share gate, settings and build.
import { state, $, el, api, count } from "./core.js";

function card(title, body, kind) {
  return el("section", { class: kind ? `card ${kind}` : "card", "aria-label": title }, el("h3", { text: title }), body);
}

function table(id, caption, columns, rows) {
  return el("div", { class: "table-wrap", tabindex: 0, role: "region", "aria-labelledby": `${id}-caption`, id },
    el("table", {},
      el("caption", { id: `${id}-caption`, class: "sr-only", text: caption }),
      el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col", text: c })))),
      el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c, i) => (i === 0 ? el("th", { scope: "row", text: c }) : el("td", { text: c }))))))));
}

function list(section) {
  if (!section) return el("p", { class: "muted", text: "Not known to this router." });
  return el("dl", { class: "settings" }, Object.entries(section).flatMap(([name, value]) =>
    [el("dt", { text: name.replace(/_/g, " ") }), el("dd", { text: value === null ? "not set" : String(value) })]));
}

export async function refreshServer() {
  const data = await api("v1/console/server");
  state.me = data;
  const focused = document.activeElement && document.activeElement.id;
  const me = data.key;
  const gate = data.gate;
  const replicas = data.replicas.length
    ? table("server-replicas", "Engine replicas", ["Replica", "Sequences running", "Adapters installed", "Resident",
      "LoRAs in engine", "Cache hits / misses", "Loads", "Evictions"],
    data.replicas.map((r) => [r.replica, count(r.running), count(r.installed), count(r.resident), count(r.engine_loras),
      `${count(r.cache.hits)} / ${count(r.cache.misses)}`, count(r.cache.loads), count(r.cache.evictions)]))
    : el("p", { class: "muted", text: "No engine replica has reported yet." });
  const queues = gate.queues.length
    ? table("server-queues", "Requests by key", ["Key", "In flight", "Waiting"],
      gate.queues.map((q) => [q.key, count(q.running), count(q.waiting)]))
    : el("p", { class: "muted", text: me.admin ? "No key has requests here now." : "Your key has no requests here now." });
  const settings = data.settings;
  $("server-body").replaceChildren(
    card("Base model", [el("p", { class: "big", text: data.base_model }),
      el("p", { text: `${count(data.adapters)} adapters visible to ${me.open ? "everyone (open server)" : `key ${me.name}`}.` })]),
    card("Admission gate (this router replica)", [
      el("p", { text: `${count(gate.inflight)} of ${count(gate.max_inflight)} slots in flight (${count(gate.reserve)} reserved ` +
        `for light keys), ${count(gate.waiting)} of ${count(gate.max_waiting)} waiting.` }), queues]),
    card("Engine replicas", replicas, "wide"),
    card("Engine settings", list(settings.engine)),
    card("Engine deployment", list(settings.deployment)),
    card("Router settings", list(settings.router)),
    card("Tracing", list(settings.tracing)),
    card("Build", list(settings.build)),
  );
  if (focused && $(focused)) $(focused).focus();
}

