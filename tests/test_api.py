"""The REST API and failoverctl against a running cluster (real etcd, real
daemons), plus the OpenAPI document checked against the router."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from devstack.stack import (
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    EtcdCluster,
    LocalCluster,
    call,
    free_port,
    wait_until,
)
from failoverd.config import ApiSettings
from failoverd.web.api import ROUTES, Api, RateLimiter, openapi_document, serve_api

pytestmark = pytest.mark.cluster
REGIONS = {"east": 100, "west": 50, "central": 25}  # as in the api_cluster fixture


def _fill(path: str) -> str:
    path = path.replace("{group}", "app").replace("{region}", "central")
    return path + "?group=app" if path == "/v1/drill/hooks" else path


async def test_auth_matrix_over_every_route(api_cluster: LocalCluster):
    cluster = api_cluster
    base = cluster.daemons["w1"].api
    for route in ROUTES:
        # east is active: a switchover there is a no-op; a drain without a body
        # takes the default duration (and the DELETE after it undoes it).
        body = {"to": "east"} if route.body is not None and route.body_required else None
        for who, token in (("none", None), ("viewer", VIEWER_TOKEN),
                           ("operator", OPERATOR_TOKEN)):
            status, data = await call(base, route.method, _fill(route.path), token, body)
            where = f"{route.method} {route.path} as {who}: {status} {data}"
            if route.role in {None, "metrics"}:
                assert status == 200, where
            elif who == "none":
                assert status == 401 and data["error"] == "unauthorized", where
            elif route.role == "operator" and who == "viewer":
                assert status == 403 and data["error"] == "forbidden", where
            else:
                assert status in {200, 409}, where
    # The matrix left nothing behind: not paused, nothing drained.
    v = await cluster.view()
    assert not v.control.paused and not v.control.drained


async def test_switchover_on_a_non_coordinator_member(api_cluster: LocalCluster):
    cluster = api_cluster
    v = await cluster.view()
    member = next(m for m in cluster.daemons if m != v.coordinator.member)
    status, data = await call(cluster.daemons[member].api, "POST",
                              "/v1/groups/app/switchover", OPERATOR_TOKEN, {"to": "west"})
    assert status == 200 and data["status"] == "accepted" and data["epoch"] == 2, data
    assert data["workflow"] == "app-2"
    rec = (await cluster.view()).active["app"]
    assert (rec.region, rec.epoch, rec.trigger, rec.mode) == ("west", 2, "operator", "planned")
    audit = [e for e in await cluster.history() if e["kind"] == "operator_request"]
    assert audit[0]["by"] == "ops" and audit[0]["result"] == "accepted"
    assert audit[0]["action"] == "switchover" and audit[0]["region"] == "west"
    # Asking again is refused (already active) and audited too.
    status, data = await call(cluster.daemons[member].api, "POST",
                              "/v1/groups/app/switchover", OPERATOR_TOKEN, {"to": "west"})
    assert status == 409 and "already active" in data["message"]


async def test_pause_holds_automatic_failover_and_resume_releases_it(api_cluster: LocalCluster):
    cluster = api_cluster
    api = cluster.daemons["c1"].api
    assert (await call(api, "POST", "/v1/pause", OPERATOR_TOKEN))[0] == 200
    assert (await cluster.view()).control.paused
    cluster.daemons["e1"].kill9()

    async def holding() -> bool:
        return any("paused, holding" in e.get("reason", "")
                   for d in cluster.daemons.values() if d.alive() for e in d.log_events())
    await wait_until(holding, 10, "the coordinator to hold because paused")
    assert (await cluster.view()).active["app"].region == "east"
    assert (await call(api, "POST", "/v1/resume", OPERATOR_TOKEN))[0] == 200
    rec = await cluster.wait_active("app", "west", 5)
    assert rec.trigger == "member_loss"


async def test_drain_removes_a_region_from_candidacy(api_cluster: LocalCluster):
    cluster = api_cluster
    api = cluster.daemons["c1"].api
    status, _ = await call(api, "POST", "/v1/regions/west/drain", OPERATOR_TOKEN)
    assert status == 200
    status, data = await call(api, "POST", "/v1/groups/app/switchover", OPERATOR_TOKEN,
                              {"to": "west"})
    assert status == 409 and "not a candidate: drained" in data["message"]
    cluster.daemons["e1"].kill9()
    rec = await cluster.wait_active("app", "central", 10)
    assert rec.epoch == 2
    # The status comes from the watch-fed mirror, one watch hop behind the
    # record read above.

    async def status_shows_central() -> dict | None:
        st = (await call(api, "GET", "/v1/status", VIEWER_TOKEN))[1]
        return st if st["groups"]["app"]["active"]["region"] == "central" else None
    st = await wait_until(status_shows_central, 5, "the failover in the status",
                          interval=0.1)
    assert st["regions"]["west"]["drained"] is True


async def test_status_is_built_once_a_second_and_afresh_after_a_change(
        api_cluster: LocalCluster):
    """A dashboard wall polling a member gets the same document for up to a
    second (no build per request); an operator's change through the API
    makes the next read a new build."""
    api = api_cluster.daemons["c1"].api

    async def just_built() -> dict | None:
        # The fixture's own reads may have left a document that expires
        # between the two reads below: start from one built just now.
        st = (await call(api, "GET", "/v1/status", VIEWER_TOKEN))[1]
        return st if time.time() - st["as_of"] < 0.2 else None
    first = await wait_until(just_built, 5, "a freshly built status document", interval=0.05)
    again = (await call(api, "GET", "/v1/status", VIEWER_TOKEN))[1]
    assert again["as_of"] == first["as_of"] and again["revision"] == first["revision"]
    assert time.time() - first["as_of"] < 1.5
    status, _ = await call(api, "POST", "/v1/pause", OPERATOR_TOKEN)
    assert status == 200
    fresh = (await call(api, "GET", "/v1/status", VIEWER_TOKEN))[1]
    assert fresh["as_of"] > first["as_of"]

    async def paused() -> bool:
        return bool((await call(api, "GET", "/v1/status", VIEWER_TOKEN))[1]["paused"])
    await wait_until(paused, 5, "the pause in the status", interval=0.1)
    assert (await call(api, "POST", "/v1/resume", OPERATOR_TOKEN))[0] == 200


async def test_a_drain_expires_on_its_own_with_a_history_event(api_cluster: LocalCluster):
    """failoverctl drain REGION --for 3s: the status shows the time left,
    then the coordinator deletes the drain, records drain_expired, and the
    region is a candidate again.  A longer drain than policy.drain_max_s, or
    a duration that is not one, is refused before it reaches etcd."""
    cluster = api_cluster
    api = cluster.daemons["w1"].api
    r = await asyncio.to_thread(ctl, "drain", "central", "--for", "3s", api=api)
    assert r.returncode == 0 and "for 3s" in r.stdout, (r.stdout, r.stderr)
    drains = (await cluster.view()).control.drains
    assert [(d.region, d.by) for d in drains] == [("central", "ops")]  # the token name
    assert 0 < drains[0].until - drains[0].at <= 3.01

    async def shown() -> str | None:
        r = await asyncio.to_thread(ctl, "status", api=api)
        return r.stdout if "! DRAINED central by ops" in r.stdout else None
    text = await wait_until(shown, 5, "the drain in failoverctl status", interval=0.2)
    assert re.search(r"! DRAINED central by ops, [0-3]s left \(until ", text)

    async def expired() -> dict | None:
        events = [e for e in await cluster.history() if e["kind"] == "drain_expired"]
        return events[0] if events else None
    event = await wait_until(expired, 10, "the drain to expire")
    assert (event["region"], event["by"]) == ("central", "ops")
    assert event["ts"] >= event["until"] >= event["drained_at"]
    assert not (await cluster.view()).control.drains

    async def candidate_again() -> bool:
        st = (await call(api, "GET", "/v1/status", VIEWER_TOKEN))[1]
        return not st["regions"]["central"]["drained"] and st["regions"]["central"][
            "drain"] is None
    await wait_until(candidate_again, 5, "central undrained in the status", interval=0.2)

    for body, message in (({"for": "73h"}, "at most 3d"), ({"for": "soon"}, "not a duration"),
                          ({"for": 60}, "for:"), ({"until": "4h"}, "until:")):
        status, data = await call(api, "POST", "/v1/regions/central/drain", OPERATOR_TOKEN,
                                  body)
        assert status == 400 and message in data["message"], (body, data)
    r = await asyncio.to_thread(ctl, "drain", "central", "--for", "soon", api=api)
    assert r.returncode == 2 and "not a duration" in r.stderr
    assert not (await cluster.view()).control.drains


async def test_drill_dry_run_checks_the_live_cluster_and_changes_nothing(
        api_cluster: LocalCluster):
    """failoverctl drill app --to west on the live cluster: every check passes
    (exit 0), the active record is untouched, and the drill is in the history
    and in control/drills/app.  Then make it fail the way operators will
    meet it: the target drained (the engine would pick central), and a
    promote hook that is not executable on the target's member (asked over
    that member's API)."""
    cluster = api_cluster
    api = cluster.daemons["e1"].api
    before = (await cluster.view()).active["app"]
    r = await asyncio.to_thread(ctl, "drill", "app", "--to", "west", api=api)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "✗" not in r.stdout and "PASSED: every check" in r.stdout
    for line in ("✓ engine: a power failure of east moves app to west (planned, epoch 2)",
                 "✓ west members: live: w1", "✓ w1 promote hook: ", "✓ west drain: not drained"):
        assert line in r.stdout, line
    assert "drain_old" in r.stdout and "promote_new" in r.stdout  # the timeline
    after = await cluster.view()
    assert after.active["app"] == before  # nothing moved
    assert after.drills["app"] >= before.since
    drills = [e for e in await cluster.history() if e["kind"] == "drill"]
    assert [(d["group"], d["to"], d["ok"], d["live"]) for d in drills] == [
        ("app", "west", True, False)]

    status, _ = await call(api, "POST", "/v1/regions/west/drain", OPERATOR_TOKEN)
    assert status == 200
    await wait_until(lambda: _mirrored_drain(cluster, "e1"), 5, "e1 to see the drain")
    r = await asyncio.to_thread(ctl, "drill", "app", "--to", "west", api=api)
    assert r.returncode == 1
    assert "✗ west drain: drained: not a candidate" in r.stdout
    assert "✗ engine: a power failure of east moves app to central" in r.stdout
    assert "FAILED: 2 check(s): west drain, engine" in r.stdout
    status, _ = await call(api, "DELETE", "/v1/regions/west/drain", OPERATOR_TOKEN)
    assert status == 200

    hook = cluster.workdir / "hook.sh"
    hook.chmod(0o644)
    try:
        r = await asyncio.to_thread(ctl, "-o", "json", "drill", "app", "--to", "central",
                                    api=api)
    finally:
        hook.chmod(0o755)
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["ok"] is False
    failed = {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}
    assert failed == {"c1 promote hook": f"{hook} is not executable",
                      "c1 demote hook": f"{hook} is not executable",
                      # central is a candidate, not the engine's choice (west is)
                      "engine": "a power failure of east moves app to west (planned, "
                                "epoch 2), not to central"}, failed
    status, _ = await call(api, "POST", "/v1/groups/app/drill", VIEWER_TOKEN, {"to": "west"})
    assert status == 403
    status, _ = await call(api, "POST", "/v1/groups/app/drill", OPERATOR_TOKEN, {"to": "mars"})
    assert status == 404
    assert (await cluster.view()).active["app"] == before


async def test_live_drill_switches_over_holds_and_comes_back(api_cluster: LocalCluster):
    """failoverctl drill app --to west --live --hold 2s: the dry run passes,
    app moves to west (epoch 2, a planned saga), stays 2 s, and comes back
    to east (epoch 3); the drill's timings are recorded.  Refused while
    paused (the dry run says why, nothing moves); an abort during a long
    hold brings the group back at once."""
    cluster = api_cluster
    api = cluster.daemons["c1"].api
    r = await asyncio.to_thread(ctl, "drill", "app", "--to", "west", "--live", "--hold", "2s",
                                api=api, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "LIVE DRILL app -> west started" in r.stdout
    assert "holding" in r.stdout and "returning" in r.stdout
    assert "PASSED: app went to west in" in r.stdout and "came back to east" in r.stdout
    view = await cluster.view()
    assert (view.active["app"].region, view.active["app"].epoch) == ("east", 3)
    d = view.live_drills["app"]
    assert (d.phase, d.home, d.to, d.out_epoch, d.back_epoch) == ("done", "east", "west", 2, 3)
    assert d.out_s is not None and d.back_s is not None and d.out_s > 0 and d.back_s > 0
    assert d.switched_at is not None and d.returned_at is not None
    assert d.returned_at - d.switched_at >= 2.0
    events = await cluster.history()
    moves = [(e["region"], e["epoch"], e["trigger"], e["mode"]) for e in reversed(events)
             if e["kind"] == "epoch_changed" and e["epoch"] > 1]
    assert moves == [("west", 2, "drill", "planned"), ("east", 3, "drill", "planned")]
    live = [e for e in events if e["kind"] == "drill" and e["live"]]
    assert [(e["ok"], e["phase"], e["to"]) for e in live] == [(True, "done", "west")]
    # Each region ran its promote for its epoch, in order.
    promotes = [(h["member"], h["epoch"]) for h in cluster.hooks()
                if h["role"] == "active" and h["epoch"] > 1]
    assert promotes == [("w1", 2), ("e1", 3)]
    assert (await cluster.view()).drills["app"] >= d.started

    # Paused: the dry run fails its "automatic actions" check; nothing moves.
    assert (await call(api, "POST", "/v1/pause", OPERATOR_TOKEN))[0] == 200
    status, body = await call(api, "POST", "/v1/groups/app/drill", OPERATOR_TOKEN,
                              {"to": "west", "live": True})
    assert status == 409 and "automatic actions" in body["message"], body
    assert (await call(api, "POST", "/v1/resume", OPERATOR_TOKEN))[0] == 200
    assert (await cluster.view()).active["app"].epoch == 3
    # A hold of any length is not for a dry run.
    status, body = await call(api, "POST", "/v1/groups/app/drill", OPERATOR_TOKEN,
                              {"to": "west", "hold": "5s"})
    assert status == 400 and "only a live drill" in body["message"]

    # A long hold, aborted: app comes back to east at once, and says aborted.
    r = await asyncio.to_thread(ctl, "drill", "app", "--to", "west", "--live", "--hold", "1h",
                                "--no-wait", api=api)
    assert r.returncode == 0, r.stdout + r.stderr

    async def holding() -> bool:
        return (await cluster.view()).live_drills["app"].phase == "holding"
    await wait_until(holding, 60, "the drill holding in west")
    status, body = await call(api, "GET", "/v1/groups/app/drill", VIEWER_TOKEN)
    assert status == 200 and body["phase"] == "holding" and body["running"] is True
    r = await asyncio.to_thread(ctl, "status", api=api)
    assert re.search(r"! LIVE DRILL app east -> west by ops: holding, \S+ left", r.stdout), \
        r.stdout
    r = await asyncio.to_thread(ctl, "drill", "app", "--abort", api=api)
    assert r.returncode == 0, r.stdout + r.stderr

    async def ended() -> bool:
        return not (await cluster.view()).live_drills["app"].running
    await wait_until(ended, 60, "the aborted drill back in east")
    view = await cluster.view()
    assert view.live_drills["app"].phase == "aborted"
    assert "aborted by ops" in view.live_drills["app"].reason
    assert (view.active["app"].region, view.active["app"].epoch) == ("east", 5)
    # Nothing left to abort.
    r = await asyncio.to_thread(ctl, "drill", "app", "--abort", api=api)
    assert r.returncode == 1 and "no live drill" in r.stderr


async def test_ctrl_c_during_a_live_drill_aborts_it_and_brings_the_group_back(
        api_cluster: LocalCluster):
    """failoverctl follows a live drill; the operator's Ctrl-C asks for an
    abort, and the command keeps following until the group is home."""
    import signal  # noqa: PLC0415

    cluster = api_cluster
    api = cluster.daemons["w1"].api
    proc = subprocess.Popen(
        [sys.executable, "-m", "failoverd.cli.ctl", "--api", api, "--token", OPERATOR_TOKEN,
         "drill", "app", "--to", "west", "--live", "--hold", "1h"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        async def holding() -> bool:
            d = (await cluster.view()).live_drills.get("app")
            return d is not None and d.phase == "holding"
        await wait_until(holding, 60, "the drill holding in west")
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out + err
    assert "aborting: switching back" in out and "FAILED (aborted)" in out, out + err
    view = await cluster.view()
    assert view.live_drills["app"].phase == "aborted"
    assert (view.active["app"].region, view.active["app"].epoch) == ("east", 3)


async def test_a_live_drill_survives_a_change_of_coordinator(api_cluster: LocalCluster):
    """The drill's state is in etcd, not in the coordinator: restart the
    coordinator during the hold, and its successor switches the group back."""
    cluster = api_cluster
    api = cluster.daemons["c1"].api
    # The coordinator to restart must not be west's only member: with the
    # group in west, that is a member loss, and the drill rightly gives way
    # to the evacuation (seen once: aborted "by member_loss").
    seat = await cluster.wait_coordinator(15)
    while seat.member == "w1":
        cluster.restart("w1")
        seat = await cluster.wait_coordinator(30, not_term=seat.term)

    async def all_members() -> bool:
        return len((await cluster.view()).members) == 3
    await wait_until(all_members, 30, "all three members registered")
    status, body = await call(api, "POST", "/v1/groups/app/drill", OPERATOR_TOKEN,
                              {"to": "west", "live": True, "hold": "8s"})
    assert status == 200 and body["live"] is True, body

    async def phase(wanted: str) -> bool:
        return (await cluster.view()).live_drills["app"].phase == wanted
    await wait_until(lambda: phase("holding"), 60, "the drill holding in west")
    seat = (await cluster.view()).coordinator
    cluster.restart(seat.member)
    await cluster.wait_coordinator(30, not_term=seat.term)
    await wait_until(lambda: phase("done"), 60, "the drill done under the new coordinator")
    view = await cluster.view()
    assert (view.active["app"].region, view.active["app"].epoch) == ("east", 3)
    assert view.active["app"].term != seat.term  # the switch back was the successor's


async def _mirrored_drain(cluster: LocalCluster, member: str) -> bool:
    st = (await call(cluster.daemons[member].api, "GET", "/v1/status", VIEWER_TOKEN))[1]
    return bool(st["regions"]["west"]["drained"])


async def test_safety_rule_9_bad_requests_get_json_errors_and_change_nothing(
        api_cluster: LocalCluster):
    cluster = api_cluster
    api = cluster.daemons["w1"].api
    cases = [
        ("/v1/groups/app/switchover", {"to": 5}, None, 400),
        ("/v1/groups/app/switchover", {"to": "west", "extra": 1}, None, 400),
        ("/v1/groups/app/switchover", {}, None, 400),
        ("/v1/groups/app/switchover", None, b"{not json", 400),
        ("/v1/groups/app/failover", {"to": "west", "force": "yes"}, None, 400),
        ("/v1/groups/nope/switchover", {"to": "west"}, None, 404),
        ("/v1/groups/app/switchover", {"to": "mars"}, None, 404),
        ("/v1/regions/mars/drain", None, None, 404),
        ("/v1/groups/app/switchover", None, b'{"to": "' + b"x" * 20000 + b'"}', 413),
    ]
    for path, body, raw, want in cases:
        status, data = await call(api, "POST", path, OPERATOR_TOKEN, body, raw)
        assert status == want, (path, body, status, data)
        assert set(data) == {"error", "message"}, data
    status, data = await call(api, "GET", "/v1/history?limit=banana", VIEWER_TOKEN)
    assert status == 400
    assert (await call(api, "GET", "/healthz"))[0] == 200
    rec = (await cluster.view()).active["app"]
    assert (rec.region, rec.epoch) == ("east", 1)


async def test_metrics(api_cluster: LocalCluster):
    cluster = api_cluster
    coordinator = (await cluster.view()).coordinator.member
    status, text = await call(cluster.daemons[coordinator].api, "GET", "/metrics")
    assert status == 200
    assert "failoverd_is_coordinator 1.0" in text
    assert 'failoverd_epoch{group="app"} 1.0' in text
    assert 'failoverd_active_region{group="app",region="east"} 1.0' in text
    assert "failoverd_etcd_op_seconds_bucket" in text


def test_openapi_document_matches_the_routes() -> None:
    app = Api(None, None, None, asyncio.Event()).app()  # type: ignore[arg-type]
    served = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    doc = openapi_document()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    assert doc["openapi"].startswith("3.1")
    for path, ops in doc["paths"].items():
        for op in ops.values():
            if "{" in path:
                assert {p["name"] for p in op["parameters"]} >= {
                    seg[1:-1] for seg in path.split("/") if seg.startswith("{")}


def ctl(*args: str, api: str, token: str | None = OPERATOR_TOKEN,
        timeout: float = 30) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "failoverd.cli.ctl", "--api", api]
    if token:
        cmd += ["--token", token]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


async def test_failoverctl_end_to_end(api_cluster: LocalCluster):
    cluster = api_cluster
    api = cluster.daemons["w1"].api
    r = await asyncio.to_thread(ctl, "status", api=api)
    assert r.returncode == 0, r.stderr
    assert "coordinator" in r.stdout and "east" in r.stdout and "app" in r.stdout
    r = await asyncio.to_thread(ctl, "-o", "json", "status", api=api)
    assert set(json.loads(r.stdout)["regions"]) == set(REGIONS)
    r = await asyncio.to_thread(ctl, "switchover", "app", "--to", "west", api=api)
    assert r.returncode == 0 and "accepted" in r.stdout and "epoch 2" in r.stdout, r.stderr
    r = await asyncio.to_thread(ctl, "switchover", "app", "--to", "west", api=api)
    assert r.returncode == 1 and "already active" in r.stderr
    r = await asyncio.to_thread(ctl, "failover", "app", "--to", "east", api=api)
    assert r.returncode == 2 and "--yes" in r.stderr  # no terminal to ask on
    r = await asyncio.to_thread(ctl, "failover", "app", "--to", "east", "--yes", api=api)
    assert r.returncode == 0, r.stderr
    for cmd in (("pause",), ("resume",), ("drain", "central"), ("undrain", "central")):
        r = await asyncio.to_thread(ctl, *cmd, api=api)
        assert r.returncode == 0, (cmd, r.stderr)
    r = await asyncio.to_thread(ctl, "history", "--limit", "50", api=api)
    assert r.returncode == 0 and r.stdout.count("operator_request") >= 6
    r = await asyncio.to_thread(ctl, "-o", "json", "history", api=api)
    assert json.loads(r.stdout)["events"]
    r = await asyncio.to_thread(ctl, "pause", api=api, token=VIEWER_TOKEN)
    assert r.returncode == 1 and "forbidden" in r.stderr
    r = await asyncio.to_thread(ctl, "drain", "mars", api=api)
    assert r.returncode == 2
    r = await asyncio.to_thread(ctl, "status", api=f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 3 and "cannot reach" in r.stderr


async def test_api_over_tls(tmp_path: Path) -> None:
    """With a certificate configured the listener speaks HTTPS (checked with
    a real self-signed certificate made by openssl)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port = free_port()
    me = SimpleNamespace(member="m1", region="east")
    api = Api(None, None, lambda: me, asyncio.Event())  # type: ignore[arg-type]
    task = asyncio.create_task(serve_api(api, ApiSettings(
        listen=f"127.0.0.1:{port}", tls_cert_file=cert, tls_key_file=key)))
    try:
        await wait_until(lambda: _ready(api), 5, "TLS listener")
        ctx = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as s, s.get(
                f"https://127.0.0.1:{port}/healthz", ssl=ctx) as r:
            body = await r.json()
            assert r.status == 200 and body["status"] == "ok"
            assert (body["member"], body["region"]) == ("m1", "east")
        with pytest.raises(aiohttp.ClientError):
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz"):
                pass
    finally:
        task.cancel()


async def _ready(api: Api) -> bool:
    return api.ready


def test_the_rate_limiter_allows_a_burst_then_the_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.wait_s("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait_s("a") == pytest.approx(0.5)  # empty: one more in 1/rate
    assert limiter.wait_s("b") == 0.0  # keys are separate
    now[0] += 0.5
    assert limiter.wait_s("a") == 0.0
    assert limiter.wait_s("a") > 0
    now[0] += 100  # refills up to the burst, not beyond
    assert [limiter.wait_s("a") for _ in range(4)][-1] > 0


async def _etcd_ranges(etcd: EtcdCluster) -> float:
    """Range (read) calls etcd has served, from its own metrics."""
    async with aiohttp.ClientSession() as s, s.get(etcd.members[0].metrics_url) as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("grpc_server_handled_total")
               and 'grpc_method="Range"' in line)


async def test_a_busy_dashboard_is_rate_limited_and_reads_no_etcd(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str):
    """200 status requests from one token: the first rate_burst are served
    from the member's watch-fed view (no etcd read per request), the rest get
    429 with Retry-After; another token and /healthz are not held back."""
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, {"east": 100, "west": 50},
                     {"app": ["east", "west"]})
    c.config = c.config_variant("limited", api_settings={"rate_per_token": 2, "rate_burst": 20})
    try:
        c.add("e1", "east")
        c.add("w1", "west")
        await c.wait_active("app", "east", 10)
        api = c.daemons["e1"].api
        await wait_until(lambda: _api_ready(api), 10, "e1's API ready")
        before = await _etcd_ranges(etcd)
        headers = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
        async with aiohttp.ClientSession() as s:
            async def one(path: str, h: dict[str, str]) -> tuple[int, str | None]:
                async with s.get(api + path, headers=h) as r:
                    await r.read()
                    return r.status, r.headers.get("Retry-After")
            answers = await asyncio.gather(*(one("/v1/status", headers) for _ in range(200)))
            ops = await one("/v1/status", {"Authorization": f"Bearer {OPERATOR_TOKEN}"})
            health = await asyncio.gather(*(one("/healthz", {}) for _ in range(100)))
        ranges = await _etcd_ranges(etcd) - before
        codes = [code for code, _ in answers]
        assert 20 <= codes.count(200) <= 24, codes  # the burst, and what refilled meanwhile
        assert codes.count(429) == 200 - codes.count(200)
        assert all(int(after) >= 1 for code, after in answers if code == 429)
        assert ops[0] == 200 and all(code == 200 for code, _ in health)
        assert ranges < 20, ranges  # background reads only, not one per request
    finally:
        await c.close()


async def _api_ready(api: str) -> bool:
    try:
        return (await call(api, "GET", "/readyz"))[0] == 200
    except aiohttp.ClientError:
        return False
