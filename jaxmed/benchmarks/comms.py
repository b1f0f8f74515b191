"""--what=comms and --what=meshes: collective bytes and per-device memory of the compiled train
step, beside the cost of jaxmed's scheme (jaxmed/parallel/communication.py: what the program is
meant to move) and the lower bound (jaxmed/parallel/bound.py: the fewest bytes any program of
the stated ways could move).

The step is lowered on abstract inputs (jax.ShapeDtypeStructs carrying the mesh's shardings)
and compiled, never run: any model size fits on a CPU host.
"""

from __future__ import annotations

import os
import time
from typing import Any

from jaxmed.benchmarks.step import describe_run

# The shipped mesh configs the parallelism table covers.
MESH_CONFIGS = ('mesh_8x1', 'mesh_2x4', 'mesh_1x8', 'fsdp_8', 'spatial_2x4')


def compile_train_step(config, devices=None) -> dict[str, Any]:
  """The production train step, sharded as the config says, compiled on abstract inputs.

  devices: the devices of the mesh (default: all). Returns {'compiled', 'mesh', 'rules',
  'abstract_state', 'compile_s'}.
  """
  import jax

  from jaxmed import tasks
  from jaxmed import train
  from jaxmed.parallel import mesh as mesh_lib
  from jaxmed.parallel import sharding as sharding_lib
  if devices is None:
    mesh, rules = train.create_mesh_and_rules(config)
  else:
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    rules = train.logical_rules(config, dict(mesh.shape))
  with sharding_lib.use_rules(mesh, rules):
    graphdef, abstract_state, shardings = train.abstract_train_state(config, mesh, rules)
    step_fn = train.make_train_step(graphdef, shardings, config)
    batch = tasks.get(config).abstract_batch(config, mesh, rules)  # As the input pipeline shards.
    t0 = time.perf_counter()
    stats = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                         train.new_loop_stats(mesh, 0))  # A few replicated scalars.
    compiled = step_fn.lower(jax.tree.leaves(abstract_state), stats, batch).compile()
  return {'compiled': compiled, 'mesh': mesh, 'rules': rules, 'abstract_state': abstract_state,
          'compile_s': time.perf_counter() - t0}


def state_bytes_per_device(abstract_state) -> dict[str, int]:
  """Bytes of one device's shard of the parameters and of the optimizer state."""
  import math

  import jax
  from flax import nnx

  def shard_bytes(tree):
    total = 0
    for leaf in jax.tree.leaves(tree):
      shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
      total += math.prod(shape) * leaf.dtype.itemsize
    return total

  return {'parameters': shard_bytes(nnx.filter_state(abstract_state['model'], nnx.Param)),
          'optimizer_state': shard_bytes(abstract_state['optimizer'])}


def benchmark_comms(config, step: dict[str, Any] | None = None) -> dict[str, Any]:
  """Measured collective ring bytes per device per step, by kind, beside the scheme's cost and
  the lower bound; and per-device memory (parameters, optimizer state, temporaries). `step`:
  the output of compile_train_step(config), when the caller has it already."""
  from jaxmed import tasks
  from jaxmed.parallel import bound as bound_lib
  from jaxmed.parallel import collectives
  from jaxmed.parallel import communication
  step = step or compile_train_step(config)
  compiled, mesh = step['compiled'], step['mesh']
  measured = collectives.summarize(collectives.parse_collectives(compiled.as_text()))
  plan = tasks.get(config).communication_plan(config)
  scheme = communication.scheme_bytes(plan, dict(mesh.shape), step['rules'])
  bound = bound_lib.lower_bound(plan, dict(mesh.shape))
  measured_total = sum(c['ring_bytes'] for c in measured.values())
  memory = state_bytes_per_device(step['abstract_state'])
  try:
    analysis = compiled.memory_analysis()
    memory.update(temporaries=int(analysis.temp_size_in_bytes),
                  arguments=int(analysis.argument_size_in_bytes))
  except Exception:  # Not every backend reports it.
    pass
  from jaxmed.errors import UserError
  from jaxmed.parallel import mesh as mesh_lib
  try:
    run = describe_run(config)
  except UserError:  # A mesh on fewer devices than the host has (compile_train_step's devices).
    run = {}
  run.update(mesh=mesh_lib.describe(mesh), devices=mesh.size)
  ratio = lambda a, b: a / b if b else None
  return {**run, 'collectives': measured, 'measured_ring_bytes': measured_total,
          'scheme': scheme['by_kind'], 'scheme_by_axis': scheme['by_axis'],
          'scheme_ring_bytes': scheme['total'], 'ratio': ratio(measured_total, scheme['total']),
          'bound_ring_bytes': bound['total'], 'bound_ways': bound['ways'],
          'ratio_to_bound': ratio(measured_total, bound['total']),
          'scheme_to_bound': ratio(scheme['total'], bound['total']),
          'replicated_layers': scheme['replicated_layers'], 'memory': memory,
          'compile_s': step['compile_s']}


def seed_model_config(mesh_config_name: str, crop_size: int, batch: int = 64,
                      dtype: str = 'float32'):
  """A shipped mesh config with the seed's ResNet-18 (width 64, plain strided convolutions, as
  configs/luna16.py), compute `dtype`, `crop_size`^3 crops (stored 1.25x) and batch `batch`."""
  import importlib

  config = importlib.import_module(f'configs.{mesh_config_name}').get_config()
  config.model.update(name='resnet3d', depth=18, width=64, stem_kernel=7, stem_stride=2,
                      stem_pool=True, space_to_depth='none', dtype=dtype)
  config.data.crop_size = crop_size
  config.data.stored_crop_size = crop_size + crop_size // 4
  config.train.global_batch_size = batch
  config.train.eval_batch_size = batch
  config.name = f'{mesh_config_name}_seed_{crop_size}'
  return config


def benchmark_meshes(crop_sizes=(32, 64), configs=MESH_CONFIGS, large_volume: bool = True,
                     dtypes=('float32',)) -> dict[str, Any]:
  """--what=comms for every shipped mesh config with the seed's ResNet-18, at each crop size
  and compute dtype; then configs/spatial_128.py as shipped and with its spatial axis set to 1
  (the same examples per data shard on 2 devices): what splitting depth does to per-device
  memory."""
  import importlib

  import jax
  runs = [(name, seed_model_config(name, crop, dtype=dtype), None)
          for dtype in dtypes for crop in crop_sizes for name in configs]
  if large_volume:
    whole = importlib.import_module('configs.spatial_128').get_config()
    whole.mesh.ici_spatial = 1
    whole.name = 'spatial_128, spatial 1'
    runs += [('spatial_128', importlib.import_module('configs.spatial_128').get_config(), None),
             ('spatial_128 (spatial 1)', whole, jax.devices()[:2])]
  rows = []
  for name, config, devices in runs:
    result = benchmark_comms(config, compile_train_step(config, devices))
    rows.append({'config': name, 'crop_size': config.data.crop_size,
                 'dtype': config.model.dtype, **{
        k: result[k] for k in ('mesh', 'collectives', 'measured_ring_bytes', 'scheme',
                               'scheme_ring_bytes', 'ratio', 'bound_ring_bytes',
                               'ratio_to_bound', 'memory', 'replicated_layers', 'compile_s')}})
    show = lambda r: '-' if r is None else f'{r:.3f}'
    print(f'{name} {config.data.crop_size}^3 {config.model.dtype}: measured / scheme '
          f'{show(result["ratio"])}, measured / bound {show(result["ratio_to_bound"])}',
          flush=True)
  return {'rows': rows}
