"""Preprocessing LUNA16-layout scans into the HDF5 crops file: geometry, schema, resume, errors."""

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from configs import default
from jaxmed.data import crops_file
from jaxmed.scans import luna16
from jaxmed.data import preprocess
from jaxmed.scans import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ('crops', 'label', 'seriesuid', 'subset', 'center_world', 'diameter_mm', 'exclude')


def make_config(raw_dir, crops_path=None, **data):
  """5 scans of 64x64x40 voxels over 3 subsets (directions cycle through flips), 24^3 crops."""
  config = default.get_config()
  config.data.raw_dir = str(raw_dir)
  config.data.crops_file = str(crops_path)
  config.data.preprocess_workers = 0
  s = config.data.synthetic
  s.num_scans = 5
  s.num_subsets = 3
  s.shape_xyz = (64, 64, 40)
  s.nodule_diameter_mm = (4.0, 10.0)
  s.negatives_per_scan = 12
  for key, value in data.items():
    config.data[key] = value
  return config


@pytest.fixture(scope='session')
def raw_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('preprocess') / 'raw'
  synthetic.synthesize(make_config(path))
  return path


@pytest.fixture(scope='session')
def prepared(raw_dir, tmp_path_factory):
  """(config, crops file path, summary) of one uninterrupted run."""
  config = make_config(raw_dir, tmp_path_factory.mktemp('crops') / 'crops.h5')
  summary = preprocess.preprocess(config)
  return config, config.data.crops_file, summary


def _csv_copy(raw_dir, path, extra_rows=(), drop_column=None):
  """candidates_V2.csv of raw_dir, plus rows, minus a column, written to `path`."""
  with open(raw_dir / 'candidates_V2.csv', newline='') as f:
    rows = list(csv.reader(f))
  rows += [list(map(str, row)) for row in extra_rows]
  if drop_column:
    where = rows[0].index(drop_column)
    rows = [row[:where] + row[where + 1:] for row in rows]
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows(rows)
  return str(path)


def _one_line_error(config, *fragments):
  with pytest.raises(luna16.DataError) as error:
    preprocess.preprocess(config)
  message = str(error.value)
  assert '\n' not in message
  for fragment in fragments:
    assert str(fragment) in message, message
  return message


def _read(path):
  with h5py.File(path, 'r') as f:
    return {name: f[name][:] for name in DATASETS}, dict(f.attrs)


# ---- geometry -------------------------------------------------------------------------------

@pytest.mark.parametrize('direction', [(-1, -1, 1), (1, 1, -1), 'oblique'])
def test_world_to_voxel_matches_simpleitk_on_flipped_image(direction):
  image = sitk.Image(7, 9, 11, sitk.sitkInt16)
  image.SetSpacing((0.7, 0.8, 2.0))
  image.SetOrigin((12.5, -20.0, -310.0))
  if direction == 'oblique':
    matrix = sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.5).GetMatrix()
  else:
    matrix = np.diag(direction).astype(float).ravel()
  image.SetDirection([float(v) for v in matrix])
  points = np.random.default_rng(0).uniform(-300, 30, size=(20, 3))
  got = luna16.world_to_voxel(image, points)
  want = [image.TransformPhysicalPointToContinuousIndex(p.tolist())[::-1] for p in points]
  np.testing.assert_allclose(got, want, atol=1e-9)
  np.testing.assert_allclose(luna16.voxel_to_world(image, got), points, atol=1e-9)


def test_crops_equal_the_resampled_scan_in_canonical_orientation(raw_dir):
  """Per-cube resampling = whole-scan resampling onto the identity grid (z, y, x) = world."""
  scans = luna16.find_scans(str(raw_dir))
  checked_directions = set()
  for scan in scans.values():
    image = luna16.read_scan(scan.mhd_path)
    checked_directions.add(image.GetDirection())
    iso = luna16.resample_isotropic(image, 1.0)
    volume = sitk.GetArrayFromImage(iso)
    shape = np.array(volume.shape)
    index = np.array([[10, 10, 10], shape // 2, shape - 11])  # (z, y, x): cubes fit inside.
    crops, padded, outside = luna16.crop_cubes(image, luna16.voxel_to_world(iso, index), 21, 1.0)
    assert not padded.any() and not outside.any()
    for crop, (z, y, x) in zip(crops, index):
      want = volume[z - 10:z + 11, y - 10:y + 11, x - 10:x + 11]
      assert np.abs(crop.astype(int) - want).max() <= 1  # Rounding of the interpolated HU.
  assert len(checked_directions) >= 2


def test_positive_crops_are_centred_on_their_nodule(prepared, raw_dir):
  """The bright blob around each positive's nodule has its centroid where the CSVs put it."""
  config, path, _ = prepared
  annotations = luna16.read_annotations(str(raw_dir / 'annotations.csv'))
  directions = {uid: luna16.read_scan(s.mhd_path).GetDirection()
                for uid, s in luna16.find_scans(str(raw_dir)).items()}
  spacing = config.data.spacing_mm
  data, _ = _read(path)
  size = data['crops'].shape[1]
  grid = np.stack(np.indices((size,) * 3), axis=-1).astype(float)  # (z, y, x) indices.
  checked = set()
  errors = []
  for crop, uid, center, label in zip(data['crops'], data['seriesuid'], data['center_world'],
                                      data['label']):
    if not label:
      continue
    uid = uid.decode()
    sel = annotations['seriesuid'] == uid
    nodules = np.stack([annotations['coordX'][sel], annotations['coordY'][sel],
                        annotations['coordZ'][sel]], 1)
    nearest = np.argmin(np.linalg.norm(nodules - center, axis=1))
    nodule, diameter = nodules[nearest], annotations['diameter_mm'][sel][nearest]
    expected = (size - 1) / 2 + (nodule - center)[::-1] / spacing  # (z, y, x) in the crop.
    near = np.linalg.norm(grid - expected, axis=-1) <= diameter / 2 / spacing + 1
    blob = near & (crop > -400)
    assert blob.sum() >= 0.5 * 4 / 3 * np.pi * (diameter / 2 / spacing) ** 3, uid
    errors.append(grid[blob].mean(axis=0) - expected)
    checked.add(directions[uid])
  errors = np.array(errors)  # (positives, 3) signed, (z, y, x) voxels.
  print('centroid errors', np.abs(errors).max(0), errors.mean(0), np.abs(errors).max(1).round(2))
  assert np.abs(errors).max() <= 1.0, f'a nodule centroid is {np.abs(errors).max():.2f} voxels off'
  assert np.all(np.abs(errors.mean(axis=0)) < 0.25), 'no systematic offset along any axis'
  assert (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0) in checked
  assert (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0) in checked


# ---- the file -------------------------------------------------------------------------------

def test_crops_file_follows_schema_v2(prepared, raw_dir):
  config, path, summary = prepared
  size = config.data.stored_crop_size
  assert crops_file.check_crops_file(path) == summary['crops'] > 0
  with h5py.File(path, 'r') as f:
    assert f['crops'].chunks == (1, size, size, size)
    assert f['crops'].dtype == np.int16 and f['seriesuid'].dtype.kind == 'S'
    assert f.attrs['schema_version'] == 2 and f.attrs['spacing_mm'] == config.data.spacing_mm
    assert tuple(f.attrs['crop_shape']) == (size, size, size)
    assert json.loads(f.attrs['config']) == json.loads(config.to_json())
    sources = json.loads(f.attrs['sources'])
  scans = luna16.find_scans(str(raw_dir))
  for scan in scans.values():
    for file_path in (scan.mhd_path, scan.raw_path):
      with open(file_path, 'rb') as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
      assert sources[os.path.relpath(file_path, raw_dir)] == digest

  data, _ = _read(path)
  keys = [(s, u) for s, u in zip(data['subset'], data['seriesuid'])]
  assert keys == sorted(keys), 'rows are sorted by (subset, seriesuid)'
  candidates = luna16.read_candidates(str(raw_dir / 'candidates_V2.csv'))
  labels = np.concatenate([candidates['class'][candidates['seriesuid'] == uid.decode()]
                           for uid in dict.fromkeys(data['seriesuid'])])
  np.testing.assert_array_equal(data['label'], labels)  # All candidates, in CSV order.
  assert summary['positives'] == data['label'].sum() and summary['skipped']['scan_missing'] == 0
  assert np.all((data['diameter_mm'] > 0) == (data['label'] == 1))
  assert not np.any(data['exclude'] & (data['label'] == 1))
  assert np.any(data['exclude']), 'negatives near nodules are flagged'


def test_worker_processes_give_the_same_crops(prepared, raw_dir, tmp_path):
  _, path, _ = prepared
  config = make_config(raw_dir, tmp_path / 'crops.h5', preprocess_workers=2)
  preprocess.preprocess(config)
  (want, want_attrs), (got, got_attrs) = _read(path), _read(config.data.crops_file)
  for name in DATASETS:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  for name in ('schema_version', 'spacing_mm', 'crop_shape', 'sources'):
    np.testing.assert_array_equal(got_attrs[name], want_attrs[name], err_msg=name)


def test_interrupted_preprocess_resumes_to_the_same_file(raw_dir, tmp_path):
  config = make_config(raw_dir, tmp_path / 'crops.h5', overwrite=True)
  preprocess.preprocess(config)
  with open(config.data.crops_file, 'rb') as f:
    uninterrupted = f.read()
  os.remove(config.data.crops_file)

  code = ('import json, sys, ml_collections\n'
          'from jaxmed.data import preprocess\n'
          'preprocess.preprocess(ml_collections.ConfigDict(json.loads(sys.argv[1])))\n')
  crashed = subprocess.run([sys.executable, '-c', code, config.to_json()], cwd=REPO,
                           env={**os.environ, preprocess.CRASH_AFTER_ENV: '2'}, timeout=120,
                           capture_output=True)
  assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
  assert not os.path.exists(config.data.crops_file), 'no half-written crops file'
  assert len(os.listdir(config.data.crops_file + '.parts')) == 2

  summary = preprocess.preprocess(config)
  assert summary['scans_cached'] == 2 and summary['scans'] == 5
  with open(config.data.crops_file, 'rb') as f:
    assert f.read() == uninterrupted
  assert not os.path.exists(config.data.crops_file + '.parts')


# ---- bad inputs: each ends in one line naming the cause and the fix ---------------------------

def test_missing_raw_folder(tmp_path):
  _one_line_error(make_config(tmp_path / 'nowhere', tmp_path / 'c.h5'),
                  tmp_path / 'nowhere', 'does not exist', '--config.data.raw_dir')


def test_missing_csv(raw_dir, tmp_path):
  config = make_config(raw_dir, tmp_path / 'c.h5', candidates_csv='gone.csv')
  _one_line_error(config, raw_dir / 'gone.csv', 'does not exist', 'candidates_csv')


def test_csv_missing_a_column(raw_dir, tmp_path):
  bad = _csv_copy(raw_dir, tmp_path / 'candidates.csv', drop_column='coordZ')
  _one_line_error(make_config(raw_dir, tmp_path / 'c.h5', candidates_csv=bad),
                  bad, 'lacks column coordZ')


def test_candidate_whose_scan_is_absent_is_skipped_or_strict_error(prepared, raw_dir, tmp_path):
  ghost = synthetic.UID_PREFIX + '9' * 30
  with_ghost = _csv_copy(raw_dir, tmp_path / 'candidates.csv',
                         extra_rows=[(ghost, 1.0, 2.0, -200.0, 0)])
  config = make_config(raw_dir, tmp_path / 'c.h5', candidates_csv=with_ghost)
  summary = preprocess.preprocess(config)
  assert summary['skipped']['scan_missing'] == 1
  assert summary['crops'] == prepared[2]['crops']
  config = make_config(raw_dir, tmp_path / 'strict.h5', candidates_csv=with_ghost, strict=True)
  _one_line_error(config, ghost, with_ghost, '--config.data.strict=False')
  assert not os.path.exists(tmp_path / 'strict.h5')


def test_truncated_raw_names_the_file(raw_dir, tmp_path):
  copy = tmp_path / 'raw'
  shutil.copytree(raw_dir, copy)
  scan = sorted(luna16.find_scans(str(copy)).values(), key=lambda s: (s.subset, s.seriesuid))[1]
  with open(scan.raw_path, 'r+b') as f:
    f.truncate(1000)
  _one_line_error(make_config(copy, tmp_path / 'c.h5'), scan.raw_path, 'truncated')
  assert not os.path.exists(tmp_path / 'c.h5')
  assert len(os.listdir(tmp_path / 'c.h5.parts')) == 1, 'the scan before it stays cached'


def test_candidate_outside_the_volume_is_padded_and_counted(prepared, raw_dir, tmp_path):
  uid = sorted(luna16.find_scans(str(raw_dir)))[0]
  outside = _csv_copy(raw_dir, tmp_path / 'candidates.csv',
                      extra_rows=[(uid, 5000.0, 5000.0, 5000.0, 0)])
  config = make_config(raw_dir, tmp_path / 'c.h5', candidates_csv=outside)
  summary = preprocess.preprocess(config)
  assert summary['outside_volume'] == prepared[2]['outside_volume'] + 1
  assert summary['padded'] == prepared[2]['padded'] + 1
  data, _ = _read(config.data.crops_file)
  row = np.flatnonzero(np.all(data['center_world'] == 5000.0, axis=1))
  assert len(row) == 1 and np.all(data['crops'][row[0]] == luna16.AIR_HU)


def test_complete_output_is_refused_unless_overwrite(prepared, raw_dir, tmp_path):
  path = tmp_path / 'c.h5'
  shutil.copy(prepared[1], path)
  _one_line_error(make_config(raw_dir, path), path, 'already complete',
                  '--config.data.overwrite=True')
  config = make_config(raw_dir, path, overwrite=True, negatives_per_scan=2)
  summary = preprocess.preprocess(config)
  assert crops_file.check_crops_file(path) == summary['crops'] < prepared[2]['crops']


def test_missing_raw_names_the_file_before_any_work(raw_dir, tmp_path):
  copy = tmp_path / 'raw'
  shutil.copytree(raw_dir, copy)
  scan = sorted(luna16.find_scans(str(copy)).values(), key=lambda s: (s.subset, s.seriesuid))[2]
  os.remove(scan.raw_path)
  _one_line_error(make_config(copy, tmp_path / 'c.h5'), scan.raw_path, 'does not exist',
                  scan.mhd_path)
  assert not os.path.exists(tmp_path / 'c.h5')
  assert not os.path.exists(tmp_path / 'c.h5.parts'), 'refused before any scan was cropped'


def test_the_data_file_is_the_one_the_mhd_header_names(prepared, raw_dir, tmp_path):
  copy = tmp_path / 'raw'
  shutil.copytree(raw_dir, copy)
  scan = sorted(luna16.find_scans(str(copy)).values(), key=lambda s: (s.subset, s.seriesuid))[1]
  # A valid MetaImage whose data file is not named after it.
  renamed = os.path.join(os.path.dirname(scan.mhd_path), 'voxels.img')
  os.rename(os.path.splitext(scan.mhd_path)[0] + '.raw', renamed)
  with open(scan.mhd_path) as f:
    header = f.read()
  assert 'ElementDataFile = ' in header
  with open(scan.mhd_path, 'w') as f:
    f.write(re.sub(r'ElementDataFile = .*', 'ElementDataFile = voxels.img', header))
  assert scan.raw_path == renamed

  config = make_config(copy, tmp_path / 'c.h5')
  preprocess.preprocess(config)
  (want, _), (got, attrs) = _read(prepared[1]), _read(config.data.crops_file)
  for name in DATASETS:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  with open(renamed, 'rb') as f:
    assert json.loads(attrs['sources'])[os.path.relpath(renamed, copy)] == (
        hashlib.sha256(f.read()).hexdigest())

  os.remove(renamed)  # Missing: the error names the file the header names.
  _one_line_error(make_config(copy, tmp_path / 'd.h5', overwrite=True), renamed,
                  'does not exist', scan.mhd_path)
  with pytest.raises(luna16.DataError, match=f'^scan file {re.escape(renamed)} .*does not exist'):
    luna16.read_scan(scan.mhd_path)


# ---- labels as LUNA16 defines them ------------------------------------------------------------

def _with_rows(src, path, rows):
  with open(src, newline='') as f:
    lines = list(csv.reader(f))
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows(lines + [list(map(str, row)) for row in rows])
  return str(path)


def test_exclusion_grows_with_the_nodule_and_unknown_diameters_are_counted(raw_dir, tmp_path):
  # A 40 mm nodule far from the synthetic ones; a negative 15 mm from its centre is inside it,
  # beyond half a stored crop (12 mm). A positive 30 mm from it lies inside no annotation.
  uid = sorted(luna16.find_scans(str(raw_dir)))[0]
  centre = np.array([400.0, 400.0, 400.0])
  annotations = _with_rows(raw_dir / 'annotations.csv', tmp_path / 'annotations.csv',
                           [(uid, *centre, 40.0)])
  candidates = _with_rows(raw_dir / 'candidates_V2.csv', tmp_path / 'candidates.csv',
                          [(uid, *(centre + [15.0, 0, 0]), 0), (uid, *(centre + [0, 21.0, 0]), 0),
                           (uid, *(centre + [0, 0, 30.0]), 1)])
  rows = {}
  for factor in (1.0, 0.0):
    config = make_config(raw_dir, tmp_path / f'c{factor}.h5', annotations_csv=annotations,
                         candidates_csv=candidates, exclude_radius_factor=factor)
    summary = preprocess.preprocess(config)
    data, _ = _read(config.data.crops_file)
    near = np.linalg.norm(data['center_world'] - centre, axis=1) < 100
    rows[factor] = {k: v[near] for k, v in data.items()}
    assert summary['positives_without_annotation'] == 1
  inside, outside, far_positive = range(3)
  np.testing.assert_array_equal(rows[1.0]['exclude'], [True, False, False])  # 15 < 20 mm
  np.testing.assert_array_equal(rows[0.0]['exclude'], [False, False, False])  # half a crop: 12
  np.testing.assert_array_equal(rows[1.0]['diameter_mm'], [0, 0, -1])
  # The synthetic positives lie inside their own nodule: every one has its diameter.
  data, _ = _read(tmp_path / 'c1.0.h5')
  known = (data['label'] == 1) & (np.linalg.norm(data['center_world'] - centre, axis=1) > 100)
  assert np.all(data['diameter_mm'][known] > 0)


def test_configured_distance_wins_over_a_small_nodule(raw_dir, tmp_path):
  uid = sorted(luna16.find_scans(str(raw_dir)))[0]
  centre = np.array([400.0, 400.0, 400.0])
  annotations = _with_rows(raw_dir / 'annotations.csv', tmp_path / 'annotations.csv',
                           [(uid, *centre, 4.0)])
  candidates = _with_rows(raw_dir / 'candidates_V2.csv', tmp_path / 'candidates.csv',
                          [(uid, *(centre + [0, 0, 7.0]), 0), (uid, *(centre + [0, 0, 1.0]), 1)])
  config = make_config(raw_dir, tmp_path / 'c.h5', annotations_csv=annotations,
                       candidates_csv=candidates, exclude_radius_mm=8.0)
  preprocess.preprocess(config)
  data, _ = _read(config.data.crops_file)
  near = np.linalg.norm(data['center_world'] - centre, axis=1) < 100
  np.testing.assert_array_equal(data['exclude'][near], [True, False])  # 7 < max(8, 2) mm
  np.testing.assert_array_equal(data['diameter_mm'][near], [0, 4.0])


def test_old_schema_names_the_rebuild(prepared, tmp_path):
  path = tmp_path / 'old.h5'
  shutil.copy(prepared[1], path)
  with h5py.File(path, 'r+') as f:
    f.attrs['schema_version'] = 1
  with pytest.raises(crops_file.CropsFileError) as error:
    crops_file.check_crops_file(path)
  assert str(error.value) == (
      f'crops file {path} has schema_version 1, expected 2 (an older jaxmed labelled it '
      'otherwise); rebuild it with: python -m jaxmed.main --mode=preprocess '
      '--config.data.overwrite=True')


@pytest.mark.parametrize('setting, fragment', [
    ({'spacing_mm': 0.0}, 'data.spacing_mm is 0.0, must be > 0 (mm)'),
    ({'crops_file': '{tmp}'}, 'is a folder; set --config.data.crops_file'),
    ({'crops_file': '{tmp}/file/crops.h5'}, 'cannot write next to crops file'),
])
def test_bad_output_settings_are_one_line(raw_dir, tmp_path, setting, fragment):
  (tmp_path / 'file').write_text('x')
  config = make_config(raw_dir, tmp_path / 'c.h5',
                       **{k: v.format(tmp=tmp_path) if isinstance(v, str) else v
                          for k, v in setting.items()})
  _one_line_error(config, fragment)
  assert not os.path.exists(tmp_path / 'c.h5')
