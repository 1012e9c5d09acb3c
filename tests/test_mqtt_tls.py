"""MQTT over TLS against a real mosquitto that requires a client certificate,
a password and an ACL, with certificates made here by openssl (issue 12):
the member connects with ``cert_file``/``key_file`` and relays power, and
each kind of failure is named in words an operator can act on."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from devstack.stack import free_port, make_ca, make_cert, write_config
from failoverd.config import Overrides, load_settings
from failoverd.core.model import Keyspace
from failoverd.sensing.mqtt import MAIN_LANE, PowerFeeds, mqtt_failure


@pytest.fixture
def tls_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    d = tmp_path / "pki"
    d.mkdir()
    ca = make_ca(d, "ca")
    server = make_cert(d, "server", ca, san="IP:127.0.0.1")
    client = make_cert(d, "client", ca)
    rogue_ca = make_ca(d, "rogue-ca")
    rogue = make_cert(d, "rogue", rogue_ca)
    passwd = d / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "failoverd", "s3cret"],
                   check=True, capture_output=True)
    acl = d / "acl"
    acl.write_text("user failoverd\ntopic read failoverd/power/#\n"
                   "topic readwrite failoverd/status/#\n")
    port = free_port()
    conf = d / "mosquitto.conf"
    # user root: the test runs as root and its files live in a 0700 tmp dir.
    conf.write_text(f"user root\nlistener {port} 127.0.0.1\ncafile {ca[0]}\ncertfile {server[0]}\n"
                    f"keyfile {server[1]}\nrequire_certificate true\nallow_anonymous false\n"
                    f"password_file {passwd}\nacl_file {acl}\npersistence false\n")
    for f in d.iterdir():
        f.chmod(0o644)
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=open(d / "log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    deadline = time.monotonic() + 10
    while True:  # listening before the first client tries
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, \
                (d / "log").read_text()[-500:]
            time.sleep(0.05)
    yield {"port": port, "ca": ca[0], "client": client, "rogue": rogue, "rogue_ca": rogue_ca[0],
           "dir": d, "proc": proc}
    proc.kill()
    proc.wait()


def _feeds(tmp_path: Path, broker: dict, *, ca: Path, cert: tuple[Path, Path] | None,
           password: str = "s3cret") -> PowerFeeds:
    pw = tmp_path / "mqtt-password"
    pw.write_text(password)
    cfg = write_config(tmp_path / "failoverd.toml", cluster="tls", endpoints=["127.0.0.1:1"],
                       regions={"east": 100}, groups={"app": ["east"]},
                       state_dir=tmp_path / "state")
    extra = (f'\n[[mqtt]]\nurl = "mqtts://127.0.0.1:{broker["port"]}"\nca_file = "{ca}"\n'
             f'username = "failoverd"\npassword_file = "{pw}"\n'
             + (f'cert_file = "{cert[0]}"\nkey_file = "{cert[1]}"\n' if cert else ""))
    text = cfg.read_text()
    head, _, policy = text.partition("[policy]")
    cfg.write_text(head + extra + "\n[policy]" + policy)
    settings = load_settings(cfg, Overrides(member="e1", region="east"))
    return PowerFeeds(None, Keyspace("tls"), lambda: settings, lambda: None)  # type: ignore[arg-type]


async def _failure(feeds: PowerFeeds) -> str:
    """The reason the member would log for this broker."""
    from failoverd.sensing.mqtt import _wire_logger  # noqa: PLC0415
    wire = _wire_logger(feeds._settings().mqtt[0].url)[1]
    wire.last = ""
    return mqtt_failure(await _connect_error(feeds), wire.last)


async def _connect_error(feeds: PowerFeeds) -> BaseException | None:
    broker = feeds._settings().mqtt[0]
    try:
        async with asyncio.timeout(8):
            await feeds._connection(broker, MAIN_LANE, broker.subscriptions, set())
    except BaseException as exc:  # the error is what we test
        if isinstance(exc, BaseExceptionGroup):
            return exc.exceptions[0]
        return exc
    return None


async def test_mqtt_client_certificate_connects_and_failures_are_named(
        tmp_path: Path, tls_broker: dict) -> None:
    ok = _feeds(tmp_path, tls_broker, ca=tls_broker["ca"], cert=tls_broker["client"])
    broker = ok._settings().mqtt[0]
    task = asyncio.create_task(ok._connection(broker, MAIN_LANE, broker.subscriptions, set()))
    try:
        for _ in range(300):
            if ok.connected.get(broker.url):
                break
            await asyncio.sleep(0.05)
        assert ok.connected.get(broker.url), (tls_broker["dir"] / "log").read_text()[-500:]
    finally:
        task.cancel()

    no_cert = _feeds(tmp_path, tls_broker, ca=tls_broker["ca"], cert=None)
    assert "client certificate" in await _failure(no_cert)
    rogue = _feeds(tmp_path, tls_broker, ca=tls_broker["ca"], cert=tls_broker["rogue"])
    assert "client certificate refused" in await _failure(rogue)
    untrusted = _feeds(tmp_path, tls_broker, ca=tls_broker["rogue_ca"], cert=tls_broker["client"])
    assert "TLS verify failed" in await _failure(untrusted)
    wrong_pw = _feeds(tmp_path, tls_broker, ca=tls_broker["ca"], cert=tls_broker["client"],
                      password="nope")
    assert "authentication failed" in await _failure(wrong_pw)


def test_mqtt_client_certificate_settings_are_checked(tmp_path: Path) -> None:
    from failoverd.config import MqttSettings  # noqa: PLC0415
    with pytest.raises(ValueError, match="go together"):
        MqttSettings(url="mqtts://h:8883", cert_file=tmp_path / "c")
    with pytest.raises(ValueError, match="mqtts"):
        MqttSettings(url="mqtt://h:1883", cert_file=tmp_path / "c", key_file=tmp_path / "k")
