"""Real-data scale detection: the centre-point detector on LUNA16's whole scans, 128^3 patches at
1 mm (DeepLung's spacing; MLPerf's 3D U-Net patch), bf16, batch 32, data parallel over every
visible device (add --config.mesh.ici_spatial=4 to split each patch's depth over 4 devices).
Put LUNA16 in data/raw/luna16/ (subset0..9, annotations.csv, annotations_excluded.csv), then:

  python -m jaxmed.main --config=configs/luna16_detect.py --mode=preprocess
  python -m jaxmed.main --config=configs/luna16_detect.py            # train on subsets 0-7
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = 'luna16_detect'
  config.task = 'detect'
  data = config.data
  data.raw_dir = 'data/raw/luna16'
  data.volumes_file = 'data/preprocessed/luna16_volumes.h5'
  data.annotations_excluded_csv = 'annotations_excluded.csv'
  data.auto_prepare = False  # Never synthesize into a real-data folder.
  data.preprocess_workers = 16
  data.workers = 8
  data.prefetch = 4

  detect = config.detect
  detect.spacing_mm = 1.0
  detect.patch_size = (128, 128, 128)
  detect.positive_fraction = 0.5
  detect.max_nodules_per_patch = 8
  detect.stride = 4

  model = config.model
  model.name = 'detector3d'
  model.depth = 18
  model.width = 64
  model.stem_kernel = 7
  model.stem_stride = 2
  model.stem_pool = True  # Stages at strides 4, 8, 16, 32; decoded back to stride 4.
  model.space_to_depth = 'none'
  model.dtype = 'bfloat16'

  train = config.train
  train.global_batch_size = 32
  train.eval_batch_size = 32
  train.steps = 50_000
  train.warmup_steps = 1000
  train.learning_rate = 1e-3
  train.log_every_steps = 100
  train.eval_every_steps = 2500
  config.checkpoint.every_steps = 2500
  return config
