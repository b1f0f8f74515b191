"""Find nodules in whole scans, sized for a 2-core CPU: a ResNet-10 centre-point detector of
width 8 trained on 32^3 patches of the synthetic scans resampled to 1.5 mm, batch 8, 600 steps
(about 4 steps/s on 2 shared cores: under 3 minutes of training), validated every 200 steps. From a fresh workdir (the synthetic scans and their volumes file are
built first when missing):

  python -m jaxmed.main --config=configs/detect.py

configs/luna16_detect.py is the real-data scale; configs/detect_spatial_2x4.py splits 128^3
patches along depth over 4 devices.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = 'detect'
  config.task = 'detect'
  config.data.volumes_file = 'data/preprocessed/synthetic_volumes_1.5mm.h5'

  detect = config.detect
  detect.spacing_mm = 1.5  # 32^3 patches cover 48 mm: the largest (30 mm) nodules fit.
  detect.patch_size = (32, 32, 32)
  detect.positive_fraction = 0.5
  detect.max_nodules_per_patch = 4
  detect.stride = 4

  model = config.model
  model.name = 'detector3d'
  model.depth = 10
  model.width = 8
  model.stem_kernel = 3
  model.stem_stride = 2  # Stages at strides 2, 4, 8, 16; the heads read the stride-4 stage.
  model.stem_pool = False
  model.space_to_depth = 'all'  # The CPU's fast form of the strided convolutions, same math.

  train = config.train
  train.global_batch_size = 8
  train.eval_batch_size = 8
  train.steps = 600
  train.warmup_steps = 40
  train.learning_rate = 2e-3
  train.log_every_steps = 20
  train.eval_every_steps = 200
  config.checkpoint.every_steps = 200
  return config
