"""Data parallelism over every device of every process: one mesh axis, ``"data"``.

The train step stays one ``jax.jit`` program; where its inputs live decides how it runs.
Batches are split on their first (batch) axis across the mesh, so each device computes
``B / n_devices`` rows and XLA all-reduces the gradient. Params and optimiser state are
replicated, or with ``parallel.fsdp`` sharded (each array along its largest dimension that
the device count divides), which XLA turns into all-gathers before use and
reduce-scatters of the gradient. No ``pmap``.

Several hosts (multi-controller JAX): every process runs the same program on the same
config. Every process builds the same *global* batch (the data order is a pure function of
the seed and the step), and process ``i`` of ``P`` hands its devices rows
``[i * B / P, (i + 1) * B / P)`` of it (:func:`process_rows`). The mesh lists devices in
process order so these slices are contiguous. Only process 0 logs (:func:`is_main_process`);
every process takes part in checkpoint saves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtl_jax.config import DISTRIBUTED_MODES
from mtl_jax.errors import UserError

DATA_AXIS = "data"

# Set by the launchers jax.distributed.initialize() detects by itself (see jax/_src/clusters).
_CLUSTER_HINTS = (
    "JAX_COORDINATOR_ADDRESS",  # explicit: with JAX_NUM_PROCESSES and JAX_PROCESS_ID
    "OMPI_MCA_orte_hnp_uri",  # mpirun / mpiexec (Open MPI)
    "MEGASCALE_COORDINATOR_ADDRESS",  # multi-slice TPU
)


# -- mesh and shardings ----------------------------------------------------------------------


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices, all hosts).

    Devices are ordered by (process, id), so each process's devices form one contiguous
    block of the batch axis (what :func:`shard_batch` relies on).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the first (batch) axis over ``"data"``; other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def check_batch_sizes(train_batch_size: int, eval_batch_size: int, n_devices: int) -> None:
    """Raise a :class:`UserError` naming the config key when a batch does not split evenly.

    The global batch is what the config says; each device gets ``batch / n_devices`` rows.
    """
    for key, size in (
        ("train.batch_size", train_batch_size),
        ("data.eval_batch_size", eval_batch_size),
    ):
        if size % n_devices:
            raise UserError(
                f"config key '{key}': expected a multiple of the {n_devices} devices "
                f"(the global batch is split evenly across them), got {size}"
            )


def process_rows(batch_size: int, mesh: Mesh) -> tuple[int, int]:
    """``(start, stop)``: the rows of a global batch this process places on its devices.

    With ``P`` processes of equal device count this is ``[i * B / P, (i + 1) * B / P)`` for
    process ``i`` (the mesh is in process order); with one process, the whole batch.
    """
    n = mesh.size
    if batch_size % n:
        raise ValueError(f"a batch of {batch_size} rows does not split over {n} devices")
    me = jax.process_index()
    positions = [k for k, d in enumerate(mesh.devices.flat) if d.process_index == me]
    if not positions:
        raise ValueError(f"process {me} has no device in the mesh")
    if positions != list(range(positions[0], positions[-1] + 1)):
        raise ValueError(f"process {me}'s devices are not contiguous in the mesh")
    per_device = batch_size // n
    return positions[0] * per_device, (positions[-1] + 1) * per_device


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
    """A host batch as global arrays split on the batch axis over ``mesh``.

    Every array leaf (``[B, ...]``, nested dicts such as ``labels`` included) becomes a
    ``jax.Array`` of global shape ``[B, ...]`` with sharding :func:`batch_sharding`; other
    leaves pass through. ``B`` is the global batch: every process passes the same host
    batch and contributes its :func:`process_rows` slice (so the result does not depend on
    the number of processes). Leaves already placed with that sharding are kept.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return _put_local(dict(batch), sharding)

    def put(x: Any) -> Any:
        if isinstance(x, jax.Array):
            if x.sharding == sharding:
                return x
            if not x.is_fully_addressable:
                return jax.device_put(x, sharding)
            x = np.asarray(x)
        if not isinstance(x, np.ndarray) or x.ndim == 0:
            return x
        start, stop = process_rows(x.shape[0], mesh)
        return jax.make_array_from_process_local_data(sharding, x[start:stop], x.shape)

    return jax.tree.map(put, dict(batch))


def _put_local(batch: dict[str, Any], sharding: NamedSharding) -> dict[str, Any]:
    """One process: every host array of the batch in one batched ``device_put``.

    One call for all leaves instead of one per leaf: the per-step host cost of feeding
    the device is what bounds small steps (and accelerators) in the fit loop.
    """
    leaves, treedef = jax.tree.flatten(batch)
    moving = [
        i
        for i, x in enumerate(leaves)
        if (isinstance(x, np.ndarray) and x.ndim > 0)
        or (isinstance(x, jax.Array) and x.ndim > 0 and x.sharding != sharding)
    ]
    placed = jax.device_put([leaves[i] for i in moving], sharding)
    for i, x in zip(moving, placed, strict=True):
        leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


def fsdp_spec(shape: Sequence[int], n_devices: int) -> P:
    """The FSDP spec of one array: its largest dimension divisible by ``n_devices`` on
    ``"data"`` (the first such on ties), or replicated when none is (scalars included)."""
    divisible = [(size, -axis) for axis, size in enumerate(shape) if size % n_devices == 0]
    if n_devices <= 1 or not divisible:
        return P()
    axis = -max(divisible)[1]
    return P(*([None] * axis), DATA_AXIS)


def state_shardings(tree: Any, mesh: Mesh, fsdp: bool = False) -> Any:
    """The sharding of each leaf of a params / optimiser / train state tree.

    Replicated by default; with ``fsdp`` each array is sharded by :func:`fsdp_spec`.
    """
    n = mesh.size

    def one(x: Any) -> NamedSharding:
        return NamedSharding(mesh, fsdp_spec(np.shape(x), n) if fsdp else P())

    return jax.tree.map(one, tree)


def abstract_state(tree: Any, mesh: Mesh, fsdp: bool = False) -> Any:
    """``ShapeDtypeStruct`` leaves carrying the shardings of :func:`state_shardings`.

    Used as the Orbax restore target: the arrays are read straight into this mesh's
    layout, whatever the device count of the run that saved them.
    """
    shardings = state_shardings(tree, mesh, fsdp)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=s),
        tree,
        shardings,
    )


def place_state(state: Any, mesh: Mesh, fsdp: bool = False) -> Any:
    """``state`` (params, optimiser state, a :class:`~mtl_jax.train.TrainState`, ...) on
    ``mesh``: replicated, or FSDP-sharded with ``fsdp`` (see :func:`state_shardings`).

    Host values and single-device arrays must be the same on every process (they are:
    init is a pure function of the seed); global arrays are resharded on device.
    """
    return jax.tree.map(_put, state, state_shardings(state, mesh, fsdp))


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """One leaf onto ``sharding``; works for host, local and global (multi-process) values."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(
            _put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x)
        )
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def host_copy(tree: Any) -> Any:
    """Numpy copies of every leaf: the full (global) arrays, on every process.

    A save reads these while the next steps run and donate the device buffers. Arrays
    sharded across processes (FSDP on several hosts) are all-gathered first, a
    collective: every process must call this at the same point.
    """

    def copy(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.array(multihost_utils.process_allgather(x, tiled=True), copy=True)
        return np.array(x, copy=True)

    return jax.tree.map(copy, tree)


# -- processes -------------------------------------------------------------------------------


def is_main_process() -> bool:
    """True on process 0: the one that logs, writes metrics and shows progress."""
    return jax.process_index() == 0


def wants_distributed(flag: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``parallel.distributed = flag`` means calling ``jax.distributed.initialize``.

    ``"on"``: yes; ``"off"``: no; ``"auto"``: when the environment is a multi-process
    launch: ``JAX_COORDINATOR_ADDRESS`` set, a Slurm step of more than one task, Open MPI's
    ``mpirun``, or a Cloud TPU pod slice of more than one host.
    """
    if flag not in DISTRIBUTED_MODES:
        raise UserError(
            f"config key 'parallel.distributed': expected one of {DISTRIBUTED_MODES}, got {flag!r}"
        )
    if flag != "auto":
        return flag == "on"
    env = os.environ if environ is None else environ
    if any(env.get(name) for name in _CLUSTER_HINTS):
        return True
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env:
        return _int(env.get("SLURM_NTASKS")) > 1
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def distributed_args(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Explicit ``initialize`` arguments from ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``.

    JAX reads ``JAX_COORDINATOR_ADDRESS`` (and ``JAX_COORDINATOR_BIND_ADDRESS``) itself
    and detects Slurm, Open MPI and TPU pods; these two complete a hand-made launch.
    """
    env = os.environ if environ is None else environ
    args: dict[str, Any] = {}
    for name, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if env.get(name, "") != "":
            try:
                args[arg] = int(env[name])
            except ValueError:
                raise UserError(f"environment variable {name}: expected an integer") from None
    return args


def maybe_initialize_distributed(flag: str = "auto", **kwargs: Any) -> bool:
    """Start multi-controller JAX when ``flag`` (``parallel.distributed``) asks for it.

    Call before anything else touches JAX devices. Returns whether this run is distributed.
    ``kwargs`` go to ``jax.distributed.initialize`` (over :func:`distributed_args`).
    Calling it again in an initialised process is a no-op.
    """
    if not wants_distributed(flag):
        return jax.distributed.is_initialized()
    if jax.distributed.is_initialized():
        return True
    try:
        jax.distributed.initialize(**{**distributed_args(), **kwargs})
    except (RuntimeError, ValueError) as exc:
        raise UserError(
            f"parallel.distributed = {flag!r}: could not start multi-process JAX ({exc}). "
            "Set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID "
            "(or launch with Slurm / mpirun / on a TPU pod), before JAX is used"
        ) from None
    return True


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0
