"""The volumes file (task 'detect'): schema, geometry through flipped and anisotropic scans,
atomic write and resume, and bad inputs that end in one line."""

import json
import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from configs import default
from jaxmed.data import prepare, preprocess_volumes, volumes_file
from jaxmed.errors import ConfigError
from jaxmed.scans import luna16, synthetic
from jaxmed.scans.resample import resample_scan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(raw_dir, volumes_path=None, **data):
  """4 scans of 48x48x32 voxels over 2 subsets (directions cycle through flips, slice spacing
  0.6-2.5 mm against 0.5-0.9 mm in plane), resampled to 1 mm."""
  config = default.get_config()
  config.task = 'detect'
  config.data.raw_dir = str(raw_dir)
  config.data.volumes_file = str(volumes_path)
  config.data.preprocess_workers = 0
  s = config.data.synthetic
  s.num_scans = 4
  s.num_subsets = 2
  s.shape_xyz = (48, 48, 32)
  s.nodules_per_scan = (2, 3)
  s.nodule_diameter_mm = (5.0, 9.0)
  s.negatives_per_scan = 4
  for key, value in data.items():
    config.data[key] = value
  return config


@pytest.fixture(scope='module')
def raw_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('volumes') / 'raw'
  synthetic.synthesize(make_config(path))
  return path


@pytest.fixture(scope='module')
def built(raw_dir, tmp_path_factory):
  """(config, summary) of one uninterrupted run."""
  config = make_config(raw_dir, tmp_path_factory.mktemp('vol') / 'volumes.h5')
  return config, preprocess_volumes.preprocess_volumes(config)


def _one_line(error) -> str:
  message = str(error)
  assert '\n' not in message and len(message) < 400, message
  return message


def test_volumes_file_follows_schema_v1(built, raw_dir):
  config, summary = built
  path = config.data.volumes_file
  assert volumes_file.check_volumes_file(path) == summary['scans'] == 4
  with h5py.File(path, 'r') as f:
    assert f.attrs['schema_version'] == 1 and f.attrs['spacing_mm'] == 1.0
    np.testing.assert_array_equal(f.attrs['direction'], np.eye(3).ravel())
    sources = json.loads(f.attrs['sources'])
    uids = [u.decode() for u in f['seriesuid'][:]]
    for uid in uids:
      ds = f['volumes'][uid]
      assert ds.dtype == np.int16 and ds.chunks == tuple(min(32, n) for n in ds.shape)
    subsets = f['subset'][:]
  assert list(zip(subsets, uids)) == sorted(zip(subsets, uids)), 'sorted by (subset, uid)'
  assert 'annotations.csv' in sources
  assert sum(name.endswith('.raw') for name in sources) == 4
  assert summary['bytes_per_scan'] > 0 and summary['scans_per_s'] > 0


def test_nodules_land_on_their_blobs_in_flipped_and_anisotropic_scans(built, raw_dir):
  config, _ = built
  source = volumes_file.VolumesSource(config.data.volumes_file)
  scans = luna16.find_scans(str(raw_dir))
  directions = set()
  for i, uid in enumerate(source.seriesuids):
    image = luna16.read_scan(scans[uid].mhd_path)
    directions.add(tuple(np.diag(np.reshape(image.GetDirection(), (3, 3)))))
    assert image.GetSpacing()[2] != image.GetSpacing()[0]  # Anisotropic before resampling.
    volume = source.read_volume(i)
    # The stored volume is the whole scan resampled, nothing else.
    np.testing.assert_array_equal(volume.hu, resample_scan(image, 1.0).hu)
    meta = source.volume_meta(i)
    assert meta.shape == volume.shape
    annotations = source.annotations(i)
    assert len(annotations) >= 2
    zyx = meta.world_to_voxel(annotations[:, :3])
    np.testing.assert_allclose(meta.voxel_to_world(zyx), annotations[:, :3], atol=1e-9)
    for (z, y, x), diameter in zip(np.rint(zyx).astype(int), annotations[:, 3]):
      blob = volume.hu[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2]
      assert blob.mean() > -150, (uid, diameter, blob.mean())  # Nodule HU 0-60, lung -850.
      # Two radii away along z the lung (or a vessel) is back: the blob is where it should be.
      assert volume.hu[np.clip(z + int(diameter * 1.2), 0, meta.shape[0] - 1), y, x] < blob.mean()
  assert {(1.0, 1.0, -1.0), (-1.0, -1.0, 1.0)} <= directions


def test_read_patch_pads_outside_the_scan(built):
  config, _ = built
  source = volumes_file.VolumesSource(config.data.volumes_file)
  volume = source.read_volume(0)
  d, h, w = volume.shape
  patch = source.read_patch(0, (-3, h - 5, 2), (8, 8, 8))
  np.testing.assert_array_equal(patch[3:, :5], volume.hu[:5, h - 5:, 2:10])
  assert (patch[:3] == -1000).all() and (patch[:, 5:] == -1000).all()
  assert (source.read_patch(0, (d + 10, 0, 0), (4, 4, 4)) == -1000).all()


def test_interrupted_build_leaves_no_file_and_resumes_to_the_same_bytes(raw_dir, tmp_path):
  config = make_config(raw_dir, tmp_path / 'volumes.h5')
  preprocess_volumes.preprocess_volumes(config)
  with open(config.data.volumes_file, 'rb') as f:
    uninterrupted = f.read()
  os.remove(config.data.volumes_file)
  code = ('import json, sys, ml_collections\n'
          'from jaxmed.data import preprocess_volumes as p\n'
          'p.preprocess_volumes(ml_collections.ConfigDict(json.loads(sys.argv[1])))\n')
  crashed = subprocess.run([sys.executable, '-c', code, config.to_json()], cwd=REPO,
                           env={**os.environ, 'JAXMED_PREPROCESS_CRASH_AFTER_SCANS': '2'},
                           timeout=120, capture_output=True)
  assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
  assert not os.path.exists(config.data.volumes_file), 'no half-written volumes file'
  assert len(os.listdir(config.data.volumes_file + '.parts')) == 2
  summary = preprocess_volumes.preprocess_volumes(config)
  assert summary['scans_cached'] == 2 and summary['scans'] == 4
  assert not os.path.exists(config.data.volumes_file + '.parts')
  with open(config.data.volumes_file, 'rb') as f:
    assert f.read() == uninterrupted


# ---- bad inputs: each ends in one line naming the cause and the fix ---------------------------

def test_a_crops_file_or_another_schema_is_refused(built, tmp_path):
  crops = tmp_path / 'crops.h5'
  with h5py.File(crops, 'w') as f:
    f.attrs['schema_version'] = 2
    f.create_dataset('crops', data=np.zeros((1, 4, 4, 4), np.int16))
  with pytest.raises(volumes_file.VolumesFileError) as e:
    volumes_file.VolumesSource(crops)
  assert 'is a crops file' in _one_line(e.value) and '--mode=preprocess' in str(e.value)
  newer = tmp_path / 'newer.h5'
  shutil.copy(built[0].data.volumes_file, newer)
  with h5py.File(newer, 'a') as f:
    f.attrs['schema_version'] = 7
  with pytest.raises(volumes_file.VolumesFileError, match='schema_version 7'):
    volumes_file.check_volumes_file(newer)


def test_a_file_missing_a_scan_is_refused(built, tmp_path):
  path = tmp_path / 'missing.h5'
  shutil.copy(built[0].data.volumes_file, path)
  with h5py.File(path, 'a') as f:
    uid = f['seriesuid'][1].decode()
    del f['volumes'][uid]
  with pytest.raises(volumes_file.VolumesFileError) as e:
    volumes_file.VolumesSource(path)
  assert f'lists scan {uid} but holds no volume' in _one_line(e.value)
  source = volumes_file.VolumesSource(built[0].data.volumes_file)
  with pytest.raises(volumes_file.VolumesFileError, match='holds no scan 1.2.3'):
    source.index_of('1.2.3')


@pytest.mark.parametrize('spacing', [0.0, -1.0])
def test_non_positive_spacing_is_one_line_and_writes_nothing(raw_dir, tmp_path, spacing):
  config = make_config(raw_dir, tmp_path / 'v.h5')
  config.detect.spacing_mm = spacing
  with pytest.raises(luna16.DataError) as e:
    preprocess_volumes.preprocess_volumes(config)
  assert 'detect.spacing_mm' in _one_line(e.value) and 'must be > 0' in str(e.value)
  assert os.listdir(tmp_path) == []


def test_complete_output_is_refused_unless_overwrite(built):
  config = built[0].copy_and_resolve_references()
  with pytest.raises(luna16.DataError, match='already complete'):
    preprocess_volumes.preprocess_volumes(config)


def test_preprocess_builds_what_the_task_or_data_build_names(raw_dir, tmp_path):
  config = make_config(raw_dir, tmp_path / 'v.h5')
  assert prepare.outputs_to_build(config) == ('volumes',)
  config.task = 'classify'
  assert prepare.outputs_to_build(config) == ('crops',)
  config.data.build = ('crops', 'volumes')
  assert prepare.outputs_to_build(config) == ('crops', 'volumes')
  config.data.build = ('masks',)
  with pytest.raises(ConfigError, match="cannot build 'masks'"):
    prepare.outputs_to_build(config)


def test_command_line_error_is_one_line(raw_dir, tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'jaxmed.main', '--mode=preprocess', f'--workdir={tmp_path}/w',
       '--config=configs/default.py', '--config.task=detect', f'--config.data.raw_dir={raw_dir}',
       f'--config.data.volumes_file={tmp_path}/v.h5', '--config.detect.spacing_mm=0'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      'jaxmed: error: detect.spacing_mm is 0.0, must be > 0 (mm); set --config.detect.spacing_mm')
  assert not os.path.exists(tmp_path / 'v.h5')


def test_ensure_volumes_file_builds_a_missing_one(raw_dir, tmp_path):
  config = make_config(raw_dir, tmp_path / 'auto.h5')
  assert prepare.ensure_volumes_file(config) == 4
  assert prepare.ensure_volumes_file(config) == 4  # Present: checked, not rebuilt.
