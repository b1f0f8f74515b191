"""Fully sharded data parallel over 8 devices: batch, parameters and optimizer state split 8 ways.

  python -m jaxmed.main --config=configs/fsdp_8.py
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = 'fsdp_8'
  config.mesh.ici_data = 1
  config.mesh.ici_fsdp = 8
  return config
