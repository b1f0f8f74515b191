"""The detector on 128^3 patches, each patch's depth split over 4 devices: data 2 x spatial 4.

A ResNet-18 encoder of width 32 (7^3 stem stride 2, max-pool: stages at strides 4-32) and a
top-down decoder back to stride 4, on 128^3 patches at 1 mm, batch 16 (8 per data shard, each
split 4 ways along depth). Every convolution, pool and upsampling of the network splits: the
deepest stage is 4 planes deep, one per device. Halos are exchanged explicitly
(jaxmed/parallel/spatial.py); the README's detector section has the collective bytes against
`--what=comms`'s minimum and the per-device temporaries against the unsplit patch.

  python -m jaxmed.main --config=configs/detect_spatial_2x4.py
  python -m jaxmed.benchmark --config=configs/detect_spatial_2x4.py --what=comms
"""

from configs import detect


def get_config():
  config = detect.get_config()
  config.name = 'detect_spatial_2x4'
  config.mesh.ici_data = 2
  config.mesh.ici_spatial = 4
  config.data.volumes_file = 'data/preprocessed/synthetic_volumes.h5'
  config.detect.spacing_mm = 1.0
  config.detect.patch_size = (128, 128, 128)
  config.detect.max_nodules_per_patch = 8
  model = config.model
  model.depth = 18
  model.width = 32
  model.stem_kernel = 7
  model.stem_stride = 2
  model.stem_pool = True
  model.space_to_depth = 'none'  # Plain strided convolutions (accelerators).
  config.train.global_batch_size = 16
  config.train.eval_batch_size = 16
  config.train.steps = 20_000
  config.train.warmup_steps = 500
  config.train.learning_rate = 1e-3
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 2000
  config.checkpoint.every_steps = 2000
  return config
