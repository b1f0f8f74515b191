"""Large volumes: the seed's ResNet-18 on 128^3 crops, each crop's depth split over 4 devices.

At 128^3 one crop's activations are 64x those of a 32^3 crop: the seed's ResNet-18 needs
about 0.7 GB of temporaries per crop in float32 for a training step (stem output 64^3 x 64
channels, then 32^3 x 64 through stage 1). Splitting depth over 4 devices cuts that about 4x,
which is what lets a useful batch fit on a device (the README's memory table has the figures,
from `python -m jaxmed.benchmark --what=meshes`). Data 2 x spatial 4 on 8 devices, batch 16.

  python -m jaxmed.main --config=configs/spatial_128.py
"""

from configs import spatial_2x4


def get_config():
  config = spatial_2x4.get_config()
  config.name = 'spatial_128'
  config.data.stored_crop_size = 160  # 128^3 crops + 16 voxels of translation margin per side.
  config.data.crop_size = 128
  config.data.crops_file = 'data/preprocessed/synthetic_crops_160.h5'
  model = config.model
  model.depth = 18  # The seed's ResNet-18.
  model.width = 64
  model.space_to_depth = 'none'  # Plain strided convolutions (accelerators).
  config.train.global_batch_size = 16
  config.train.eval_batch_size = 16
  return config
