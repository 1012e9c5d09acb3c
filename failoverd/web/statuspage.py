"""The status page at ``/``: one server-rendered HTML page, no build step.

The page itself carries no cluster data (it is served without a token); its
script asks for a viewer token — from the URL fragment ``#token=…`` (never
sent to the server) or a form, kept in sessionStorage — and refreshes from
``/v1/status`` and ``/v1/history`` every 2 s.  All data is inserted as text.
"""

from __future__ import annotations

import html

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>failoverd · __CLUSTER__</title>
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1b1f24; }
 h1 { font-size: 1.3rem; margin: 0 0 .2rem; } h2 { font-size: 1rem; margin: 1.4rem 0 .4rem; }
 .meta { color: #57606a; } table { border-collapse: collapse; min-width: 40rem; }
 th, td { text-align: left; padding: .3rem .8rem .3rem 0; border-bottom: 1px solid #d8dee4; }
 .badge { padding: .05rem .45rem; border-radius: .6rem; font-size: .8rem; }
 .active { background: #1f883d; color: #fff; } .standby { background: #eaeef2; }
 .up, .normal { color: #1a7f37; } .down, .critical { color: #cf222e; font-weight: 600; }
 .unknown, .unprobed { color: #6e7781; }
 .utility_lost, .on_battery, .on_generator { color: #9a6700; font-weight: 600; }
 #error { color: #cf222e; } #timeline td:first-child { white-space: nowrap; }
 .paused { background: #fff8c5; padding: .3rem .6rem; display: inline-block; }
 .evacuation { background: #ffebe9; color: #82071e; padding: .3rem .6rem; margin: .2rem 0;
   font-weight: 600; }
 .drain { background: #fff8c5; color: #7d4e00; padding: .3rem .6rem; margin: .2rem 0; }
 #waterfall td { padding: .15rem .8rem .15rem 0; } .bar-cell { width: 22rem; }
 .bar { height: .8rem; background: #0969da; min-width: 2px; } .bar.failed { background: #cf222e; }
 .bar.running { background: #9a6700; }
</style></head>
<body>
<h1>failoverd · <span id="cluster">__CLUSTER__</span></h1>
<div class="meta">served by __MEMBER__ · coordinator <span id="coordinator">…</span>
 · updated <span id="updated">never</span></div>
<div id="paused"></div>
<div id="evacuations"></div>
<div id="live-drills"></div>
<div id="drains"></div>
<form id="login" hidden><label>Viewer token <input id="token" type="password"></label>
 <button>Show</button></form>
<div id="error"></div>
<h2>Regions</h2>
<table id="regions"><thead><tr><th>Region</th><th>Role</th><th>Health</th><th>Power</th>
 <th>Drained</th><th>Members</th></tr></thead><tbody></tbody></table>
<h2>Power</h2>
<table id="power"><thead><tr><th>Region</th><th>Sensor</th><th>Source</th><th>State</th>
 <th>Runtime</th><th>Age</th><th>Rule</th><th>Why</th></tr></thead><tbody></tbody></table>
<h2>Incident</h2>
<div id="incident">no failover yet</div>
<h2>Groups</h2>
<table id="group-summary"><thead><tr><th>Region</th><th>Active groups</th><th>Sagas running</th>
 <th>Sagas failed</th></tr></thead><tbody></tbody></table>
<p><label>Filter <input id="filter" placeholder="group, region or state"></label>
 <span id="shown"></span></p>
<table id="groups"><thead><tr><th>Group</th><th>Active</th><th>Epoch</th><th>Since</th>
 <th>Workflow</th><th>Reason</th></tr></thead><tbody></tbody></table>
<div id="data" hidden><h2>Data</h2>
<table id="data-copies"><thead><tr><th>Group</th><th>Region</th><th>Role</th><th>Behind</th>
 <th>Replay</th><th>Reported</th><th>Can take over</th></tr></thead><tbody></tbody></table></div>
<h2>Timeline</h2>
<table id="timeline"><tbody></tbody></table>
<script>
"use strict";
const m = location.hash.match(/token=([^&]+)/);
if (m) { sessionStorage.setItem("failoverd-token", decodeURIComponent(m[1]));
         history.replaceState(null, "", location.pathname + location.search); }
const $ = (id) => document.getElementById(id);
function cell(row, text, cls) {
  const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td;
}
function badge(row, text, cls) {
  const span = document.createElement("span"); span.className = "badge " + cls;
  span.textContent = text; row.insertCell().appendChild(span);
}
function ago(ts) { return Math.max(0, Math.round(Date.now() / 1000 - ts)) + "s ago"; }
function span(seconds) {
  let left = Math.max(0, Math.round(seconds)), out = "";
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]]) {
    const n = Math.floor(left / size); left -= n * size; if (n) out += n + unit;
  }
  return out || "0s";
}
function local(ts) {
  // The viewer's local time, dated; UTC on hover (see stamp).
  return new Date(ts * 1000).toLocaleString();
}
function stamp(row, ts) {
  const td = row.insertCell(); td.textContent = local(ts);
  td.title = new Date(ts * 1000).toISOString(); td.className = "ts";
}
function secs(x) { return x < 10 ? x.toFixed(2) + "s" : span(x); }
const GROUPS_SHOWN = 200;
let lastStatus = null;
function renderIncident(st) {
  // The current or last incident: every group moved by the newest decision
  // (same reason, committed within a minute), its sagas' steps aggregated.
  const moved = Object.entries(st.groups).filter(([, g]) => g.active &&
    g.active.trigger !== "bootstrap");
  const box = $("incident");
  if (!moved.length) { box.textContent = "no failover yet"; return; }
  const newest = moved.reduce((a, b) => (b[1].active.since > a[1].active.since ? b : a))[1];
  const inc = moved.filter(([, g]) => g.active.reason === newest.active.reason &&
    Math.abs(g.active.since - newest.active.since) < 60);
  const t0 = Math.min(...inc.map(([, g]) => g.active.since));
  const flows = inc.map(([, g]) => g.workflow).filter((w) => w && w.epoch ===
    inc.find(([n]) => n === w.group)[1].active.epoch);
  const names = flows.length ? flows[0].steps.map((x) => x.name) : [];
  const rows = [];
  for (const name of names) {
    const steps = flows.map((w) => w.steps.find((x) => x.name === name)).filter(Boolean);
    const started = steps.filter((x) => x.started != null).map((x) => x.started);
    const finished = steps.filter((x) => x.finished != null).map((x) => x.finished);
    const failed = steps.filter((x) => x.state === "failed").length;
    const done = steps.filter((x) => x.state === "done").length;
    rows.push({name, start: started.length ? Math.min(...started) : null,
               end: finished.length ? Math.max(...finished) : null, done, failed,
               total: steps.length});
  }
  const allDone = flows.length && flows.every((w) => w.state === "done");
  const end = Math.max(t0, ...rows.filter((r) => r.end != null).map((r) => r.end));
  const span_ = Math.max(end - t0, 0.001);
  const table = document.createElement("table"); table.id = "waterfall";
  const head = table.insertRow(); head.className = "trigger";
  cell(head, "trigger"); stamp(head, t0); cell(head, "");
  const why = newest.active.reason.startsWith(newest.active.trigger + ":") ?
    newest.active.reason : newest.active.trigger + ": " + newest.active.reason;
  cell(head, why + " · " + inc.length + " group(s)");
  const dec = table.insertRow(); dec.dataset.step = "decision";
  cell(dec, "decision committed"); stamp(dec, t0); cell(dec, "0s"); dec.insertCell();
  for (const r of rows) {
    const row = table.insertRow(); row.dataset.step = r.name;
    cell(row, r.name);
    if (r.start == null) { cell(row, "pending"); cell(row, ""); row.insertCell(); continue; }
    stamp(row, r.start);
    const took = (r.end != null && r.done + r.failed === r.total ? r.end : Date.now() / 1000)
      - r.start;
    cell(row, secs(Math.max(took, 0)) + (r.total > 1 ? " · " + r.done + "/" + r.total : ""),
         r.failed ? "critical" : "");
    const td = row.insertCell(); td.className = "bar-cell";
    const bar = document.createElement("div");
    bar.className = "bar" + (r.failed ? " failed" : r.done < r.total ? " running" : "");
    bar.style.marginLeft = (100 * (r.start - t0) / span_).toFixed(1) + "%";
    bar.style.width = (100 * Math.max(took, 0) / span_).toFixed(1) + "%";
    td.appendChild(bar);
  }
  const last = table.insertRow(); last.dataset.step = "done";
  if (allDone) {
    cell(last, "done"); stamp(last, end); cell(last, secs(end - t0) + " in all");
  } else {
    cell(last, flows.some((w) => w.state === "failed") ? "FAILED" : "in progress");
    cell(last, ""); cell(last, "");
  }
  last.insertCell();
  box.replaceChildren(table);
}
function renderGroups(st) {
  const summary = $("group-summary").tBodies[0]; summary.replaceChildren();
  for (const name of Object.keys(st.regions)) {
    const gs = Object.values(st.groups).filter((g) => g.active && g.active.region === name);
    const row = summary.insertRow(); row.dataset.region = name; cell(row, name);
    cell(row, String(gs.length));
    cell(row, String(gs.filter((g) => g.workflow && g.workflow.state === "running").length));
    const failed = gs.filter((g) => g.workflow && g.workflow.state === "failed").length;
    cell(row, String(failed), failed ? "critical" : "");
  }
  const q = $("filter").value.trim().toLowerCase();
  const all = Object.entries(st.groups);
  const match = all.filter(([name, g]) => !q || [name, g.active && g.active.region,
    g.workflow && g.workflow.state, g.active && g.active.reason]
    .some((x) => x && String(x).toLowerCase().includes(q)));
  const groups = $("groups").tBodies[0]; groups.replaceChildren();
  for (const [name, g] of match.slice(0, GROUPS_SHOWN)) {
    const row = groups.insertRow(); row.dataset.group = name; cell(row, name);
    const a = g.active;
    cell(row, a ? a.region : "—"); cell(row, a ? String(a.epoch) : "—");
    if (a) stamp(row, a.since); else cell(row, "—");
    const wf = g.workflow, cur = wf && wf.steps.find((s) => s.state !== "done");
    cell(row, wf ? wf.state + (cur ? " at " + cur.name : "")
                   + (wf.state === "running" && cur && cur.detail ? ": " + cur.detail : "") : "—",
         wf && wf.state === "failed" ? "critical" : "");
    cell(row, a ? a.reason : "not bootstrapped");
  }
  renderData(match.slice(0, GROUPS_SHOWN));
  $("shown").textContent = match.length > GROUPS_SHOWN ?
    "showing " + GROUPS_SHOWN + " of " + match.length + " (filter to narrow)" :
    match.length + " of " + all.length + " group(s)";
}
function bytes(n) {
  if (n < 1024) return n + " B";
  const units = ["KiB", "MiB", "GiB"];
  let i = -1; do { n /= 1024; i++; } while (n >= 1024 && i < units.length - 1);
  return n.toFixed(1) + " " + units[i];
}
function renderData(shown) {
  // A database group's copies, as failoverctl status prints them: whether
  // each region may take over, and if not, why (the data guard).
  const withData = shown.filter(([, g]) => g.data);
  $("data").hidden = !withData.length;
  const body = $("data-copies").tBodies[0]; body.replaceChildren();
  for (const [name, g] of withData) {
    for (const [region, d] of Object.entries(g.data.regions)) {
      const row = body.insertRow(); row.dataset.data = name + "/" + region;
      cell(row, name); cell(row, region);
      cell(row, (d.role || "no report") + (d.error ? ": " + d.error : ""));
      cell(row, d.lag_bytes == null ? "—" : bytes(d.lag_bytes) +
           (d.lag_s ? ", " + d.lag_s.toFixed(1) + "s" : ""));
      cell(row, d.paused ? "paused" : d.streaming ? "streaming" : d.role === "primary" ? "" : "—",
           d.paused ? "critical" : "");
      if (d.at != null) stamp(row, d.at); else cell(row, "—");
      cell(row, d.ok ? "yes" : "NO: " + d.why, d.ok ? "up" : "critical");
    }
  }
}
// The filter is in the address (?filter=east), so a view can be bookmarked
// or handed over during an incident.
$("filter").value = new URLSearchParams(location.search).get("filter") || "";
$("filter").addEventListener("input", () => {
  const url = new URL(location.href);
  if ($("filter").value) url.searchParams.set("filter", $("filter").value);
  else url.searchParams.delete("filter");
  history.replaceState(null, "", url.pathname + url.search);
  if (lastStatus) renderGroups(lastStatus);
});
async function get(path) {
  const r = await fetch(path, {headers: {Authorization: "Bearer " +
    sessionStorage.getItem("failoverd-token")}});
  if (r.status === 401 || r.status === 403) { $("login").hidden = false; throw new Error(
    "a viewer token is needed"); }
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}
function render(st, events) {
  $("coordinator").textContent = st.coordinator ?
    st.coordinator.member + " (term " + st.coordinator.term + ")" : "none";
  $("paused").textContent = st.paused ? "Automatic actions are paused" : "";
  $("paused").className = st.paused ? "paused" : "";
  $("evacuations").replaceChildren(...(st.evacuations || []).map((e) => {
    const div = document.createElement("div"); div.className = "evacuation";
    div.dataset.region = e.region;
    div.textContent = e.kind === "failback" ? "Failback " + ago(e.at) + ": " + e.reason :
      "Evacuated " + e.region + " " + ago(e.at) + " (" + e.trigger + "): " + e.groups +
      " group(s) moved" + (e.held ? ", " + e.held + " held" : "") + " — " + e.reason;
    return div;
  }));
  $("live-drills").replaceChildren(...Object.values(st.live_drills || {})
    .filter((d) => d.running).map((d) => {
      const div = document.createElement("div"); div.className = "paused";
      div.dataset.group = d.group;
      let text = "Live drill of " + d.group + ": " + d.home + " \u2192 " + d.to + " by " +
        d.by + ", " + d.phase;
      if (d.phase === "holding" && d.switched_at != null) {
        text += ", back in " + Math.max(0, Math.round(d.switched_at + d.hold_s -
                                                      Date.now() / 1000)) + "s";
      }
      div.textContent = text + (d.abort_by ? " (abort asked by " + d.abort_by + ")" : "");
      return div;
    }));
  $("drains").replaceChildren(...Object.entries(st.regions).filter(([, r]) => r.drain)
    .map(([name, r]) => {
      const div = document.createElement("div"); div.className = "drain";
      div.dataset.region = name;
      if (r.drain.until != null) div.title = new Date(r.drain.until * 1000).toISOString();
      div.textContent = "Drained " + name + " by " + r.drain.by + ": " +
        (!r.drained ? "expired, being lifted" : r.drain.until == null ? "no end yet" :
         span(r.drain.left_s) + " left, until " + local(r.drain.until));
      return div;
    }));
  const regions = $("regions").tBodies[0]; regions.replaceChildren();
  for (const [name, r] of Object.entries(st.regions)) {
    const row = regions.insertRow(); row.dataset.region = name;
    cell(row, name);
    // A region active for 1,000 groups says how many; the Groups table lists them.
    badge(row, !r.active_for.length ? "standby" : r.active_for.length > 8 ?
          "active: " + r.active_for.length + " groups" : "active: " + r.active_for.join(", "),
          r.active_for.length ? "active" : "standby");
    cell(row, r.health.verdict, r.health.verdict);
    cell(row, r.power.state + (r.power.runtime_s != null ?
      " (" + Math.round(r.power.runtime_s) + "s)" : ""), r.power.state);
    cell(row, !r.drain ? "" : !r.drained ? "expiring" : r.drain.left_s == null ? "drained" :
              "drained, " + span(r.drain.left_s) + " left");
    cell(row, r.members.join(", ") || "none");
  }
  const power = $("power").tBodies[0]; power.replaceChildren();
  for (const [name, r] of Object.entries(st.regions)) {
    const p = r.power, heard = new Set(p.sensors.map((x) => x.sensor));
    for (const x of p.sensors) {
      const row = power.insertRow(); row.dataset.region = name; row.dataset.sensor = x.sensor;
      cell(row, name); cell(row, x.sensor); cell(row, x.source); cell(row, x.state, x.state);
      cell(row, x.runtime_s != null ? Math.round(x.runtime_s) + "s" : "—");
      cell(row, Math.round(x.age_s) + "s");
      cell(row, x.rule, x.rule === "critical" || x.rule === "silence" || x.rule === "budget"
           ? "critical" : "");
      cell(row, x.explanation + (x.detail ? " · " + x.detail : ""));
    }
    for (const src of p.sources.filter((x) => !heard.has(x.sensor))) {
      const row = power.insertRow(); row.dataset.region = name; row.dataset.sensor = src.sensor;
      cell(row, name); cell(row, src.sensor); cell(row, src.kind); cell(row, "no reading",
           "unknown");
      cell(row, "—"); cell(row, "—"); cell(row, "—");
      cell(row, src.target + (src.poll && !src.poll.ok ? ": " + src.poll.reason : ""));
    }
    if (p.refused && p.refused.messages) {
      const row = power.insertRow(); row.dataset.region = name; row.className = "refused";
      cell(row, name); cell(row, "refused"); cell(row, ""); cell(row, "", "critical");
      cell(row, ""); cell(row, ""); cell(row, "");
      cell(row, p.refused.messages + " message(s) from sensors past max_sensors_per_region, " +
           "e.g. " + p.refused.names.join(", ") +
           (p.refused.narrowed ? "; now subscribed to the known sensors' topics only" : ""));
    }
    const row = power.insertRow(); row.dataset.region = name; row.className = "verdict";
    cell(row, name); cell(row, "→ region"); cell(row, "");
    cell(row, p.state, p.state); cell(row, p.runtime_s != null ?
      Math.round(p.runtime_s) + "s" : "—"); cell(row, "");
    cell(row, "quorum " + p.quorum); cell(row, (p.evidence.length ? "critical because: " +
      p.evidence.join(", ") : p.detail) + " · failover budget " + Math.round(p.budget_s) + "s");
  }
  lastStatus = st;
  renderIncident(st);
  renderGroups(st);
  const tl = $("timeline").tBodies[0]; tl.replaceChildren();
  for (const e of events) {
    const row = tl.insertRow(); row.dataset.kind = e.kind;
    stamp(row, e.ts); cell(row, e.member);
    cell(row, e.kind);
    const bits = ["group", "region", "epoch", "reason", "by", "result"]
      .filter((k) => e[k] != null).map((k) => k + "=" + e[k]);
    cell(row, bits.join(" "));
  }
  $("updated").textContent = new Date().toLocaleTimeString();
}
async function refresh() {
  try {
    const [st, h] = await Promise.all([get("/v1/status"), get("/v1/history?limit=25")]);
    render(st, h.events); $("error").textContent = "";
  } catch (err) { $("error").textContent = String(err.message || err); }
}
$("login").addEventListener("submit", (ev) => {
  ev.preventDefault(); sessionStorage.setItem("failoverd-token", $("token").value);
  $("login").hidden = true; refresh();
});
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""


def render_page(cluster: str, member: str) -> str:
    return PAGE.replace("__CLUSTER__", html.escape(cluster)).replace(
        "__MEMBER__", html.escape(member))
