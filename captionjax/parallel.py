"""Devices and hosts: one code path for one CPU, every GPU of a machine, and many machines.

A run's devices form a 2-D mesh ("data", "model"). Batches are split over
"data"; the train state is replicated, except that with `config.model_parallel`
= M > 1 the large 2-D arrays (embeddings, the output layer, the fc layers, and
their Adam moments) are split over "model" (M devices) along their last axis.
XLA inserts the communication (jax.jit over NamedShardings).

Several processes (one per host, or one per GPU) start JAX's distributed
runtime with `initialize`; each reads its own share of the training records
(input_pipeline.TrainIterator) while evaluation batches are read whole by every
process and split here (`Placement.everywhere`). Results come back to every
process whole (`to_host`), and only process 0 writes files (`is_writer`).
Checkpoints hold host arrays, so a checkpoint moves between device counts.
"""

import dataclasses

import jax
import numpy as np

# 2-D arrays at least this big are split over "model" (when model_parallel > 1).
MODEL_SPLIT_MIN_SIZE = 1 << 16


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
               auto: bool = False) -> None:
  """Starts JAX's distributed runtime (before any other JAX call), or does nothing.

  `coordinator` HOST:PORT (process 0 listens there), `num_processes` and
  `process_id` name the process; `auto` lets jax.distributed.initialize() read
  them from the cluster (SLURM, Open MPI, a Cloud TPU slice). Raises ValueError
  for an incomplete or inconsistent set of flags.
  """
  given = [bool(coordinator), num_processes > 0, process_id >= 0]
  if not any(given) and not auto:
    return
  if any(given) and not all(given):
    raise ValueError("--coordinator, --num_processes and --process_id go together "
                     "(or use --distributed alone to read them from the cluster)")
  if all(given):
    if ":" not in coordinator:
      raise ValueError(f"--coordinator={coordinator!r} must be HOST:PORT")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in 0..{num_processes - 1}")
  kw = dict(coordinator_address=coordinator, num_processes=num_processes,
            process_id=process_id) if all(given) else {}
  jax.distributed.initialize(**kw)


def is_writer() -> bool:
  """True in the one process that writes logs, plots and JSON files (process 0)."""
  return jax.process_index() == 0


def to_host(x) -> np.ndarray:
  """A (global) array as numpy on every process, gathered when split across
  processes; a copy of its own (never a view of a buffer a step may donate)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.array(jax.device_get(x))
  if x.is_fully_replicated:
    return np.array(x.addressable_data(0))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_to_host(tree):
  return jax.tree_util.tree_map(to_host, tree)


def local_rows(x) -> np.ndarray:
  """This process's rows of a global array split over "data" (its first axis), in order."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  shards = sorted((s for s in x.addressable_shards if s.replica_id == 0),
                  key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def process_sum(x: np.ndarray) -> np.ndarray:
  """The sum over processes of each process's numpy array (itself with one process)."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x)).sum(0)


@dataclasses.dataclass
class Placement:
  """Where a run's arrays live: a ("data", "model") mesh over all devices."""
  mesh: jax.sharding.Mesh
  model_parallel: int = 1

  @classmethod
  def create(cls, model_parallel: int = 1, devices=None) -> "Placement":
    devices = list(jax.devices() if devices is None else devices)
    if model_parallel < 1 or len(devices) % model_parallel:
      raise ValueError(f"config.model_parallel={model_parallel} must divide the "
                       f"{len(devices)} devices")
    if jax.local_device_count() % model_parallel:
      raise ValueError(f"config.model_parallel={model_parallel} must divide the "
                       f"{jax.local_device_count()} devices of each process")
    grid = np.array(devices).reshape(len(devices) // model_parallel, model_parallel)
    return cls(jax.sharding.Mesh(grid, ("data", "model")), model_parallel)

  @property
  def data_size(self) -> int:
    return self.mesh.shape["data"]

  def check_batch(self, batch_size: int, field: str) -> None:
    """A clear error when a global batch does not split over the "data" devices."""
    n = self.data_size
    if batch_size % n:
      raise ValueError(f"{field}={batch_size} is not divisible by the {n} devices of the "
                       f"data axis ({jax.device_count()} devices, model_parallel="
                       f"{self.model_parallel}, {jax.process_count()} process(es))")

  def _sharding(self, *spec):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))

  def batch(self, x) -> jax.Array:
    """This process's rows of a global batch -> the global array split over "data"."""
    return jax.make_array_from_process_local_data(self._sharding("data"), np.asarray(x))

  def everywhere(self, x) -> jax.Array:
    """A whole global batch, the same on every process -> the array split over "data"."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, self._sharding("data"), lambda i: x[i])

  def state_sharding(self, tree):
    """The NamedSharding of each leaf of a state (replicated, or split over "model")."""
    def spec(x):
      shape = np.shape(x)
      if (self.model_parallel > 1 and len(shape) == 2 and np.prod(shape) >= MODEL_SPLIT_MIN_SIZE
          and shape[-1] % self.model_parallel == 0):
        return self._sharding(None, "model")
      return self._sharding()
    return jax.tree_util.tree_map(spec, tree)

  def state(self, tree):
    """Host (or device) arrays of a state, the same on every process -> placed."""
    shardings = self.state_sharding(tree)
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, _reader(x)), tree, shardings)


def _reader(x):
  host = to_host(x) if isinstance(x, jax.Array) else np.asarray(x)
  return lambda index: host[index]


def local_batch_putter(batch_size: int):
  """For single-process inference: x -> split over the local devices when
  `batch_size` divides over them, else x unchanged (one device)."""
  devices = jax.local_devices()
  if len(devices) == 1 or batch_size % len(devices) or jax.process_count() > 1:
    return lambda x: x
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("data",)),
                                        jax.sharding.PartitionSpec("data"))
  return lambda x: jax.device_put(np.asarray(x), sharding)
