"""etcd over TLS with client-certificate auth (``--client-cert-auth``), with
certificates made here by openssl (issue 12): the store works with
``ca_file``/``cert_file``/``key_file``, and ``check-config --connect`` names
what is wrong with a rogue client certificate or an untrusted server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devstack.stack import ROOT, etcd_binary, free_port, make_ca, make_cert, write_config
from failoverd.config import EtcdSettings
from failoverd.etcd.client import EtcdStore


@pytest.fixture
def tls_etcd(tmp_path: Path):  # type: ignore[no-untyped-def]
    d = tmp_path / "pki"
    d.mkdir()
    ca = make_ca(d, "ca")
    server = make_cert(d, "server", ca, san="IP:127.0.0.1")
    port, peer = free_port(), free_port()
    proc = subprocess.Popen(
        [etcd_binary(), "--name", "tls0", "--data-dir", str(tmp_path / "data"),
         "--listen-client-urls", f"https://127.0.0.1:{port}",
         "--advertise-client-urls", f"https://127.0.0.1:{port}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"tls0=http://127.0.0.1:{peer}",
         "--cert-file", str(server[0]), "--key-file", str(server[1]),
         "--client-cert-auth", "--trusted-ca-file", str(ca[0]),
         "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}", "--log-level", "warn"],
        stdout=open(tmp_path / "etcd.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    yield {"endpoint": f"127.0.0.1:{port}", "ca": ca, "client": make_cert(d, "client", ca),
           "rogue": make_cert(d, "rogue", make_ca(d, "rogue-ca")),
           "other_ca": make_ca(d, "other-ca")[0], "dir": tmp_path}
    proc.kill()
    proc.wait()


async def test_etcd_client_certificate_auth_works(tls_etcd: dict) -> None:
    store = EtcdStore(EtcdSettings(endpoints=[tls_etcd["endpoint"]], ca_file=tls_etcd["ca"][0],
                                   cert_file=tls_etcd["client"][0],
                                   key_file=tls_etcd["client"][1], timeout_s=2.0))
    try:
        for _ in range(50):  # etcd may still be starting
            try:
                await store.put("/failoverd/tls/x", "1")
                break
            except Exception:  # still starting
                import asyncio  # noqa: PLC0415
                await asyncio.sleep(0.2)
        kv = await store.get("/failoverd/tls/x")
        assert kv is not None and kv.value == "1"
    finally:
        await store.close()


def test_check_config_connect_names_etcd_tls_failures(tmp_path: Path, tls_etcd: dict) -> None:
    def check(ca: Path, cert: tuple[Path, Path]) -> str:
        cfg = write_config(tmp_path / "c.toml", cluster="tls", endpoints=[tls_etcd["endpoint"]],
                           regions={"east": 100}, groups={"app": ["east"]},
                           state_dir=tmp_path / "state")
        text = cfg.read_text().replace(
            "[etcd]\n", f'[etcd]\nca_file = "{ca}"\ncert_file = "{cert[0]}"\n'
                        f'key_file = "{cert[1]}"\n', 1)
        cfg.write_text(text)
        out = subprocess.run([sys.executable, "-m", "failoverd", "check-config", "--connect",
                              str(cfg)], capture_output=True, text=True, timeout=60, cwd=ROOT,
                             check=False)
        return next(x for x in out.stdout.splitlines() if " etcd " in x)
    import time  # noqa: PLC0415
    deadline = time.monotonic() + 20
    while not (good := check(tls_etcd["ca"][0], tls_etcd["client"])).startswith("ok"):
        assert time.monotonic() < deadline, good  # etcd still starting, or a real failure
        time.sleep(0.3)
    assert good.startswith("ok   etcd")
    rogue = check(tls_etcd["ca"][0], tls_etcd["rogue"])
    assert rogue.startswith("FAIL") and "TLS" in rogue, rogue
    untrusted = check(tls_etcd["other_ca"], tls_etcd["client"])
    assert untrusted.startswith("FAIL") and "TLS" in untrusted, untrusted
