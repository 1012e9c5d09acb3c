"""``failoverd`` with test fault points armed from ``FAILOVERD_FAULTS``.

The shipped entry points never arm fault points; the harness starts this
module instead of ``python -m failoverd`` when a test asks for faults
(:class:`devstack.stack.DaemonProc`).
"""

from __future__ import annotations

import os

from failoverd import faults
from failoverd.cli.daemon import main

faults.arm(os.environ.pop("FAILOVERD_FAULTS", ""))
raise SystemExit(main())
