import sys
from pathlib import Path

# The tiny models live beside the tests; make them importable as `tiny_models`.
sys.path.insert(0, str(Path(__file__).parent))
