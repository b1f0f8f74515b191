"""Real-data scale: the seed's ResNet-18 on LUNA16, 32^3 crops, batch 256, bf16.

Put LUNA16 in data/raw/luna16/ (subset0..9 folders, candidates_V2.csv, annotations.csv), then:

  python -m jaxmed.main --config=configs/luna16.py --mode=preprocess
  python -m jaxmed.main --config=configs/luna16.py                      # train on all devices
  python -m jaxmed.main --config=configs/luna16.py --mode=eval          # FROC / CPM on subset 9

Data parallel over every visible device by default; add e.g. --config.mesh.ici_model=2 for
tensor parallelism.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = 'luna16'
  data = config.data
  data.raw_dir = 'data/raw/luna16'
  data.crops_file = 'data/preprocessed/luna16_crops.h5'
  data.annotations_excluded_csv = 'annotations_excluded.csv'
  data.auto_prepare = False  # Never synthesize into a real-data folder.
  data.stored_crop_size = 40  # 32^3 training crops + 4 voxels of translation margin per side.
  data.crop_size = 32
  data.negatives_per_scan = -1  # All 754,975 candidates (~100 GB at 40^3 int16).
  data.preprocess_workers = 16
  data.workers = 8
  data.prefetch = 4
  model = config.model
  model.name = 'resnet3d'
  model.depth = 18
  model.width = 64
  model.stem_kernel = 7
  model.stem_stride = 2
  model.stem_pool = True
  # The plain reference; 'stem' / 'all' compute the same (python -m jaxmed.benchmark compares).
  model.space_to_depth = 'none'
  model.dtype = 'bfloat16'
  train = config.train
  train.global_batch_size = 256
  train.eval_batch_size = 1024
  train.steps = 30_000
  train.warmup_steps = 1000
  train.learning_rate = 1e-3
  train.log_every_steps = 100
  train.eval_every_steps = 2000
  config.checkpoint.every_steps = 2000
  return config
