"""Run-directory I/O around `core.loop.run`, shared by every training script.

A stage script builds its step function, its batch source and its evaluation, then calls
`train(...)`, which supplies the loop's hooks: orbax checkpoints (params + optimizer state + step +
the batch source's state, with a fingerprint a resumed run must match), metrics.jsonl and
evals.jsonl (cut back to the checkpoint on resume, so nothing is logged twice), progress lines
with tokens/s, MFU and ETA, and Ctrl-C: the first one finishes the current step, saves and prints
the command that resumes; a second one aborts at once.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shlex
import signal
import sys
import time
from typing import Any, Callable, Optional

from experiments import common


def has_checkpoints(out_dir) -> bool:
    d = pathlib.Path(out_dir) / common.CHECKPOINT_DIR
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def check_fresh_or_resume(out_dir, resume: bool) -> bool:
    """True when out_dir holds checkpoints to resume. A run directory with checkpoints and no
    --resume is an error (before anything is written), so a finished run is never overwritten."""
    found = has_checkpoints(out_dir)
    if found and not resume:
        raise ValueError(f"--out_dir={out_dir} already holds checkpoints; pass --resume to continue "
                         f"that run or use a fresh --out_dir")
    return found


class StopFlag:
    """SIGINT -> a flag the loop polls (the step in flight finishes, the run saves and stops).
    A second SIGINT raises KeyboardInterrupt at once. Restores the old handler on exit."""

    def __init__(self):
        self.asked = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. a test harness): no Ctrl-C handling
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        common.say("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __call__(self) -> bool:
        return self.asked

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def resume_command() -> str:
    """The command line that continues this run: this one with --resume."""
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--noresume") and not a.startswith("--resume=")]
    module = "experiments." + pathlib.Path(sys.argv[0]).stem if sys.argv and sys.argv[0].endswith(".py") else "?"
    return "python -m " + " ".join([module, *map(shlex.quote, args), "--resume"])


@dataclasses.dataclass
class StageIO:
    """What `train` needs to know about the run directory and its checkpoints."""

    out_dir: pathlib.Path
    fingerprint: dict  # what a resumed checkpoint must agree with
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    resume: bool = False
    debug_kill_at_step: int = -1


def train(step_fn, init: Callable[[], Any], abstract_state: Callable[[], Any], batches, loop_cfg, io: StageIO, *,
          mesh, progress: common.Progress, evaluate: Optional[Callable[[int, Any], dict]] = None,
          record: Optional[Callable[[int, dict], dict]] = None, t_start: Optional[float] = None):
    """Runs `core.loop.run` with checkpoint, metrics, progress and Ctrl-C hooks.

    Args:
      step_fn, init, batches, loop_cfg: as for `core.loop.run`.
      abstract_state: () -> the state's ShapeDtypeStructs with shardings (the restore target).
      io: the run directory's settings.
      mesh: for sharding host batches.
      progress: a common.Progress (its pause() is called after evals and saves).
      evaluate: (step, state) -> record; logged to evals.jsonl by this function.
      record: (step, host metrics) -> the JSON record for metrics.jsonl (default: the scalars).
      t_start: wall-clock start of the script (for 'elapsed').

    Returns:
      core.loop.LoopResult.
    """
    import jax

    from core import checkpoint as ck
    from core import loop
    from core import sharding as sharding_lib

    t_start = t_start or time.time()
    out_dir = io.out_dir
    ckpt_dir = out_dir / common.CHECKPOINT_DIR
    is_main = jax.process_index() == 0

    def restore():
        if not (io.resume and has_checkpoints(out_dir)):
            if io.resume:
                common.say(f"--resume: no checkpoint in {ckpt_dir} yet; starting from scratch")
            return None
        with ck.make_manager(ckpt_dir, read_only=True) as ro:
            step = ck.latest_step(ro)
            if step is None:
                return None
            # The small JSON record first: a mismatched run fails before any array is read.
            ck.check_meta(ck.read_meta(ro, step), io.fingerprint, where=f"checkpoint {ckpt_dir}/{step}")
            state, data_state, _ = ck.restore(ro, abstract_state(), step=step, expected_meta=io.fingerprint)
        if data_state is None:
            raise ValueError(f"checkpoint {ckpt_dir}/{step} has no data-iterator state; cannot resume exactly")
        common.say(f"resumed from {ckpt_dir}/{step}")
        return step, state, data_state

    mngr = ck.make_manager(ckpt_dir, max_to_keep=io.keep_checkpoints, save_interval_steps=loop_cfg.save_every,
                           async_save=io.async_checkpoint)
    metrics_log = evals_log = None

    def log(step, m, verbose):
        rec = record(step, m) if record else {k: float(v) for k, v in m.items() if getattr(v, "ndim", 0) == 0}
        rec = {"step": step, **rec, "tokens_per_s": progress.tokens_per_s, "mfu": progress.mfu,
               "step_time": progress.step_time, "elapsed": time.time() - t_start}
        metrics_log.log(rec)
        if verbose:
            common.say(progress.line(step, rec))

    def ev(step, state):
        rec = {"step": step, **evaluate(step, state)}
        evals_log.log(rec)
        progress.pause()
        return rec

    def save(step, state, data_state, final):
        ck.save(mngr, step, state, data_state=data_state, meta=io.fingerprint, force=final)
        progress.pause()

    def after_step(step, is_save):
        if step == io.debug_kill_at_step:
            common.say(f"DEBUG: SIGKILL at step {step}" + (" while its checkpoint is being written" if is_save else ""))
            os.kill(os.getpid(), signal.SIGKILL)

    def tick(step):
        progress.tick()

    try:
        with StopFlag() as stop:
            # The logs are cut back to the restored step before anything is appended.
            def restore_and_open():
                found = restore()
                start = found[0] if found else 0
                if is_main:  # the one writer; another process's rewrite would orphan its open file
                    common.truncate_jsonl(out_dir / common.METRICS_FILE, start)
                    common.truncate_jsonl(out_dir / common.EVALS_FILE, start)
                nonlocal metrics_log, evals_log
                metrics_log = common.MetricsLogger(out_dir / common.METRICS_FILE, enabled=is_main)
                evals_log = common.MetricsLogger(out_dir / common.EVALS_FILE, enabled=is_main)
                progress.start_step = start
                return found

            hooks = loop.Hooks(restore=restore_and_open, log=log, tick=tick, evaluate=ev if evaluate else None,
                               save=save, after_step=after_step, should_stop=stop)
            result = loop.run(step_fn, init, batches, loop_cfg, hooks,
                              prepare=lambda b: sharding_lib.shard_batch(b, mesh))
        mngr.wait_until_finished()
    finally:
        for lg in (metrics_log, evals_log):
            if lg is not None:
                lg.close()
        mngr.close()
    if result.interrupted:
        common.say(f"stopped at step {result.step} (checkpoint saved). To continue:\n  {resume_command()}")
    return result
