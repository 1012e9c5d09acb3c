"""failoverd: multi-region failover orchestrator on etcd."""

__version__ = "0.1.0"
