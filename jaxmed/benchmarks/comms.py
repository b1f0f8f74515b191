"""--what=comms: collective bytes per device per step in the compiled train step's HLO
(parallel/collectives.py counts them), beside the data-parallel minimum."""

from __future__ import annotations

import math
from typing import Any

from jaxmed.benchmarks.step import StepBench
from jaxmed.benchmarks.step import describe_run


def benchmark_comms(config) -> dict[str, Any]:
  """Collective bytes per device per step of the compiled train step, and the DP minimum.

  Data parallel needs one all-reduce of the gradients per step: result bytes = parameter
  gradient bytes; a ring moves 2 (n-1)/n times that through each device's links (the analytic
  minimum, also listed). BatchNorm statistics add a few small all-reduces.
  """
  import jax
  from flax import nnx

  from jaxmed.parallel import collectives
  bench = StepBench(config)
  comms = collectives.collective_bytes(bench.compiled.as_text())
  params = nnx.state(nnx.merge(bench.graphdef, bench.state).model, nnx.Param)
  grad_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
  n = math.prod(bench.mesh.shape[a] for a in ('data', 'fsdp'))
  return {**describe_run(config), 'collectives': comms,
          'total_bytes': sum(c['bytes'] for c in comms.values()),
          'param_gradient_bytes': grad_bytes, 'batch_shards': n,
          'dp_allreduce_result_bytes': grad_bytes if n > 1 else 0,
          'dp_ring_bytes_per_device': 2 * (n - 1) / n * grad_bytes,
          'compile_s': bench.compile_s}
