"""Probe hysteresis (pure) and each check kind against real loopback servers."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from devstack.stack import HttpService, free_port
from failoverd.config import ProbeSettings
from failoverd.sensing.probes import ProbeState, check, region_verdict, step


def run(results: str, rise: int = 2, fall: int = 3) -> list[str]:
    """Feed a string of results ('+' ok, '-' fail); the status after each."""
    state, out = ProbeState(), []
    for i, r in enumerate(results):
        state = step(state, r == "+", rise=rise, fall=fall, now=float(i))
        out.append(state.status)
    return out


@pytest.mark.parametrize(("results", "final"), [
    ("+", "unknown"), ("++", "up"), ("---", "down"), ("++--", "up"), ("++---", "down"),
    ("---+", "down"), ("---++", "up"), ("+-+-+-+-+-", "unknown"), ("++-+-+--+-", "up"),
])
def test_fall_and_rise(results: str, final: str) -> None:
    assert run(results)[-1] == final


def test_since_moves_only_on_a_change() -> None:
    s = ProbeState()
    for t, ok in enumerate([True, True, True, False]):
        s = step(s, ok, rise=2, fall=3, now=float(t))
    assert (s.status, s.since) == ("up", 1.0)


def _p(**kw: object) -> ProbeSettings:
    return ProbeSettings.model_validate({"kind": "http", "target": "x", "interval_s": 1,
                                         "timeout_s": 0.5, **kw})


def test_region_verdict_combines_health_and_readiness() -> None:
    up, down, unk = ProbeState("up"), ProbeState("down"), ProbeState()
    h, r = _p(), _p(readiness=True)
    assert region_verdict([(h, up), (r, up)]) == ("up", True)
    assert region_verdict([(h, up), (r, down)]) == ("up", False)
    assert region_verdict([(h, up), (h, down)]) == ("down", True)
    assert region_verdict([(h, up), (h, unk)]) == ("unknown", True)


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


async def test_http_check(session: aiohttp.ClientSession) -> None:
    svc = await HttpService("east").start()
    try:
        assert await check(_p(target=svc.url), session, "east") == (True, "http 200")
        ok, detail = await check(_p(target=svc.url, body_match="region west"), session, "east")
        assert not ok and "body lacks" in detail
        assert (await check(_p(target=svc.url, body_match="region east"), session, "east"))[0]
        assert not (await check(_p(target=svc.url, expect_status=[204]), session, "east"))[0]
        svc.mode = "fail"
        assert await check(_p(target=svc.url), session, "east") == (False, "http 503")
        assert (await check(_p(target=svc.url, expect_status=[503]), session, "east"))[0]
    finally:
        await svc.stop()
    ok, detail = await check(_p(target=svc.url), session, "east")
    assert not ok and "ClientConnectorError" in detail


async def test_tcp_check(session: aiohttp.ClientSession) -> None:
    svc = await HttpService("east").start()
    try:
        assert (await check(_p(kind="tcp", target=f"127.0.0.1:{svc.port}"), session, "e"))[0]
    finally:
        await svc.stop()
    assert not (await check(_p(kind="tcp", target=f"127.0.0.1:{free_port()}"), session, "e"))[0]


async def test_exec_check_gets_the_target_region(session: aiohttp.ClientSession,
                                                 tmp_path: Path) -> None:
    script = tmp_path / "probe.sh"
    script.write_text('#!/bin/sh\n[ "$FAILOVERD_TARGET_REGION" = west ]\n')
    script.chmod(0o755)
    assert (await check(_p(kind="exec", target=[str(script)]), session, "west"))[0]
    assert not (await check(_p(kind="exec", target=[str(script)]), session, "east"))[0]


async def test_a_hanging_target_is_a_timeout(session: aiohttp.ClientSession) -> None:
    hang = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await hang.wait()
        writer.close()
    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        ok, detail = await check(_p(target=f"http://127.0.0.1:{port}/", timeout_s=0.2),
                                 session, "east")
        assert not ok and detail == "timeout after 0.2s"
    finally:
        hang.set()
        server.close()


async def test_http_check_tls_options(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    """https targets: verified against ca_file, refused when unverifiable,
    accepted with tls_verify = false (a real self-signed certificate)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    app = web.Application()
    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    url = f"https://127.0.0.1:{port}/health"
    try:
        assert (await check(_p(target=url, ca_file=cert), session, "east"))[0]
        ok, detail = await check(_p(target=url), session, "east")
        assert not ok and "Certificate" in detail  # no CA given: unverifiable
        assert (await check(_p(target=url, tls_verify=False), session, "east"))[0]
    finally:
        await runner.cleanup()
