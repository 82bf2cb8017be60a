"""Orbax checkpoints that hold a whole training run: params, optimizer state, step, the
data-iterator state of every host, and a JSON `meta` record (model config and run settings).

A checkpoint directory holds one sub-directory per step. Orbax writes each step into a temporary
directory and renames it only when every item is on disk, so a run killed mid-save leaves a
`<step>.orbax-checkpoint-tmp*` directory that is never listed as a step: resuming always starts
from the last complete checkpoint.

Typical use::

    mngr = make_manager(out_dir / "checkpoints", max_to_keep=3)
    save(mngr, step, train_state, data_state=it.get_state(), meta={"model_config": ...})
    ...
    mngr.wait_until_finished()   # async saves: before reading or exiting
    state, data_state, meta = restore(mngr, abstract_state, expected_meta={...})

This is the one module of core/ that touches the file system (with core/hf.py).
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

STATE_ITEM = "state"
DATA_ITEM = "data"
META_ITEM = "meta"


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a run with a different configuration."""


# ----------------------------------------------------------------------------- data-iterator state
#
# Every host (process) owns a different shard of the data, so each writes its own iterator state
# into `data/process_<i>-of-<n>.json`. The state is captured when `save` is called (this handler is
# synchronous), not later in the async writer, when the iterator has already moved on.


def _encode_data_state(state: Any) -> dict:
    """JSON-safe envelope: grain's DatasetIterator states are dicts, DataLoader states are bytes."""
    if isinstance(state, (bytes, bytearray)):
        return {"kind": "bytes", "value": base64.b64encode(bytes(state)).decode("ascii")}
    return {"kind": "json", "value": state}


def _decode_data_state(envelope: dict) -> Any:
    if envelope.get("kind") == "bytes":
        return base64.b64decode(envelope["value"])
    return envelope["value"]


class DataStateHandler(ocp.CheckpointHandler):
    """Writes/reads one JSON file of iterator state per process."""

    @staticmethod
    def _filename(directory: epath.Path) -> epath.Path:
        return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: "DataStateSave"):
        self._filename(directory).write_text(json.dumps(_encode_data_state(args.state)))

    def restore(self, directory: epath.Path, args: Optional["DataStateRestore"] = None) -> Any:
        fname = self._filename(directory)
        if not fname.exists():
            found = sorted(p.name for p in epath.Path(directory).glob("process_*.json"))
            raise CheckpointMismatchError(
                f"no data-iterator state {fname.name} in {directory} (found {found}); the checkpoint "
                f"was written with a different number of processes than {jax.process_count()}"
            )
        return _decode_data_state(json.loads(fname.read_text()))

    def metadata(self, directory: epath.Path) -> Optional[Any]:
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ----------------------------------------------------------------------------- manager


def make_manager(
    directory,
    *,
    max_to_keep: Optional[int] = 3,
    save_interval_steps: int = 1,
    async_save: bool = True,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` (created unless read_only).

    Args:
      directory: where the step sub-directories live (local path or gs://...).
      max_to_keep: keep only the newest K complete checkpoints (None keeps all).
      save_interval_steps: `save` without force=True only writes on multiples of this.
      async_save: write in a background thread; call `manager.wait_until_finished()` before
        exiting or reading the files.
      read_only: for loading a finished run (sampling, evaluation): never writes or deletes.

    Returns:
      an ocp.CheckpointManager; use it as a context manager or call `.close()`.
    """
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    if save_interval_steps < 1:
        raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    directory = epath.Path(directory)
    if "://" not in str(directory):
        # Orbax's tensorstore writer refuses relative paths (and fails only in its async thread).
        directory = epath.Path(os.path.abspath(directory))
    if read_only and not directory.exists():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    # Plain "multiples of N" (orbax's own interval rule also saves the first step it sees).
    should_save = None if read_only else (lambda step, _latest: step % save_interval_steps == 0)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else 1,
        should_save_fn=should_save,
        preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
        enable_async_checkpointing=async_save,
        # Leftovers of a save that was killed: never listed as steps; removing them keeps the
        # directory clean. (Disabled when read-only: a reader must not touch a live run.)
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE_ITEM, ocp.args.StandardSave, ocp.StandardCheckpointHandler())
    registry.add(STATE_ITEM, ocp.args.StandardRestore, ocp.StandardCheckpointHandler())
    # Same on-disk format; used to read a sub-tree (params without optimizer state).
    registry.add(STATE_ITEM, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
    registry.add(DATA_ITEM, DataStateSave, DataStateHandler())
    registry.add(DATA_ITEM, DataStateRestore, DataStateHandler())
    registry.add(META_ITEM, ocp.args.JsonSave, ocp.JsonCheckpointHandler())
    registry.add(META_ITEM, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    *,
    data_state: Any = None,
    meta: Optional[Mapping[str, Any]] = None,
    force: bool = False,
) -> bool:
    """Saves one checkpoint (asynchronously if the manager is async).

    Args:
      manager: from `make_manager`.
      step: the number of optimizer steps taken so far (the directory name).
      state: pytree of jax/numpy arrays, e.g. {'params', 'opt_state', 'step'}; may be sharded.
      data_state: the data iterator's `get_state()` after `step` batches (dict or bytes), or None.
      meta: JSON-serialisable record (model config, run settings) checked on restore.
      force: save even if `step` is not a multiple of save_interval_steps.

    Returns:
      True if a save was started.
    """
    items = {STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(dict(meta or {}))}
    if data_state is not None:
        items[DATA_ITEM] = DataStateSave(data_state)
    return bool(manager.save(int(step), args=ocp.args.Composite(**items), force=force))


# Files a finished step always has: orbax's own record of the step, the state's tree metadata and
# the meta record. A step directory without one of them (a copy cut short, a disk that filled up,
# a step written by something else) is incomplete, whatever its name says.
_REQUIRED_FILES = ("_CHECKPOINT_METADATA", f"{STATE_ITEM}/_METADATA", f"{META_ITEM}/metadata")


def step_path(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """The directory of one step."""
    return epath.Path(manager.directory) / str(step)


def incomplete_reason(manager: ocp.CheckpointManager, step: int) -> Optional[str]:
    """Why step `step` is not a complete checkpoint ("lacks state/_METADATA"), or None."""
    missing = [f for f in _REQUIRED_FILES if not (step_path(manager, step) / f).exists()]
    return f"lacks {', '.join(missing)}" if missing else None


def complete_steps(manager: ocp.CheckpointManager) -> list[int]:
    """Steps with every required file, newest first (incomplete ones are logged and skipped)."""
    manager.reload()
    out = []
    for step in sorted(manager.all_steps(), reverse=True):
        reason = incomplete_reason(manager, step)
        if reason is None:
            out.append(step)
        else:
            logging.getLogger(__name__).warning("skipping incomplete checkpoint %s: %s",
                                                step_path(manager, step), reason)
    return out


def latest_step(manager: ocp.CheckpointManager) -> Optional[int]:
    """The newest complete step (partially written or incomplete saves are skipped), or None."""
    steps = complete_steps(manager)
    return steps[0] if steps else None


def read_meta(manager: ocp.CheckpointManager, step: Optional[int] = None) -> dict:
    """The JSON `meta` record of `step` (default: the newest complete one); reads no arrays.

    Raises:
      FileNotFoundError: no complete checkpoint.
      ValueError naming the step's path: the record is unreadable.
    """
    step = latest_step(manager) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {manager.directory}")
    try:
        out = manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
        meta = out[META_ITEM]
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged step
        raise ValueError(f"corrupt checkpoint {step_path(manager, step)}: cannot read its "
                         f"{META_ITEM} record ({type(e).__name__}: {e})") from None
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"corrupt checkpoint {step_path(manager, step)}: {META_ITEM} is not an object")
    return dict(meta or {})


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_meta(saved: Mapping[str, Any], expected: Mapping[str, Any], where: str = "checkpoint"):
    """Raises CheckpointMismatchError listing every key of `expected` whose value differs in `saved`.

    Only the keys present in `expected` are compared (nested dicts key by key), so a reader can
    check just the model config while a resuming trainer also checks batch size and seq_len.
    """
    flat_saved, flat_exp = _flatten(saved), _flatten(expected)
    # JSON turns tuples into lists; compare on the JSON form so equal configs compare equal.
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731
    diffs = [
        f"{k}: checkpoint has {flat_saved.get(k, '<missing>')!r}, this run has {norm(v)!r}"
        for k, v in sorted(flat_exp.items())
        if k not in flat_saved or norm(flat_saved[k]) != norm(v)
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"{where} was written by a run with a different configuration; refusing to load it.\n  "
            + "\n  ".join(diffs)
            + "\nUse a fresh --out_dir, or the flags the checkpoint was written with."
        )


def abstract_state(state_or_shapes: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs (with target shardings) describing what `restore` should produce.

    Args:
      state_or_shapes: pytree of arrays or ShapeDtypeStructs (e.g. from jax.eval_shape).
      shardings: None (keep each leaf's own .sharding, if any) or a matching pytree of
        jax.sharding.Sharding. Passing the shardings of a new mesh restores onto that mesh.
    """
    def one(x, s=None):
        s = s if s is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)

    if shardings is None:
        return jax.tree_util.tree_map(one, state_or_shapes)
    return jax.tree_util.tree_map(one, state_or_shapes, shardings)


def restore(
    manager: ocp.CheckpointManager,
    target: Any,
    *,
    step: Optional[int] = None,
    expected_meta: Optional[Mapping[str, Any]] = None,
    with_data: bool = True,
    partial: bool = False,
) -> tuple[Any, Any, dict]:
    """Restores (state, data_state, meta) from `step` (default: the newest complete one).

    Args:
      manager: from `make_manager`.
      target: pytree of jax.ShapeDtypeStruct with shardings (see `abstract_state`) matching the
        saved state; arrays are placed with those shardings, so any mesh works.
      step: which step; None for the latest.
      expected_meta: checked against the saved meta before any array is read (see `check_meta`).
      with_data: also restore this process's data-iterator state (None if none was saved).
      partial: `target` names only a sub-tree of the saved state (e.g. {'params': ...} to load
        a model for sampling without its optimizer state); the rest is never read.

    Returns:
      (state pytree like `target`, data_state or None, meta dict).

    With `step=None`, a newest step that is incomplete or cannot be read is skipped (with a
    warning) for the next older one, so a damaged last save costs one interval, not the run.

    Raises:
      FileNotFoundError: no complete checkpoint.
      CheckpointMismatchError: the saved meta disagrees with `expected_meta`, or the saved
        arrays' shapes disagree with `target` (never skipped: the run, not the step, differs).
      ValueError naming the step's path: that step (given explicitly, or every step) is corrupt.
    """
    if step is not None:
        return _restore_step(manager, target, step, expected_meta, with_data, partial)
    steps = complete_steps(manager)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {manager.directory}")
    errors = []
    for candidate in steps:
        try:
            return _restore_step(manager, target, candidate, expected_meta, with_data, partial)
        except CheckpointMismatchError:
            raise
        except ValueError as e:
            errors.append(str(e))
            logging.getLogger(__name__).warning("%s; trying an older step", e)
    raise ValueError("no readable checkpoint in " + str(manager.directory) + ":\n  " + "\n  ".join(errors))


def _restore_step(manager, target, step, expected_meta, with_data, partial):
    """`restore` of one given step; damage becomes a ValueError naming the step's path."""
    reason = incomplete_reason(manager, step)
    if reason is not None:
        raise ValueError(f"incomplete checkpoint {step_path(manager, step)}: {reason}")
    meta = read_meta(manager, step)
    if expected_meta is not None:
        check_meta(meta, expected_meta, where=f"checkpoint {manager.directory}/{step}")
    _check_shapes(manager, step, target, partial=partial)
    if partial:
        state_args = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)
    else:
        state_args = ocp.args.StandardRestore(target)
    items = {STATE_ITEM: state_args}
    step_dir = epath.Path(manager.directory) / str(step) / DATA_ITEM
    has_data = with_data and step_dir.exists()
    if has_data:
        items[DATA_ITEM] = DataStateRestore()
    try:
        out = manager.restore(step, args=ocp.args.Composite(**items))
    except CheckpointMismatchError:
        raise
    except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many types for damaged files
        raise ValueError(f"corrupt checkpoint {step_path(manager, step)}: "
                         f"{type(e).__name__}: {str(e)[:500]}") from None
    return out[STATE_ITEM], (out[DATA_ITEM] if has_data else None), meta


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat_by_name(tree: Any) -> dict[str, Any]:
    """Leaves keyed by 'a/b/0/mu' paths: orbax metadata turns namedtuples (optax states) into
    dicts, so attribute and dict keys must compare equal."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): v for path, v in leaves}


def _check_shapes(manager: ocp.CheckpointManager, step: int, target: Any, partial: bool = False):
    """Compares saved array shapes with the target's so a mismatch names the leaf, not an
    obscure orbax/tensorstore error."""
    try:
        saved = manager.item_metadata(step)[STATE_ITEM]
    except Exception:  # noqa: BLE001 - metadata is optional; restore itself will still validate
        return
    if saved is None:
        return
    flat_saved = _flat_by_name(saved)
    flat_tgt = _flat_by_name(target)
    diffs = []
    keys = set(flat_tgt) if partial else set(flat_saved) | set(flat_tgt)
    for k in sorted(keys):
        a, b = flat_saved.get(k), flat_tgt.get(k)
        if a is None or b is None:
            diffs.append(f"{k}: {'missing in checkpoint' if a is None else 'not in this run'}")
        elif tuple(getattr(a, "shape", ())) != tuple(np.shape(b)):
            diffs.append(f"{k}: checkpoint shape {tuple(a.shape)}, this run {tuple(np.shape(b))}")
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {manager.directory}/{step} does not match this run's state:\n  "
            + "\n  ".join(diffs[:20])
            + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
        )

