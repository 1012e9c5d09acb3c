"""MQTT lanes: one connection per region for our own topics, so a flood on
one region's topics cannot hold back (or get the broker to drop) another
region's power events; bounded queues that keep the newest messages."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from devstack.stack import EtcdCluster, LocalCluster, Mosquitto, wait_until
from failoverd.config import MqttMapping, MqttSettings
from failoverd.sensing.mqtt import MAIN_LANE, _lane_queue, subscription_lanes


def _broker(**kw: object) -> MqttSettings:
    return MqttSettings.model_validate({"url": "mqtt://127.0.0.1:1883", **kw})


def test_our_topic_is_split_by_region_and_other_topics_stay_on_main() -> None:
    regions = ["east", "west"]
    assert subscription_lanes(_broker(), regions) == {
        MAIN_LANE: [], "east": ["failoverd/power/east/#"], "west": ["failoverd/power/west/#"]}
    # A custom layout cannot be split safely (the region is read from the
    # end of the topic): it stays on main, whole.
    custom = _broker(topics=["site/+/power/#", "failoverd/power/#"])
    assert subscription_lanes(custom, regions)[MAIN_LANE] == ["site/+/power/#"]
    # A mapping with a fixed region rides on that region's lane; one that
    # takes the region from a topic level, on main.
    mapped = _broker(mappings=[
        MqttMapping.model_validate({"topic": "zigbee2mqtt/ups-east", "region": "east",
                                    "sensor": "ups", "json_path": "state",
                                    "states": {"ON": "utility_ok"}}),
        MqttMapping.model_validate({"topic": "tele/+/STATE", "region": "{1}",
                                    "sensor": "plug", "json_path": "POWER",
                                    "states": {"ON": "utility_ok"}})])
    lanes = subscription_lanes(mapped, regions)
    assert lanes["east"] == ["failoverd/power/east/#", "zigbee2mqtt/ups-east"]
    assert lanes[MAIN_LANE] == ["tele/+/STATE"]


async def test_a_full_lane_queue_drops_its_oldest_message_and_counts_it() -> None:
    made: list[asyncio.Queue[aiomqtt.Message]] = []
    dropped: list[int] = []
    queue = _lane_queue(made.append, lambda: dropped.append(1))(maxsize=3)
    assert made == [queue]
    for i in range(5):
        queue.put_nowait(aiomqtt.Message(f"t/{i}", b"", 0, False, i, None))
    assert [queue.get_nowait().topic.value for _ in range(3)] == ["t/2", "t/3", "t/4"]
    assert len(dropped) == 2


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    b = Mosquitto(tmp_path).start()
    yield b
    b.stop()


async def test_each_region_has_its_own_connection_and_a_reload_adds_a_region_lane(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str, broker: Mosquitto) -> None:
    regions = {"east": 100, "west": 50}
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, regions, {"app": ["east", "west"]},
                     mqtt=[broker.url])
    d = c.add("e1", "east")

    def connected_lanes() -> list[str] | None:
        events = [e for e in d.log_events() if e.get("event") == "mqtt connected"]
        return events[-1]["lanes"] if events else None

    async def relayed(region: str, sensor: str) -> bool:
        return bool((await c.view()).power.get((region, sensor)))

    async def publish(region: str, sensor: str) -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.publish(f"failoverd/power/{region}/{sensor}",
                                 json.dumps({"state": "utility_ok", "ts": time.time()}), qos=1)
    try:
        lanes = await wait_until(connected_lanes, 20, "e1 on the broker")
        assert lanes == ["east", MAIN_LANE, "west"]
        clients = (tmp_path / "mosquitto.log").read_text()
        assert all(f"failoverd-{cluster_name}-e1-{broker.port}{suffix}" in clients
                   for suffix in ("", "-east", "-west"))
        for region in ("east", "west"):
            await publish(region, "ups1")
            await wait_until(lambda r=region: relayed(r, "ups1"), 10, f"{region} relayed")

        # A region added by a reload gets its lane without a restart, and
        # the lanes that were there keep their connections.
        grown = c.config_variant("grown", regions={**regions, "south": 25})
        shutil.copy(grown, c.config)
        d.signal(signal.SIGHUP)
        await wait_until(lambda: "south" in (connected_lanes() or []), 20, "the south lane")
        await publish("south", "ups1")
        await wait_until(lambda: relayed("south", "ups1"), 10, "south relayed")
        assert not [e for e in d.log_events()
                    if e.get("event") == "mqtt disconnected; reconnecting"]
    finally:
        await c.close()
