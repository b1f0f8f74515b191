"""Synthetic LUNA16-format scans: layout, geometry, truth at the CSV coordinates, determinism."""

import filecmp
import os
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from configs import default
from jaxmed.scans import luna16
from jaxmed.scans import synthetic


def small_config(raw_dir, seed=0):
  config = default.get_config()
  config.data.raw_dir = str(raw_dir)
  s = config.data.synthetic
  s.num_scans = 4
  s.num_subsets = 3
  s.shape_xyz = (64, 64, 40)
  s.nodule_diameter_mm = (4.0, 10.0)
  s.negatives_per_scan = 12
  s.seed = seed
  return config


@pytest.fixture(scope='session')
def raw_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('synthetic') / 'raw'
  synthetic.synthesize(small_config(path))
  return path


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def test_writes_luna16_layout_with_varied_geometry(raw_dir):
  scans = luna16.find_scans(str(raw_dir))
  assert len(scans) == 4 and {s.subset for s in scans.values()} == {0, 1, 2}
  assert all(re.fullmatch(r'1\.3\.6\.1\.4\.1\.14519\.5\.2\.1\.6279\.6001\.[1-9]\d{29}', uid)
             for uid in scans)
  directions = set()
  for scan in scans.values():
    image = sitk.ReadImage(scan.mhd_path)
    assert image.GetPixelID() == sitk.sitkInt16
    assert image.GetSize() == (64, 64, 40)
    sx, sy, sz = image.GetSpacing()
    assert 0.5 <= sx == sy <= 0.9 and 0.6 <= sz <= 2.5
    assert np.all(np.abs(image.GetOrigin()) > 1.0)
    directions.add(tuple(np.round(image.GetDirection()).astype(int)))
  assert (1, 0, 0, 0, 1, 0, 0, 0, 1) in directions
  assert len(directions) >= 2, 'some scans must have flipped direction cosines'
  candidates = luna16.read_candidates(str(raw_dir / 'candidates_V2.csv'))
  annotations = luna16.read_annotations(str(raw_dir / 'annotations.csv'))
  assert set(candidates['seriesuid']) == set(scans) == set(annotations['seriesuid'])
  assert np.all((annotations['diameter_mm'] >= 4.0) & (annotations['diameter_mm'] <= 10.0))
  assert 0 < candidates['class'].sum() < len(candidates['class']) / 2


def test_nodules_and_candidates_sit_at_their_world_coordinates(raw_dir):
  """Checked with SimpleITK's own physical->index mapping, independent of jaxmed's."""
  scans = luna16.find_scans(str(raw_dir))
  annotations = luna16.read_annotations(str(raw_dir / 'annotations.csv'))
  candidates = luna16.read_candidates(str(raw_dir / 'candidates_V2.csv'))
  bright_negatives = total_negatives = 0
  for uid, scan in scans.items():
    image = sitk.ReadImage(scan.mhd_path)
    volume = sitk.GetArrayFromImage(image)

    def hu_at(x, y, z):  # The nearest voxel (nodules are at least 4 mm, voxels < 2.5 mm).
      i, j, k = image.TransformPhysicalPointToIndex((float(x), float(y), float(z)))
      return volume[k, j, i]

    sel = annotations['seriesuid'] == uid
    for x, y, z in zip(annotations['coordX'][sel], annotations['coordY'][sel],
                       annotations['coordZ'][sel]):
      assert -120 < hu_at(x, y, z) < 180, 'a nodule centre must be solid tissue'
    sel = candidates['seriesuid'] == uid
    for x, y, z, cls in zip(candidates['coordX'][sel], candidates['coordY'][sel],
                            candidates['coordZ'][sel], candidates['class'][sel]):
      if cls == 1:
        assert hu_at(x, y, z) > -500, 'a positive candidate must lie on its nodule'
      else:
        total_negatives += 1
        bright_negatives += hu_at(x, y, z) > -500
  # Hard negatives (vessels, body tissue) exist: brightness alone does not classify.
  assert 0.2 < bright_negatives / total_negatives < 0.95


def test_same_seed_gives_byte_identical_files(raw_dir, tmp_path):
  again = tmp_path / 'again'
  synthetic.synthesize(small_config(again))
  names = _files(raw_dir)
  assert names == _files(again) and len(names) == 4 * 2 + 3
  _, mismatch, errors = filecmp.cmpfiles(raw_dir, again, names, shallow=False)
  assert mismatch == [] and errors == []
  other = tmp_path / 'other'
  synthetic.synthesize(small_config(other, seed=1))
  assert not filecmp.cmp(raw_dir / 'candidates_V2.csv', other / 'candidates_V2.csv', shallow=False)


def test_refuses_a_complete_dataset_unless_overwrite(tmp_path):
  config = small_config(tmp_path / 'raw')
  config.data.synthetic.num_scans = 2
  synthetic.synthesize(config)
  with pytest.raises(luna16.DataError) as error:
    synthetic.synthesize(config)
  message = str(error.value)
  assert '\n' not in message and str(tmp_path / 'raw') in message
  assert 'already holds a complete' in message and '--config.data.overwrite=True' in message
  config.data.overwrite = True
  config.data.synthetic.num_scans = 1
  config.data.synthetic.seed = 5
  summary = synthetic.synthesize(config)
  assert summary['scans'] == 1
  assert len(luna16.find_scans(str(tmp_path / 'raw'))) == 1, 'old scans must be removed'


def test_never_writes_into_a_dataset_it_did_not_make(tmp_path):
  raw = tmp_path / 'luna16'
  (raw / 'subset0').mkdir(parents=True)
  (raw / 'subset0' / 'real.mhd').write_text('ObjectType = Image\n')
  config = small_config(raw)
  config.data.overwrite = True
  with pytest.raises(luna16.DataError) as error:
    synthetic.synthesize(config)
  message = str(error.value)
  assert '\n' not in message and 'not written by synthesize' in message and str(raw) in message
  assert (raw / 'subset0' / 'real.mhd').exists()


@pytest.mark.parametrize('key, value, fragment', [
    ('nodules_per_scan', (3, 1), 'synthetic.nodules_per_scan is (3, 1), not a range'),
    ('nodule_diameter_mm', (0.0, 5.0), 'synthetic.nodule_diameter_mm is (0.0, 5.0), not a range'),
    ('shape_xyz', (4, 4, 4), 'synthetic.shape_xyz is (4, 4, 4): need 3 sizes'),
    ('negatives_per_scan', -2, 'synthetic.negatives_per_scan is -2, must be >= 0'),
    ('num_scans', 0, 'synthetic.num_scans and synthetic.num_subsets must be > 0'),
])
def test_bad_settings_are_one_line_and_keep_the_dataset_there(raw_dir, tmp_path, key, value,
                                                              fragment):
  copy = tmp_path / 'raw'
  shutil.copytree(raw_dir, copy)
  before = _files(copy)
  config = small_config(copy)
  config.data.overwrite = True  # Even then, nothing is removed before the settings are checked.
  config.data.synthetic[key] = value
  with pytest.raises(luna16.DataError) as error:
    synthetic.synthesize(config)
  assert fragment in str(error.value) and '\n' not in str(error.value)
  assert _files(copy) == before


def test_raw_dir_that_is_a_file_or_cannot_be_made(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(luna16.DataError, match='is a file, not a folder'):
    synthetic.synthesize(small_config(tmp_path / 'file'))
  with pytest.raises(luna16.DataError, match='cannot be created'):
    synthetic.synthesize(small_config(tmp_path / 'file' / 'raw'))


def _segment_gaps(point, segments):
  """Distance (mm) from `point` to each tube's surface (negative inside it)."""
  p0 = np.array([p for p, _, _ in segments])
  d = np.array([q for _, q, _ in segments]) - p0
  radius = np.array([r for _, _, r in segments])
  t = np.clip(np.sum((point - p0) * d, axis=1) / np.maximum(np.sum(d * d, axis=1), 1e-9), 0, 1)
  return np.linalg.norm(point - p0 - t[:, None] * d, axis=1) - radius


def test_nodules_are_isolated_on_the_lung_wall_or_on_a_vessel_and_vessels_branch():
  from jaxmed.scans import synthetic_anatomy as anatomy
  rng = np.random.default_rng(0)
  lungs = [anatomy.Ellipsoid(np.array([side * 60.0, 0.0, 0.0]), np.array([50.0, 80.0, 100.0]))
           for side in (-1, 1)]
  trees = [anatomy.vessel_tree(rng, lung, medial_sign=-side)
           for lung, side in zip(lungs, (-1, 1))]
  segments = [tree[0] for tree in trees]
  synthetic_config = default.get_config().data.synthetic  # Diameters 3-30 mm.
  nodules, clamped = anatomy.place_nodules(rng, lungs, segments, synthetic_config, 40)
  kinds = {n['kind'] for n in nodules}
  assert kinds == {'isolated', 'pleural', 'vascular'} and clamped == 0
  diameters = np.array([n['diameter'] for n in nodules])
  assert diameters.min() >= 3.0 and diameters.max() <= 30.0 and diameters.max() > 15.0
  for n in nodules:
    if n['kind'] == 'vascular':  # Its surface meets a vessel's (semi-axes vary by 15%).
      gap = min(_segment_gaps(n['center'], tree).min() for tree in segments)
      assert gap <= 1.15 * n['diameter'] / 2, (gap, n['diameter'])
  for (tree_segments, branch_points) in trees:
    assert len(branch_points) >= 4
    ends = np.array([p1 for _, p1, _ in tree_segments])
    starts = np.array([p0 for p0, _, _ in tree_segments])
    for point, _ in branch_points:  # Where one segment ends, two start.
      assert np.min(np.linalg.norm(ends - point, axis=1)) < 1e-9
      assert np.sum(np.linalg.norm(starts - point, axis=1) < 1e-9) == 2
