"""Partitions of one member, on real etcd: a member cut off from etcd but not
from its peers is alive, not lost (rule 4 and DESIGN's member-loss trigger),
and an unplanned move never promotes before the old region has fenced itself
or its self-fence deadline has passed (issue 12)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack.stack import EtcdCluster, LocalCluster, TcpProxy, wait_until


async def _logged(c: LocalCluster, member: str, event: str) -> bool:
    return any(str(e.get("event", "")).startswith(event)
               for e in c.daemons[member].log_events())


async def _roles(c: LocalCluster, wanted: set[tuple[str, str]]) -> bool:
    return wanted <= {(h["member"], h["role"]) for h in c.hooks()}


async def test_partition_member_cut_off_from_etcd_but_not_from_peers_holds_and_nothing_moves(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str) -> None:
    """east-1 (active) loses etcd for longer than its lease, member-loss
    grace and isolation grace together, but west can still reach its API:
    the coordinator holds (east answers), east-1 holds (west answers, no
    newer epoch), no hook runs anywhere, and after the heal nothing moved."""
    proxies = [await TcpProxy(ep).start() for ep in etcd.endpoints]
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints,
                     regions={"east": 100, "west": 50}, groups={"app": ["east", "west"]},
                     policy={"member_loss_grace_s": 0.5, "isolation_grace_s": 1})
    try:
        c.add("w1", "west")
        await c.wait_coordinator(10)
        c.add("e1", "east", config=c.config_variant(
            "e1", endpoints=[p.endpoint for p in proxies]))
        before = await c.wait_active("app", "east", 15)
        await wait_until(lambda: _roles(c, {("e1", "active"), ("w1", "standby")}), 10,
                         "e1 promoted, w1 demoted")
        await wait_until(lambda: _logged(c, "e1", "isolation peers"), 10, "e1 knows w1")
        hooks_before = c.hooks()

        for p in proxies:
            p.cut()
        # By the time both have held, member loss (TTL + 0.5 s) and e1's
        # isolation grace (1 s after its lease) have both passed.
        await wait_until(lambda: _logged(c, "w1", "memberless region still answers"),
                         c.ttl * 4 + 5, "the coordinator to find e1 alive")
        await wait_until(lambda: _logged(c, "e1", "etcd unreachable; other regions reachable"),
                         c.ttl * 4 + 5, "e1 to hold: w1 answers")
        view = await c.view()
        assert "e1" not in view.members  # its lease is gone: a real loss of etcd
        assert view.active["app"].epoch == before.epoch
        assert view.active["app"].region == "east"
        assert c.hooks() == hooks_before

        for p in proxies:
            p.heal()

        async def back() -> bool:
            return "e1" in (await c.view()).members
        await wait_until(back, c.ttl * 4 + 5, "e1 back in etcd")
        after = (await c.view()).active["app"]
        assert (after.region, after.epoch) == ("east", before.epoch)
        assert c.hooks() == hooks_before
        assert all(d.alive() for d in c.daemons.values())
    finally:
        await c.close()
        for p in proxies:
            await p.stop()


async def test_partition_unplanned_move_promotes_only_after_the_self_fence_deadline(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str) -> None:
    """east-1 dies (it could as well be cut off from everything: from the
    coordinator's side the two look the same).  The record moves at member
    loss, but west is promoted only once east's self-fence deadline has
    passed; the saga says so while it waits."""
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints,
                     regions={"east": 100, "west": 50}, groups={"app": ["east", "west"]},
                     policy={"member_loss_grace_s": 0.5, "isolation_grace_s": 2})
    try:
        c.add("w1", "west")
        await c.wait_coordinator(10)
        c.add("e1", "east")
        await c.wait_active("app", "east", 15)
        await wait_until(lambda: _roles(c, {("e1", "active")}), 10, "e1 promoted")
        c.daemons["e1"].kill9()
        moved = await c.wait_active("app", "west", c.ttl * 4 + 5)
        assert moved.trigger == "member_loss"

        async def waiting() -> object:
            wf = (await c.view()).workflows.get("app")
            step = next((s for s in wf.steps if s.name == "fence_old"), None) if wf else None
            return step if step is not None and step.state == "running" else None
        # While it waits, the saga says for what (status and the page show it).
        step = await wait_until(waiting, 10, "the saga waiting for the deadline", interval=0.05)
        assert "waiting until" in step.detail and "self-fence deadline" in step.detail

        async def done() -> object:
            wf = (await c.view()).workflows.get("app")
            return wf if wf is not None and wf.epoch == moved.epoch and wf.state == "done" \
                else None
        wf = await wait_until(done, 30, "the saga done")
        fence = next(s for s in wf.steps if s.name == "fence_old")
        assert "self-fence deadline" in fence.detail
        # The deadline is at least two checks (a check and a peer ask) after
        # the decision, and the isolation grace after east vanished.
        assert fence.finished is not None
        assert fence.finished >= moved.since + 2.0
        promotes = [h for h in c.hooks() if h["member"] == "w1" and h["role"] == "active"
                    and h["epoch"] == moved.epoch]
        assert promotes and min(h["t"] for h in promotes) >= fence.finished
    finally:
        await c.close()


def test_wan_peer_timeout_follows_the_configured_rtt_and_bounds_the_fence_deadline(
        tmp_path: Path) -> None:
    """Rule 4 across a WAN: the peer check waits 4 x the largest configured
    inter-region RTT (1 s to 10 s), and the self-fence deadline the saga
    waits for includes that wait."""
    from devstack.stack import write_config  # noqa: PLC0415
    from failoverd.config import Overrides, load_settings  # noqa: PLC0415
    from failoverd.daemon.isolation import self_fence_deadline  # noqa: PLC0415

    def timeout(settings: dict[str, dict[str, float]]) -> float:
        cfg = write_config(tmp_path / "c.toml", cluster="x", endpoints=["127.0.0.1:1"],
                           regions={"east": 100, "west": 50}, groups={"app": ["east", "west"]},
                           state_dir=tmp_path, region_settings=settings)
        return load_settings(cfg, Overrides(member="m", region="east")).peer_timeout_s
    assert timeout({}) == 1.0  # LAN default
    assert timeout({"west": {"rtt_ms": 120}}) == 1.0  # 4 x 0.12 s is under the floor
    assert timeout({"east": {"rtt_ms": 40}, "west": {"rtt_ms": 600}}) == 2.4
    assert timeout({"west": {"rtt_ms": 4000}}) == 10.0  # capped
    assert self_fence_deadline(100.0, 100.0, 3.0, 2.4) - self_fence_deadline(
        100.0, 100.0, 3.0, 1.0) == pytest.approx(1.4)
