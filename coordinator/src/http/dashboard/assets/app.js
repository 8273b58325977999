// Stagecoach dashboard. Plain JavaScript, no build step, nothing loaded
// from elsewhere. Everything the server sends reaches the DOM as text
// (textContent, createTextNode, setAttribute): subjects and event messages
// are user input.
"use strict";

const TOKEN_KEY = "stagecoach.token";
const STATES = ["queued", "running", "succeeded", "failed", "canceled"];

const app = {
  route: null,        // the parsed location hash
  routeKey: "",       // what the shell was built for
  shell: null,        // the current view's static parts
  loading: false,     // a refresh is running
  again: false,       // another refresh was asked for meanwhile
  refreshTimer: null, // a refresh gathered from live changes
  live: null,         // the live feed's AbortController
  liveRetry: 1000,
};

// --- DOM helpers: text only ----------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function svgEl(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function setAttrs(node, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    node.setAttribute(k, v === true ? "" : String(v));
  }
}

function append(node, children) {
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function badge(state) {
  return el("span", { class: "badge " + state }, state);
}

function time(ms) {
  if (ms === null || ms === undefined) return "–";
  const d = new Date(ms);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

function duration(ms) {
  if (ms < 1000) return ms + " ms";
  const s = ms / 1000;
  if (s < 120) return s.toFixed(1) + " s";
  const m = s / 60;
  if (m < 120) return m.toFixed(1) + " min";
  return (m / 60).toFixed(1) + " h";
}

function bar(done, total) {
  const pct = total > 0 ? Math.min(100, Math.round((100 * done) / total)) : 0;
  const inner = el("span");
  inner.style.width = pct + "%";
  return el("span", { class: "bar", role: "img", "aria-label": `${done} of ${total}` }, inner);
}

// A table whose cells carry their column's name (the phone layout shows it).
function table(columns, rows, attrsOf) {
  const head = el("thead", {}, el("tr", {}, columns.map((c) => el("th", {}, c))));
  const body = el("tbody", {}, rows.map((cells, i) =>
    el("tr", attrsOf ? attrsOf(i) : {}, cells.map((cell, j) => {
      const td = el("td", { "data-label": columns[j] }, cell);
      return td;
    }))));
  return el("div", { class: "table-wrap" }, el("table", {}, head, body));
}

// --- the API ---------------------------------------------------------------

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(path) {
  const res = await fetch(path, { headers: headers(), cache: "no-store" });
  if (res.ok) return res.json();
  const text = await res.text();
  let message = text.trim();
  try {
    const body = JSON.parse(text);
    if (body && body.error) message = (body.field ? body.field + ": " : "") + body.error;
  } catch (_) { /* a plain-text answer (the token check) */ }
  throw new HttpError(res.status, message || res.statusText);
}

// --- auth ----------------------------------------------------------------

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = !message;
}

function askForToken(message) {
  document.getElementById("auth-message").textContent = message;
  document.getElementById("auth").hidden = false;
  document.getElementById("token").focus();
}

function onAuthSubmit(event) {
  event.preventDefault();
  const input = document.getElementById("token");
  const token = input.value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  input.value = "";
  document.getElementById("auth").hidden = true;
  showError("");
  startLive();
  refresh();
}

// Shows why a read failed; true when it was the token.
function handleFailure(err) {
  if (err instanceof HttpError && err.status === 401) {
    const had = sessionStorage.getItem(TOKEN_KEY);
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken(had ? "That token was refused: " + err.message : "This coordinator needs a token: " + err.message);
    return true;
  }
  if (err instanceof HttpError && err.status === 403) {
    showError("Permission denied: " + err.message);
    askForToken("This token may not read the dashboard; it needs role viewer or admin. Enter another token.");
    return true;
  }
  showError(err instanceof HttpError ? `Error ${err.status}: ${err.message}` : "Cannot reach the coordinator: " + err.message);
  return false;
}

// --- routing ---------------------------------------------------------------

function parseRoute() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "migrations" && parts[1]) return { view: "migration", id: parts[1], params };
  if (parts[0] === "pools") return { view: "pools", params };
  if (parts[0] === "workers") return { view: "workers", params };
  return { view: "migrations", params };
}

function onRoute() {
  app.route = parseRoute();
  const key = location.hash;
  if (key !== app.routeKey) {
    app.routeKey = key;
    app.shell = null;
  }
  const nav = app.route.view === "migration" ? "migrations" : app.route.view;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.nav === nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  refresh();
}

// One refresh at a time; a refresh asked for meanwhile runs after it.
async function refresh() {
  if (app.loading) {
    app.again = true;
    return;
  }
  app.loading = true;
  try {
    const route = app.route;
    const view = VIEWS[route.view];
    const data = await view.load(route);
    if (route !== app.route) return; // the user moved on
    if (!app.shell) {
      app.shell = view.shell(route);
      document.getElementById("view").replaceChildren(app.shell.root);
    }
    view.fill(app.shell, data, route);
    showError("");
  } catch (err) {
    handleFailure(err);
  } finally {
    app.loading = false;
    if (app.again) {
      app.again = false;
      refresh();
    }
  }
}

// Live changes arrive in bursts: redraw at most every 500 ms.
function refreshSoon() {
  if (app.refreshTimer) return;
  app.refreshTimer = setTimeout(() => {
    app.refreshTimer = null;
    refresh();
  }, 500);
}

// --- views -----------------------------------------------------------------

const VIEWS = {};

VIEWS.migrations = {
  load(route) {
    const q = new URLSearchParams();
    for (const k of ["state", "subject", "pool", "page_token"]) {
      const v = route.params.get(k);
      if (v) q.set(k, v);
    }
    q.set("page_size", route.params.get("page_size") || "50");
    return api("/api/migrations?" + q.toString());
  },
  shell(route) {
    const p = route.params;
    const state = el("select", { name: "state" },
      el("option", { value: "" }, "any state"),
      STATES.map((s) => el("option", { value: s, selected: p.get("state") === s }, s)));
    const subject = el("input", { name: "subject", placeholder: "exact subject", value: p.get("subject") || "" });
    const pool = el("input", { name: "pool", placeholder: "pool", value: p.get("pool") || "" });
    const form = el("form", { class: "filters" },
      el("label", {}, "State", state),
      el("label", {}, "Subject", subject),
      el("label", {}, "Pool", pool),
      el("button", { type: "submit" }, "Filter"));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const q = new URLSearchParams();
      if (state.value) q.set("state", state.value);
      if (subject.value.trim()) q.set("subject", subject.value.trim());
      if (pool.value.trim()) q.set("pool", pool.value.trim());
      location.hash = "#/migrations?" + q.toString();
    });
    const list = el("div", { id: "migrations" });
    const pager = el("div", { class: "pager" });
    return { root: el("section", {}, el("h1", {}, "Migrations"), form, list, pager), list, pager };
  },
  fill(shell, data, route) {
    const rows = data.migrations.map((m) => [
      el("a", { href: "#/migrations/" + m.id }, "#" + m.id),
      el("span", { class: "subject" }, m.subject),
      `${m.plan_name} v${m.plan_version}`,
      m.pool,
      el("span", { class: "state" }, badge(m.state)),
      el("span", {}, bar(m.tasks_done, m.tasks_total), ` ${m.tasks_done}/${m.tasks_total}`),
      time(m.created_at_ms),
    ]);
    shell.list.replaceChildren(rows.length
      ? table(["ID", "Subject", "Plan", "Pool", "State", "Tasks", "Created"], rows,
        (i) => ({ "data-migration-id": data.migrations[i].id, "data-state": data.migrations[i].state }))
      : el("p", { class: "muted" }, "No migrations match."));
    const links = [];
    if (route.params.get("page_token")) {
      const first = new URLSearchParams(route.params);
      first.delete("page_token");
      links.push(el("a", { href: "#/migrations?" + first.toString() }, "← Newest"));
    }
    if (data.next_page_token) {
      const next = new URLSearchParams(route.params);
      next.set("page_token", data.next_page_token);
      links.push(el("a", { href: "#/migrations?" + next.toString(), id: "older" }, "Older →"));
    }
    shell.pager.replaceChildren(...links);
  },
};

VIEWS.migration = {
  load(route) {
    return api("/api/migrations/" + encodeURIComponent(route.id));
  },
  shell() {
    const parts = {
      title: el("h1", {}),
      facts: el("dl", { class: "facts" }),
      gantt: el("div", {}),
      stages: el("div", {}),
      tasks: el("div", {}),
      events: el("div", {}),
    };
    parts.root = el("section", {},
      el("p", {}, el("a", { href: "#/" }, "← Migrations")),
      parts.title, parts.facts,
      el("h2", {}, "Stage timeline"), parts.gantt,
      el("h2", {}, "Stages"), parts.stages,
      el("h2", {}, "Running tasks"), parts.tasks,
      el("h2", {}, "Event log (latest)"), parts.events);
    return parts;
  },
  fill(shell, d) {
    const m = d.migration;
    shell.title.replaceChildren(`Migration #${m.id} `, el("span", { id: "migration-state" }, badge(m.state)));
    const facts = [
      ["Subject", el("span", { id: "migration-subject" }, m.subject)],
      ["Plan", `${m.plan_name} v${m.plan_version}`],
      ["Pool", m.pool],
      ["Created", time(m.created_at_ms)],
      ["Admitted", time(m.admitted_at_ms)],
      ["Finished", time(m.finished_at_ms)],
    ];
    if (m.deadline_ms) facts.push(["Deadline", time(m.deadline_ms)]);
    if (m.reason) facts.push(["Reason", m.reason]);
    facts.push(["Parameters", el("pre", {}, JSON.stringify(d.parameters, null, 2))]);
    shell.facts.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
    const width = shell.gantt.clientWidth || 600;
    shell.gantt.replaceChildren(gantt(m.stages, d.spans, d.now_ms, width));
    if (!d.log_complete) {
      shell.gantt.appendChild(el("p", { class: "hint" }, `A long log: ${d.events_read} events read so far; the chart fills in as the rest is read.`));
    }
    shell.stages.replaceChildren(table(["#", "Stage", "State", "Done", "Running", "Failed"],
      m.stages.map((s) => {
        const done = s.succeeded + s.failed + s.canceled;
        return [String(s.index), s.name, badge(s.state),
          el("span", {}, bar(done, s.total), ` ${done}/${s.total}`), String(s.running), String(s.failed)];
      }), (i) => ({ "data-stage": m.stages[i].index })));
    shell.tasks.replaceChildren(d.leased_tasks.length
      ? table(["Task", "Stage", "Kind", "Worker", "Progress", "Lease until"], d.leased_tasks.map((t) => [
        `${t.task_id} (attempt ${t.attempt})`,
        stageName(m.stages, t.stage_index),
        t.kind,
        t.worker_id,
        t.total > 0 ? el("span", {}, bar(t.done, t.total), ` ${t.done}/${t.total}`) : "–",
        time(t.lease_expires_at_ms),
      ]), () => ({ class: "leased-task" }))
      : el("p", { class: "muted" }, "No task is running."));
    const events = d.events.slice().reverse();
    shell.events.replaceChildren(events.length
      ? table(["Time", "Event", "Stage", "Task", "Worker", "Message"], events.map((e) => [
        time(e.at_ms), e.kind,
        e.stage_index === null ? "" : stageName(m.stages, e.stage_index),
        e.task_id ? `${e.task_id}/${e.attempt}` : "",
        e.worker_id,
        el("span", { class: "message" }, e.message),
      ]), (i) => ({ class: "event", "data-kind": events[i].kind }))
      : el("p", { class: "muted" }, "No events."));
  },
};

function stageName(stages, index) {
  const s = stages.find((x) => x.index === index);
  return s ? s.name : "#" + index;
}

// The stage timeline: one row per stage, one rect per run from the log.
// Drawn in CSS pixels at the container's width, so its text stays legible
// on a phone and on a wide screen alike.
function gantt(stages, spans, nowMs, width) {
  const W = Math.max(240, Math.floor(width)), PAD = 8, ROW = 40, BAR = 16;
  const height = PAD * 2 + Math.max(1, stages.length) * ROW + 22;
  const svg = svgEl("svg", {
    id: "gantt", width: W, height, viewBox: `0 0 ${W} ${height}`, role: "img",
    "aria-label": "stage timeline",
  });
  if (!spans.length) {
    svg.appendChild(svgEl("text", { x: PAD, y: PAD + 16 }, "No stage has started yet."));
    return svg;
  }
  const t0 = Math.min(...spans.map((s) => s.start_ms));
  const t1 = Math.max(t0 + 1, ...spans.map((s) => s.end_ms ?? nowMs));
  const x = (t) => PAD + ((W - 2 * PAD) * (t - t0)) / (t1 - t0);
  stages.forEach((stage, row) => {
    const y = PAD + row * ROW;
    svg.appendChild(svgEl("text", { x: PAD, y: y + 14 }, `${stage.name} (${stage.state})`));
    svg.appendChild(svgEl("rect", { class: "track", x: PAD, y: y + 20, width: W - 2 * PAD, height: BAR }));
  });
  for (const s of spans) {
    const row = stages.findIndex((st) => st.index === s.stage_index);
    if (row < 0) continue;
    const end = s.end_ms ?? nowMs;
    const left = x(s.start_ms);
    const rect = svgEl("rect", {
      class: "span " + s.outcome, "data-stage": s.stage_index,
      x: left, y: PAD + row * ROW + 20, width: Math.max(2, x(end) - left), height: BAR,
    }, svgEl("title", {}, `${stageName(stages, s.stage_index)}: ${s.outcome}, ${duration(end - s.start_ms)}`));
    svg.appendChild(rect);
  }
  const axisY = PAD + stages.length * ROW + 4;
  svg.appendChild(svgEl("line", { class: "axis", x1: PAD, y1: axisY, x2: W - PAD, y2: axisY }));
  svg.appendChild(svgEl("text", { x: PAD, y: axisY + 16 }, new Date(t0).toLocaleTimeString()));
  svg.appendChild(svgEl("text", { x: W - PAD, y: axisY + 16, "text-anchor": "end" }, `+${duration(t1 - t0)}`));
  return svg;
}

VIEWS.pools = {
  load() {
    return api("/api/pools");
  },
  shell() {
    const list = el("div", { id: "pools" });
    return { root: el("section", {}, el("h1", {}, "Pools"), list), list };
  },
  fill(shell, d) {
    shell.list.replaceChildren(d.pools.length
      ? table(["Pool", "Slots in use", "Queued", "State"], d.pools.map((p) => [
        p.name,
        el("span", {}, bar(p.running, p.slots), ` ${p.running}/${p.slots}`),
        String(p.queued),
        p.paused ? badge("paused") : badge("open"),
      ]), (i) => ({ "data-pool": d.pools[i].name }))
      : el("p", { class: "muted" }, "No pools yet."));
  },
};

VIEWS.workers = {
  load() {
    return api("/api/workers");
  },
  shell() {
    const list = el("div", { id: "workers" });
    return { root: el("section", {}, el("h1", {}, "Workers"), list), list };
  },
  fill(shell, d) {
    shell.list.replaceChildren(d.workers.length
      ? table(["Worker", "Kinds", "Leases", "State", "Last heartbeat"], d.workers.map((w) => [
        el("span", {}, w.worker_id, w.name && w.name !== w.worker_id ? el("span", { class: "muted" }, ` (${w.name})`) : null),
        w.kinds.join(", "),
        el("span", {}, `${w.leases.length}/${w.slots} `,
          el("span", { class: "muted" }, w.leases.map((l) => `task ${l.task_id}/${l.attempt}`).join(", "))),
        w.draining ? badge("draining") : w.eligible ? badge("eligible") : el("span", {}, badge("held"), " ", w.ineligible_reason),
        time(w.last_heartbeat_ms),
      ]), (i) => ({ "data-worker": d.workers[i].worker_id }))
      : el("p", { class: "muted" }, "No worker is connected."));
  },
};

// --- live updates ------------------------------------------------------------

function setLive(on) {
  const badgeEl = document.getElementById("live");
  badgeEl.textContent = on ? "live" : "offline";
  badgeEl.className = "live " + (on ? "on" : "off");
}

function onLiveEvent(name, data) {
  if (name === "ready" || name === "resync") {
    refreshSoon();
    return;
  }
  if (name !== "changes") return;
  const route = app.route;
  if (route.view === "migration") {
    const ids = (JSON.parse(data).migration_ids || []).map(String);
    if (ids.includes(String(route.id))) refreshSoon();
  } else {
    refreshSoon();
  }
}

// Server-sent events over fetch(): EventSource cannot send the token header.
async function startLive() {
  if (app.live) app.live.abort();
  const controller = new AbortController();
  app.live = controller;
  try {
    const res = await fetch("/api/live", { headers: headers(), signal: controller.signal, cache: "no-store" });
    if (!res.ok) {
      setLive(false);
      if (res.status === 401 || res.status === 403) return; // the reads ask for a token
      throw new Error("live feed answered " + res.status);
    }
    setLive(true);
    app.liveRetry = 1000;
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) onLiveEvent(name, data.join("\n"));
      }
    }
  } catch (err) {
    if (controller.signal.aborted) return;
  }
  if (app.live !== controller) return;
  setLive(false);
  // Reconnect with backoff; the coordinator may be restarting.
  setTimeout(() => { if (app.live === controller) startLive(); }, app.liveRetry);
  app.liveRetry = Math.min(app.liveRetry * 2, 30000);
}

// Pools and workers change without a migration changing (heartbeats,
// connections): those views also poll.
setInterval(() => {
  if (app.route && (app.route.view === "pools" || app.route.view === "workers")) refresh();
}, 5000);

// The chart is drawn at the page's width: redraw when that changes.
let lastWidth = window.innerWidth;
window.addEventListener("resize", () => {
  if (window.innerWidth !== lastWidth && app.route && app.route.view === "migration") refreshSoon();
  lastWidth = window.innerWidth;
});

document.getElementById("auth").querySelector("form").addEventListener("submit", onAuthSubmit);
window.addEventListener("hashchange", onRoute);
onRoute();
startLive();
