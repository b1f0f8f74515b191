"""Every key jaxmed reads, with its default. Other configs import this and override a few keys.

The defaults are sized for a laptop CPU: a ResNet-10 of width 16 on 16^3 crops of the synthetic
dataset, 1,200 steps of batch 32 (about 5 minutes on 2 cores, validation AUC about 0.96).
configs/luna16.py is the full-scale setting (the seed's ResNet-18, 32^3 crops, batch 256, bf16).

Run it (one CPU device or whatever accelerators are visible, data parallel over all of them):
  python -m jaxmed.main --config=configs/default.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = 'default'  # Run name: the default workdir is workdirs/<name>.
  config.seed = 0  # One seed for data order, augmentation and initialisation.
  # What the one training loop trains: 'classify' (score candidates from crops: the crops file)
  # or 'detect' (find nodules in whole scans: the volumes file and config.detect).
  config.task = 'classify'
  # Compiled XLA programs are kept here and reused by later runs ('' = off);
  # $JAX_COMPILATION_CACHE_DIR, when set, wins.
  config.compilation_cache_dir = '~/.cache/jaxmed/xla'

  # ---- data: raw scans, preprocessing, input pipeline -------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.raw_dir = 'data/raw/synthetic'  # LUNA16 layout: subset0..9/<seriesuid>.mhd/.raw + CSVs.
  data.candidates_csv = 'candidates_V2.csv'  # Relative to raw_dir unless absolute.
  data.annotations_csv = 'annotations.csv'  # Relative to raw_dir unless absolute.
  data.annotations_excluded_csv = ''  # LUNA16's annotations_excluded.csv for FROC; '' = none.
  data.crops_file = 'data/preprocessed/synthetic_crops.h5'  # The HDF5 crops file (schema v2).
  # The HDF5 volumes file (task 'detect'): every scan resampled to detect.spacing_mm.
  data.volumes_file = 'data/preprocessed/synthetic_volumes.h5'
  # What --mode=preprocess writes: some of ('crops', 'volumes'); () = what config.task reads
  # (classify: the crops file, detect: the volumes file).
  data.build = ()
  data.auto_prepare = True  # train/eval: synthesize + preprocess the default dataset if missing.
  data.overwrite = False  # preprocess/synthesize: replace a complete output instead of stopping.
  data.strict = False  # preprocess: a candidate whose scan is missing is an error, not a skip.
  data.subsets = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)  # preprocess: LUNA subsets to read.
  data.spacing_mm = 1.0  # Isotropic voxel spacing after resampling, mm.
  data.interpolator = 'linear'  # Resampling: 'linear' or 'bspline'.
  data.stored_crop_size = 24  # Edge of the cube stored per candidate, voxels (crop + margin).
  data.crop_size = 16  # Edge of the cube the model sees, voxels (<= stored_crop_size).
  # Negatives kept per scan: -1 = all, else a deterministic cap (a training-only file:
  # --mode=eval and crossval refuse it, as its FROC would undercount false positives).
  data.negatives_per_scan = -1
  # Negatives within max(exclude_radius_mm, exclude_radius_factor x the nodule's radius) of a
  # nodule centre are left out of training, validation and the test AUC (never of the FROC).
  data.exclude_radius_mm = 0.0  # Distance, mm; 0 = half a stored crop.
  data.exclude_radius_factor = 1.0  # 1: no negative inside a nodule (LUNA16 counts it a hit).
  data.preprocess_workers = 2  # Worker processes for preprocessing, one scan each (0 = in-process).
  data.train_subsets = (0, 1, 2, 3, 4, 5, 6, 7)  # LUNA subsets used for training.
  data.val_subsets = (8,)  # Subsets for periodic validation during training (() = none: skipped).
  data.test_subsets = (9,)  # Subsets scored by --mode=eval.
  data.positive_fraction = 0.5  # Fraction of positives in every training batch.
  data.workers = 0  # Grain worker processes per host (0 = read in the main process).
  data.prefetch = 2  # Batches each worker prepares ahead (Grain per_worker_buffer_size).
  # Where training/evaluation crops come from: 'none' (the HDF5 file, every step), 'host' (read
  # once into shared host RAM that the workers map) or 'device' (read once into device memory,
  # rows split over every device; each batch gathered on the devices, no host I/O per step).
  data.cache = 'none'
  data.cache_max_bytes_per_device = 0  # cache='device': refuse above this (0 = free memory).
  data.hu_window = (-1000.0, 400.0)  # HU mapped linearly onto [0, 1], clipped.

  # Synthetic LUNA16-format scans (--mode=synthesize, and auto_prepare).
  data.synthetic = synthetic = ml_collections.ConfigDict()
  synthetic.num_scans = 50  # Scans written, spread round-robin over the subsets.
  synthetic.num_subsets = 10  # subset0..subset{n-1}.
  synthetic.shape_xyz = (192, 192, 96)  # Scan size in voxels (x, y, z); LUNA16 is ~(512, 512, 300).
  synthetic.nodules_per_scan = (2, 5)  # Inclusive range of nodules per scan.
  synthetic.nodule_diameter_mm = (3.0, 30.0)  # Range of nodule diameters, mm.
  synthetic.negatives_per_scan = 40  # Negative candidates per scan (about a third on vessels).
  synthetic.positives_per_nodule = (1, 3)  # Jittered positive candidates per nodule.
  synthetic.seed = 0  # Seed of the synthetic dataset (independent of config.seed).

  # Augmentation, on the device inside the jitted step (training only).
  data.augment = augment = ml_collections.ConfigDict()
  augment.translate = True  # Random offset within the stored margin before the centre crop.
  augment.flip = True  # Random flips along each of the three axes.
  augment.rotate = True  # Random choice among the 24 rotations of the cube.
  augment.intensity_scale = 0.05  # HU multiplied by 1 + U(-s, s).
  augment.intensity_shift_hu = 20.0  # HU shifted by U(-s, s).
  augment.noise_std_hu = 0.0  # Gaussian noise std in HU (0 = off).

  # ---- model ------------------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.name = 'resnet3d'  # 'resnet3d' (the seed's ResNet) or 'cnn3d' (a small plain CNN).
  model.depth = 10  # ResNet depth: 10, 18 (the seed's) or 34.
  model.width = 16  # Filters of the first stage; stages use width x (1, 2, 4, 8). Seed: 64.
  model.stem_kernel = 7  # ResNet stem kernel edge (the seed: 7, stride 2).
  model.stem_stride = 2  # ResNet stem stride.
  model.stem_pool = True  # ResNet 3^3 max-pool stride 2 after the stem.
  # ResNet strided convs as space-to-depth + stride-1 convs, same math and parameters:
  # 'none', 'stem' (the 1-channel stem) or 'all' (also stride-2 block convs and projections).
  model.space_to_depth = 'all'
  model.dtype = 'float32'  # Compute dtype of activations: 'float32' or 'bfloat16' (accelerators).
  model.param_dtype = 'float32'  # Dtype parameters are stored and updated in.

  # ---- mesh and sharding ------------------------------------------------------------------
  # Axes data x fsdp x model x spatial; one size may be -1 (filled from the device count).
  # ici_* is within a host/slice, dcn_* across hosts/slices; the mesh is ici x dcn per axis.
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.ici_data = -1
  mesh.ici_fsdp = 1
  mesh.ici_model = 1
  mesh.ici_spatial = 1
  mesh.dcn_data = 1
  mesh.dcn_fsdp = 1
  mesh.dcn_model = 1
  mesh.dcn_spatial = 1
  # Logical axis name -> mesh axis (or tuple of axes, or None = replicated).
  mesh.logical_rules = (
      ('batch', ('data', 'fsdp')),  # Examples are split over data and fsdp.
      ('depth', 'spatial'),  # Activation depth (z) split over spatial.
      ('height', None),
      ('width', None),
      ('channels', 'model'),  # Activation channels split over model (tensor parallel).
      # Kernels: 'conv_out' is the dim tensor parallelism splits (output channels of a block's
      # first conv, input channels of its second: Megatron's pair), 'conv_in' the other one.
      ('conv_in', 'fsdp'),  # Sharded over fsdp (ZeRO-3); also the gathered conv inputs.
      ('conv_out', 'model'),  # Split over model.
      ('kernel_spatial', None),
      ('features', None),  # Dense/classifier features.
  )
  # What the model axis does in each ResNet stage (stem, stage1..4, head): 'channels' or
  # 'batch', comma-separated, or 'auto' (the cost model's choice: the fewest bytes per step;
  # jaxmed/parallel/stages.py, README "Parallelism").
  mesh.model_axis_by_stage = 'auto'

  # ---- training ---------------------------------------------------------------------------
  config.train = train = ml_collections.ConfigDict()
  train.global_batch_size = 32  # Examples per step over all hosts and devices.
  train.steps = 1200  # Total optimisation steps.
  train.learning_rate = 2e-3  # Peak AdamW learning rate.
  train.warmup_steps = 100  # Linear warm-up steps before the cosine decay.
  train.weight_decay = 1e-4  # AdamW decoupled weight decay.
  train.grad_clip_norm = 1.0  # Global gradient norm clip (0 = off).
  train.log_every_steps = 100  # Steps between metrics.jsonl / TensorBoard / progress lines.
  train.eval_every_steps = 300  # Steps between validation passes (0 = only at the end).
  train.eval_batch_size = 64  # Global batch for evaluation (last batch padded, never dropped).
  train.profile_steps = 0  # >0: write a jax.profiler trace of this many steps after warm-up.
  # Steps the host may dispatch ahead of the device (it waits for step N - this one): enough
  # to ride out a busy host; far fewer than the ~100 that hung two gloo processes on CPU.
  train.max_steps_in_flight = 4
  train.nan_at_step = -1  # Test hook: make the loss NaN at this step (-1 = off).
  train.sigterm_at_step = -1  # Test hook: SIGTERM to this process at this step (-1 = off)...
  train.sigterm_during_eval = False  # ...or during that step's evaluation, after its 1st batch.
  train.sigterm_to_group = False  # ...sent to the whole process group (as schedulers send it).

  # ---- checkpoints ------------------------------------------------------------------------
  config.checkpoint = checkpoint = ml_collections.ConfigDict()
  checkpoint.every_steps = 600  # Steps between checkpoints (and one at the end).
  checkpoint.keep = 3  # Most recent checkpoints kept.
  checkpoint.async_save = True  # Write in the background while training continues.
  checkpoint.step = -1  # --mode=eval: step to restore (-1 = latest).
  # Resume even if the checkpoint was written with another data stream (seed, batch size,
  # subsets, crop sizes, schedule, crops file); the differences are logged.
  checkpoint.allow_changed_data_stream = False

  # ---- evaluation (--mode=eval) -----------------------------------------------------------
  config.eval = eval_ = ml_collections.ConfigDict()
  eval_.bootstrap_samples = 1000  # Bootstrap resamples over scans for the CPM 95% interval.
  # FROC arithmetic: 'official' (the LUNA16 script's numbers to the last bit, FPs per scan as
  # fpr * FPs / scans in floating point) or 'exact' (integer FP count / scans).
  eval_.froc_arithmetic = 'official'
  eval_.montage_size = 8  # Crops shown in each montage (top false positives, missed nodules).
  eval_.crossval_folds = tuple(range(10))  # --mode=crossval: subsets held out, one fold each.

  # ---- scoring new scans (--mode=predict) -------------------------------------------------
  config.predict = predict = ml_collections.ConfigDict()
  predict.scans_dir = ''  # Folder of .mhd/.raw, .nii(.gz) files and DICOM series folders.
  predict.candidates_csv = ''  # seriesuid,coordX,coordY,coordZ (world mm) [,class].
  predict.output_dir = ''  # Where predictions.csv and montages go ('' = <workdir>/predict).
  predict.montage_size = 4  # Top-scoring candidates shown per scan (0 = no montages).

  # ---- detection (task 'detect', --mode=detect, --mode=predict without candidates) ---------
  config.detect = detect = ml_collections.ConfigDict()
  detect.spacing_mm = 1.0  # Isotropic spacing of the volumes file and of detection, mm.
  detect.patch_size = (64, 64, 64)  # Training patch (D, H, W) voxels at spacing_mm.
  detect.positive_fraction = 0.5  # Fraction of patches holding a nodule centre, in [0, 1].
  detect.margin_vox = 4  # A positive patch's nodule centre lies this far inside its faces.
  detect.max_nodules_per_patch = 8  # Nodule slots per patch in a batch (padded, masked).
  detect.stride = 4  # Output stride of the heatmap, voxels.
  detect.threshold = 0.05  # Heatmap probability below which peaks are dropped, in [0, 1].
  detect.max_per_scan = 100  # Detections kept per scan (top by probability).
  detect.nms_kernel = 3  # Max-pool non-maximum suppression window on the heatmap, output voxels.
  # Whole-scan inference: a device's slab above this many input voxels runs as windows along
  # depth (with overlap covering the receptive field) instead of one call (0 = no limit).
  detect.max_voxels_per_device = 0
  detect.classifier_workdir = ''  # A crop classifier's workdir: re-score each detection.
  detect.combine = 'product'  # Detector x classifier score rule (see jaxmed/detect.py).
  detect.output_dir = ''  # Where detections.csv and montages go ('' = <workdir>/detect).
  # Training the detector (task 'detect'; model.name 'detector3d' decodes to detect.stride).
  detect.augment = True  # On-device flips, axial 90-degree rotations, intensity (data.augment).
  # Heatmap Gaussian sigma, output voxels: max(sigma_per_radius x the nodule's radius, min_sigma).
  detect.sigma_per_radius = 0.5
  detect.min_sigma = 0.5
  detect.diameter_loss_weight = 1.0  # L1 on log-diameter (log mm) at the centre cells.
  detect.offset_loss_weight = 1.0  # L1 on the sub-voxel offset (output voxels) at the centres.
  detect.val_batches = 4  # Validation-loss batches of val_subsets patches per evaluation.

  # ---- multi-host (jax.distributed) -------------------------------------------------------
  config.distributed = dist = ml_collections.ConfigDict()
  dist.coordinator_address = ''  # host:port of process 0; '' = environment or auto-detection.
  dist.num_processes = 0  # 0 = from the environment / auto-detection (1 if nothing found).
  dist.process_id = -1  # -1 = from the environment / auto-detection.
  dist.initialization_timeout_s = 300  # Seconds to wait for every process to join.
  # A process silent this long is declared lost; JAX then ends the others (jax.distributed's
  # heartbeat_timeout_seconds).
  dist.heartbeat_timeout_s = 60
  # At exit, how long a process waits for the others in jax.distributed's shutdown barrier.
  dist.shutdown_timeout_s = 300
  dist.cpu_devices = 0  # CPU-only runs: virtual devices per process (0 = as the mesh needs).
  return config
