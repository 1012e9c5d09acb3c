"""Config loading: the DESIGN.md shape, every error with its location."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from failoverd.config import ConfigError, Overrides, load_settings

ROOT = Path(__file__).resolve().parent.parent
GOOD = ROOT / "deploy" / "failoverd.toml"


def test_design_example_loads() -> None:
    s = load_settings(GOOD, Overrides())
    assert s.cluster == "prod" and s.member == "east-1" and s.region == "east"
    assert [r.name for r in s.regions] == ["east", "west"]
    assert s.groups[0].routes[1].kind == "dns"
    assert s.policy.failback == "manual"


def test_overrides_beat_the_file_and_env_fills_gaps() -> None:
    env = Overrides.from_env({"FAILOVERD_MEMBER": "west-9", "FAILOVERD_REGION": "west",
                              "FAILOVERD_API_LISTEN": "127.0.0.1:9999"})
    s = load_settings(GOOD, Overrides(member="west-2").over(env))
    assert (s.member, s.region, s.api.listen) == ("west-2", "west", "127.0.0.1:9999")


def _errors(tmp_path: Path, text: str) -> list[str]:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(p, Overrides())
    return info.value.errors


BASE = 'cluster = "c"\nmember = "m"\nregion = "east"\n[[regions]]\nname = "east"\n'


@pytest.mark.parametrize(("extra", "expected"), [
    ('[[regions]]\nname = "west"\n[[regions.probes]]\nkind = "http"\ntarget = "x"\n'
     'interval_s = 0\n', "regions[1].probes[0].interval_s: must be > 0"),
    ('[etcd]\nlease_ttl_s = 1\n', "etcd.lease_ttl_s: must be >= 2"),
    ('colour = "blue"\n', "colour: unknown setting"),
    ('[[groups]]\nname = "app"\nregions = ["east", "south"]\n',
     "groups[0].regions: unknown region 'south'"),
    ('[policy]\nfailback = "sometimes"\n', "policy.failback: Input should be 'manual' or 'auto'"),
    ('[[groups]]\nname = "app"\nregions = ["east"]\n[[groups.routes]]\nkind = "dns"\n'
     'server = "s"\nzone = "z."\nname = "n"\naddresses = { east = [] }\n',
     "groups[0].routes[0]: regions with no addresses: east"),
    ('[[regions.probes]]\nkind = "tcp"\ntarget = "x"\ninterval_s = 1\ntimeout_s = 2\n',
     "regions[0].probes[0]: timeout_s must not exceed interval_s"),
    ('[api]\nlisten = "0.0.0.0:8080"\n', "api: listen = '0.0.0.0:8080' is a "
     "wildcard address: set advertise_url"),
    ('[api]\nlisten = "[::]:8080"\n', "set advertise_url to the URL other members reach"),
    ('[api]\nadvertise_url = "east-1.example:8080"\n', "api.advertise_url"),
    ('[api]\npeer_source_address = "east-1"\n', "api.peer_source_address"),
    ('[[regions.power_sources]]\nkind = "nut"\nsensor = "u"\n',
     "regions[0].power_sources[0].ups: is required"),
    ('[[regions.power_sources]]\nkind = "snmpv9"\nsensor = "u"\n',
     "regions[0].power_sources[0]: Input tag 'snmpv9'"),
    ('[[regions.power_sources]]\nkind = "nut"\nsensor = "u"\nups = "u"\nusername = "x"\n',
     "username and password_file go together"),
    ('[[regions.power_sources]]\nkind = "nut"\nsensor = "u"\nups = "u"\n'
     '[[regions.power_sources]]\nkind = "nut"\nsensor = "u"\nups = "v"\n',
     "regions[0]: power_sources: each source needs its own sensor name"),
    ('[[regions.power_sources]]\nkind = "snmp"\nsensor = "u"\ntarget = "h"\nmib = "oids"\n',
     'regions[0].power_sources[0]: mib = "oids" goes with an [oids] table'),
    ('[[regions.power_sources]]\nkind = "snmp"\nsensor = "u"\ntarget = "h"\nversion = "3"\n',
     'version = "3" needs user'),
    ('[[regions.power_sources]]\nkind = "snmp"\nsensor = "u"\ntarget = "h"\nversion = "3"\n'
     'user = "x"\npriv_protocol = "AES"\npriv_key_file = "/k"\n', "privacy needs authentication"),
    ('[[regions.power_sources]]\nkind = "snmp"\nsensor = "u"\ntarget = "h"\nmib = "oids"\n'
     '[regions.power_sources.oids]\nstate = "1.3.x"\nstates = { 1 = "utility_ok" }\n',
     "regions[0].power_sources[0].oids.state"),
    ('[[mqtt]]\nurl = "mqtt://b"\n[[mqtt.mappings]]\ntopic = "a/#/b"\nregion = "east"\n'
     'sensor = "s"\nnut_status = true\n', "mqtt[0].mappings[0]: topic 'a/#/b'"),
    ('[[mqtt]]\nurl = "mqtt://b"\n[[mqtt.mappings]]\ntopic = "a/b"\nregion = "east"\n'
     'sensor = "s"\n', "mqtt[0].mappings[0]: give either states"),
    ('[[mqtt]]\nurl = "mqtt://b"\n[[mqtt.mappings]]\ntopic = "a/b"\nregion = "north"\n'
     'sensor = "s"\nnut_status = true\n', "mqtt[0].mappings[0].region: unknown region"),
    ('[[mqtt]]\nurl = "mqtt://b"\n[[mqtt.mappings]]\ntopic = "a/b"\nregion = "east"\n'
     'sensor = "{5}"\nnut_status = true\n', "sensor {5}: the topic has only 2 levels"),
    ('[[mqtt]]\nurl = "mqtt://b"\n[[mqtt.mappings]]\ntopic = "a/b"\nregion = "east"\n'
     'sensor = "s"\nstates = { on = "sunny" }\n', "mqtt[0].mappings[0].states.on"),
])
def test_errors_name_their_location(tmp_path: Path, extra: str, expected: str) -> None:
    errors = _errors(tmp_path, BASE + extra)
    assert any(e.startswith(expected) or expected in e for e in errors), errors


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    errors = _errors(tmp_path, BASE.replace('"east"\n[[', '"nowhere"\n[[') +
                     '[etcd]\nlease_ttl_s = 0\n[policy]\ncooldown_s = -1\n')
    assert "etcd.lease_ttl_s: must be >= 2" in errors
    assert "policy.cooldown_s: must be >= 0" in errors
    assert "region: 'nowhere' is not one of the [[regions]]" in errors


def test_broken_toml_says_where(tmp_path: Path) -> None:
    errors = _errors(tmp_path, BASE + "[policy\n")
    assert len(errors) == 1 and "line 6" in errors[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.toml", Overrides())


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE + "[etcd]\nlease_ttl_s = 1\n")
    run = [sys.executable, "-m", "failoverd", "check-config"]
    ok = subprocess.run([*run, str(GOOD)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "ok" in ok.stdout
    # The timing an operator should know: how long a dead site's groups wait.
    assert re.search(r"site loss: member loss after ~\d+s .*promotion elsewhere after ~\d+s",
                     ok.stdout), ok.stdout
    err = subprocess.run([*run, str(bad)], capture_output=True, text=True, check=False)
    assert err.returncode == 1
    assert "etcd.lease_ttl_s: must be >= 2" in err.stderr


def test_deprecated_cluster_limit_is_an_alias_with_a_warning(tmp_path: Path) -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    cfg = tmp_path / "c.toml"
    cfg.write_text('cluster = "c"\nmember = "m"\nregion = "east"\n[[regions]]\n'
                   'name = "east"\n[policy]\nmax_auto_failovers_per_hour = 7\n')
    from failoverd.config import load_settings  # noqa: PLC0415

    s = load_settings(cfg)
    assert s.policy.evacuation_limit == 7
    out = subprocess.run([sys.executable, "-m", "failoverd", "check-config", str(cfg)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0
    assert "max_auto_failovers_per_hour is deprecated" in out.stderr
    assert "max_evacuations_per_hour" in out.stderr


def test_check_config_on_a_shared_file_without_member_or_region(tmp_path: Path) -> None:
    """The one file every member shares need not name a member or region."""
    cfg = tmp_path / "shared.toml"
    cfg.write_text('cluster = "c"\n[[regions]]\nname = "east"\n[[regions]]\nname = "west"\n')
    run = [sys.executable, "-m", "failoverd", "check-config", str(cfg)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAILOVERD_")}
    out = subprocess.run(run, capture_output=True, text=True, check=False, env=env)
    assert out.returncode == 0, out.stderr
    assert "shared file: no member or region" in out.stdout
    # A real error in a shared file is still reported.
    cfg.write_text('cluster = "c"\n[[regions]]\nname = "east"\n[etcd]\nlease_ttl_s = 1\n')
    out = subprocess.run(run, capture_output=True, text=True, check=False, env=env)
    assert out.returncode == 1 and "etcd.lease_ttl_s: must be >= 2" in out.stderr


def test_unreadable_files_are_check_config_errors_with_their_location(tmp_path: Path) -> None:
    """A missing etcd CA is an error with its location (exit 1, no traceback),
    for check-config and for run alike; a missing route key is a warning."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('cluster = "c"\nmember = "m"\nregion = "east"\n'
                   f'[etcd]\nca_file = "{tmp_path}/nope-ca.pem"\n'
                   '[[regions]]\nname = "east"\n[[groups]]\nname = "g"\nregions = ["east"]\n'
                   '[[groups.routes]]\nkind = "webhook"\nurl = "http://127.0.0.1:1/"\n'
                   f'secret_file = "{tmp_path}/nope.secret"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAILOVERD_")}
    for argv in (["check-config", str(cfg)], ["run", "--config", str(cfg)]):
        out = subprocess.run([sys.executable, "-m", "failoverd", *argv], capture_output=True,
                             text=True, check=False, env=env, timeout=30)
        assert out.returncode == 1, out
        assert f"etcd.ca_file: cannot read {tmp_path}/nope-ca.pem" in out.stderr
        assert "groups[0].routes[0].secret_file" in out.stderr and "warning" in out.stderr
        assert "Traceback" not in out.stderr


def test_the_url_peers_use_is_the_advertised_one(tmp_path: Path) -> None:
    """A member listening on every address tells its peers (and failoverctl)
    the URL it gave; without one it would advertise 0.0.0.0, which each peer
    would resolve to itself."""
    p = tmp_path / "c.toml"
    p.write_text(BASE + '[api]\nlisten = "0.0.0.0:8080"\n'
                 'advertise_url = "https://east-1.example:8080/"\n'
                 'peer_source_address = "127.0.0.21"\n')
    s = load_settings(p, Overrides())
    assert s.api.url() == "https://east-1.example:8080"
    assert str(s.api.peer_source_address) == "127.0.0.21"
    p.write_text(BASE + '[api]\nlisten = "127.0.0.1:9000"\n')
    assert load_settings(p, Overrides()).api.url() == "http://127.0.0.1:9000"
