"""--what=checkpoint: seconds to save and restore the train state through
checkpointing.Checkpointer (the path train.py uses)."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from typing import Any

from jaxmed.benchmarks.step import describe_run


def benchmark_checkpoint(config, workdir: str, repeats: int = 2) -> dict[str, Any]:
  """Seconds to save (until save() returns, and until on disk) and restore the train state."""
  import jax
  from flax import nnx

  from jaxmed import checkpointing
  from jaxmed import train
  from jaxmed.parallel import sharding as sharding_lib
  mesh, rules = train.create_mesh_and_rules(config)
  directory = tempfile.mkdtemp(prefix='benchmark_checkpoint_', dir=workdir)
  config = config.copy_and_resolve_references()
  config.checkpoint.keep = repeats + 1
  saves, returns, restores = [], [], []
  try:
    with sharding_lib.use_rules(mesh, rules):
      graphdef, state, _ = train.init_sharded_state(config, mesh, rules)
      _, abstract_state, _ = train.abstract_train_state(config, mesh, rules)
      jax.block_until_ready(state)
      state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
      checkpointer = checkpointing.Checkpointer(directory, config)
      try:
        for step in range(1, repeats + 1):
          t0 = time.perf_counter()
          checkpointer.save(step, nnx.to_pure_dict(state))
          returns.append(time.perf_counter() - t0)
          checkpointer.wait()
          saves.append(time.perf_counter() - t0)
          t0 = time.perf_counter()
          restored, _ = train.restore_state(checkpointer, abstract_state, step)
          jax.block_until_ready(restored)
          restores.append(time.perf_counter() - t0)
      finally:
        checkpointer.close()
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  save_s, restore_s = statistics.median(saves), statistics.median(restores)
  return {**describe_run(config), 'state_bytes': state_bytes,
          'async_save': bool(config.checkpoint.async_save),
          'save_s': save_s, 'save_returns_s': statistics.median(returns),
          'restore_s': restore_s, 'save_gb_per_s': state_bytes / save_s / 1e9,
          'restore_gb_per_s': state_bytes / restore_s / 1e9,
          'save_s_all': saves, 'restore_s_all': restores}
