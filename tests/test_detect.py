"""--mode=detect and --mode=predict without a candidates CSV: detections.csv in world mm,
re-scoring exactly as --mode=predict scores a candidate, and each bad input one line, nothing
written."""

import csv
import os

import jax
import numpy as np
import pytest
import SimpleITK as sitk
from flax import nnx

from conftest import apply_overrides, cli_overrides, run_main
from jaxmed import checkpointing
from jaxmed import detect
from jaxmed import evaluate as classify_evaluate
from jaxmed.detection import evaluation as detect_evaluation
from jaxmed.detection import rescoring
from jaxmed.detection import validation
from jaxmed.parallel import sharding as sharding_lib
from jaxmed import predict
from jaxmed import train
from jaxmed.errors import ConfigError, UserError
from jaxmed.scans import luna16
from jaxmed.scans import resample
from jaxmed.scans import synthetic
from jaxmed.scans.luna16 import DataError

SCANS = {
    'data.synthetic.num_scans': 3,
    'data.synthetic.num_subsets': 1,
    'data.synthetic.shape_xyz': (48, 48, 24),
    'data.synthetic.nodules_per_scan': (1, 2),
    'data.synthetic.nodule_diameter_mm': (4.0, 10.0),
    'data.synthetic.negatives_per_scan': 4,
    'data.stored_crop_size': 20,
    'data.crop_size': 16,
    'train.global_batch_size': 8,
    'train.eval_batch_size': 8,
    'predict.montage_size': 2,
}
# A narrow detector with a stride-1 stem (size divisor 8), on data 2 x spatial 4.
DETECT = {
    'task': 'detect', 'model.name': 'detector3d', 'model.depth': 10, 'model.width': 4,
    'model.stem_kernel': 3, 'model.stem_stride': 1, 'model.stem_pool': False,
    'model.space_to_depth': 'none', 'mesh.ici_data': 2, 'mesh.ici_spatial': 4,
    'detect.threshold': 0.0, 'detect.max_per_scan': 5,
}
CLASSIFIER = {'model.name': 'resnet3d', 'model.depth': 10, 'model.width': 4}


def _save_untrained(config, path):
  # Untrained models are enough: the tests check geometry and plumbing, not accuracy. The
  # weights are drawn with NumPy into the model's own state tree (He-scaled kernels, BN scale
  # and variance 1, the rest 0): XLA:CPU compiling the initializers took minutes on a loaded
  # 2-core machine.
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: train.create_train_state(config))))
  rng = np.random.default_rng(0)

  def fill(where, leaf):
    name = str(getattr(where[-1], 'key', where[-1]))
    if name in ('var', 'scale'):
      return np.ones(leaf.shape, leaf.dtype)
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)

  checkpointer = checkpointing.Checkpointer(path, config)
  checkpointer.save(0, jax.tree_util.tree_map_with_path(fill, abstract))
  checkpointer.close()
  return path


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """(detect config, detector workdir, classifier config, classifier workdir, root)."""
  from configs import default
  root = tmp_path_factory.mktemp('detect')
  base = apply_overrides(default.get_config(), {**SCANS, 'data.raw_dir': str(root / 'raw'),
                                                'data.crops_file': str(root / 'crops.h5'),
                                                'data.test_subsets': (0,)})
  synthetic.synthesize(base)
  classifier = apply_overrides(base.copy_and_resolve_references(), CLASSIFIER)
  config = apply_overrides(base.copy_and_resolve_references(), DETECT)
  config.predict.scans_dir = str(root / 'raw' / 'subset0')
  config.detect.output_dir = str(root / 'out')
  return (config, _save_untrained(config, str(root / 'detector')), classifier,
          _save_untrained(classifier, str(root / 'classifier')), root)


def _read(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_detect_writes_world_detections_and_montages(setup):
  config, workdir, _, _, root = setup
  summary = detect.detect(config, workdir)
  rows = _read(summary['detections_csv'])
  assert list(rows[0]) == list(detect.DETECTION_COLUMNS)
  scans = sorted(p[:-4] for p in os.listdir(root / 'raw' / 'subset0') if p.endswith('.mhd'))
  assert sorted({r['seriesuid'] for r in rows}) == scans and summary['scans'] == 3
  for uid in scans:
    mine = [r for r in rows if r['seriesuid'] == uid]
    assert len(mine) == 5  # threshold 0: max_per_scan peaks.
    prob = [float(r['probability']) for r in mine]
    assert prob == sorted(prob, reverse=True) and all(0 <= p <= 1 for p in prob)
    # Every detection lies inside its scan's world box (the grid covers exactly that box).
    image = luna16.read_scan(str(root / 'raw' / 'subset0' / f'{uid}.mhd'))
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in image.GetSize()],
                                   indexing='ij')).reshape(3, -1).T
    world = luna16.voxel_to_world(image, corners[:, ::-1])
    xyz = np.array([[float(r[c]) for c in ('coordX', 'coordY', 'coordZ')] for r in mine])
    assert np.all(xyz >= world.min(0) - 4) and np.all(xyz <= world.max(0) + 4)
    assert all(float(r['diameter_mm']) > 0 for r in mine)
    assert os.path.getsize(root / 'out' / 'montages' / f'{uid}.png') > 3_000


@pytest.mark.parametrize('direction', [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, 1, 0, 0, 0, -1),
                                       (1, 0, 0, 0, -1, 0, 0, 0, 1), (0, 1, 0, 1, 0, 0, 0, 0, 1)])
def test_resampled_grid_maps_voxels_to_world_for_flipped_and_left_handed_scans(direction):
  # A bright ball at a known world point, in a scan of anisotropic spacing and odd direction.
  image = sitk.Image(40, 36, 20, sitk.sitkInt16)
  image.SetSpacing((0.8, 0.7, 1.6))
  image.SetOrigin((-12.0, 30.0, -200.0))
  image.SetDirection(direction)
  index = np.array(np.meshgrid(*[np.arange(n) for n in (20, 36, 40)], indexing='ij'))
  world = luna16.voxel_to_world(image, index.reshape(3, -1).T).reshape(20, 36, 40, 3)
  ball = (np.asarray(image.TransformContinuousIndexToPhysicalPoint((21.3, 17.6, 9.2))))
  inside = np.sum((world - ball) ** 2, axis=-1) < 4.0 ** 2
  array = np.where(inside, 100, -1000).astype(np.int16)
  hu = sitk.GetImageFromArray(array)
  hu.CopyInformation(image)
  volume = resample.resample_scan(hu, 1.0)
  found = np.argwhere(volume.hu > -450).mean(axis=0)  # The ball's centre of mass, voxels.
  np.testing.assert_allclose(volume.voxel_to_world(found[None])[0], ball, atol=0.35)
  np.testing.assert_allclose(volume.world_to_voxel(volume.voxel_to_world(found[None]))[0],
                             found, atol=1e-9)


def test_rescoring_scores_each_detection_as_predict_scores_that_candidate(setup, tmp_path):
  config, workdir, classifier, classifier_workdir, _ = setup
  config = config.copy_and_resolve_references()
  config.detect.classifier_workdir = classifier_workdir
  config.detect.combine = 'classifier'
  config.predict.output_dir = str(tmp_path / 'predict')
  summary = predict.predict(config, workdir)  # No candidates CSV: detect + re-score.
  rows = _read(summary['predictions_csv'])
  assert list(rows[0]) == ['seriesuid', 'coordX', 'coordY', 'coordZ', 'probability']
  assert len(rows) == 15 and os.path.isfile(tmp_path / 'predict' / 'detections.csv')
  # The same points as a candidates CSV, scored by --mode=predict with the classifier itself.
  candidates = tmp_path / 'candidates.csv'
  with open(candidates, 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(['seriesuid', 'coordX', 'coordY', 'coordZ'])
    writer.writerows([r['seriesuid'], r['coordX'], r['coordY'], r['coordZ']] for r in rows)
  plain = classifier.copy_and_resolve_references()
  plain.predict.scans_dir = config.predict.scans_dir
  plain.predict.candidates_csv = str(candidates)
  plain.predict.output_dir = str(tmp_path / 'plain')
  plain.mesh = config.mesh
  scored = _read(predict.predict(plain, classifier_workdir)['predictions_csv'])
  ours = np.array([float(r['probability']) for r in rows])
  theirs = np.array([float(r['probability']) for r in scored])
  assert np.ptp(theirs) > 1e-4  # The classifier tells the crops apart: the test can fail.
  np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_eval_of_a_detect_config_scores_detection_fpr_and_the_baseline(setup):
  config, workdir, classifier, classifier_workdir, _ = setup
  config = config.copy_and_resolve_references()
  config.detect.classifier_workdir = classifier_workdir
  metrics = detect_evaluation.evaluate(config, workdir)
  assert metrics['scans'] == 3 and metrics['detections'] == 15 and metrics['nodules'] >= 3
  for key in ('cpm_detection', 'cpm_detection_fpr', 'cpm_baseline', 'recall_at_8',
              'recall_at_32', 'recall_at_100', *(f'cpm_{r}' for r in rescoring.COMBINE_RULES)):
    assert 0.0 <= metrics[key] <= 1.0, key
  assert metrics['cpm_detector'] == metrics['cpm_detection']
  assert metrics['cpm_detection_fpr'] == metrics['cpm_product'] == metrics['cpm']
  assert os.path.getsize(os.path.join(workdir, 'froc_detect.png')) > 10_000
  assert len(_read(os.path.join(workdir, 'predictions.csv'))) == 15
  # The detect task's validation over the same scans (as Volumes) gives detection's numbers.
  mesh, rules = train.create_mesh_and_rules(config)
  annotations = luna16.read_annotations(os.path.join(config.data.raw_dir, 'annotations.csv'))
  volumes = []
  for uid, read in detect_evaluation.test_scans(config):
    mine = annotations['seriesuid'] == uid
    table = np.stack([annotations[c][mine] for c in ('coordX', 'coordY', 'coordZ',
                                                     'diameter_mm')], 1)
    volumes.append((uid, resample.resample_scan(read(), config.detect.spacing_mm), table))
  with sharding_lib.use_rules(mesh, rules):
    graphdef, state, shardings, _ = detect.restore_detector(config, workdir, mesh, rules)
    detector = detect.volume_detector(config, graphdef, state, shardings, mesh, rules)
    validated = validation.validate_volumes(detector, detect.peaks_fn(config), volumes)
  assert validated['scans'] == 3
  assert validated['cpm'] == pytest.approx(metrics['cpm_detection'], abs=1e-9)
  assert validated['recall_at_32'] == pytest.approx(metrics['recall_at_32'], abs=1e-9)
  # The baseline is what --mode=eval of the classifier itself reports.
  plain = classifier.copy_and_resolve_references()
  plain.mesh = config.mesh
  plain.eval.bootstrap_samples = 10
  assert classify_evaluate.evaluate(plain, classifier_workdir)['cpm'] == metrics['cpm_baseline']


# ---- bad inputs: one line, nothing written ------------------------------------------------------

def _refused(config, workdir, error, match):
  out = config.detect.output_dir
  with pytest.raises(error, match=match):
    detect.detect(config, workdir)
  assert not os.path.exists(out), os.listdir(out)


def test_bad_inputs_are_one_line_and_write_nothing(setup, tmp_path):
  config, workdir, classifier, classifier_workdir, root = setup

  def fresh(**overrides):
    c = config.copy_and_resolve_references()
    c.detect.output_dir = str(tmp_path / 'never')
    return apply_overrides(c, {k.replace('__', '.'): v for k, v in overrides.items()})

  _refused(fresh(), str(tmp_path / 'untrained'), checkpointing.CheckpointError,
           'no detector checkpoint')
  _refused(fresh(detect__threshold=1.5), workdir, ConfigError, r'outside \[0, 1\]')
  _refused(fresh(detect__threshold=-0.01), workdir, ConfigError, r'outside \[0, 1\]')
  os.makedirs(tmp_path / 'empty')
  _refused(fresh(predict__scans_dir=str(tmp_path / 'empty')), workdir, DataError, 'holds no scan')
  # A classifier trained on other crops (crop size 16 there, 12 here).
  _refused(fresh(detect__classifier_workdir=classifier_workdir, data__crop_size=12), workdir,
           ConfigError, r'trained on other crops \(data.crop_size 16 there, 12 here\)')
  _refused(fresh(detect__classifier_workdir=str(tmp_path / 'nothing')), workdir,
           checkpointing.CheckpointError, 'no checkpoint')
  # A scan 3 mm deep: fewer planes than the output stride at 1 mm.
  thin = tmp_path / 'thin'
  os.makedirs(thin)
  image = sitk.Image(32, 32, 3, sitk.sitkInt16)
  sitk.WriteImage(image, str(thin / 'thin.mhd'))
  _refused(fresh(predict__scans_dir=str(thin)), workdir, DataError,
           'smaller than the detector.s output stride 4')


def test_cli_bad_threshold_is_one_line(setup, tmp_path):
  config, workdir, _, _, _ = setup
  overrides = {**SCANS, **DETECT, 'data.raw_dir': config.data.raw_dir,
               'predict.scans_dir': config.predict.scans_dir,
               'detect.output_dir': str(tmp_path / 'out'), 'detect.threshold': 2.0}
  proc = run_main(['--mode=detect', *cli_overrides(overrides)], workdir, check=False, timeout=300)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('jaxmed: error: detect.threshold is 2.0, outside [0, 1]'), last
  assert not os.path.exists(tmp_path / 'out')
