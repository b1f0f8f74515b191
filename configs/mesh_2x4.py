"""Data parallel 2 x tensor (channel) parallel 4, on 8 devices: the README's main command.

  python -m jaxmed.main --config=configs/mesh_2x4.py

On a CPU-only machine jaxmed exposes 8 virtual CPU devices by itself; on an 8-GPU host the same
command shards over the GPUs. Every other setting is configs/default.py's.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = 'mesh_2x4'
  config.mesh.ici_data = 2
  config.mesh.ici_model = 4
  return config
