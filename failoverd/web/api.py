"""The REST API every member serves (aiohttp), per DESIGN.md.

Reads come from one etcd snapshot.  Mutations are written to
``control/requests/<id>``; the coordinator carries each out (or refuses it),
audits it and answers in ``control/results/<id>``; the HTTP reply waits for
that answer (``REQUEST_DEADLINE_S``, then 503 and the request is withdrawn).
Bearer tokens are stored as SHA-256 digests and compared in constant time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from failoverd import __version__, metrics
from failoverd.config import ApiSettings, GroupSettings, RegionSettings, Settings, engine_policy
from failoverd.core.data import data_state, newest_report
from failoverd.core.drill import MAX_HOLD_S
from failoverd.core.durations import format_duration, parse_duration
from failoverd.core.engine import (
    Policy,
    failover_budget_s,
    is_drained,
    power_of,
    region_health,
)
from failoverd.core.model import ClusterView, Keyspace, LiveDrill, OperatorRequest, parse_view
from failoverd.core.power import explain_sensor, merge
from failoverd.core.store import Compare, Delete, Store, StoreError
from failoverd.web.statuspage import render_page

log = structlog.get_logger("failoverd.web.api")

MAX_BODY = 16 * 1024
REQUEST_DEADLINE_S = 10.0
ROLE_RANK = {"viewer": 1, "operator": 2}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# Routes no limit applies to: rule 4's peer check and systemd ask them, and
# they read nothing from etcd.
UNLIMITED = frozenset({"/healthz", "/readyz"})
LIMITED_KEYS_MAX = 10_000
# How long a built status document is served again while nothing changed.
STATUS_REUSE_S = 1.0


class RateLimiter:
    """A token bucket per key (a token's name, or a client address).

    :meth:`wait_s` takes one request's token and says 0, or how long until
    the key may ask again.  Keeps at most ``LIMITED_KEYS_MAX`` keys (the
    least recently seen go first): addresses are remote-chosen."""

    def __init__(self, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst = rate, burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def wait_s(self, key: str) -> float:
        now = self._clock()
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        while len(self._buckets) > LIMITED_KEYS_MAX:
            del self._buckets[next(iter(self._buckets))]
        return wait


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SwitchoverBody(Body):
    to: str


class FailoverBody(Body):
    to: str
    force: bool = False
    accept_data_loss: bool = Field(
        default=False, description="With force, into a region whose database is behind (or "
        "not known to be current): the operator accepts losing what it has not replayed; "
        "the estimate is recorded")


class DrillBody(Body):
    to: str
    live: bool = Field(default=False, description="A real planned switchover to the region, "
                       "a hold, and a switchover back (the dry run's checks must pass first)")
    hold: str | None = Field(default=None, description='Live: how long to hold in the region '
                             'before switching back: "90s", "15m" (default 60s)')


# (group, to, by, the caller's Authorization header) -> the drill's report.
DrillRunner = Callable[[str, str, str, str], Awaitable[dict[str, Any]]]


class DrainBody(Body):
    for_: str | None = Field(
        default=None, alias="for",
        description='How long: "90s", "15m", "4h", "3d" (default policy.drain_default_s, '
                    'at most policy.drain_max_s)')


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    role: str | None  # None: open
    summary: str
    body: type[Body] | None = None
    body_required: bool = True


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/status", "viewer", "Cluster status: coordinator, members, regions, groups"),
    Route("GET", "/v1/history", "viewer", "Audit events, newest first (?limit=N, max 1000)"),
    Route("POST", "/v1/groups/{group}/switchover", "operator",
          "Planned switchover of a group to a region", SwitchoverBody),
    Route("POST", "/v1/groups/{group}/failover", "operator",
          "Failover of a group to a region (force skips the candidate rules)", FailoverBody),
    Route("POST", "/v1/groups/{group}/retry", "operator",
          "Run a failed saga again from its failed step"),
    Route("POST", "/v1/pause", "operator", "Stop automatic actions"),
    Route("POST", "/v1/resume", "operator", "Resume automatic actions"),
    Route("POST", "/v1/regions/{region}/drain", "operator",
          "Take a region out of candidacy for a while (the drain expires)", DrainBody,
          body_required=False),
    Route("DELETE", "/v1/regions/{region}/drain", "operator", "Return a region to candidacy"),
    Route("POST", "/v1/groups/{group}/drill", "operator",
          "Dry-run drill: would a power failure move the group to this region, and would "
          "it work? Changes nothing but the audit trail", DrillBody),
    Route("POST", "/v1/groups/{group}/drill/abort", "operator",
          "End the group's live drill now: it switches back once the target serves it"),
    Route("GET", "/v1/groups/{group}/drill", "viewer",
          "The group's live drill: running, or the last one"),
    Route("GET", "/v1/drill/hooks", "operator",
          "This member's hooks for a group (?group=G): present and executable (drills ask "
          "each member of the target region)"),
    Route("GET", "/v1/openapi.json", "viewer", "This document"),
    Route("GET", "/healthz", None, "Liveness"),
    Route("GET", "/readyz", None, "Ready: store reachable and API up"),
    Route("GET", "/metrics", "metrics", "Prometheus metrics"),
    Route("GET", "/", None, "The status page (HTML; its script needs a viewer token)"),
)


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


class Api:
    """The REST API and status page of one member (the ``api`` task).

    Owns no cluster state: reads come from the store (status from one
    snapshot, history through the injected reader); mutations become
    requests in etcd that the coordinator answers, and the handler waits
    for the answer (10 s, then 503 and the request is withdrawn).  Bearer
    tokens are checked against their SHA-256 digests.  Errors: every
    failure is a JSON error with a status code (400 bad input, 401/403,
    404, 409 refused, 413 too large, 503 no answer); nothing reaches the
    client as a traceback.
    """

    def __init__(self, store: Store, keys: Keyspace, settings: Callable[[], Settings],
                 results_changed: asyncio.Event,
                 epochs: Callable[[], dict[str, int]] = dict,
                 history: Callable[[int], Awaitable[list[dict[str, object]]]] | None = None,
                 polls: Callable[[], Mapping[str, Mapping[str, object]]] = dict,
                 refused: Callable[[], Mapping[str, Mapping[str, Any]]] = dict,
                 cached_view: Callable[[], ClusterView | None] = lambda: None,
                 drill: DrillRunner | None = None,
                 hook_checks: Callable[[str], list[dict[str, Any]]] = lambda group: []
                 ) -> None:
        self._store = store
        self._drill = drill
        self._hook_checks = hook_checks
        self._polls = polls
        self._cached_view = cached_view
        self._status_built: tuple[Settings, float, bytes] | None = None
        self._limiter: RateLimiter | None = None
        self._in_flight: tuple[int, asyncio.Semaphore] | None = None
        self._refused = refused
        self._history = history
        self._epochs = epochs
        self._keys = keys
        self._settings = settings
        self._results_changed = results_changed
        self.ready = False
        self.listening = asyncio.Event()

    # -- plumbing ---------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY,
                              middlewares=[self._errors, self._limits, self._auth])
        handlers: dict[tuple[str, str], Handler] = {
            ("GET", "/v1/status"): self.status,
            ("GET", "/v1/history"): self.history,
            ("POST", "/v1/groups/{group}/switchover"): self.switchover,
            ("POST", "/v1/groups/{group}/failover"): self.failover,
            ("POST", "/v1/groups/{group}/retry"): self.retry,
            ("POST", "/v1/pause"): self.pause,
            ("POST", "/v1/resume"): self.resume,
            ("POST", "/v1/regions/{region}/drain"): self.drain,
            ("DELETE", "/v1/regions/{region}/drain"): self.undrain,
            ("POST", "/v1/groups/{group}/drill"): self.drill,
            ("GET", "/v1/drill/hooks"): self.drill_hooks,
            ("POST", "/v1/groups/{group}/drill/abort"): self.drill_abort,
            ("GET", "/v1/groups/{group}/drill"): self.live_drill,
            ("GET", "/v1/openapi.json"): self.openapi,
            ("GET", "/healthz"): self.healthz,
            ("GET", "/readyz"): self.readyz,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/"): self.page,
        }
        for r in ROUTES:
            app.router.add_route(r.method, r.path, handlers[(r.method, r.path)])
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
                    413: "too_large"}.get(exc.status, "http_error")
            resp = error(exc.status, code, exc.reason)
            if "Allow" in exc.headers:  # RFC 9110: a 405 says what is allowed
                resp.headers["Allow"] = exc.headers["Allow"]
        except StoreError as exc:
            resp = error(503, "store_unavailable", str(exc))
        metrics.API_REQUESTS.labels(name, str(resp.status)).inc()
        if request.method != "GET":
            self._status_built = None  # the writer's next status read is fresh
        return resp

    @web.middleware
    async def _limits(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Per-token (else per-address) rate limit and a bound on requests
        in flight: a busy dashboard or a script in a loop must not take the
        control loop's CPU or etcd's time."""
        if request.path in UNLIMITED:
            return await handler(request)
        api = self._settings().api
        if self._limiter is None or (self._limiter.rate, self._limiter.burst) != (
                api.rate_per_token, api.rate_burst):
            self._limiter = RateLimiter(api.rate_per_token, api.rate_burst)
        who = request["who"] = self._role_of(request)  # _auth reads it: one hash
        key = f"token {who[0]}" if who else f"address {request.remote}"
        wait = self._limiter.wait_s(key)
        if wait > 0:
            resp = error(429, "too_many_requests",
                         f"over {api.rate_per_token:g} requests/s for {key}; "
                         f"retry in {wait:.1f}s")
            resp.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            return resp
        if self._in_flight is None or self._in_flight[0] != api.max_concurrent_requests:
            self._in_flight = (api.max_concurrent_requests,
                               asyncio.Semaphore(api.max_concurrent_requests))
        slots = self._in_flight[1]  # released to the one it was taken from
        try:
            async with asyncio.timeout(1.0):
                await slots.acquire()
        except TimeoutError:
            resp = error(503, "busy", f"{api.max_concurrent_requests} requests in flight "
                                      "(api.max_concurrent_requests)")
            resp.headers["Retry-After"] = "1"
            return resp
        try:
            return await handler(request)
        finally:
            slots.release()

    def _role_of(self, request: web.Request) -> tuple[str, str] | None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return None
        digest = hashlib.sha256(header[len("Bearer "):].strip().encode()).hexdigest()
        found = None
        for t in self._settings().api.tokens:  # no early exit: constant time over tokens
            if hmac.compare_digest(digest, t.sha256):
                found = (t.name, t.role)
        return found

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = next((r for r in ROUTES if request.match_info.route.resource is not None
                      and r.path == request.match_info.route.resource.canonical
                      and r.method == request.method), None)
        need = route.role if route is not None else None
        if need == "metrics":
            need = None if self._settings().api.metrics_public else "viewer"
        if need is not None:
            who = request["who"] if "who" in request else self._role_of(request)
            if who is None:
                return error(401, "unauthorized", "a valid bearer token is required")
            if ROLE_RANK[who[1]] < ROLE_RANK[need]:
                return error(403, "forbidden", f"this needs the {need} role")
            request["token"] = who[0]
        return await handler(request)

    # -- reads ------------------------------------------------------------
    async def _view(self) -> ClusterView:
        """The member's watch-fed view when it has one (no etcd read per
        request: a dashboard polling every member must not load etcd), else
        a snapshot."""
        cached = self._cached_view()
        if cached is not None:
            return cached
        snap = await self._store.snapshot(self._keys.prefix, exclude=("history/",))
        return parse_view(self._keys, snap)

    async def status(self, request: web.Request) -> web.Response:
        """The status document, built at most once per STATUS_REUSE_S: a
        dashboard wall polling every member must not cost the control loop
        a build per request (sensor readings alone change many times a
        second).  A change made through this API, or a reload, builds it
        afresh: an operator reads their own write."""
        settings = self._settings()
        now = time.monotonic()
        reuse = self._status_built
        if reuse is not None and reuse[0] is settings and now < reuse[1]:
            body = reuse[2]
        else:
            body = json.dumps(status_document(await self._view(), settings, time.time(),
                                              self._polls(), self._refused())).encode()
            self._status_built = (settings, now + STATUS_REUSE_S, body)
        return web.Response(body=body, content_type="application/json")

    async def history(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            return error(400, "bad_request", "limit must be an integer")
        if not 1 <= limit <= 1000:
            return error(400, "bad_request", "limit must be between 1 and 1000")
        if self._history is None:
            return error(503, "unavailable", "no history reader")
        return web.json_response({"events": await self._history(limit)})

    async def healthz(self, request: web.Request) -> web.Response:
        # The epochs this member last read: peers cut off from etcd use them
        # to tell "still current" from "replaced" (safety rule 4).
        s = self._settings()
        return web.json_response({"status": "ok", "version": __version__,
                                  "member": s.member, "region": s.region,
                                  "epochs": self._epochs()})

    async def readyz(self, request: web.Request) -> web.Response:
        try:
            await self._store.get(self._keys.coordinator)
        except StoreError as exc:
            return error(503, "store_unavailable", str(exc))
        return web.json_response({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest())
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    async def page(self, request: web.Request) -> web.Response:
        s = self._settings()
        return web.Response(text=render_page(s.cluster, s.member), content_type="text/html",
                            headers={"Content-Security-Policy": "default-src 'self'; "
                                     "script-src 'unsafe-inline' 'self'; "
                                     "style-src 'unsafe-inline'"})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    # -- mutations --------------------------------------------------------
    async def _body(self, request: web.Request, model: type[Body]) -> Body | web.Response:
        raw = await request.read()  # raises 413 past client_max_size
        try:
            return model.model_validate_json(raw or b"{}")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return error(400, "bad_request", f"{where}: {first['msg']}")

    async def _group_region(self, request: web.Request, model: type[Body]
                            ) -> tuple[str, Body] | web.Response:
        group = self._known_group(request)
        if isinstance(group, web.Response):
            return group
        body = await self._body(request, model)
        if isinstance(body, web.Response):
            return body
        to = getattr(body, "to", "")
        if self._settings().region_by_name(to) is None:
            return error(404, "not_found", f"unknown region {to!r}")
        return group, body

    async def switchover(self, request: web.Request) -> web.Response:
        parsed = await self._group_region(request, SwitchoverBody)
        if isinstance(parsed, web.Response):
            return parsed
        group, body = parsed
        return await self._submit(request, "switchover", group=group,
                                  region=getattr(body, "to", None))

    async def failover(self, request: web.Request) -> web.Response:
        parsed = await self._group_region(request, FailoverBody)
        if isinstance(parsed, web.Response):
            return parsed
        group, body = parsed
        return await self._submit(request, "failover", group=group,
                                  region=getattr(body, "to", None),
                                  force=bool(getattr(body, "force", False)),
                                  accept_data_loss=bool(getattr(body, "accept_data_loss",
                                                                False)))

    def _known_group(self, request: web.Request) -> str | web.Response:
        """The path's group, or a 404 when the config has no such group."""
        group = request.match_info["group"]
        if self._settings().group_by_name(group) is None:
            return error(404, "not_found", f"unknown group {group!r}")
        return group

    async def _group_action(self, request: web.Request, action: str) -> web.Response:
        """A request that names only its group (retry, drill_abort)."""
        group = self._known_group(request)
        if isinstance(group, web.Response):
            return group
        return await self._submit(request, action, group=group)

    async def retry(self, request: web.Request) -> web.Response:
        return await self._group_action(request, "retry")

    async def pause(self, request: web.Request) -> web.Response:
        return await self._submit(request, "pause")

    async def resume(self, request: web.Request) -> web.Response:
        return await self._submit(request, "resume")

    async def drain(self, request: web.Request) -> web.Response:
        region = request.match_info["region"]
        if self._settings().region_by_name(region) is None:
            return error(404, "not_found", f"unknown region {region!r}")
        body = await self._body(request, DrainBody)
        if isinstance(body, web.Response):
            return body
        for_s = _body_duration("for", body.for_ if isinstance(body, DrainBody) else None,
                               self._settings().policy.drain_max_s,
                               "a drain lasts at most {} (policy.drain_max_s)")
        if isinstance(for_s, web.Response):
            return for_s
        return await self._submit(request, "drain", region=region, for_s=for_s)

    async def drill(self, request: web.Request) -> web.Response:
        parsed = await self._group_region(request, DrillBody)
        if isinstance(parsed, web.Response):
            return parsed
        group, body = parsed
        if self._drill is None:
            return error(503, "unavailable", "drills are not wired on this member")
        hold_s = _body_duration("hold", body.hold if isinstance(body, DrillBody) else None,
                                MAX_HOLD_S, "at most {}")
        if isinstance(hold_s, web.Response):
            return hold_s
        live = isinstance(body, DrillBody) and body.live
        if hold_s is not None and not live:
            return error(400, "bad_request", "hold: only a live drill holds")
        report = await self._drill(group, getattr(body, "to", ""),
                                   str(request.get("token", "?")),
                                   request.headers.get("Authorization", ""))
        if not live:
            return web.json_response(report)
        if not report.get("ok"):
            # The dry run's checks gate the live run: nothing is switched.
            failed = [c["name"] for c in report.get("checks", []) if not c.get("ok")]
            return web.json_response(
                {"error": "refused", "message": "live drill refused: the dry run failed "
                 f"({', '.join(failed)})", "report": report}, status=409)
        answer = await self._accepted(request, "drill", group=group,
                                      region=getattr(body, "to", None), force=False,
                                      for_s=hold_s)
        if isinstance(answer, web.Response):
            return answer
        return web.json_response({**answer, "report": report, "live": True})

    async def drill_abort(self, request: web.Request) -> web.Response:
        return await self._group_action(request, "drill_abort")

    async def live_drill(self, request: web.Request) -> web.Response:
        group = self._known_group(request)
        if isinstance(group, web.Response):
            return group
        d = (await self._view()).live_drills.get(group)
        if d is None:  # none yet: an answer, not an error
            return web.json_response({"group": group, "phase": None, "running": False})
        return web.json_response(live_drill_summary(d))

    async def drill_hooks(self, request: web.Request) -> web.Response:
        group = request.query.get("group", "")
        if self._settings().group_by_name(group) is None:
            return error(404, "not_found", f"unknown group {group!r}")
        return web.json_response({"member": self._settings().member,
                                  "checks": self._hook_checks(group)})

    async def undrain(self, request: web.Request) -> web.Response:
        region = request.match_info["region"]
        if self._settings().region_by_name(region) is None:
            return error(404, "not_found", f"unknown region {region!r}")
        return await self._submit(request, "undrain", region=region)

    async def _submit(self, request: web.Request, action: str, *, group: str | None = None,
                      region: str | None = None, force: bool = False,
                      for_s: float | None = None, accept_data_loss: bool = False
                      ) -> web.Response:
        answer = await self._accepted(request, action, group=group, region=region,
                                      force=force, for_s=for_s,
                                      accept_data_loss=accept_data_loss)
        return answer if isinstance(answer, web.Response) else web.json_response(answer)

    async def _accepted(self, request: web.Request, action: str, *, group: str | None,
                        region: str | None, force: bool, for_s: float | None,
                        accept_data_loss: bool = False) -> dict[str, Any] | web.Response:
        """Hand an operator request to the coordinator: its answer when
        accepted, else the error response (409 refused, 503 no answer)."""
        req = OperatorRequest(id=f"{time.time_ns():020d}-{secrets.token_hex(4)}",
                              action=action, by=str(request.get("token", "?")), at=time.time(),
                              group=group, region=region, force=force, for_s=for_s,
                              accept_data_loss=accept_data_loss)
        rev = await self._store.put(self._keys.request(req.id), req.to_value())
        result = await self._await_result(req.id)
        if result is None:
            withdrawn = await self._store.txn([Compare(self._keys.request(req.id), "create",
                                                       rev)],
                                              [Delete(self._keys.request(req.id))])
            if withdrawn.succeeded:
                return error(503, "no_coordinator",
                             f"no coordinator answered within {REQUEST_DEADLINE_S:.0f}s; "
                             "the request was withdrawn")
            result = await self._await_result(req.id)
            if result is None:
                return error(503, "no_coordinator", "the coordinator took the request but "
                             "has not answered; see /v1/history")
        if result.get("status") != "accepted":
            return error(409, "refused", str(result.get("reason", "refused")))
        epoch = result.get("epoch")
        return {"request": req.id, "status": "accepted", "reason": result.get("reason"),
                "epoch": epoch, "workflow": f"{group}-{epoch}" if group and epoch else None}

    async def _await_result(self, request_id: str) -> dict[str, Any] | None:
        deadline = time.monotonic() + REQUEST_DEADLINE_S
        key = self._keys.result(request_id)
        while True:
            self._results_changed.clear()
            kv = await self._store.get(key)
            if kv is not None:
                data = json.loads(kv.value)
                return data if isinstance(data, dict) else None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                async with asyncio.timeout(min(left, 0.5)):
                    await self._results_changed.wait()
            except TimeoutError:
                pass


def power_document(view: ClusterView, policy: Policy, region: RegionSettings, now: float,
                   polls: Mapping[str, Mapping[str, object]],
                   refused: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A region's power as the engine concludes it, every sensor with the
    rule that applies to it, and the region's polled sources."""
    p = power_of(view, policy, region.name, now)
    budget = failover_budget_s(view, policy)
    merged = merge({k: v for k, v in view.power.items() if k[0] == region.name})
    sensors = [asdict(explain_sensor(r, now, grace_s=policy.power_grace_s,
                                     stale_s=policy.sensor_stale_s,
                                     silence_s=policy.power_silence_during_outage_s,
                                     budget_s=budget))
               for r in merged.get(region.name, [])]
    heard = {x["sensor"] for x in sensors}
    sources = [{"sensor": src.sensor, "kind": src.kind, "target": src.where,
                "reading": src.sensor in heard,
                # Only the members of the region poll it: the one answering
                # knows how its own polls go.
                **({"poll": dict(polls[src.sensor])} if src.sensor in polls else {})}
               for src in region.power_sources]
    return {"state": p.state, "runtime_s": p.runtime_s, "detail": p.detail,
            "evidence": list(p.evidence), "quorum": p.quorum, "minority": list(p.minority),
            "budget_s": budget, "sensors": sensors, "sources": sources,
            # Sensor names this member refused (max_sensors_per_region).
            "refused": dict(refused or {"messages": 0, "names": []})}


def _drain_document(view: ClusterView, policy: Policy, region: str, now: float
                    ) -> dict[str, Any] | None:
    d = next((d for d in view.control.drains if d.region == region), None)
    if d is None:
        return None
    until = d.ends(policy.drain_max_s)
    if not math.isfinite(until):  # written by hand: the coordinator gives it an end
        return {"by": d.by, "at": d.at, "until": None, "left_s": None}
    return {"by": d.by, "at": d.at, "until": until, "left_s": max(until - now, 0.0)}


def status_document(view: ClusterView, s: Settings, now: float,
                    polls: Mapping[str, Mapping[str, object]] | None = None,
                    refused: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    policy = engine_policy(s)
    regions: dict[str, Any] = {}
    for r in s.regions:
        h = region_health(view, policy, r.name)
        regions[r.name] = {
            "priority": r.priority,
            "members": [m.member for m in view.members_in(r.name)],
            "health": {"verdict": h.verdict, "ready": h.ready, "quorum": h.quorum,
                       "votes": dict(h.votes)},
            "power": power_document(view, policy, r, now, polls or {},
                                    (refused or {}).get(r.name)),
            "drained": is_drained(view, policy, r.name, now),
            "drain": _drain_document(view, policy, r.name, now),
            "active_for": sorted(g for g, rec in view.active.items() if rec.region == r.name),
        }
    return {
        "cluster": s.cluster,
        "revision": view.revision,
        "coordinator": ({"member": view.coordinator.member, "term": view.coordinator.term}
                        if view.coordinator else None),
        "members": {m.member: {"region": m.region, "version": m.version, "api": m.api_url,
                               "started": m.started} for m in view.members.values()},
        "regions": regions,
        "groups": {g.name: {"regions": g.regions,
                            "active": ({"region": rec.region, "epoch": rec.epoch,
                                        "since": rec.since, "reason": rec.reason,
                                        "trigger": rec.trigger, "mode": rec.mode}
                                       if (rec := view.active.get(g.name)) else None),
                            "workflow": (wf.summary() if (wf := view.workflows.get(g.name))
                                         else None),
                            **({"data": data_document(view, g)} if g.database else {})}
                   for g in s.groups},
        "paused": view.control.paused,
        # Live drills, running or the last of each group.
        "live_drills": {g: live_drill_summary(d) for g, d in sorted(view.live_drills.items())},
        # Incidents of the last hour (evacuations, failback waves): the
        # cluster-wide storm guard's memory, newest first.
        "evacuations": [{"kind": i.kind, "region": i.region, "trigger": i.trigger,
                         "at": i.at, "reason": i.reason, "groups": i.groups, "held": i.held}
                        for i in sorted(view.control.incidents, key=lambda i: -i.at)
                        if now - i.at < 3600],
        # When this document was built (from "revision"): it is served
        # again for up to a second (Api.status).
        "as_of": now,
    }


def data_document(view: ClusterView, g: GroupSettings) -> dict[str, Any]:
    """A database group's copies, region by region: role, lag, and whether
    the data guard lets the region take over (with why not)."""
    assert g.database is not None
    rec = view.active.get(g.name)
    reports = view.data.get(g.name, {})
    out: dict[str, Any] = {"max_lag_bytes": g.database.max_lag_bytes, "regions": {}}
    for region in g.regions:
        st = data_state(reports, region, rec.region if rec else None, g.database.max_lag_bytes)
        mine = newest_report(reports.values(), region)
        out["regions"][region] = {
            "role": mine.role if mine else None, "lag_bytes": st.lag_bytes,
            "lag_s": mine.lag_s if mine else None,
            "streaming": mine.streaming if mine else None,
            "paused": mine.paused if mine else None, "at": mine.at if mine else None,
            "error": mine.error if mine else None, "ok": st.ok, "why": st.why}
    return out


def _body_duration(field: str, text: str | None, most: float, too_long: str
                   ) -> float | web.Response | None:
    """A duration field of a body ("90s", "4h") in seconds; None when
    absent; a 400 when malformed or longer than ``most``."""
    if text is None:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        return error(400, "bad_request", f"{field}: {exc}")
    if seconds > most:
        return error(400, "bad_request", f"{field}: " + too_long.format(format_duration(most)))
    return seconds


def live_drill_summary(d: LiveDrill) -> dict[str, Any]:
    out = asdict(d)
    out.pop("mod_revision")
    out["running"] = d.running
    return out


def openapi_document() -> dict[str, Any]:
    err = {"description": "error", "content": {"application/json": {"schema": {
        "type": "object", "required": ["error", "message"],
        "properties": {"error": {"type": "string"}, "message": {"type": "string"}}}}}}
    paths: dict[str, Any] = {}
    for r in ROUTES:
        op: dict[str, Any] = {"summary": r.summary, "responses": {
            "200": {"description": "ok", "content": {"application/json": {"schema": {}}}}}}
        if r.role not in {None, "metrics"}:
            op["security"] = [{"bearer": []}]
            op["responses"] |= {"401": err, "403": err}
        if r.method != "GET" or r.path == "/v1/history":
            op["responses"] |= {"400": err, "404": err, "409": err, "413": err, "503": err}
        if r.path == "/v1/drill/hooks" or "{group}" in r.path or "{region}" in r.path:
            op["responses"]["404"] = err  # an unknown group or region
        if r.path == "/readyz":
            op["responses"]["503"] = err
        if r.path not in UNLIMITED:  # api.rate_per_token, api.max_concurrent_requests
            op["responses"] |= {"429": err, "503": err}
        params: list[dict[str, Any]] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in ("group", "region") if "{" + p + "}" in r.path]
        if r.path == "/v1/history":
            params.append({"name": "limit", "in": "query", "required": False,
                           "schema": {"type": "integer", "minimum": 1, "maximum": 1000}})
        if r.path == "/v1/drill/hooks":
            params.append({"name": "group", "in": "query", "required": True,
                           "schema": {"type": "string"}})
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": r.body_required, "content": {"application/json": {
                "schema": r.body.model_json_schema()}}}
        if r.path == "/metrics":
            op["responses"]["200"] = {"description": "Prometheus text format",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}}
        if r.path == "/":
            op["responses"]["200"] = {"description": "HTML",
                                      "content": {"text/html": {"schema": {"type": "string"}}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "failoverd", "version": __version__},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }


async def serve_api(api: Api, settings: ApiSettings) -> None:
    """Run the API until cancelled (a task of the daemon's TaskGroup).

    A port that cannot be bound is retried: the API must never take the
    failover machinery down with it.
    """
    listen = settings.listen
    host, _, port = listen.rpartition(":")
    context = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    runner = web.AppRunner(api.app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        while True:
            try:
                await web.TCPSite(runner, host.strip("[]") or "127.0.0.1", int(port),
                                  ssl_context=context).start()
                break
            except OSError as exc:
                log.error("api cannot listen; retrying", listen=listen, error=str(exc))
                await asyncio.sleep(5)
        api.ready = True
        api.listening.set()
        log.info("api listening", listen=listen, tls=context is not None)
        await asyncio.Event().wait()
    finally:
        api.ready = False
        api.listening.clear()
        await runner.cleanup()
