"""The status page as a person sees it: real headless Chromium (Debian
``chromium``) on loopback, after a failover."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from devstack.stack import OPERATOR_TOKEN, VIEWER_TOKEN, LocalCluster, call, wait_until

pytestmark = pytest.mark.cluster

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1200,900"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("chromium not found: scripts/test installs Debian's chromium")
    return path


def render(url: str, tmp_path: Path, screenshot: Path | None = None) -> str:
    args = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chrome'}",
            "--virtual-time-budget=6000"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=90, check=True)
    return out.stdout


def row(dom: str, attr: str, name: str) -> str:
    m = re.search(rf'<tr data-{attr}="{name}">(.*?)</tr>', dom, re.S)
    assert m, f"no row for {name} in the page"
    return re.sub(r"<[^>]+>", " ", m.group(1))


async def test_status_page_shows_the_failover(api_cluster: LocalCluster, tmp_path: Path):
    c = api_cluster
    api = c.daemons["c1"].api
    status, data = await call(api, "POST", "/v1/groups/app/switchover", OPERATOR_TOKEN,
                              {"to": "west"})
    assert status == 200, data
    status, data = await call(api, "POST", "/v1/regions/central/drain", OPERATOR_TOKEN,
                              {"for": "2h"})
    assert status == 200, data

    async def saga_done() -> bool:
        wf = (await c.view()).workflows.get("app")
        return wf is not None and wf.epoch == 2 and wf.state == "done"
    await wait_until(saga_done, 20, "the switchover's saga to finish")
    url = f"{api}/#token={VIEWER_TOKEN}"
    dom = await asyncio.to_thread(render, url, tmp_path)
    west, east = row(dom, "region", "west"), row(dom, "region", "east")
    # The incident as a waterfall: trigger, decision, each saga step with its
    # start (local time, UTC on hover) and duration, done.
    steps = re.findall(r'<tr data-step="([a-z_]+)">', dom)
    assert steps[0] == "decision" and steps[-1] == "done", steps
    assert {"precheck", "drain_old", "promote_new", "reroute", "verify", "demote_old"} <= set(
        steps), steps
    assert re.search(r'operator: operator switchover by ops · 1 group\(s\)', dom)
    done = row(dom, "step", "done")
    assert re.search(r"done .* [0-9.]+s in all", done), done
    promote = row(dom, "step", "promote_new")
    assert re.search(r"\d[0-9.]*s", promote) and 'class="bar' in dom
    assert re.search(r'<td title="\d{4}-\d\d-\d\dT[0-9:.]+Z" class="ts">', dom)
    # Groups: a summary by region and a filterable table.
    assert row(dom, "region", "west").split()[:2] == ["west", "active:"]
    summary = re.search(r'<tr data-region="west"><td>west</td><td>(\d+)</td>', dom)
    assert summary and summary.group(1) == "1"
    assert "1 of 1 group(s)" in dom and 'id="filter"' in dom
    assert "active: app" in west and "standby" in east
    # The drain on top, with the time left and its end in local time (UTC
    # on hover), and in the region's row.
    banner = re.search(r'<div class="drain" data-region="central" title="([^"]+)">([^<]+)<',
                       dom)
    assert banner, "no drain banner"
    assert banner.group(1).endswith("Z")
    assert re.match(r"Drained central by ops: (2h|1h59m\d*s?) left, until ", banner.group(2))
    assert re.search(r"drained, (2h|1h59m)", row(dom, "region", "central"))
    app = row(dom, "group", "app").split()
    assert app[:3] == ["app", "west", "2"], app
    assert "done" in app or "running" in app  # the switchover's workflow
    assert 'data-kind="epoch_changed"' in dom and 'data-kind="operator_request"' in dom
    assert "operator switchover by ops" in dom
    # No database group: no Data table (tests/test_database.py shows one).
    assert re.search(r'<div id="data" hidden(="")?>', dom) and 'data-data="' not in dom
    # And a picture of it, for people reviewing a run.
    shot = tmp_path / "status.png"
    await asyncio.to_thread(render, url, tmp_path, shot)
    assert shot.stat().st_size > 10_000


async def test_status_page_without_a_token_asks_for_one(api_cluster: LocalCluster,
                                                        tmp_path: Path):
    dom = await asyncio.to_thread(render, api_cluster.daemons["w1"].api + "/", tmp_path)
    assert '<form id="login">' in dom  # no longer hidden
    assert "a viewer token is needed" in dom
    assert 'data-region="east"' not in dom


async def test_status_page_stays_usable_at_a_thousand_groups(
        etcd, cluster_name: str, tmp_path: Path):
    """A region active for 1,000 groups: the page renders in Chromium within
    its time budget, the summary counts every group by region, and the table
    shows the first 200 (the filter narrows it) instead of 1,000 rows."""
    groups = {f"g{i:04d}": ["east", "west"] for i in range(1000)}
    (tmp_path / "cluster").mkdir()
    c = LocalCluster(tmp_path / "cluster", cluster_name, etcd.endpoints,
                     {"east": 100, "west": 50}, groups, policy={"bootstrap_grace_s": 1})
    try:
        c.add("e1", "east")
        c.add("w1", "west")

        async def all_active() -> bool:
            view = await c.view()
            return sum(1 for r in view.active.values() if r.region == "east") == 1000
        await wait_until(all_active, 120, "1,000 groups active in east", interval=0.5)
        api = c.daemons["w1"].api

        async def served_settled() -> bool:
            # w1's own document (its watch-fed view, cached up to a second)
            # may trail etcd: the page is judged on a settled one.
            status, st = await call(api, "GET", "/v1/status", VIEWER_TOKEN)
            assert status == 200 and len(st["groups"]) == 1000
            return len(st["regions"]["east"]["active_for"]) == 1000
        await wait_until(served_settled, 10, "w1's status document with all 1,000 in east")
        dom = await asyncio.to_thread(render, f"{api}/#token={VIEWER_TOKEN}", tmp_path)
        summary = re.search(r'<tr data-region="east"><td>east</td><td>(\d+)</td>', dom)
        assert summary and summary.group(1) == "1000", "the summary counts every group"
        assert "showing 200 of 1000 (filter to narrow)" in dom
        assert len(re.findall(r'<tr data-group="g\d{4}">', dom)) == 200
        # The filter, from a bookmarked address, narrows the table.
        narrowed = await asyncio.to_thread(
            render, f"{api}/?filter=g099#token={VIEWER_TOKEN}", tmp_path)
        assert re.findall(r'<tr data-group="(g\d{4})">', narrowed) == [
            f"g099{i}" for i in range(10)]
        assert "10 of 1000 group(s)" in narrowed
    finally:
        await c.close()
