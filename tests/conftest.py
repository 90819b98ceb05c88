import os
import sys
from pathlib import Path

# Under pytest-xdist (`-n 2`: the README's test command) the workers share the cores: OpenMP threads that
# spin while idle would take time slices from the other worker's threads (a 6 MB add ran 5x slower that
# way on 2 cores; docs/cpu_path.md), so they wait passively. Set before torch starts OpenMP.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The tiny models live beside the tests; make them importable as `tiny_models`.
sys.path.insert(0, str(Path(__file__).parent))
