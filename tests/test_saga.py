"""The durable failover saga end to end: real etcd, real daemons, real HAProxy
and a real authoritative BIND 9, all on loopback."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import pytest

from devstack.stack import (
    OPERATOR_TOKEN,
    Bind,
    EtcdCluster,
    Haproxy,
    HttpService,
    LocalCluster,
    call,
    wait_until,
)
from failoverd.core.workflow import ORDERS, parse_workflow

pytestmark = pytest.mark.cluster
ADDRS = {"east": ["192.0.2.10"], "west": ["198.51.100.10"], "central": ["203.0.113.10"]}


class SagaStack:
    def __init__(self, c: LocalCluster, hp: Haproxy, bind: Bind) -> None:
        self.c, self.hp, self.bind = c, hp, bind

    async def traffic(self) -> set[str]:
        seen = set()
        async with aiohttp.ClientSession() as s:
            for _ in range(4):
                async with s.get(f"http://127.0.0.1:{self.hp.port}/health") as r:
                    seen.add((await r.text()).strip())
        return seen

    async def dns(self) -> tuple[set[str], set[str]]:
        """(A records of app, TXT of the fence) from the authoritative server."""
        out = []
        for name, kind in (("app.example.test.", "A"), ("_failoverd.app.example.test.", "TXT")):
            resp = await dns.asyncquery.tcp(dns.message.make_query(name, kind), "127.0.0.1",
                                            port=self.bind.port, timeout=2)
            out.append({rd.to_text() for rr in resp.answer for rd in rr})
        return out[0], out[1]

    async def workflow(self) -> Any:
        kv = await self.c.store.get(self.c.keys.workflow("app"))
        return parse_workflow(kv.value, kv.mod_revision) if kv else None

    async def wait_failed(self, what: str) -> Any:
        async def failed() -> Any:
            wf = await self.workflow()
            return wf if wf is not None and wf.state == "failed" else None
        return await wait_until(failed, 30, what)

    async def wait_done(self, epoch: int, timeout: float = 20) -> Any:
        async def done() -> Any:
            wf = await self.workflow()
            return wf if wf is not None and wf.epoch == epoch and wf.state == "done" else None
        return await wait_until(done, timeout, f"workflow of epoch {epoch} done")


@pytest.fixture
async def saga_stack(tmp_path: Path, etcd: EtcdCluster, cluster_name: str
                     ) -> AsyncIterator[Any]:
    made: list[tuple[LocalCluster, Haproxy, Bind, list[HttpService]]] = []

    async def make(extra_routes: str = "", regions: tuple[str, ...] = ("east", "west",
                                                                        "central")) -> SagaStack:
        apps = {r: await HttpService(r).start() for r in regions}
        hp = Haproxy(tmp_path, {r: s.port for r, s in apps.items()}, active="east").start()
        bind = Bind(tmp_path).start()
        servers = ", ".join(f'{r} = "{r}"' for r in regions)
        addrs = ", ".join(f'{r} = {json.dumps(ADDRS[r])}' for r in regions)
        group_toml = (
            f'verify_url = "http://127.0.0.1:{hp.port}/health"\nverify_timeout_s = 5\n'
            "step_attempts = 3\n"
            f'[[groups.routes]]\nkind = "haproxy"\nsocket = "{hp.socket}"\nbackend = "app"\n'
            f"servers = {{ {servers} }}\n"
            f'[[groups.routes]]\nkind = "dns"\nserver = "{bind.server}"\n'
            f'zone = "example.test."\nname = "app"\nttl = 5\n'
            f'tsig_key_file = "{bind.key_file}"\naddresses = {{ {addrs} }}\n' + extra_routes)
        prio = {"east": 100, "west": 50, "central": 25}
        c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, {r: prio[r] for r in regions},
                         {"app": list(regions)}, group_toml=group_toml,
                         policy={"max_evacuations_per_hour": 100})
        made.append((c, hp, bind, list(apps.values())))
        return SagaStack(c, hp, bind)
    yield make
    for c, hp, bind, apps in made:
        await c.close()
        hp.stop()
        bind.stop()
        for a in apps:
            await a.stop()


async def test_forced_failover_moves_haproxy_and_dns_traffic(saga_stack):
    s = await saga_stack()
    for m, r in (("e1", "east"), ("w1", "west"), ("c1", "central")):
        s.c.add(m, r)
    boot = await s.wait_done(1)
    assert boot.mode == "bootstrap" and boot.to_region == "east"
    assert await s.traffic() == {"region east"}
    assert await s.dns() == ({"192.0.2.10"}, {'"epoch=1"'})
    s.c.daemons["e1"].kill9()
    wf = await s.wait_done(2)
    assert (wf.mode, wf.from_region, wf.to_region) == ("forced", "east", "west")
    assert [st.name for st in wf.steps] == list(ORDERS["forced"])
    assert await s.traffic() == {"region west"}
    assert await s.dns() == ({"198.51.100.10"}, {'"epoch=2"'})
    done = [e for e in await s.c.history() if e["kind"] == "workflow_done" and e["epoch"] == 2]
    assert done and done[0]["duration_s"] > 0


async def test_safety_rule_2_deposed_coordinator_dns_update_is_refused_by_the_server(saga_stack):
    """e1 coordinates the bootstrap and freezes between reading the DNS fence
    and sending its update.  w1 takes over (member loss: east is gone), moves
    the group to west at epoch 2 and the fence with it.  e1 resumes, sends
    its stale update, and BIND refuses it on the prerequisite."""
    s = await saga_stack(regions=("east", "west"))
    e1 = s.c.add("e1", "east", env={"FAILOVERD_FAULTS": "dns-before-send=stop"})

    async def frozen() -> bool:
        with open(f"/proc/{e1.pid}/stat") as f:
            return f.read().split()[2] == "T"
    await wait_until(frozen, 15, "e1 frozen before its DNS update")
    s.c.add("w1", "west")
    await s.wait_done(2, timeout=30)
    assert await s.dns() == ({"198.51.100.10"}, {'"epoch=2"'})
    # The bootstrap saga e1 left unfinished is recorded as superseded, at the
    # last step it recorded: promote_new (a step that finishes at once is
    # recorded with the next wait, so e1 froze in reroute before writing
    # promote_new's end).
    superseded = [e for e in await s.c.history() if e["kind"] == "workflow_superseded"]
    assert superseded and (superseded[0]["epoch"], superseded[0]["at_step"],
                           superseded[0]["by_epoch"]) == (1, "promote_new", 2)
    e1.signal(signal.SIGCONT)

    async def refused() -> list[dict]:
        return [e for e in e1.log_events() if e.get("event", "").startswith("saga fenced out")]
    events = await wait_until(refused, 10, "e1's update refused by BIND")
    assert "server refused the update, prerequisite failed" in events[0]["error"]
    # The answer is still the new epoch's.
    assert await s.dns() == ({"198.51.100.10"}, {'"epoch=2"'})
    assert await s.traffic() == {"region west"}


@pytest.mark.parametrize(("action", "step"), [
    *(("switchover", st) for st in ("precheck", "drain_old", "promote_new", "reroute",
                                    "verify")),
    ("failover", "fence_old"),  # an operator failover runs the forced order
])
async def test_safety_rule_7_coordinator_killed_after_each_step_successor_finishes(
        saga_stack, action: str, step: str):
    s = await saga_stack()
    mode = "planned" if action == "switchover" else "forced"
    # c1 starts first so it coordinates; it dies right after recording `step`.
    c1 = s.c.add("c1", "central", env={"FAILOVERD_FAULTS": f"after-{mode}-{step}=exit"})
    await s.c.wait_coordinator(10)
    s.c.add("e1", "east")
    s.c.add("w1", "west")
    await s.wait_done(1)
    assert (await s.c.view()).coordinator.member == "c1"
    await s.c.wait_api("w1")
    status, data = await call(s.c.daemons["w1"].api, "POST", f"/v1/groups/app/{action}",
                              OPERATOR_TOKEN, {"to": "west"})
    assert status == 200, data
    await wait_until(lambda: _exited(c1), 15, f"c1 to die after {step}")
    wf = await s.wait_done(2, timeout=30)
    assert wf.mode == mode
    assert [(st.name, st.state) for st in wf.steps] == [(n, "done") for n in ORDERS[mode]]
    history = await s.c.history()
    # One workflow_done across the coordinator change, listing each step once.
    done = [e for e in history if e["kind"] == "workflow_done" and e["epoch"] == 2]
    assert len(done) == 1
    assert [st["step"] for st in done[0]["steps"]] == list(ORDERS[mode])
    assert not [e for e in history if e["kind"] == "workflow_step" and e["epoch"] == 2]
    assert await s.traffic() == {"region west"}
    assert (await s.dns())[1] == {'"epoch=2"'}


async def _exited(d: Any) -> bool:
    return not d.alive()


async def test_failing_router_fails_the_saga_with_an_alert(saga_stack):
    s = await saga_stack(extra_routes='[[groups.routes]]\nkind = "exec"\n'
                                      'command = ["/bin/false"]\ntimeout_s = 2\n')
    for m, r in (("e1", "east"), ("w1", "west"), ("c1", "central")):
        s.c.add(m, r)
    wf = await s.wait_failed("the bootstrap saga to fail")
    step = next(st for st in wf.steps if st.state == "failed")
    assert step.name == "reroute" and step.attempts == 3 and "exec" in step.error
    alerts = [e for e in await s.c.history() if e["kind"] == "alert"]
    assert any("failover workflow failed at reroute" in a["reason"] for a in alerts)
    assert all(d.alive() for d in s.c.daemons.values())
    assert (await call(s.c.daemons["w1"].api, "GET", "/healthz"))[0] == 200


async def test_operator_retries_a_failed_saga_once_the_cause_is_fixed(saga_stack, tmp_path):
    fixed = tmp_path / "route-fixed"
    s = await saga_stack(extra_routes='[[groups.routes]]\nkind = "exec"\n'
                                      f'command = ["/bin/test", "-e", "{fixed}"]\n'
                                      "timeout_s = 2\n")
    for m, r in (("e1", "east"), ("w1", "west"), ("c1", "central")):
        s.c.add(m, r)
    await s.wait_failed("the bootstrap saga to fail")
    api = s.c.daemons["w1"].api
    status, body = await call(api, "POST", "/v1/groups/app/retry", OPERATOR_TOKEN)
    assert status == 200, body  # accepted: it fails again, the cause is still there
    wf = await s.wait_failed("the retried saga to fail again")
    assert next(st for st in wf.steps if st.state == "failed").attempts == 3
    fixed.touch()
    status, body = await call(api, "POST", "/v1/groups/app/retry", OPERATOR_TOKEN)
    assert status == 200 and body["reason"].startswith("saga app-1 retried at reroute"), body
    done = await s.wait_done(1)
    assert [st.name for st in done.steps] == ["promote_new", "reroute", "verify"]
    assert await s.traffic() == {"region east"}
    # Nothing left to retry: refused, and said why.
    status, body = await call(api, "POST", "/v1/groups/app/retry", OPERATOR_TOKEN)
    assert status == 409 and "is done, not failed" in body["message"], body
    events = [e for e in await s.c.history() if e["kind"] == "operator_request"]
    assert [e["result"] for e in events] == ["refused", "accepted", "accepted"]  # newest first


async def test_safety_rule_11_a_rebuilt_etcd_continues_above_every_fence(saga_stack):
    """etcd loses every key (rebuilt from scratch) after two switchovers:
    the new first epoch is above the DNS epoch record and every member's
    applied epoch, the reroute is accepted (not refused as stale), no member
    ever applies a lower epoch after a higher one, and traffic flows."""
    s = await saga_stack()
    for m, r in (("e1", "east"), ("w1", "west"), ("c1", "central")):
        s.c.add(m, r)
    await s.wait_done(1)
    for epoch, region in ((2, "west"), (3, "central")):
        status, data = await call(s.c.daemons["e1"].api, "POST", "/v1/groups/app/switchover",
                                  OPERATOR_TOKEN, {"to": region})
        assert status == 200, data
        await s.wait_done(epoch, timeout=30)
    assert (await s.dns())[1] == {'"epoch=3"'}
    for d in s.c.daemons.values():
        d.stop()
    assert await s.c.store.delete(s.c.keys.prefix, prefix=True) > 0  # etcd rebuilt: empty
    for d in s.c.daemons.values():
        d.start()
    wf = await s.wait_done(4, timeout=40)
    assert (wf.mode, wf.to_region) == ("bootstrap", "east")
    record = (await s.c.view()).active["app"]
    assert (record.epoch, record.trigger) == (4, "bootstrap")
    assert (await s.dns())[1] == {'"epoch=4"'}
    assert await s.traffic() == {"region east"}
    for member in s.c.daemons:
        epochs = [h["epoch"] for h in s.c.hooks() if h["member"] == member]
        assert epochs == sorted(epochs), (member, epochs)


async def test_safety_rule_11_a_restored_etcd_is_lifted_above_the_applied_epochs(saga_stack):
    """etcd restored from an older snapshot: the record says epoch 1 (east)
    again while the members applied epoch 2 and the DNS fence holds 2.
    Whichever member comes back first and whatever it decides, the next
    epoch is above 2, no member applies a lower epoch after a higher one,
    the DNS fence and the record agree and traffic flows where the record
    says."""
    s = await saga_stack()
    for m, r in (("e1", "east"), ("w1", "west"), ("c1", "central")):
        s.c.add(m, r)
    await s.wait_done(1)
    old = await s.c.store.get(s.c.keys.active("app"))
    old_wf = await s.c.store.get(s.c.keys.workflow("app"))
    assert old is not None and old_wf is not None
    status, data = await call(s.c.daemons["e1"].api, "POST", "/v1/groups/app/switchover",
                              OPERATOR_TOKEN, {"to": "west"})
    assert status == 200, data
    await s.wait_done(2, timeout=30)
    for d in s.c.daemons.values():
        d.stop()
    # The snapshot's view of the group: epoch 1 in east, its saga done.
    await s.c.store.delete(s.c.keys.groups, prefix=True)
    await s.c.store.put(old.key, old.value)
    await s.c.store.put(old_wf.key, old_wf.value)
    for d in s.c.daemons.values():
        d.start()

    async def settled() -> Any:
        v = await s.c.view()
        rec, wf = v.active.get("app"), v.workflows.get("app")
        if rec is None or rec.epoch <= 2 or wf is None or wf.epoch != rec.epoch:
            return None
        return rec if wf.state == "done" else None
    record = await wait_until(settled, 40, "a record above every fence, its saga done")
    assert record.trigger in {"restore", "member_loss"}
    assert (await s.dns())[1] == {f'"epoch={record.epoch}"'}
    assert await s.traffic() == {f"region {record.region}"}
    for member in s.c.daemons:
        epochs = [h["epoch"] for h in s.c.hooks() if h["member"] == member]
        assert epochs == sorted(epochs), (member, epochs)
