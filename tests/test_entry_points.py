"""The commands as a user runs them, from a directory that is not the checkout: a mistake on the command line is a
short message and exit status 2 before jax is imported, and a real crash keeps its traceback."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAR = f"{REPO}/configs/par.py"
# Runs a module as `python -m` does and reports, at exit, whether jax (or flax, tensorflow) was imported.
RUN = ("import atexit, runpy, sys; "
       "atexit.register(lambda: print('heavy imports:', sorted(m for m in ('jax', 'flax', 'tensorflow') "
       "if m in sys.modules), file=sys.stderr)); "
       "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def _run(module, *args, cwd, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", RUN, module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    ((f"--config={PAR}:size=XXXL", "--workdir=w"), "config argument size='XXXL' is not one of: tiny, small, B"),
    ((f"--config={PAR}:runlocal=ture", "--workdir=w"), "runlocal='ture' is not a bool"),
    ((f"--config={PAR}:sise=L", "--workdir=w"), "unknown config argument 'sise'"),
    ((f"--config={PAR}", "--config.optimizer.lrr=1", "--workdir=w"),
     '--config.optimizer.lrr: no such config field; did you mean "lr"?'),
    ((f"--config={PAR}", "--config.train.batch_size=big", "--workdir=w"), "batch_size=big"),
    ((f"--config={PAR}",), "--workdir is required"),
    (("--workdir=w",), "--config is required"),
    ((f"--config={PAR}", "--workdir=w", "--job=trian"), "--job=trian: value should be one of"),
    ((f"--config={PAR}", "--workdir=w", "--config.job=trian"), "unknown job 'trian' (config.job); known jobs:"),
    (("--config=configs/par.py", "--workdir=w"), "no config file 'configs/par.py' (relative paths start at"),
    ((f"--config={PAR}", "--worksdir=w"), "Unknown command line flag 'worksdir'. Did you mean: workdir"),
    ((f"--config={PAR}", "--workdir=w", "train"), "unexpected argument(s) 'train'"),
    ((f"--config={REPO}/configs/demo.py:quick", "--config.par.model.layers=2", "--workdir=w"),
     "--config.par.model.layers: no such config field"),  # demo.py loads par.py and vq.py beside it by path
    ((f"--config={REPO}/configs/vq.py:fmnst", "--workdir=w"), "unknown config argument 'fmnst'"),
    ((f"--config={REPO}/configs/vq.py:vq16,fmnist", "--workdir=w"), "vq16 and fmnist exclude each other"),
    ((f"--config={REPO}/configs/demo.py:quick=maybe", "--workdir=w"), "quick='maybe' is not a bool"),
])
def test_user_errors_are_one_short_block_with_status_2_before_heavy_imports(args, message, tmp_path):
    result = _run("par_jax.main", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("heavy imports:")]
    assert lines[0].startswith("python -m par_jax.main: error: ") and len(lines) <= 3, result.stderr
    if "layers" not in " ".join(args):  # a whole demo config includes the tokenizer's fields, read from its (jax) module
        assert "heavy imports: []" in result.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("bug, error", [('{"a": 1}["b"]', "KeyError: 'b'"),
                                        ('int("x")', "ValueError: invalid literal for int()")])
def test_a_crash_keeps_its_traceback(bug, error, tmp_path):
    """A bug in a config file (not a user's typo): its own traceback, once (not config_flags' escaped copy)."""
    (tmp_path / "broken.py").write_text(f"def get_config(arg=''):\n    return {bug}\n")
    result = _run("par_jax.main", f"--config={tmp_path / 'broken.py'}", "--workdir=w", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("Traceback") == 1 and error in result.stderr and "broken.py" in result.stderr
    assert "Error whilst parsing" not in result.stderr and ": error: " not in result.stderr


def test_help_lists_the_flags(tmp_path):
    result = _run("par_jax.main", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--workdir" in result.stdout and "--job" in result.stdout and "configs/FILE.py" in result.stdout


@pytest.mark.parametrize("module, args, message", [
    ("par_jax.convert", ("--kind=gpt", "--input=x.pt", "--output=o", f"--config={PAR}:size=XXL,n=5"),
     "n=5 must be a square"),
    ("par_jax.convert", ("--kind=gpt", "--output=o"), "--input is required"),
    ("par_jax.visualize", ("--grid=16,16", "--n=3"), "--n"),
    ("par_jax.training.memory", (f"--config={PAR}:size=XXXL",), "size='XXXL' is not one of"),
    ("par_jax.bench.train", (f"--config={PAR}:size=B", "--sizes=L"), "size is given twice"),
])
def test_every_command_reports_user_errors_the_same_way(module, args, message, tmp_path):
    result = _run(module, *args, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"python -m {module}: error: " in result.stderr and message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_grain_workers_need_absl_flags_parsed_by_the_caller(tmp_path):
    """The data pipeline no longer marks absl flags parsed behind the caller's back; it says what to do."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from configs import par
        from par_jax.data import pipeline
        config = par.get_config("runlocal")
        config.data.worker_count = 1
        try:
            pipeline.make_train_loader(config, global_batch_size=4)
        except RuntimeError as e:
            print("refused:", e)
        from absl import flags
        assert not flags.FLAGS.is_parsed()
        """)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused: config.data.worker_count > 0 starts grain worker processes" in result.stdout


def test_every_job_names_a_module_function_that_exists():
    """Jobs are imported only when run; a renamed module must not leave a job pointing nowhere."""
    import importlib.util

    from par_jax import main
    for name, target in main.JOBS.items():
        module, fn = target.split(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"job {name}: no module {module}"
        assert f"def {fn}(" in pathlib.Path(spec.origin).read_text(), f"job {name}: {module} has no {fn}()"
