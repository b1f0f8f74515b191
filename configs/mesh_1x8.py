"""Pure tensor (channel) parallel over 8 devices: Megatron-paired convs, activations, kernels and
AdamW moments split 8 ways by channels (README, Parallelism).

  python -m jaxmed.main --config=configs/mesh_1x8.py
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = 'mesh_1x8'
  config.mesh.ici_data = 1
  config.mesh.ici_model = 8
  return config
