"""The README's first command plays its scenario end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_fails_the_active_region_over(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--exit",
         "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "app moved east -> west, epoch 1 -> 2" in out.stdout
    assert "epoch_changed" in out.stdout and "hook ran" in out.stdout
