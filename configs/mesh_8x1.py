"""Pure data parallel over 8 devices (each holds a replica; gradients all-reduced).

  python -m jaxmed.main --config=configs/mesh_8x1.py
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = 'mesh_8x1'
  config.mesh.ici_data = 8
  return config
