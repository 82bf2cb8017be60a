"""tpu_scripts/: the TPU launch (gcloud, all workers) and the SLURM GPU path (srun), run for real
against fake `gcloud` / `srun` / `python3` on PATH that record what they are asked to do.

The fake gcloud executes an `ssh --worker=all --command CMD` once per simulated worker (each
with its own HOME), as the real one does on a pod slice; the fake srun runs its command once per
task with SLURM_PROCID set. The fake python3 records its argv and working directory, so the tests
see exactly what every worker / task would have run.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
FLAGS = ["--preset=d20", "--mesh=fsdp:-1", "--out_dir=gs://bucket/run 1", "--note=it's \"quoted\""]

_RECORD = '''
def record(path, **rec):
    with open(os.environ[path], "a") as f:
        f.write(json.dumps(rec) + "\\n")
'''

FAKE_GCLOUD = f'''#!{sys.executable}
import json, os, subprocess, sys
{_RECORD}
argv = sys.argv[1:]
record("FAKE_LOG", tool="gcloud", argv=argv)
if argv[:2] == ["config", "get-value"]:
    print("test-project")
elif "ssh" in argv and "--command" in argv and os.environ.get("FAKE_EXEC", "1") == "1":
    assert "--worker=all" in argv, argv
    cmd = argv[argv.index("--command") + 1]
    for w in range(int(os.environ["FAKE_WORKERS"])):
        home = os.path.join(os.environ["FAKE_ROOT"], f"worker{{w}}")
        os.makedirs(os.path.join(home, "zipchat"), exist_ok=True)
        env = dict(os.environ, HOME=home, TPU_WORKER_ID=str(w))
        # wait: a command that backgrounds its job still finishes before we return.
        subprocess.run(["bash", "-c", cmd + "\\nwait"], env=env, check=True)
'''

FAKE_SRUN = f'''#!{sys.executable}
import json, os, subprocess, sys
{_RECORD}
argv = sys.argv[1:]
record("FAKE_LOG", tool="srun", argv=argv)
i = 0
while argv[i].startswith("-"):
    i += 1
n = int(os.environ["FAKE_TASKS"])
for task in range(n):
    env = dict(os.environ, SLURM_PROCID=str(task), SLURM_LOCALID=str(task % 8), SLURM_NTASKS=str(n))
    subprocess.run(argv[i:], env=env, check=True)
'''

FAKE_PYTHON = f'''#!{sys.executable}
import json, os, sys
{_RECORD}
record("FAKE_RUNS", argv=sys.argv[1:], cwd=os.getcwd(),
       worker=os.environ.get("TPU_WORKER_ID", os.environ.get("SLURM_PROCID")))
print("fake python3 ran", sys.argv[1:])
'''


@pytest.fixture
def fake(tmp_path):
    """(env, log, runs): PATH with the fakes first; log() / runs() read what they recorded."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD), ("srun", FAKE_SRUN), ("python3", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT", "TPU_NAME", "ZONE", "SLURM_SUBMIT_DIR")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "log.jsonl"),
               FAKE_RUNS=str(tmp_path / "runs.jsonl"), FAKE_ROOT=str(tmp_path / "hosts"),
               TPU_NAME="pod", ZONE="us-central2-b")

    def read(name):
        p = tmp_path / name
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    return env, lambda: read("log.jsonl"), lambda: read("runs.jsonl"), tmp_path


def _run(args, env, **extra):
    return subprocess.run(["bash", *map(str, args)], cwd=REPO, env=dict(env, **extra), capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("foreground", [False, True])
def test_tpu_launch_runs_the_same_command_on_every_worker(fake, workers, foreground):
    env, log, runs, root = fake
    res = _run([SCRIPTS / "launch.sh", "pretrain", *FLAGS], env, FAKE_WORKERS=str(workers),
               FOREGROUND="1" if foreground else "0")
    assert res.returncode == 0, res.stderr
    calls = log()
    assert [c["argv"][:2] for c in calls] == [["config", "get-value"], ["compute", "tpus"]]
    ssh = calls[1]["argv"]
    assert ssh[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and ssh[4] == "pod"
    assert {"--zone", "us-central2-b", "--project", "test-project", "--worker=all"} <= set(ssh)
    got = runs()
    assert sorted(r["worker"] for r in got) == [str(w) for w in range(workers)]
    for r in got:
        # Every worker: the same experiment and flags, byte for byte (spaces and quotes kept).
        assert r["argv"] == ["tpu_scripts/run_distributed.py", "pretrain", *FLAGS]
        assert r["cwd"] == str(root / "hosts" / f"worker{r['worker']}" / "zipchat")
        logfile = root / "hosts" / f"worker{r['worker']}" / "pretrain.log"
        assert logfile.exists() != foreground  # background runs log to ~/EXPERIMENT.log
        if not foreground:
            assert "fake python3 ran" in logfile.read_text()


def test_tpu_launch_rejects_unknown_experiment_before_gcloud(fake):
    env, log, runs, _ = fake
    res = _run([SCRIPTS / "launch.sh", "no_such_experiment", "--x=1"], env, FAKE_WORKERS="4")
    assert res.returncode == 2 and "no experiment 'no_such_experiment'" in res.stderr
    assert [c["argv"][:2] for c in log()] == [["config", "get-value"]] and runs() == []


def test_tpu_setup_copies_to_and_installs_on_all_workers(fake):
    env, log, _, _ = fake
    res = _run([SCRIPTS / "setup.sh"], env, FAKE_WORKERS="4", FAKE_EXEC="0", PROJECT="p1")
    assert res.returncode == 0, res.stderr
    calls = [c["argv"] for c in log()]
    assert [c[3] for c in calls] == ["scp", "ssh"]
    assert all("--worker=all" in c and "p1" in c for c in calls)
    assert "pip install" in calls[1][calls[1].index("--command") + 1]


@pytest.mark.parametrize("tasks", [1, 4])
def test_slurm_script_runs_one_process_per_task_with_the_same_flags(fake, tasks):
    env, log, runs, _ = fake
    res = _run([SCRIPTS / "slurm_gpu.sbatch", "pretrain", *FLAGS], env, FAKE_TASKS=str(tasks))
    assert res.returncode == 0, res.stderr
    (call,) = log()
    assert call["tool"] == "srun" and "--kill-on-bad-exit=1" in call["argv"]
    assert call["argv"][-len(FLAGS) - 3:] == ["python3", "tpu_scripts/run_distributed.py", "pretrain", *FLAGS]
    got = runs()
    assert sorted(r["worker"] for r in got) == [str(t) for t in range(tasks)]
    assert all(r["argv"] == ["tpu_scripts/run_distributed.py", "pretrain", *FLAGS] and r["cwd"] == str(REPO)
               for r in got)


def test_slurm_script_rejects_unknown_experiment(fake):
    env, log, _, _ = fake
    res = _run([SCRIPTS / "slurm_gpu.sbatch", "nope"], env, FAKE_TASKS="2")
    assert res.returncode == 2 and "no experiment 'nope'" in res.stderr and log() == []


def test_run_distributed_passes_flags_to_the_experiment_unchanged():
    """The real launcher (initialize() skipped: no cluster here) hands the experiment its flags:
    absl parses them, so an unknown one fails and a known one reaches the flag parser."""
    env = dict(os.environ, ZIPCHAT_NO_DISTRIBUTED="1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(SCRIPTS / "run_distributed.py"), "bench_decode"]
    bad = subprocess.run(cmd + ["--no_such_flag=1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no_such_flag" in bad.stderr
    bad = subprocess.run(cmd + ["--repeats=0", "--hf=false"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "--repeats must be >= 1" in bad.stderr
    missing = subprocess.run([sys.executable, str(SCRIPTS / "run_distributed.py"), "nope"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "no experiment 'nope'" in missing.stderr
