"""Device meshes from a spec string, one logical-axis rules table, and shardings built from it.

Every mesh has the three axes ('data', 'fsdp', 'tensor') in that order (outermost to innermost,
so tensor parallelism lands on the fastest links); axes the spec leaves out have size 1.

- data:   pure data parallelism; params replicated, batch split.
- fsdp:   batch split too, and params (plus optimizer state) split along their 'embed' dim;
          XLA all-gathers each weight where it is used and reduce-scatters its gradient.
- tensor: Megatron-style: heads / mlp / vocab dims split; the batch is replicated.

A dim whose size the mapped mesh axes do not divide is replicated instead (for example 2 kv
heads on tensor:4), so any model runs on any mesh, only less sharded.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

MeshAxes = Union[None, str, tuple[str, ...]]

# Logical axis name (core/model.param_axes, plus 'batch' for activations) -> mesh axes.
RULES: dict[Optional[str], MeshAxes] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    None: None,
}

_AXIS_RE = re.compile(r"^\s*([A-Za-z_]\w*)\s*:\s*(-?\d+)\s*$")


def parse_mesh_spec(spec: str, n_devices: int) -> dict[str, int]:
    """'data:2,fsdp:-1' -> {'data': 2, 'fsdp': n_devices // 2, 'tensor': 1}.

    One axis may be -1 (the rest of the devices). ValueError on a malformed spec, an unknown or
    repeated axis, a non-positive size, or sizes whose product is not n_devices.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--mesh: empty mesh spec {spec!r}; expected e.g. 'data:2,fsdp:2,tensor:2'")
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        m = _AXIS_RE.match(part)
        if not m:
            raise ValueError(f"--mesh: malformed entry {part!r} in {spec!r}; expected NAME:SIZE, "
                             f"e.g. 'data:2,fsdp:2,tensor:2'")
        name, size = m.group(1), int(m.group(2))
        if name not in MESH_AXES:
            raise ValueError(f"--mesh: unknown axis {name!r} in {spec!r}; axes are {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"--mesh: axis {name!r} repeated in {spec!r}")
        if size == 0 or size < -1:
            raise ValueError(f"--mesh: axis {name!r} has size {size} in {spec!r}; use a positive size or -1")
        sizes[name] = size
    wild = [n for n, s in sizes.items() if s == -1]
    if len(wild) > 1:
        raise ValueError(f"--mesh: only one axis may be -1, got {wild} in {spec!r}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if wild:
        if n_devices % fixed:
            raise ValueError(f"--mesh: {spec!r} fixes {fixed} devices, which does not divide the "
                             f"{n_devices} devices available")
        sizes[wild[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ValueError(f"--mesh: {spec!r} uses {fixed} devices but {n_devices} are available; "
                         f"the product of the sizes must equal the device count (one size may be -1)")
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def make_mesh(spec: str = "data:-1", devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A Mesh with axes ('data', 'fsdp', 'tensor') from a spec such as 'data:2,fsdp:2,tensor:2'.

    Args:
      spec: comma-separated NAME:SIZE; names from MESH_AXES; one size may be -1.
      devices: the devices to use (default: all of jax.devices(), across every process).
    Axes are Auto (sharding propagated by XLA from the in/out shardings we give jit).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (AxisType.Auto,) * len(MESH_AXES)
    try:
        # Topology-aware device order (TPU ICI rings, GPU NVLink islands).
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except Exception:  # pragma: no cover - odd device sets fall back to the given order
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def mesh_axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(
    logical: Sequence[Optional[str]],
    shape: Optional[Sequence[int]],
    mesh: Mesh,
    rules: Mapping[Optional[str], MeshAxes] = RULES,
) -> P:
    """PartitionSpec for one array from its logical axis names.

    Mesh axes of size 1 are dropped; a mesh axis already used by an earlier dim is not reused;
    when `shape` is given, a dim that the mapped axes do not divide keeps the longest prefix of
    those axes that does divide it (often none: replicated).
    """
    if shape is not None and len(shape) != len(logical):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        if name not in rules:
            raise ValueError(f"no sharding rule for logical axis {name!r}; known: {sorted(map(str, rules))}")
        axes = rules[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in used)
        if shape is not None:
            while axes and shape[i] % mesh_axis_size(mesh, axes):
                axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _is_axes_leaf(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_shardings(axes_tree: Any, mesh: Mesh, shapes_tree: Any = None,
                    rules: Mapping[Optional[str], MeshAxes] = RULES) -> Any:
    """NamedSharding tree for params.

    Args:
      axes_tree: `core.model.param_axes(cfg)` (leaves: tuples of logical names).
      mesh: from `make_mesh`.
      shapes_tree: matching tree of arrays / ShapeDtypeStructs (`core.model.param_shapes(cfg)`);
        needed for the divisibility fallback. Without it every dim is assumed divisible.
    """
    if shapes_tree is None:
        return jax.tree_util.tree_map(lambda ax: NamedSharding(mesh, logical_to_spec(ax, None, mesh, rules)),
                                      axes_tree, is_leaf=_is_axes_leaf)
    return jax.tree_util.tree_map(
        lambda ax, s: NamedSharding(mesh, logical_to_spec(ax, tuple(s.shape), mesh, rules)),
        axes_tree, shapes_tree, is_leaf=_is_axes_leaf)


def model_shardings(cfg, mesh: Mesh) -> Any:
    """Param shardings for a `core.model.ModelConfig` (layout-aware, divisibility-safe)."""
    from core import model  # local: keep this module importable without the model

    return param_shardings(model.param_axes(cfg), mesh, model.param_shapes(cfg))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over data x fsdp; other dims and the tensor axis replicated."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    return NamedSharding(mesh, P(axes if axes else None))


def batch_divisor(mesh: Mesh) -> int:
    """The global batch size must be a multiple of this (data x fsdp)."""
    return mesh_axis_size(mesh, BATCH_AXES)


def opt_state_shardings(optimizer, params_shapes: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for `optimizer.init(params)`: param-shaped leaves (Adam moments) follow their
    param; everything else (step counts, learning rate) is replicated."""
    import optax

    state_shapes = jax.eval_shape(optimizer.init, params_shapes)
    try:
        return optax.tree_map_params(
            optimizer, lambda _, s: s, state_shapes, params_shardings,
            transform_non_params=lambda _: replicated(mesh),
            is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
        )
    except ValueError:
        # Parameter groups (optax.multi_transform) keep masked copies of the params tree, which
        # tree_map_params cannot line up; match each state leaf to the param whose path ends
        # its own path and whose shape it has.
        return _shardings_by_path(state_shapes, params_shapes, params_shardings, mesh)


def _key_names(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shardings_by_path(state_shapes: Any, params_shapes: Any, params_shardings: Any, mesh: Mesh) -> Any:
    by_path = {}
    shapes = dict((_key_names(p), s) for p, s in jax.tree_util.tree_flatten_with_path(params_shapes)[0])
    for p, sh in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
        names = _key_names(p)
        by_path[names] = (tuple(shapes[names].shape), sh)

    def pick(path, leaf):
        names = _key_names(path)
        for k in range(len(names)):
            hit = by_path.get(names[k:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, state_shapes)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Host numpy batch -> global jax arrays split over data x fsdp.

    Multi-host: every process passes its own local rows (global batch = local rows x process
    count, in process order); single-process it is a plain device_put with the batch sharding.
    """
    sharding = batch_sharding(mesh)
    div = batch_divisor(mesh)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        global_rows = v.shape[0] * jax.process_count()
        if global_rows % div:
            raise ValueError(f"batch['{k}'] has global batch size {global_rows}, not a multiple of "
                             f"data x fsdp = {div} of the mesh {dict(mesh.shape)}")
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def shard_global_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Host numpy batch that every process holds whole (e.g. an RL rollout batch, which all
    processes assemble identically) -> global jax arrays split over data x fsdp; each process
    places only the rows of its own devices. Single-process: the same as `shard_batch`."""
    sharding = batch_sharding(mesh)
    div = batch_divisor(mesh)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.shape[0] % div:
            raise ValueError(f"batch['{k}'] has batch size {v.shape[0]}, not a multiple of data x fsdp = {div} "
                             f"of the mesh {dict(mesh.shape)}")
        out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
    return out


def initialize_distributed(enabled: bool, **kwargs) -> None:
    """Calls `jax.distributed.initialize(**kwargs)` when `enabled` (multi-host TPU/GPU runs);
    must run before anything touches jax devices. A no-op otherwise."""
    if enabled:
        jax.distributed.initialize(**kwargs)


def describe(shardings: Any) -> dict[str, str]:
    """{'layers/attn/wq': 'PartitionSpec(None, 'fsdp', 'tensor')', ...}: for logs and reports."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): str(s.spec) for path, s in flat}


def to_host(tree):
    """Host numpy copies of (possibly sharded) device arrays. With several processes each holds
    only its shards: they are gathered, so every process sees (and decides on) the whole batch,
    as the engine's and the rollouts' host-side logic needs."""
    leaves = jax.tree_util.tree_leaves(tree)
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves):
        from jax.experimental import multihost_utils

        return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
