"""schemathesis against /v1/openapi.json of a live daemon: no 5xx, every
response matches the document.  Bounded example count."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.stack import OPERATOR_TOKEN, LocalCluster

pytestmark = pytest.mark.cluster


async def test_api_conforms_to_its_openapi_document(api_cluster: LocalCluster, tmp_path: Path):
    api = api_cluster.daemons["w1"].api
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe), "run", f"{api}/v1/openapi.json", "-H",
           f"Authorization: Bearer {OPERATOR_TOKEN}", "--max-examples", "15",
           "--checks", "all", "--generation-deterministic", "--request-timeout", "15",
           "--no-color"]
    out = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True,
                                  timeout=600, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert all(d.alive() for d in api_cluster.daemons.values())
