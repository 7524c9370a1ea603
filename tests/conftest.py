import atexit
import os
import shutil
import sys
import tempfile

# Tests run on the CPU in float32 (bfloat16 is ~10x slower on XLA:CPU); the repo root is importable for configs/.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, shared by the xdist workers (they inherit this environment)
# and by every subprocess a test starts with os.environ: the tiny models' programs recur across tests and processes,
# and on a CPU their compilation, not their arithmetic, is most of a test's time. A run starts with an empty cache, so
# no test depends on what an earlier run left. Set JAX_COMPILATION_CACHE_DIR="" to run without it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="par_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# And XLA:CPU's backend at optimization level 0 (the multi-process tests already ran so): the programs are tiny, so
# compiling them costs more than running them; every test passes the same. Tests that start subprocesses with their
# own XLA_FLAGS keep theirs. (Users' runs keep XLA's default level: this file is only the tests'.)
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
__import__("absl.flags").flags.FLAGS.mark_as_parsed()  # tests run outside an absl app; grain reads its absl flags
