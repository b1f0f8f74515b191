"""Parallelism: the device mesh (mesh.py), logical-axis -> mesh placement (sharding.py), what
the model axis does per model stage (stages.py), spatial halos (spatial.py), collective
accounting of compiled steps (collectives.py), the scheme's cost (communication.py) and the
lower bound over the ways any program could serve each layer (bound.py)."""

from jaxmed.parallel.mesh import MESH_AXES, MeshError, check_batch_divisible, create_mesh
from jaxmed.parallel.sharding import (
    batch_sharding,
    constrain,
    logical_sharding,
    logical_to_spec,
    state_shardings,
    use_rules,
)

__all__ = [
    'MESH_AXES', 'MeshError', 'batch_sharding', 'check_batch_divisible', 'constrain',
    'create_mesh', 'logical_sharding', 'logical_to_spec', 'state_shardings', 'use_rules',
]
