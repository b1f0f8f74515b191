"""What the model axis does, stage by stage: split channels, or split the batch.

A CNN's early stages hold large activations and small kernels, its late stages the reverse
(the seed's ResNet-18 at 64^3: stage 1's activations are 64x its kernels, stage 4's kernels
1000x its activations). Splitting channels moves activations (Megatron pairs: one all-reduce's
worth per block and direction), splitting the batch moves kernel gradients; so the cheap choice
differs per stage (Krizhevsky's "one weird trick": the batch where activations dominate,
channels where parameters do).

config.mesh.model_axis_by_stage is 'auto' or one strategy per stage of STAGES:
  'channels'  the model axis splits channels (activations, kernels, batch-norm variables)
  'batch'     the model axis splits the examples, as data does: the stage's kernels and their
              AdamW moments are whole on each model device (more memory: the parameters of
              the stages so placed are not divided by the model axis), their gradients summed
              over data x model
'auto' takes, of all 2^6 assignments, the one with the fewest bytes under
communication.scheme_bytes (ties: more channel stages, less memory). Activations are split by
the model axis either way, so per-device activation memory does not change; the one memory
trade is the parameters and moments of the batch stages, which the start-up log and
--what=comms show (the seed's stem and stages 1-2 are 7% of its parameters).

The choice becomes logical rules 'STAGE/NAME' (parallel/sharding.stage_rules), so every
consumer of the rules (state shardings, activation constraints, the cost model) agrees.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from jaxmed.errors import ConfigError
from jaxmed.parallel import sharding as sharding_lib

STAGES = ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head')
STRATEGIES = ('channels', 'batch')


def parse(value: Any) -> tuple[str, ...] | None:
  """config.mesh.model_axis_by_stage -> one strategy per stage, or None for 'auto'.

  Accepts 'auto', a sequence of len(STAGES) strategies, or the same comma-separated.
  Raises ConfigError (one line) otherwise.
  """
  if isinstance(value, str):
    if value.strip() == 'auto':
      return None
    value = [v.strip() for v in value.split(',')]
  value = tuple(value)
  if len(value) != len(STAGES) or any(v not in STRATEGIES for v in value):
    raise ConfigError(
        f'config.mesh.model_axis_by_stage={value!r} is not {len(STAGES)} strategies; set it to '
        f"'auto' or one of {'/'.join(STRATEGIES)} per stage ({', '.join(STAGES)}), e.g. "
        "'batch,batch,batch,channels,channels,channels'")
  return value


def stage_overrides(strategies: Sequence[str], rules: sharding_lib.LogicalRules,
                    model_axis: str = 'model') -> tuple[tuple[str, Any], ...]:
  """The 'STAGE/NAME' rules that make `model_axis` split the batch in the 'batch' stages."""
  base = sharding_lib.rules_dict(rules)
  without = lambda name: tuple(a for a in base.get(name, ()) if a != model_axis)
  extra = []
  for stage, strategy in zip(STAGES, strategies):
    if strategy == 'batch':
      extra += [(f'{stage}/batch', without('batch') + (model_axis,)),
                (f'{stage}/channels', without('channels')),
                (f'{stage}/conv_in', without('conv_in')),
                (f'{stage}/conv_out', without('conv_out'))]
  return tuple(extra)


def with_strategies(rules: sharding_lib.LogicalRules,
                    strategies: Sequence[str]) -> tuple[tuple[str, Any], ...]:
  """`rules` (without any stage entries) plus the stage entries of `strategies`."""
  plain = tuple((n, a) for n, a in sharding_lib.rules_dict(rules).items() if '/' not in n)
  return plain + stage_overrides(strategies, plain)


def choose(plan, mesh_shape: dict[str, int], rules: sharding_lib.LogicalRules
           ) -> tuple[tuple[str, ...], dict[tuple[str, ...], float]]:
  """(the strategies with the fewest scheme bytes, {strategies: bytes} of all of them)."""
  from jaxmed.parallel import communication
  if mesh_shape.get('model', 1) < 2:
    return ('channels',) * len(STAGES), {}
  costs = {}
  for strategies in itertools.product(STRATEGIES, repeat=len(STAGES)):
    costs[strategies] = communication.scheme_bytes(
        plan, mesh_shape, with_strategies(rules, strategies))['total']
  best = min(costs, key=lambda s: (round(costs[s]), s.count('batch')))
  return best, costs


def describe(rules: sharding_lib.LogicalRules) -> str | None:
  """One line: what the model axis does in each stage under `rules` (None: no stage rules)."""
  names = set(sharding_lib.rules_dict(rules))
  if not any(f'{stage}/batch' in names for stage in STAGES):
    return None
  return 'model axis by stage: ' + ', '.join(
      f"{stage} {'batch' if f'{stage}/batch' in names else 'channels'}" for stage in STAGES)
