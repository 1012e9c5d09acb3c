"""Routers against real HAProxy and a real authoritative BIND 9 on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from devstack.stack import Bind, Haproxy, HttpService, free_port
from failoverd.config import DnsRoute, ExecRoute, HaproxyRoute, WebhookRoute
from failoverd.traffic.routers import (
    ADMIN_DRAIN,
    ADMIN_MAINT,
    Change,
    DnsRouter,
    ExecRouter,
    FencedOut,
    HaproxyRouter,
    RouterError,
    WebhookRouter,
    runtime_api_answers,
)

ADDRS = {"east": ["192.0.2.10"], "west": ["198.51.100.10", "198.51.100.11"]}


@pytest.fixture
async def haproxy(tmp_path: Path) -> AsyncIterator[tuple[Haproxy, dict[str, HttpService]]]:
    apps = {r: await HttpService(r).start() for r in ("east", "west")}
    hp = Haproxy(tmp_path, {r: s.port for r, s in apps.items()}, active="east").start()
    yield hp, apps
    hp.stop()
    for s in apps.values():
        await s.stop()


async def through(hp: Haproxy, n: int = 6) -> set[str]:
    """Which regions answer requests sent through the HAProxy frontend."""
    seen = set()
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(f"http://127.0.0.1:{hp.port}/health") as r:
                seen.add((await r.text()).strip())
    return seen


async def test_haproxy_moves_traffic_and_confirms(haproxy):
    hp, _ = haproxy
    router = HaproxyRouter(HaproxyRoute(kind="haproxy", socket=hp.socket, backend="app",
                                        servers={"east": "east", "west": "west"}))
    assert await through(hp) == {"region east"}
    # Draining the only server would leave new sessions nowhere (rule 8):
    # east keeps serving until the reroute.
    kept = await router.apply(Change("app", "east", "west", 2, "drain"))
    assert "kept serving" in kept
    assert (await router.states())["east"] & (ADMIN_MAINT | ADMIN_DRAIN) == 0
    assert await through(hp) == {"region east"}
    done = await router.apply(Change("app", "east", "west", 2, "reroute"))
    assert "west=ready" in done and "east=maint" in done
    states = await router.states()
    assert states["west"] & (ADMIN_MAINT | ADMIN_DRAIN) == 0 and states["east"] & ADMIN_MAINT
    assert await through(hp) == {"region west"}
    # Idempotent: the same change again is fine and changes nothing.
    await router.apply(Change("app", "east", "west", 2, "reroute"))
    assert await through(hp) == {"region west"}


async def test_haproxy_drain_never_raises_a_fenced_server_and_drains_when_another_serves(
        haproxy):
    hp, _ = haproxy
    router = HaproxyRouter(HaproxyRoute(kind="haproxy", socket=hp.socket, backend="app",
                                        servers={"east": "east", "west": "west"}))
    await router.command("set server app/west state ready")
    await router.apply(Change("app", "east", "west", 2, "drain"))
    assert (await router.states())["east"] & ADMIN_DRAIN
    assert await through(hp) == {"region west"}
    # east fenced (maintenance): a later drain of east leaves it there.
    await router.apply(Change("app", "east", "west", 2, "fence"))
    skipped = await router.apply(Change("app", "east", "west", 3, "drain"))
    assert "already out of service" in skipped
    assert (await router.states())["east"] & ADMIN_MAINT


async def test_haproxy_refused_command_in_the_one_connection_batch_is_an_error(haproxy):
    """Every set-server command and the read-back go on one runtime-API
    connection; a command HAProxy refuses surfaces with its text, and the
    servers before it in the line stay as set (ready first: never zero up)."""
    hp, _ = haproxy
    router = HaproxyRouter(HaproxyRoute(kind="haproxy", socket=hp.socket, backend="app",
                                        servers={"east": "east", "west": "west",
                                                 "south": "nosuch"}))
    with pytest.raises(RouterError, match="No such server"):
        await router.apply(Change("app", "east", "west", 2, "reroute"))
    states = await router.states()
    assert states["west"] & (ADMIN_MAINT | ADMIN_DRAIN) == 0
    assert await through(hp) <= {"region west", "region east"}


async def test_haproxy_unreachable_socket_is_a_router_error(tmp_path: Path):
    router = HaproxyRouter(HaproxyRoute(kind="haproxy", socket=str(tmp_path / "nope.sock"),
                                        backend="app", servers={"east": "e", "west": "w"}))
    with pytest.raises(RouterError):
        await router.apply(Change("app", "east", "west", 2, "reroute"))


@pytest.fixture
def bind(tmp_path: Path):
    b = Bind(tmp_path).start()
    yield b
    b.stop()


def dns_router(b: Bind, **kw) -> DnsRouter:
    return DnsRouter(DnsRoute(kind="dns", server=b.server, zone="example.test.", name="app",
                              ttl=5, tsig_key_file=b.key_file, addresses=kw.get("addresses",
                                                                                ADDRS)))


async def test_safety_rule_2_dns_reroute_is_fenced_by_epoch(bind: Bind):
    router = dns_router(bind)
    assert await router.addresses() == {"192.0.2.10"}
    assert await router.fence_epoch() is None
    await router.apply(Change("app", "east", "west", 2, "reroute"))
    assert await router.addresses() == set(ADDRS["west"])
    assert await router.fence_epoch() == 2
    # The same change again (a retry) is idempotent.
    assert "already" in await router.apply(Change("app", "east", "west", 2, "reroute"))
    await router.apply(Change("app", "west", "east", 3, "reroute"))
    assert (await router.addresses(), await router.fence_epoch()) == ({"192.0.2.10"}, 3)
    # A stale writer (epoch 2) is refused before it sends anything...
    with pytest.raises(FencedOut):
        await router.apply(Change("app", "east", "west", 2, "reroute"))
    # ...and if it sends its update anyway (it read the fence before the
    # newer writer moved it), the DNS server itself refuses the prerequisite.
    stale = router.update(2, ADDRS["west"], current=1)
    assert await router.send(stale) != 0  # NXRRSET
    assert (await router.addresses(), await router.fence_epoch()) == ({"192.0.2.10"}, 3)


async def test_dns_reroute_is_one_signed_round_trip_when_the_fence_is_as_expected(
        bind: Bind, monkeypatch: pytest.MonkeyPatch):
    """Issue 17: the update's prerequisite carries the fence, so the happy
    path reads nothing first; a fence moved by someone else costs a refused
    update, a read and a second update — never a write past the fence."""
    router = dns_router(bind)
    calls: list[str] = []
    send, read = router.send, router.fence_epoch

    async def counted_send(upd):  # type: ignore[no-untyped-def]
        calls.append("update")
        return await send(upd)

    async def counted_read():  # type: ignore[no-untyped-def]
        calls.append("read")
        return await read()
    monkeypatch.setattr(router, "send", counted_send)
    monkeypatch.setattr(router, "fence_epoch", counted_read)
    for epoch, to in ((1, "east"), (2, "west"), (3, "east")):
        calls.clear()
        await router.apply(Change("app", "x", to, epoch, "reroute"))
        assert calls == ["update"], (epoch, calls)
    assert (await read(), await router.addresses()) == (3, set(ADDRS["east"]))
    # Another writer moved the fence to 5 (a newer coordinator, epochs
    # 4 and 5): our epoch 4 is refused by the server, read, and stopped.
    assert await send(router.update(5, ADDRS["west"], current=3)) == 0
    calls.clear()
    with pytest.raises(FencedOut, match=r"prerequisite failed .* holds epoch 5 >= 4"):
        await router.apply(Change("app", "x", "east", 4, "reroute"))
    assert calls == ["update", "read"]
    # Epoch 7 after an epoch (6) that never rerouted: refused on the guess,
    # read, sent again on what the fence holds.
    calls.clear()
    from failoverd.traffic import routers  # noqa: PLC0415
    routers._FENCE_SEEN.clear()  # a new coordinator process knows nothing yet
    await router.apply(Change("app", "x", "east", 7, "reroute"))
    assert calls == ["update", "read", "update"]
    assert (await read(), await router.addresses()) == (7, set(ADDRS["east"]))


async def test_dns_without_the_key_is_refused(bind: Bind, tmp_path: Path):
    other = tmp_path / "other.key"
    other.write_text('key "failoverd" { algorithm hmac-sha256; secret "'
                     + "A" * 43 + '="; };\n')
    route = DnsRoute(kind="dns", server=bind.server, zone="example.test.", name="app",
                     tsig_key_file=other, addresses=ADDRS)
    with pytest.raises(RouterError):
        await DnsRouter(route).apply(Change("app", "east", "west", 2, "reroute"))
    assert await dns_router(bind).addresses() == {"192.0.2.10"}


async def test_safety_rule_8_dns_never_writes_an_empty_record_set(bind: Bind):
    router = dns_router(bind)
    router.route = router.route.model_copy(update={"addresses": {"east": ["192.0.2.10"],
                                                                  "west": []}})
    with pytest.raises(RouterError, match="refusing"):
        await router.apply(Change("app", "east", "west", 2, "reroute"))
    assert await router.addresses() == {"192.0.2.10"}


async def test_webhook_is_signed_and_verified(tmp_path: Path):
    secret = b"shared-webhook-secret"
    (tmp_path / "secret").write_bytes(secret)
    got: list[dict] = []

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers["X-Failoverd-Signature"]):
            return web.Response(status=401)
        got.append(json.loads(body))
        return web.Response(status=204)
    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        url = f"http://127.0.0.1:{port}/hook"
        router = WebhookRouter(WebhookRoute(kind="webhook", url=url,
                                            secret_file=tmp_path / "secret"))
        await router.apply(Change("app", "east", "west", 4, "reroute"))
        assert got and (got[0]["group"], got[0]["from"], got[0]["to"], got[0]["epoch"],
                        got[0]["step"]) == ("app", "east", "west", 4, "reroute")
        (tmp_path / "wrong").write_bytes(b"not-the-secret")
        bad = WebhookRouter(WebhookRoute(kind="webhook", url=url,
                                         secret_file=tmp_path / "wrong"))
        with pytest.raises(RouterError, match="HTTP 401"):
            await bad.apply(Change("app", "east", "west", 4, "reroute"))
        assert len(got) == 1
    finally:
        await runner.cleanup()


async def test_exec_router_gets_the_change(tmp_path: Path):
    out = tmp_path / "out"
    script = tmp_path / "route.sh"
    script.write_text(f'#!/bin/sh\necho "$FAILOVERD_GROUP $FAILOVERD_FROM $FAILOVERD_TO '
                      f'$FAILOVERD_EPOCH $FAILOVERD_STEP" > {out}\n')
    script.chmod(0o755)
    await ExecRouter(ExecRoute(kind="exec", command=[str(script)])).apply(
        Change("app", "east", "west", 7, "reroute"))
    assert out.read_text().strip() == "app east west 7 reroute"
    failing = ExecRouter(ExecRoute(kind="exec", command=["/bin/false"]))
    with pytest.raises(RouterError):
        await failing.apply(Change("app", "east", "west", 7, "reroute"))


async def test_haproxy_changes_of_many_groups_share_one_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An evacuation's reroutes behind one HAProxy (a backend per group) go
    on shared runtime-API connections, each group's commands together and
    read back on their own; a command refused for one group fails that
    group alone."""
    from failoverd.traffic import routers  # noqa: PLC0415

    backends = [f"g{i:02d}" for i in range(40)]
    apps = {r: await HttpService(r).start() for r in ("east", "west")}
    hp = Haproxy(tmp_path, {r: s.port for r, s in apps.items()}, active="east",
                 more_backends=backends).start()
    connections: list[int] = []
    real = routers.runtime_api

    async def counted(socket: str, line: str, timeout_s: float) -> str:
        connections.append(line.count(";") + 1)
        return await real(socket, line, timeout_s)
    monkeypatch.setattr(routers, "runtime_api", counted)
    try:
        def router(backend: str, servers: dict[str, str]) -> HaproxyRouter:
            return HaproxyRouter(HaproxyRoute(kind="haproxy", socket=hp.socket,
                                              backend=backend, servers=servers))
        good = {"east": "east", "west": "west"}
        routes = [router(b, good) for b in backends]
        broken = router("app", {**good, "south": "nosuch"})
        results = await asyncio.gather(
            *(r.apply(Change(r.route.backend, "east", "west", 2, "reroute")) for r in routes),
            broken.apply(Change("app", "east", "west", 2, "reroute")), return_exceptions=True)
        assert all(r == "west=ready, east=maint" for r in results[:-1]), results
        assert isinstance(results[-1], RouterError) and "No such server" in str(results[-1])
        # 41 changes of 3-4 commands each, in lines of at most RUNTIME_LINE_MAX.
        assert sum(connections) == 40 * 3 + 4 and len(connections) <= 4
        for r in routes:
            states = await r.states()
            assert states["west"] & (ADMIN_MAINT | ADMIN_DRAIN) == 0
            assert states["east"] & ADMIN_MAINT
    finally:
        hp.stop()
        for s in apps.values():
            await s.stop()


def test_runtime_api_answers_are_split_per_command():
    """HAProxy 2.6's answer to `set (ok); set (refused); show; set (ok);
    show`, as captured: five answers; a cut connection's last one is not."""
    table = ("1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state\n"
             "3 app 1 east 127.0.0.1 2 0\n3 app 2 west 127.0.0.1 2 4\n")
    out = "\nNo such server.\n\n" + table + "\n\n" + table + "\n"
    answers = runtime_api_answers(out)
    assert [len(a) for a in answers] == [0, 1, 4, 0, 4]
    assert answers[1] == ["No such server."] and answers[2][1].startswith("# be_id")
    assert len(runtime_api_answers(out[:-1])) == 4  # the last table never ended
