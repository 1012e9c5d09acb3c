"""``failoverd check-config --connect`` against real etcd, mosquitto, HAProxy,
BIND and an HTTP endpoint: a line per endpoint, each failure with its reason,
exit 1 when anything fails (issue 12)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

from devstack.stack import (
    ROOT,
    Bind,
    EtcdCluster,
    Haproxy,
    HttpService,
    Mosquitto,
    free_port,
    write_config,
)


async def test_check_config_connect_tries_every_endpoint(tmp_path: Path, etcd: EtcdCluster
                                                         ) -> None:
    broker = Mosquitto(tmp_path).start()
    app = await HttpService("east").start()
    hp = Haproxy(tmp_path, {"east": app.port, "west": app.port}, active="east").start()
    bind = Bind(tmp_path).start()
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_text('key "failoverd" {\n\talgorithm hmac-sha256;\n\tsecret "'
                         + base64.b64encode(os.urandom(32)).decode() + '";\n};\n')
    dead = free_port()

    def dns(name: str, key: Path) -> str:
        return (f'[[groups.routes]]\nkind = "dns"\nserver = "{bind.server}"\n'
                f'zone = "example.test."\nname = "{name}"\ntsig_key_file = "{key}"\n'
                'addresses = { east = ["192.0.2.1"], west = ["192.0.2.2"] }\n')
    try:
        cfg = write_config(
            tmp_path / "shared.toml", cluster="cc", endpoints=[etcd.endpoints[0],
                                                               f"127.0.0.1:{dead}"],
            regions={"east": 100, "west": 50}, groups={"app": ["east", "west"],
                                                       "app2": ["east", "west"]},
            state_dir=tmp_path / "state", mqtt=[broker.url, f"mqtt://127.0.0.1:{dead}"],
            group_tomls={
                "app": (f'[[groups.routes]]\nkind = "haproxy"\nsocket = "{hp.socket}"\n'
                        'backend = "app"\nservers = { east = "east", west = "west" }\n'
                        + dns("app", bind.key_file)
                        + f'[[groups.routes]]\nkind = "webhook"\nurl = "{app.url}/hook"\n'),
                "app2": (dns("app2", wrong_key)
                         + '[[groups.routes]]\nkind = "exec"\ncommand = ["/nonexistent/x"]\n'),
            })
        out = subprocess.run([sys.executable, "-m", "failoverd", "check-config", "--connect",
                              str(cfg)], capture_output=True, text=True, timeout=60, cwd=ROOT,
                             check=False)
        lines = out.stdout.splitlines()
        assert out.returncode == 1, out.stdout + out.stderr

        def line(prefix: str) -> str:
            return next(x for x in lines if x.split(" ", 1)[1].startswith(prefix)
                        or x.startswith(prefix))
        assert line(f"ok   etcd {etcd.endpoints[0]}")
        assert "unreachable" in line(f"FAIL etcd 127.0.0.1:{dead}")
        assert line(f"ok   mqtt {broker.url}")
        assert "unreachable" in line(f"FAIL mqtt mqtt://127.0.0.1:{dead}")
        assert "servers east, west known" in line(f"ok   haproxy {hp.socket}")
        assert "signed query accepted" in line(f"ok   dns {bind.server} _failoverd.app.")
        assert "TSIG" in line(f"FAIL dns {bind.server} _failoverd.app2.")
        assert line(f"ok   webhook {app.url}/hook")
        assert "not found" in line("FAIL exec /nonexistent/x")
        assert lines[-1] == "9 endpoint(s), 4 failed"
    finally:
        broker.stop()
        hp.stop()
        bind.stop()
        await app.stop()
