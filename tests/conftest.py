"""Test session set-up: four fake CPU devices, so data-parallel code runs on N > 1 devices."""

import os
import sys
from pathlib import Path

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # configs/ is a plain folder imported by config files
    sys.path.insert(0, str(REPO))

DATA = REPO / "data"
