import os
import sys

# Tests run on the CPU in float32 (bfloat16 is ~10x slower on XLA:CPU); the repo root is importable for configs/.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
__import__("absl.flags").flags.FLAGS.mark_as_parsed()  # tests run outside an absl app; grain reads its absl flags
