"""The labelled-gauge cache: set on change only, and a clear forgets it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from failoverd import metrics


def _value(registry: CollectorRegistry, group: str) -> float | None:
    return registry.get_sample_value("t_gauge", {"group": group})


def test_set_labelled_exports_each_change_and_survives_a_clear() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("t_gauge", "test", ["group"], registry=registry)
    metrics.set_labelled(gauge, 1, "app")
    assert _value(registry, "app") == 1
    metrics.set_labelled(gauge, 1, "app")  # unchanged: skipped, still 1
    metrics.set_labelled(gauge, 0, "app")
    assert _value(registry, "app") == 0
    metrics.set_labelled(gauge, 2, "app")
    assert _value(registry, "app") == 2
    # A deposed coordinator clears its view; the next term exports again.
    metrics.clear_labelled(gauge)
    assert _value(registry, "app") is None
    metrics.set_labelled(gauge, 2, "app")
    assert _value(registry, "app") == 2
