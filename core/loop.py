"""The one training loop every stage calls (pretraining, SFT, reward model, RL, honesty).

It owns the order of events and nothing else: resume-or-init, one step at a time, metrics of
step s fetched from the device only after step s+1 has been dispatched (the host never waits for
the device on an ordinary step), evaluation / save / log hooks at intervals, a clean stop when
asked (Ctrl-C), a final save. It does no file I/O of its own: checkpoints, metric files, plots
and progress lines are hooks the script passes. What differs between stages (where rows come
from, the loss, extra state) lives in the step function and the batch source.

Order within a step s (1-based, after the update):
    dispatch step s -> log step s-1 (one step late)
    if s is a log / eval / save / final step, or a stop was asked: wait, log step s now
    eval hook (s % eval_every == 0, not the final step) -> save hook (s % save_every == 0)
    after_step hook (tests use it to kill the process mid-save)
After the last step: a final save unless step `total` was just saved, then the final eval.

Batch sources are iterators with `get_state()` / `set_state()` (grain's `DatasetIterator`, or
`core.loop.ListIterator` for a stage whose rows are not a grain pipeline); their state is handed
to the save hook so a resumed run sees exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional, Protocol

import jax

State = Any
Metrics = dict[str, Any]


class BatchSource(Protocol):
    def __next__(self) -> Any: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """When things happen. Steps are 1-based; `total_steps` is the step the run ends at."""

    total_steps: int
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 100
    eval_at_end: bool = True

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total steps must be >= 1, got {self.total_steps}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0 = only at the end), got {self.eval_every}")
        if self.save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {self.save_every}")


@dataclasses.dataclass
class Hooks:
    """What the script does at each event; every hook is optional.

    restore() -> None or (step, state, batch-source state): the latest checkpoint, if any.
    log(step, metrics, verbose): host metrics (numpy / python scalars) of a finished step, once
      per step, in order; verbose is True on log_every steps, the first and the last step.
    tick(step): after every step is dispatched (progress timing).
    evaluate(step, state) -> dict: at eval_every and at the end.
    save(step, state, batch_state, final): at save_every, at the end, and on a stop.
    after_step(step, is_save): last thing of every step.
    should_stop() -> bool: polled after every step (a SIGINT flag); the loop then logs, saves
      and returns with `interrupted=True`.
    """

    restore: Optional[Callable[[], Optional[tuple[int, State, Any]]]] = None
    log: Optional[Callable[[int, Metrics, bool], None]] = None
    tick: Optional[Callable[[int], None]] = None
    evaluate: Optional[Callable[[int, State], Metrics]] = None
    save: Optional[Callable[[int, State, Any, bool], None]] = None
    after_step: Optional[Callable[[int, bool], None]] = None
    should_stop: Optional[Callable[[], bool]] = None


@dataclasses.dataclass
class LoopResult:
    state: State
    step: int  # the last step completed
    start_step: int  # where this invocation started (0 = fresh)
    last_metrics: Metrics
    last_eval: Metrics
    interrupted: bool


class ListIterator:
    """A resumable iterator over a fixed list of batches, cycled (small stages, tests)."""

    def __init__(self, batches: list):
        if not batches:
            raise ValueError("ListIterator needs at least one batch")
        self.batches, self.i = batches, 0

    def __next__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def __iter__(self) -> Iterator:
        return self

    def get_state(self) -> dict:
        return {"i": self.i}

    def set_state(self, state: dict) -> None:
        self.i = int(state["i"])


def resume_or_init(init: Callable[[], State], restore=None) -> tuple[int, State, Any]:
    """(start step, state, batch-source state or None): the restored checkpoint when `restore`
    finds one, else `init()` at step 0."""
    found = restore() if restore is not None else None
    if found is not None:
        return found
    return 0, init(), None


def run(step_fn: Callable[[State, Any], tuple[State, Metrics]], init: Callable[[], State],
        batches: BatchSource, cfg: LoopConfig, hooks: Hooks = Hooks(),
        prepare: Callable[[Any], Any] = lambda b: b) -> LoopResult:
    """Trains from the latest checkpoint (or `init()`) up to `cfg.total_steps`.

    Args:
      step_fn: (state, batch) -> (state, device metrics); e.g. `core.train.make_train_step`.
      init: () -> a fresh state (called only when there is nothing to restore).
      batches: a resumable batch source (see the module docstring).
      cfg: intervals.
      hooks: the script's I/O.
      prepare: host batch -> device batch (e.g. `core.sharding.shard_batch` on the mesh).

    Returns:
      LoopResult. On a stop request the state is saved (save hook with final=True) and
      `interrupted` is True.
    """
    start, state, batch_state = resume_or_init(init, hooks.restore)
    if batch_state is not None:
        batches.set_state(batch_state)
    total = cfg.total_steps
    last: Metrics = {}
    last_eval: Metrics = {}
    step, pending, saved_at = start, None, start

    def flush():
        nonlocal pending, last
        s, m = pending
        pending = None
        last = jax.device_get(m)
        if hooks.log:
            hooks.log(s, last, s % cfg.log_every == 0 or s in (start + 1, total))

    def save(s, final):
        nonlocal saved_at
        if hooks.save:
            hooks.save(s, state, batches.get_state(), final)
        saved_at = s

    interrupted = False
    while step < total:
        state, m = step_fn(state, prepare(next(batches)))
        step += 1
        if pending is not None:
            flush()
        pending = (step, m)
        is_save = step % cfg.save_every == 0
        is_eval = bool(cfg.eval_every) and step % cfg.eval_every == 0 and step != total
        stop = hooks.should_stop() if hooks.should_stop else False
        if is_save or is_eval or stop or step == total or step % cfg.log_every == 0:
            jax.block_until_ready(m)
            if hooks.tick:
                hooks.tick(step)
            flush()
        elif hooks.tick:
            hooks.tick(step)
        if is_eval and hooks.evaluate:
            last_eval = hooks.evaluate(step, state) or {}
        if is_save:
            save(step, False)
        if hooks.after_step:
            hooks.after_step(step, is_save)
        if stop and step < total:
            if saved_at != step:
                save(step, True)
            interrupted = True
            break
    if pending is not None:
        flush()
    if not interrupted and start < total:  # a finished run resumed does nothing
        if saved_at != total:
            save(total, True)
        if cfg.eval_at_end and hooks.evaluate:
            last_eval = hooks.evaluate(total, state) or {}
    return LoopResult(state=state, step=step, start_step=start, last_metrics=last, last_eval=last_eval,
                      interrupted=interrupted)
