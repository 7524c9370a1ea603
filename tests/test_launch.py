"""Launch scripts: the commands their dry runs print, the same commands when run for real (against stand-ins for
gcloud and sbatch), clean failures on missing settings, and (when the tools are installed) shellcheck and gcloud's
own argument parser."""

import concurrent.futures
import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu.sh"
SLURM = REPO / "launch" / "slurm.sh"
SETTINGS = ("PROJECT_ID", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "SPOT", "QUEUED", "JAX_VERSION",
            "CONFIG", "RUN_NAME", "BUCKET", "WORKDIR", "DRY_RUN", "NODES", "GPUS_PER_NODE", "PARTITION", "ACCOUNT",
            "TIME_LIMIT", "CPUS_PER_GPU", "SETUP", "LOG_DIR")
TPU_ENV = {"PROJECT_ID": "my-proj", "ZONE": "us-east5-a", "TPU_NAME": "par-xl"}
RUN_FLAGS = ["--config=configs/par.py:size=XL,n=4,res=384", "--name=xl4", "--bucket=my-bucket"]


def _run(script, *args, env=None, path_prefix=None):
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    clean.update(env or {})
    if path_prefix:
        clean["PATH"] = f"{path_prefix}{os.pathsep}{clean['PATH']}"
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=clean, cwd=REPO,
                          timeout=60)


def _commands(result):
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line and not line.startswith("#")]


def _dry(script, *args, env=None):
    return _commands(_run(script, "--dry-run", *args, env=env) if script == SLURM else
                     _run(script, args[0], "--dry-run", *args[1:], env=env))


def _find(commands, *prefix):
    found = [c for c in commands if c[: len(prefix)] == list(prefix)]
    assert found, f"no command starting with {' '.join(prefix)!r} in {commands}"
    return found


def _option(command, name):
    values = [a.split("=", 1)[1] for a in command if a.startswith(name + "=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {command}"
    return values[0]


def test_create_queued_spot_slice():
    cmds = _dry(TPU, "create", "--accelerator=v5p-64", "--spot", "--queued", env=TPU_ENV)
    create = _find(cmds, "gcloud", "compute", "tpus", "queued-resources", "create", "par-xl")[0]
    assert "--spot" in create
    assert _option(create, "--node-id") == "par-xl"
    assert _option(create, "--accelerator-type") == "v5p-64"
    assert _option(create, "--runtime-version") == "v2-alpha-tpuv5"
    assert _option(create, "--zone") == "us-east5-a" and _option(create, "--project") == "my-proj"
    describe = _find(cmds, "gcloud", "compute", "tpus", "queued-resources", "describe", "par-xl")[0]
    assert _option(describe, "--format") == "value(state.state)"


def test_create_on_demand_vm_with_flags_instead_of_environment():
    cmds = _dry(TPU, "create", "--project=p2", "--zone=europe-west4-a", "--tpu=t2", "--accelerator=v4-32",
                "--runtime-version=my-image")
    create = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create", "t2")[0]
    assert "--spot" not in create
    assert (_option(create, "--version"), _option(create, "--zone"), _option(create, "--project")) == (
        "my-image", "europe-west4-a", "p2")
    assert not [c for c in cmds if "queued-resources" in c]


def test_setup_installs_the_checkout_on_every_worker():
    cmds = _dry(TPU, "setup", "--jax-version=0.10.2", "--python=3.12", env=TPU_ENV)
    archive = _find(cmds, "git", "-C", str(REPO), "archive")[0]
    assert archive[-1] == "HEAD"
    tarball = _option(archive, "-o") if "-o=" in " ".join(archive) else archive[archive.index("-o") + 1]
    scp = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp", tarball)[0]
    assert _option(scp, "--worker") == "all"
    ssh = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "par-xl")[0]
    assert _option(ssh, "--worker") == "all"
    remote = _option(ssh, "--command")
    assert "tar xzf ~/par_jax.tar.gz" in remote
    # A venv with its own Python (the TPU images' 3.10 is too old for JAX), then the checkout and jax[tpu] in it.
    assert "uv venv -q --python=3.12 $HOME/par_jax_env;" in remote
    assert 'uv pip install -q --python=$HOME/par_jax_env/bin/python -e ~/par_jax "jax[tpu]==0.10.2"' in remote


def test_run_starts_the_config_on_all_workers_with_a_bucket_workdir():
    cmds = _dry(TPU, "run", *RUN_FLAGS, "--", "--config.train.batch_size=256", env=TPU_ENV)
    ssh = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "par-xl")[0]
    assert _option(ssh, "--worker") == "all"
    remote = shlex.split(_option(ssh, "--command").replace(";", " ; "))
    main = remote[remote.index("$HOME/par_jax_env/bin/python"):]
    assert main[1:3] == ["-m", "par_jax.main"]
    assert "--config=configs/par.py:size=XL,n=4,res=384" in main
    assert "--workdir=gs://my-bucket/runs/xl4" in main
    assert "--config.train.batch_size=256" in main
    assert "$HOME/par_jax_runs/xl4.log" in main and "$HOME/par_jax_runs/xl4.pid" in remote


def test_logs_stop_and_delete():
    logs = _dry(TPU, "logs", "--name=xl4", env=TPU_ENV)
    ssh = _find(logs, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "par-xl")[0]
    assert _option(ssh, "--worker") == "all" and _option(ssh, "--output-directory") == "logs/xl4"
    assert "xl4.log" in _option(ssh, "--command")
    stop = _find(_dry(TPU, "stop", "--name=xl4", env=TPU_ENV), "gcloud", "compute", "tpus", "tpu-vm", "ssh")[0]
    assert "kill" in _option(stop, "--command") and "xl4.pid" in _option(stop, "--command")
    queued = _find(_dry(TPU, "delete", "--queued", env=TPU_ENV), "gcloud", "compute", "tpus", "queued-resources",
                   "delete", "par-xl")[0]
    assert "--force" in queued and "--quiet" in queued
    _find(_dry(TPU, "delete", env=TPU_ENV), "gcloud", "compute", "tpus", "tpu-vm", "delete", "par-xl")


@pytest.mark.parametrize("command, args, missing, flag", [
    ("create", ["--accelerator=v4-8"], "PROJECT_ID", "--project"),
    ("create", ["--accelerator=v4-8"], "ZONE", "--zone"),
    ("create", [], "ACCELERATOR_TYPE", "--accelerator"),
    ("setup", [], "TPU_NAME", "--tpu"),
    ("run", ["--name=a", "--bucket=b"], "CONFIG", "--config"),
    ("run", ["--config=c", "--bucket=b"], "RUN_NAME", "--name"),
    ("run", ["--config=c", "--name=a"], "BUCKET", "--bucket"),
    ("logs", [], "RUN_NAME", "--name"),
    ("create", ["--accelerator=v9z-8"], "RUNTIME_VERSION", "--runtime-version"),
])
def test_tpu_fails_cleanly_naming_the_missing_setting(command, args, missing, flag):
    env = {k: v for k, v in TPU_ENV.items() if k != missing}
    result = _run(TPU, command, "--dry-run", *args, env=env)
    assert result.returncode == 2
    assert missing in result.stderr and flag in result.stderr
    assert result.stdout == ""  # nothing printed, nothing run


def test_tpu_rejects_a_local_workdir_and_unknown_input():
    result = _run(TPU, "run", "--dry-run", "--config=c", "--name=a", "--workdir=/tmp/run", env=TPU_ENV)
    assert result.returncode == 2 and "gs://" in result.stderr and result.stdout == ""
    result = _run(TPU, "launch", "--dry-run", env=TPU_ENV)
    assert result.returncode == 2 and "unknown command 'launch'" in result.stderr
    result = _run(TPU, "create", "--zone", "x", env=TPU_ENV)
    assert result.returncode == 2 and "unknown argument '--zone'" in result.stderr


def test_slurm_submits_one_process_per_gpu():
    cmds = _dry(SLURM, "--config=configs/par.py:size=XL,n=4", "--workdir=/shared/xl", "--nodes=2",
                "--gpus-per-node=8", "--partition=gpu", "--time=3-00:00:00", "--setup=source ~/venv/bin/activate",
                "--", "--config.train.batch_size=256")
    sbatch = _find(cmds, "sbatch")[0]
    assert _option(sbatch, "--nodes") == "2"
    assert _option(sbatch, "--ntasks-per-node") == "8" and _option(sbatch, "--gpus-per-node") == "8"
    assert _option(sbatch, "--partition") == "gpu" and _option(sbatch, "--time") == "3-00:00:00"
    assert _option(sbatch, "--chdir") == str(REPO)
    assert not [a for a in sbatch if a.startswith("--account")]
    wrap = _option(sbatch, "--wrap")
    setup, step = wrap.split(" && ")
    assert setup == "source ~/venv/bin/activate"
    step = shlex.split(step)
    assert step[0] == "srun" and "--kill-on-bad-exit=1" in step
    main = step[step.index("python3"):]
    assert main == ["python3", "-m", "par_jax.main", "--config=configs/par.py:size=XL,n=4", "--workdir=/shared/xl",
                    "--config.train.batch_size=256"]


@pytest.mark.parametrize("missing", ["CONFIG", "WORKDIR", "NODES", "GPUS_PER_NODE"])
def test_slurm_fails_cleanly_naming_the_missing_setting(missing):
    env = {"CONFIG": "configs/par.py", "WORKDIR": "/shared/x", "NODES": "2", "GPUS_PER_NODE": "8"}
    del env[missing]
    result = _run(SLURM, "--dry-run", env=env)
    assert result.returncode == 2 and missing in result.stderr and result.stdout == ""


def test_slurm_rejects_a_bad_count():
    result = _run(SLURM, "--dry-run", "--config=c", "--workdir=w", "--nodes=two", "--gpus-per-node=8")
    assert result.returncode == 2 and "NODES must be a positive integer, got 'two'" in result.stderr


def _stand_ins(tmp_path):
    """gcloud / sbatch / git that only record their arguments (one shell-quoted line each)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "sbatch"):
        script = bin_dir / tool
        script.write_text(f'#!/usr/bin/env bash\nprintf "%q " {tool} "$@" >> {tmp_path}/calls\necho >> '
                          f'{tmp_path}/calls\n[[ "$*" == *describe* ]] && echo ACTIVE\nexit 0\n')
        script.chmod(0o755)
    return bin_dir


def _calls(tmp_path):
    path = tmp_path / "calls"
    return [shlex.split(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_real_runs_execute_what_the_dry_runs_print(tmp_path):
    bin_dir = _stand_ins(tmp_path)
    jobs = [(TPU, ["create", "--accelerator=v5p-64", "--spot", "--queued"]), (TPU, ["run", *RUN_FLAGS]),
            (TPU, ["stop", "--name=xl4"]), (TPU, ["delete", "--queued"]),
            (SLURM, ["--config=c", "--workdir=/w", "--nodes=2", "--gpus-per-node=4", f"--log-dir={tmp_path}/logs"])]
    for script, args in jobs:
        dry = [c for c in _commands(_run(script, *args, "--dry-run", env=TPU_ENV, path_prefix=bin_dir))
               if c[0] in ("gcloud", "sbatch")]
        assert _calls(tmp_path) == [], "a dry run called a tool"
        real = _run(script, *args, env=TPU_ENV, path_prefix=bin_dir)
        assert real.returncode == 0, real.stderr
        assert _calls(tmp_path) == dry
        (tmp_path / "calls").unlink()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_scripts_are_shellcheck_clean():
    scripts = sorted(str(p) for p in (REPO / "launch").glob("*.sh"))
    result = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud not installed")
def test_gcloud_accepts_every_printed_command(tmp_path):
    """gcloud parses each command's arguments before it looks for credentials: with an empty configuration it must
    fail on the missing account (exit 1), never on its arguments (exit 2)."""
    cmds = []
    for args in (["create", "--accelerator=v5p-64", "--spot", "--queued"], ["create", "--accelerator=v4-32"],
                 ["setup"], ["run", *RUN_FLAGS], ["logs", "--name=xl4"], ["stop", "--name=xl4"],
                 ["delete", "--queued"], ["delete"]):
        cmds += [c for c in _dry(TPU, *args, env=TPU_ENV) if c[0] == "gcloud"]
    # One call per distinct command and set of flags (each call starts gcloud: about a second).
    signature = lambda c: (tuple(a for a in c if not a.startswith("-")), tuple(a.split("=")[0] for a in c))
    cmds = list({signature(c)[0][:6] + signature(c)[1]: c for c in cmds}.values())
    (tmp_path / "logs" / "xl4").mkdir(parents=True)
    env = dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), CLOUDSDK_CORE_DISABLE_PROMPTS="1")

    def parse(cmd):
        return cmd, subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for cmd, result in pool.map(parse, cmds):
            assert result.returncode != 2 and "unrecognized arguments" not in result.stderr, (cmd, result.stderr)
            assert "account" in result.stderr.lower(), (cmd, result.stderr)
