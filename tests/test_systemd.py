"""The systemd units, checked by systemd's own tools (Debian ``systemd``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
BIN = Path(sys.executable).parent
# A template is checked as one of its instances.
UNIT_FILES = [("failoverd.service", None), ("failoverd@.service", "failoverd@payments.service")]


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def _installed(tmp_path: Path, name: str, as_name: str | None = None) -> Path:
    """The unit as it would be installed, with ExecStart pointing at this
    checkout's failoverd (verify checks that the binary exists)."""
    text = (UNITS / name).read_text().replace("/opt/failoverd/bin/", f"{BIN}/")
    path = tmp_path / (as_name or name)
    path.write_text(text)
    return path


@pytest.mark.parametrize(("name", "instance"), UNIT_FILES)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, name: str,
                                            instance: str | None) -> None:
    unit = _installed(tmp_path, name, instance)
    out = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "" and out.stdout.strip() == "", out.stderr + out.stdout


@pytest.mark.parametrize(("name", "instance"), UNIT_FILES)
def test_unit_exposure_is_two_or_lower(tmp_path: Path, name: str, instance: str | None) -> None:
    unit = _installed(tmp_path, name, instance)
    out = subprocess.run([ANALYZE, "security", "--offline=true", str(unit)],
                         capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert m is not None, out.stdout + out.stderr
    assert float(m.group(1)) <= 2.0, out.stdout


def test_unit_is_a_good_citizen() -> None:
    d = _directives((UNITS / "failoverd.service").read_text())
    assert d["Type"] == ["notify"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Restart"] == ["on-failure"]
    watchdog = int(d["WatchdogSec"][0])
    assert 0 < watchdog <= 30
    assert d["User"] == ["failoverd"] and d["StateDirectory"] == ["failoverd"]
    assert d["ConfigurationDirectory"] == ["failoverd"]
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "CapabilityBoundingSet": ""}.items():
        assert d[key] == [value], key
    assert d["SystemCallFilter"][0] == "@system-service"
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # The config is checked before start, with the command the unit runs.
    assert d["ExecStartPre"][0].split()[1:] == ["check-config", "/etc/failoverd/failoverd.toml"]


def test_template_hardening_matches_the_main_unit() -> None:
    def hardening(name: str) -> str:
        text = (UNITS / name).read_text()
        return text[text.index("# Hardening"):].split("\n", 1)[1]
    assert hardening("failoverd@.service") == hardening("failoverd.service")
    d = _directives((UNITS / "failoverd@.service").read_text())
    assert d["StateDirectory"] == ["failoverd/%i"]
    assert d["ExecStart"][0].endswith("--config /etc/failoverd/%i.toml")


def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    sysusers = shutil.which("systemd-sysusers") or "/usr/bin/systemd-sysusers"
    subprocess.run([sysusers, f"--root={tmp_path}", str(UNITS / "failoverd.sysusers")],
                   check=True, capture_output=True, timeout=60)
    user = next(line for line in (tmp_path / "etc/passwd").read_text().splitlines()
                if line.startswith("failoverd:"))
    assert user.endswith(":/var/lib/failoverd:/usr/sbin/nologin")
    assert re.search(r"^failoverd:x:\d+:", (tmp_path / "etc/group").read_text(), re.M)
