"""Data parallel 2 x spatial parallel 4: each crop's depth (z) split over 4 devices.

Each convolution and pool exchanges its halo planes with the neighbouring devices
(jaxmed/parallel/spatial.py); layers whose depth does not divide by 4 run replicated, and the
start-up log names them. Useful when one crop's activations do not fit a device (large crops,
wide models): see configs/spatial_128.py.

  python -m jaxmed.main --config=configs/spatial_2x4.py
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = 'spatial_2x4'
  config.mesh.ici_data = 2
  config.mesh.ici_spatial = 4
  return config
