"""--mode=predict: the same scans as MetaImage, DICOM series and NIfTI give the same predictions;
each bad input is one UserError and leaves no output behind."""

import csv
import functools
import glob
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from flax import nnx

from conftest import apply_overrides, cli_overrides, run_main
from jaxmed import checkpointing
from jaxmed import evaluate
from jaxmed import predict
from jaxmed import train
from jaxmed.scans import convert
from jaxmed.scans import luna16
from jaxmed.data import preprocess
from jaxmed.scans import scan_formats
from jaxmed.scans import synthetic
from jaxmed.errors import UserError
from jaxmed.parallel import sharding as sharding_lib

# Four scans (64, 64, 32): directions identity, z flipped, identity, x and y flipped.
SMALL = {
    'data.synthetic.num_scans': 4,
    'data.synthetic.num_subsets': 1,
    'data.synthetic.shape_xyz': (64, 64, 32),
    'data.synthetic.nodules_per_scan': (1, 2),
    'data.synthetic.nodule_diameter_mm': (4.0, 10.0),
    'data.synthetic.negatives_per_scan': 6,
    'data.stored_crop_size': 20,
    'data.crop_size': 16,
    'model.depth': 10,
    'model.width': 4,
    'train.global_batch_size': 16,
    'train.eval_batch_size': 8,  # Below the candidates of a scan: several batches per scan.
    'predict.montage_size': 2,
}


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """(config, root): synthetic scans (.mhd) under root/raw/subset0 with their candidates."""
  from configs import default
  root = tmp_path_factory.mktemp('predict')
  config = apply_overrides(default.get_config(), {**SMALL, 'data.raw_dir': str(root / 'raw')})
  synthetic.synthesize(config)
  return config, root


@pytest.fixture(scope='module')
def workdir(dataset):
  """root/workdir, holding a checkpoint of the SMALL model."""
  config, root = dataset
  path = str(root / 'workdir')
  # An initialised (untrained) model is enough: the tests compare inputs, not accuracy.
  _, state, _ = train.init_sharded_state(config, *train.create_mesh_and_rules(config))
  checkpointer = checkpointing.Checkpointer(path, config)
  checkpointer.save(0, nnx.to_pure_dict(state))
  checkpointer.close()
  return path


def _config(dataset, scans_dir, candidates_csv, output_dir):
  config = dataset[0].copy_and_resolve_references()
  config.predict.scans_dir = str(scans_dir)
  config.predict.candidates_csv = str(candidates_csv)
  config.predict.output_dir = str(output_dir)
  return config


def _read(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _write_csv(path, rows, header=('seriesuid', 'coordX', 'coordY', 'coordZ', 'class')):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(header)
    writer.writerows(rows)
  return path


def test_dicom_and_nifti_give_the_predictions_of_the_mhd_scans(dataset, workdir):
  root = dataset[1]
  raw = root / 'raw'
  scans = scan_formats.find_scans(str(raw / 'subset0'))
  directions = [luna16.read_scan(s.path).GetDirection() for s in scans.values()]
  assert any(d != (1, 0, 0, 0, 1, 0, 0, 0, 1) for d in directions)  # Flipped axes are tested.
  # One folder holding every scan three times, under three seriesuids: .mhd, DICOM, NIfTI.
  mixed = root / 'mixed'
  shutil.copytree(raw / 'subset0', mixed / 'mhd')
  rename = {}
  for i, (uid, scan) in enumerate(scans.items()):
    image = luna16.read_scan(scan.path)
    rename[uid] = {'dicom': f'1.2.826.0.1.3680043.8.498.{i + 1}', 'nifti': f'scan_{i}'}
    convert.write_dicom_series(image, str(mixed / 'dicom' / f'series{i}'), rename[uid]['dicom'])
    convert.write_nifti(image, str(mixed / f'{rename[uid]["nifti"]}.nii.gz'))
  original = _read(raw / 'candidates_V2.csv')
  rows = [[r['seriesuid'], r['coordX'], r['coordY'], r['coordZ'], r['class']] for r in original]
  for fmt in ('dicom', 'nifti'):
    rows += [[rename[r[0]][fmt]] + r[1:] for r in rows[:len(original)]]
  csv_path = _write_csv(root / 'mixed_candidates.csv', rows)

  per_scan = np.unique([r[0] for r in rows], return_counts=True)[1]
  assert per_scan.max() > SMALL['train.eval_batch_size']  # A scan's last batch is padded.
  found = scan_formats.find_scans(str(mixed))
  assert sorted(s.format for s in found.values()) == ['dicom'] * 4 + ['mhd'] * 4 + ['nifti'] * 4
  summary = predict.predict(_config(dataset, mixed, csv_path, root / 'out'), workdir)
  assert summary['candidates'] == 3 * len(original) and summary['scans'] == 12

  predictions = _read(root / 'out' / 'predictions.csv')
  assert [p['seriesuid'] for p in predictions] == [r[0] for r in rows]  # The CSV's order.
  prob = np.array([float(p['probability']) for p in predictions]).reshape(3, -1)
  # The comparison means something only if the model tells the candidates apart.
  assert np.ptp(prob[0]) > 1e-3, np.ptp(prob[0])
  np.testing.assert_array_equal(prob[1], prob[0])  # DICOM keeps int16 HU and float64 geometry.
  np.testing.assert_allclose(prob[2], prob[0], atol=1e-4)  # NIfTI stores geometry as float32.
  for uid in found:
    assert os.path.getsize(root / 'out' / 'montages' / f'{uid}.png') > 3_000


def test_predict_cuts_and_scores_each_candidate_as_preprocess_and_eval_do(dataset, workdir,
                                                                           tmp_path):
  root = dataset[1]
  config = _config(dataset, root / 'raw' / 'subset0', root / 'raw' / 'candidates_V2.csv',
                   tmp_path / 'out')
  config.data.crops_file = str(tmp_path / 'crops.h5')
  config.data.subsets = config.data.test_subsets = (0,)
  config.data.preprocess_workers = 0
  preprocess.preprocess(config)
  predict.predict(config, workdir)
  # --mode=eval's scoring of the preprocessed crops file, same checkpoint.
  mesh, rules = train.create_mesh_and_rules(config)
  with sharding_lib.use_rules(mesh, rules):
    checkpointer = checkpointing.Checkpointer(workdir, config)
    graphdef, abstract_state, shardings = train.abstract_train_state(config, mesh, rules)
    state, _ = train.restore_state(checkpointer, abstract_state)
    checkpointer.close()
    scores = train.predict(train.make_eval_step(graphdef, shardings, mesh, config), state, config,
                           (0,), sharding_lib.batch_sharding(mesh, rules, ndim=1))
  table = evaluate.candidate_table(config.data.crops_file, scores['row'])
  from_eval = {(uid, *map(float, xyz)): p for uid, xyz, p in
               zip(table['seriesuid'], table['center_world'], scores['probability'])}
  predicted = _read(tmp_path / 'out' / 'predictions.csv')
  assert len(predicted) == len(from_eval)
  for row in predicted:
    key = (row['seriesuid'], float(row['coordX']), float(row['coordY']), float(row['coordZ']))
    assert abs(float(row['probability']) - from_eval[key]) < 1e-6, key


def test_world_coordinates_survive_dicom_and_nifti(dataset, tmp_path):
  root = dataset[1]
  scans = scan_formats.find_scans(str(root / 'raw' / 'subset0'))
  for fmt in ('dicom', 'nifti'):
    convert.convert_scans(str(root / 'raw' / 'subset0'), str(tmp_path / fmt), fmt)
    converted = scan_formats.find_scans(str(tmp_path / fmt))
    assert set(converted) == set(scans)  # seriesuid: SeriesInstanceUID, or the NIfTI stem.
    for uid, scan in scans.items():
      image, other = luna16.read_scan(scan.path), scan_formats.read_scan(converted[uid])
      # Voxel centres of the .mhd are voxel centres of the copy, with the same HU (a z-flipped
      # scan comes back z-sorted from DICOM: other indices, same world points).
      shape_zyx = sitk.GetArrayViewFromImage(image).shape
      index = np.random.default_rng(0).integers(0, shape_zyx, (300, 3))
      back = luna16.world_to_voxel(other, luna16.voxel_to_world(image, index))
      np.testing.assert_allclose(back, np.round(back), atol=1e-4)
      hu = sitk.GetArrayViewFromImage(other)[tuple(np.round(back).astype(int).T)]
      np.testing.assert_array_equal(hu, sitk.GetArrayViewFromImage(image)[tuple(index.T)])
      assert other.GetDirection()[8] == 1 or fmt == 'nifti'  # DICOM: slices sorted by z.
      # The header-only geometry (predict's early check) is the volume's geometry.
      geometry = scan_formats.read_geometry(converted[uid])
      assert geometry.size_xyz == other.GetSize()
      for get in ('GetOrigin', 'GetSpacing', 'GetDirection'):
        np.testing.assert_allclose(getattr(geometry.grid, get)(), getattr(other, get)(),
                                   atol=1e-6, err_msg=get)


def _dicom_copy(root, tmp_path, index=0):
  """A DICOM series of one synthetic scan, written to its own folder; returns (folder, uid)."""
  scan = sorted(scan_formats.find_scans(str(root / 'raw' / 'subset0')).values(),
                key=lambda s: s.path)[index]
  folder = tmp_path / f'dicom{index}' / 'series'
  convert.write_dicom_series(luna16.read_scan(scan.path), str(folder), scan.seriesuid)
  return folder, scan.seriesuid


def _candidates_of(root, uids, tmp_path, extra=()):
  rows = [[r['seriesuid'], r['coordX'], r['coordY'], r['coordZ'], r['class']]
          for r in _read(root / 'raw' / 'candidates_V2.csv') if r['seriesuid'] in uids]
  return _write_csv(tmp_path / 'candidates.csv', rows + list(extra))


def _expect_one_line_error(dataset, scans_dir, csv_path, out, match, workdir=None):
  with pytest.raises(UserError, match=match) as raised:
    # These inputs fail before the checkpoint is looked at, whether or not it exists.
    predict.predict(_config(dataset, scans_dir, csv_path, out),
                    workdir or str(dataset[1] / 'workdir'))
  message = str(raised.value)
  assert '\n' not in message and ';' in message, message  # One line: the cause; the fix.
  assert not os.path.exists(out), os.listdir(out)  # Nothing written, not even a montage.
  return message


def test_a_folder_with_several_dicom_series_is_refused(dataset, tmp_path):
  root = dataset[1]
  first, uid0 = _dicom_copy(root, tmp_path, 0)
  second, uid1 = _dicom_copy(root, tmp_path, 1)
  for path in glob.glob(str(second / '*.dcm')):
    shutil.copy(path, first / ('b' + os.path.basename(path)))
  _expect_one_line_error(dataset, first.parent, _candidates_of(root, {uid0}, tmp_path),
                         tmp_path / 'out', 'holds 2 DICOM series')


@pytest.mark.parametrize('damage,match', [
    ('missing', r'uneven slice spacing.*a missing slice\? restore it'),
    ('uneven', r'uneven slice spacing.*resample the series evenly'),
    ('modality', r'has Modality MR .*not CT'),
    ('corrupt', r'0004.dcm, are unreadable as DICOM\); a missing slice'),
    ('tilt', r'slice 0001.dcm is shifted 0.3 mm sideways from slice 0000.dcm \(gantry tilt'),
    ('localizer', r'slice 0007.dcm is a localizer \(scout\) image \(ImageType '
                  r'ORIGINAL\\PRIMARY\\LOCALIZER\), not a slice of the volume; remove'),
    ('hair', r'slices 00(09|10).dcm and 00(09|10).dcm lie at 0.001 mm apart \(the series spaces '
             r'its slices .* mm\): the same slice twice; remove the duplicate slice'),
    ('multiframe', r'series.dcm is an enhanced multi-frame CT file \(\d+ frames in one file\); '
                   r'jaxmed reads classic series \(one slice per file\): convert it'),
])
def test_a_damaged_dicom_series_is_refused(dataset, tmp_path, damage, match):
  root = dataset[1]
  folder, uid = _dicom_copy(root, tmp_path, 1)  # The z-flipped scan.
  slices = sorted(glob.glob(str(folder / '*.dcm')))
  if damage == 'missing':
    os.remove(slices[len(slices) // 2])
  elif damage == 'corrupt':  # A slice file overwritten: the series reader leaves it out.
    with open(slices[4], 'wb') as f:
      f.write(b'\0' * 128 + b'DICM' + bytes(range(256)) * 2)
  elif damage in ('uneven', 'tilt'):
    # uneven: one slice moved 0.3 gaps along z; tilt: each slice 0.3 mm further along x.
    spacing_z = luna16.read_scan(scan_formats.find_scans(str(root / 'raw'))[uid].path
                                 ).GetSpacing()[2]
    moves = {10: (0, 0.3 * spacing_z)} if damage == 'uneven' else {
        k: (0.3 * k, 0) for k in range(len(slices))}
    reader, writer = sitk.ImageFileReader(), sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, (dx, dz) in moves.items():
      reader.SetFileName(slices[k])
      image = reader.Execute()
      x, y, z = (float(v) for v in image.GetMetaData('0020|0032').split('\\'))
      image.SetMetaData('0020|0032', f'{x + dx:.4f}\\{y}\\{z + dz:.4f}')
      writer.SetFileName(slices[k])
      writer.Execute(image)
  elif damage in ('localizer', 'hair'):
    # localizer: a scout image among the slices; hair: slice 10 moved 0.001 mm from slice 9.
    reader, writer = sitk.ImageFileReader(), sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    k = 7 if damage == 'localizer' else 10
    reader.SetFileName(slices[k])
    image = reader.Execute()
    if damage == 'localizer':
      image.SetMetaData('0008|0008', 'ORIGINAL\\PRIMARY\\LOCALIZER')
    else:
      reader.SetFileName(slices[9])
      reader.ReadImageInformation()
      x, y, z = (float(v) for v in reader.GetMetaData('0020|0032').split('\\'))
      image.SetMetaData('0020|0032', f'{x}\\{y}\\{z + 0.001:.4f}')
    writer.SetFileName(slices[k])
    writer.Execute(image)
  elif damage == 'multiframe':  # The whole volume in one enhanced CT file.
    volume = sitk.Cast(luna16.read_scan(scan_formats.find_scans(str(root / 'raw'))[uid].path),
                       sitk.sitkInt16)
    shutil.rmtree(folder)
    folder.mkdir()
    for tag, value in (('0008|0060', 'CT'), ('0020|000e', uid),
                       ('0008|0016', '1.2.840.10008.5.1.4.1.1.2.1')):
      volume.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(folder / 'series.dcm'))
    writer.Execute(volume)
  else:
    shutil.rmtree(folder)
    convert.write_dicom_series(luna16.read_scan(
        scan_formats.find_scans(str(root / 'raw'))[uid].path), str(folder), uid, modality='MR')
  _expect_one_line_error(dataset, folder.parent, _candidates_of(root, {uid}, tmp_path),
                         tmp_path / 'out', match)


def test_a_candidate_outside_every_scan_is_refused(dataset, tmp_path):
  root = dataset[1]
  raw = root / 'raw' / 'subset0'
  uids = set(scan_formats.find_scans(str(raw)))
  uid = sorted(uids)[-1]
  unknown = _candidates_of(root, uids, tmp_path, [['1.2.3.999', '0', '0', '0', '0']])
  _expect_one_line_error(dataset, raw, unknown, tmp_path / 'out',
                         r'line \d+: seriesuid 1.2.3.999 names no scan')
  # Outside its scan's volume: found from the scan headers, before any scan is read.
  far = _candidates_of(root, uids, tmp_path, [[uid, '0', '0', '5000', '0']])
  _expect_one_line_error(dataset, raw, far, tmp_path / 'out',
                         rf'line \d+: candidate \(0.00, 0.00, 5000.00\) mm lies outside scan {uid}')


def test_missing_inputs_and_checkpoint_are_refused(dataset, tmp_path):
  root = dataset[1]
  raw = root / 'raw' / 'subset0'
  csv_path = _candidates_of(root, set(scan_formats.find_scans(str(raw))), tmp_path)
  out = tmp_path / 'out'
  expect = functools.partial(_expect_one_line_error, dataset, out=out)
  expect(tmp_path / 'nope', csv_path, match='scans folder .* does not exist')
  (tmp_path / 'empty').mkdir()
  expect(tmp_path / 'empty', csv_path, match='holds no scan')
  expect(raw, tmp_path / 'nope.csv', match='candidates CSV .* does not exist')
  expect(raw, csv_path, match='no checkpoint in .*train first',
         workdir=str(tmp_path / 'untrained'))


def test_readme_command_scores_synthetic_scans_written_as_dicom(dataset, workdir, tmp_path):
  """The README's example: convert to DICOM with the CLI, then --mode=predict through main."""
  root = dataset[1]
  dicom = tmp_path / 'dicom'
  assert convert.main(['--format=dicom', f'--candidates={root / "raw" / "candidates_V2.csv"}',
                       str(root / 'raw' / 'subset0'), str(dicom)]) == 0
  overrides = {**SMALL, 'predict.scans_dir': str(dicom),
               'predict.candidates_csv': str(dicom / 'candidates.csv')}
  run_main(['--config=configs/default.py', '--mode=predict', *cli_overrides(overrides)],
           workdir)
  predictions = _read(os.path.join(workdir, 'predict', 'predictions.csv'))
  assert len(predictions) == len(_read(root / 'raw' / 'candidates_V2.csv'))
  # A bad input through the CLI: one `jaxmed: error:` line and exit status 1.
  proc = run_main(['--config=configs/default.py', '--mode=predict',
                   *cli_overrides({**overrides, 'predict.scans_dir': str(tmp_path / 'nope')})],
                  workdir, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith('jaxmed: error: scans folder')
