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
</style></head>
<body>
<h1>failoverd · <span id="cluster">__CLUSTER__</span></h1>
<div class="meta">served by __MEMBER__ · coordinator <span id="coordinator">…</span>
 · updated <span id="updated">never</span></div>
<div id="paused"></div>
<div id="evacuations"></div>
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
<h2>Groups</h2>
<table id="groups"><thead><tr><th>Group</th><th>Active</th><th>Epoch</th><th>Since</th>
 <th>Workflow</th><th>Reason</th></tr></thead><tbody></tbody></table>
<h2>Timeline</h2>
<table id="timeline"><tbody></tbody></table>
<script>
"use strict";
const m = location.hash.match(/token=([^&]+)/);
if (m) { sessionStorage.setItem("failoverd-token", decodeURIComponent(m[1]));
         history.replaceState(null, "", location.pathname); }
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
  // The viewer's local time; UTC on hover (title).
  return new Date(ts * 1000).toLocaleString();
}
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
    badge(row, r.active_for.length ? "active: " + r.active_for.join(", ") : "standby",
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
  const groups = $("groups").tBodies[0]; groups.replaceChildren();
  for (const [name, g] of Object.entries(st.groups)) {
    const row = groups.insertRow(); row.dataset.group = name; cell(row, name);
    const a = g.active;
    cell(row, a ? a.region : "—"); cell(row, a ? String(a.epoch) : "—");
    cell(row, a ? ago(a.since) : "—");
    const wf = g.workflow, cur = wf && wf.steps.find((s) => s.state !== "done");
    cell(row, wf ? wf.state + (cur ? " at " + cur.name : "")
                   + (wf.state === "running" && cur && cur.detail ? ": " + cur.detail : "") : "—",
         wf && wf.state === "failed" ? "critical" : "");
    cell(row, a ? a.reason : "not bootstrapped");
  }
  const tl = $("timeline").tBodies[0]; tl.replaceChildren();
  for (const e of events) {
    const row = tl.insertRow(); row.dataset.kind = e.kind;
    cell(row, new Date(e.ts * 1000).toLocaleTimeString()); cell(row, e.member);
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
