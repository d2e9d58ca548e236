// The Kelpie dashboard. Plain JavaScript, no build step. Every value from the
// API is written with textContent, never as HTML: job names, commands and log
// lines are user data.
"use strict";

const REFRESH_MS = 2000;
let csrf = "";
const timers = [];

function every(fn) {
  timers.push(setInterval(fn, REFRESH_MS));
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function $(id) {
  return document.getElementById(id);
}

function showError(message) {
  const box = $("error");
  if (!box) return;
  box.hidden = !message;
  box.textContent = message || "";
}

async function api(path, options) {
  const opts = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
  if (opts.method && opts.method !== "GET") opts.headers["X-CSRF-Token"] = csrf;
  const response = await fetch(path, opts);
  if (response.status === 401) {
    window.location.assign("/ui/login");
    throw new Error("not signed in");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (!response.ok) {
    const detail = body && (body.message || body.detail || body.error);
    throw new Error(detail || `${response.status} ${response.statusText}`);
  }
  return body;
}

function when(value) {
  if (!value) return "";
  const d = new Date(value);
  return isNaN(d) ? String(value) : d.toLocaleString();
}

function seconds(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(2)} h`;
}

function fraction(job) {
  const p = job.progress;
  if (job.status === "completed") return 1;
  if (!p) return null;
  if (typeof p.fraction === "number") return Math.max(0, Math.min(1, p.fraction));
  return null;
}

function statusBadge(status) {
  return el("span", status, `status status-${status}`);
}

// The session (who is signed in, and the CSRF token) is fetched once; the
// sign-out button works from the moment the page is shown, before that fetch
// has answered: its click waits for the token.
let sessionReady = null;
let signingOut = false;

async function startSession() {
  const session = await api("/ui/session");
  csrf = session.csrf;
  const who = $("who");
  if (who) who.textContent = session.admin ? `${session.user_id} (admin)` : session.user_id;
}

function bindLogout() {
  const out = $("logout");
  if (!out) return;
  out.addEventListener("click", async () => {
    signingOut = true;
    timers.forEach(clearInterval);
    try {
      await sessionReady;
    } catch (e) {
      // No session: the form is where the browser goes anyway.
    }
    await fetch("/ui/logout", {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf },
    });
    window.location.assign("/ui/login");
  });
}

// -- the jobs table -------------------------------------------------------------

async function refreshJobs() {
  const params = new URLSearchParams({ page_size: "100" });
  for (const input of $("filters").elements) {
    if (input.name && input.value.trim()) params.set(input.name, input.value.trim());
  }
  try {
    const body = await api(`/jobs?${params}`);
    const rows = body.jobs.map((job) => {
      const tr = el("tr");
      tr.dataset.jobId = job.id;
      const link = el("a", job.id.slice(0, 8), "mono");
      link.href = `/ui/jobs/${encodeURIComponent(job.id)}`;
      link.title = job.id;
      const idCell = el("td");
      idCell.appendChild(link);
      tr.appendChild(idCell);
      tr.appendChild(el("td", job.name || ""));
      const st = el("td");
      st.appendChild(statusBadge(job.status));
      tr.appendChild(st);
      tr.appendChild(el("td", job.container_group_id));
      const f = fraction(job);
      tr.appendChild(el("td", f === null ? "" : `${Math.round(f * 100)} %`));
      tr.appendChild(el("td", job.attempt || ""));
      tr.appendChild(el("td", when(job.created)));
      return tr;
    });
    $("jobs").tBodies[0].replaceChildren(...rows);
    $("count").textContent = `${rows.length} job(s)${rows.length === 100 ? " (newest 100)" : ""}`;
    showError("");
  } catch (e) {
    showError(`Could not load the jobs: ${e.message}`);
  }
}

function jobsPage() {
  const form = $("filters");
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    refreshJobs();
  });
  form.addEventListener("input", () => refreshJobs());
  refreshJobs();
  every(refreshJobs);
}

// -- the groups table -----------------------------------------------------------

async function refreshGroups() {
  try {
    const body = await api("/ui/api/groups");
    const rows = body.groups.map((g) => {
      const tr = el("tr");
      tr.appendChild(el("td", g.container_group_id));
      for (const k of ["pending", "running", "completed", "failed", "canceled"]) {
        tr.appendChild(el("td", g[k], `num ${k}`));
      }
      return tr;
    });
    $("groups").tBodies[0].replaceChildren(...rows);
    $("empty").hidden = rows.length > 0;
    showError("");
  } catch (e) {
    showError(`Could not load the groups: ${e.message}`);
  }
}

function groupsPage() {
  refreshGroups();
  every(refreshGroups);
}

// -- one job --------------------------------------------------------------------

function jobId() {
  return decodeURIComponent(window.location.pathname.split("/").pop());
}

const FIELDS = [
  ["id", "Id"],
  ["name", "Name"],
  ["tags", "Tags"],
  ["status", "Status"],
  ["container_group_id", "Group"],
  ["command", "Command"],
  ["arguments", "Arguments"],
  ["attempt", "Attempt"],
  ["num_failures", "Failures"],
  ["max_failures", "Max failures"],
  ["num_interruptions", "Interruptions"],
  ["machine_id", "Machine"],
  ["created", "Created"],
  ["started", "Started"],
  ["completed", "Completed"],
  ["failed", "Failed"],
  ["canceled", "Canceled"],
  ["heartbeat", "Last heartbeat"],
  ["goodput", "Goodput"],
  ["last_error", "Last error"],
];

function fieldText(key, value) {
  if (value === null || value === undefined || value === "") return null;
  if (Array.isArray(value)) return value.length ? value.join(" ") : null;
  if (["created", "started", "completed", "failed", "canceled", "heartbeat"].includes(key)) {
    return when(value);
  }
  if (key === "goodput") return `${Math.round(value * 100)} %`;
  return String(value);
}

function renderJob(job) {
  $("job-id").textContent = job.id;
  $("job-status").replaceChildren(statusBadge(job.status));
  document.title = `${job.name || job.id.slice(0, 8)} · Kelpie`;
  const dl = $("fields");
  const items = [];
  for (const [key, label] of FIELDS) {
    const text = fieldText(key, job[key]);
    if (text === null) continue;
    items.push(el("dt", label));
    items.push(el("dd", text, key === "command" || key === "arguments" ? "mono" : ""));
  }
  dl.replaceChildren(...items);
  const f = fraction(job);
  const p = job.progress || {};
  $("progress-bar").style.width = `${f === null ? 0 : f * 100}%`;
  let text = f === null ? "no progress reported" : `${Math.round(f * 100)} %`;
  if (typeof p.step === "number") text += ` · step ${p.step}${p.total ? ` of ${p.total}` : ""}`;
  $("progress-text").textContent = text;
  $("cancel").hidden = !(job.status === "pending" || job.status === "running");
}

function cause(ev) {
  const d = ev.details || {};
  const parts = [];
  if (d.reason) parts.push(String(d.reason));
  if (d.exit_code !== undefined && d.exit_code !== null) parts.push(`exit code ${d.exit_code}`);
  if (d.error && ev.kind === "failed") parts.push(String(d.error).split("\n")[0]);
  if (d.by) parts.push(`by ${d.by}`);
  if (d.final) parts.push("no retries left");
  if (d.remaining !== undefined && d.remaining !== null) parts.push(`${d.remaining} failure(s) left`);
  return parts.join("; ");
}

const ENDINGS = ["lease_expired", "released", "failed", "banned", "canceled", "completed"];

function attempts(events) {
  const list = [];
  let current = null;
  for (const ev of events) {
    if (ev.kind === "claimed") {
      current = { attempt: ev.attempt, machine: ev.machine_id, start: new Date(ev.time), end: null, how: "running" };
      list.push(current);
    } else if (current && ENDINGS.includes(ev.kind) && (ev.attempt === current.attempt || ev.attempt === null)) {
      current.end = new Date(ev.time);
      current.how = ev.kind;
      const d = ev.details || {};
      if (typeof d.compute_seconds === "number") current.compute = d.compute_seconds;
      if (typeof d.lost_seconds === "number") current.lost = d.lost_seconds;
      current.cause = cause(ev);
      current = null;
    }
  }
  return list;
}

function renderTimeline(events) {
  const list = attempts(events);
  const box = $("timeline");
  if (!list.length) {
    box.replaceChildren(el("p", "Not claimed by a worker yet.", "muted"));
    return;
  }
  const now = new Date();
  const start = list[0].start.getTime();
  const end = Math.max(...list.map((a) => (a.end || now).getTime()), start + 1);
  const rows = list.map((a) => {
    const row = el("div", null, "attempt");
    row.appendChild(el("span", `#${a.attempt}`, "attempt-no"));
    const track = el("div", null, "track");
    const bar = el("div", null, `span how-${a.how}`);
    const from = a.start.getTime();
    const to = (a.end || now).getTime();
    bar.style.marginLeft = `${((from - start) / (end - start)) * 100}%`;
    bar.style.width = `${Math.max(((to - from) / (end - start)) * 100, 0.5)}%`;
    track.appendChild(bar);
    row.appendChild(track);
    let label = `${a.machine || "?"} · ${seconds((to - from) / 1000)} · ${a.how.replace("_", " ")}`;
    if (a.cause) label += ` (${a.cause})`;
    if (a.lost) label += ` · ${seconds(a.lost)} lost`;
    row.appendChild(el("span", label, "attempt-label"));
    return row;
  });
  box.replaceChildren(...rows);
}

function renderEvents(events) {
  const rows = events.map((ev) => {
    const tr = el("tr");
    tr.appendChild(el("td", when(ev.time)));
    tr.appendChild(el("td", ev.kind.replace("_", " ")));
    tr.appendChild(el("td", ev.attempt === null ? "" : ev.attempt));
    tr.appendChild(el("td", ev.machine_id || ""));
    tr.appendChild(el("td", cause(ev)));
    return tr;
  });
  $("events").tBodies[0].replaceChildren(...rows);
}

async function refreshJob() {
  const id = jobId();
  try {
    const [job, history] = await Promise.all([
      api(`/jobs/${encodeURIComponent(id)}`),
      api(`/jobs/${encodeURIComponent(id)}/events`),
    ]);
    renderJob(job);
    renderTimeline(history.events);
    renderEvents(history.events);
    showError("");
    return job;
  } catch (e) {
    showError(`Could not load the job: ${e.message}`);
    return null;
  }
}

async function followLog() {
  const id = encodeURIComponent(jobId());
  const pre = $("log");
  let since = 0;
  for (;;) {
    const follow = $("follow").checked;
    try {
      const body = await api(`/jobs/${id}/logs?since=${since}&limit=1000&follow=${follow}&wait=20`);
      for (const line of body.lines) {
        const span = el("span", `${line.line}\n`, line.stream === "stderr" ? "stderr" : "");
        span.dataset.seq = line.seq;
        pre.appendChild(span);
      }
      since = body.next;
      if (body.lines.length && follow) pre.scrollTop = pre.scrollHeight;
      if (body.finished) return;
      if (!body.more && !follow) await new Promise((r) => setTimeout(r, REFRESH_MS));
    } catch (e) {
      await new Promise((r) => setTimeout(r, REFRESH_MS));
    }
  }
}

function jobPage() {
  $("cancel").addEventListener("click", async () => {
    if (!window.confirm("Cancel this job?")) return;
    try {
      await api(`/jobs/${encodeURIComponent(jobId())}`, { method: "DELETE" });
      await refreshJob();
    } catch (e) {
      showError(`Could not cancel the job: ${e.message}`);
    }
  });
  refreshJob();
  every(refreshJob);
  followLog();
}

// -- start ------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  const page = document.body.dataset.page;
  if (page === "login") {
    $("failed").hidden = !new URLSearchParams(window.location.search).has("failed");
    return;
  }
  sessionReady = startSession();
  bindLogout();
  try {
    await sessionReady;
  } catch (e) {
    return;
  }
  if (signingOut) return;
  if (page === "jobs") jobsPage();
  else if (page === "groups") groupsPage();
  else if (page === "job") jobPage();
});
