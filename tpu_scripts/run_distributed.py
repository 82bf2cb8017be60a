"""Runs one experiment as one process of a multi-host job: `jax.distributed.initialize()`, then
`python -m experiments.NAME` with the remaining flags, unchanged.

    python3 tpu_scripts/run_distributed.py pretrain --preset=d20 --mesh=fsdp:-1 --out_dir=gs://b/run1

Every experiment gets the multi-host path this way, whether or not it defines --distributed.
With no arguments to initialize(), JAX detects the cluster itself: a Cloud TPU VM (every worker
of a pod slice), SLURM (srun: one process per task, SLURM_LOCALID picks the task's GPU), or
Open MPI. The scripts that call this: tpu_scripts/launch.sh (TPU) and tpu_scripts/slurm_gpu.sbatch.

ZIPCHAT_NO_DISTRIBUTED=1 skips initialize() (a single host, or a test of the launch scripts).
"""
from __future__ import annotations

import os
import pathlib
import runpy
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1].startswith("-"):
        sys.exit(f"usage: {argv[0]} EXPERIMENT [--flag=value ...]  (EXPERIMENT: a module in experiments/)")
    name = argv[1]
    if not (REPO / "experiments" / f"{name}.py").is_file():
        known = sorted(p.stem for p in (REPO / "experiments").glob("*.py") if not p.stem.startswith("_"))
        sys.exit(f"{argv[0]}: no experiment {name!r} in {REPO / 'experiments'}; one of {known}")
    sys.path.insert(0, str(REPO))
    if os.environ.get("ZIPCHAT_NO_DISTRIBUTED") != "1":
        import jax

        jax.distributed.initialize()
        print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local / "
              f"{jax.device_count()} global devices", flush=True)
    # The experiment sees exactly the flags it would see on one host.
    sys.argv = [f"experiments/{name}.py", *argv[2:]]
    runpy.run_module(f"experiments.{name}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv)
