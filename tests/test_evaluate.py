"""--mode=eval and --mode=crossval on the synthetic dataset: CSV, FROC metrics and plots."""

import csv
import json
import os

import h5py
import numpy as np
import pytest

from conftest import TINY, cli_overrides, run_main
from jaxmed import crossval
from jaxmed import evaluate
from jaxmed import train
from jaxmed.checkpointing import CheckpointError

pytestmark = pytest.mark.slow
PLOTS = ('froc.png', 'roc.png', 'false_positives.png', 'missed_nodules.png',
         'training_curves.png')


@pytest.fixture(scope='module')
def trained(tiny_dataset, tmp_path_factory):
  """A workdir with a 4-step checkpoint of the tiny config."""
  from configs import default
  from conftest import apply_overrides
  config = apply_overrides(default.get_config(), {**TINY, **tiny_dataset, 'train.steps': 4})
  workdir = str(tmp_path_factory.mktemp('trained'))
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_eval_scores_every_test_candidate_and_writes_froc_metrics_and_plots(trained):
  config, workdir = trained
  metrics = evaluate.evaluate(config, workdir)
  with h5py.File(config.data.crops_file, 'r') as f:
    in_test = np.isin(f['subset'][:], config.data.test_subsets)
    expected_uids = sorted(np.char.decode(f['seriesuid'][:][in_test].astype('S'), 'ascii'))
  with open(os.path.join(workdir, 'predictions.csv')) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['seriesuid', 'coordX', 'coordY', 'coordZ', 'probability']
  # One row per candidate of the test subsets (excluded negatives included: LUNA scores all).
  assert sorted(r['seriesuid'] for r in rows) == expected_uids
  assert all(0.0 <= float(r['probability']) <= 1.0 for r in rows)
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  test = [r for r in records if r['split'] == 'test']
  assert len(test) == 1 and test[0]['step'] == 4
  assert 0.0 <= test[0]['cpm_low'] <= test[0]['cpm'] <= test[0]['cpm_high'] <= 1.0
  # The FROC scores every candidate; loss, AUC and accuracy leave excluded negatives out, as
  # validation does, and both records say so.
  with h5py.File(config.data.crops_file, 'r') as f:
    excluded = int(f['exclude'][:][in_test].sum())
  assert metrics['candidates'] == len(rows) and metrics['examples'] == len(rows) - excluded
  val = [r for r in records if r['split'] == 'val']
  assert val and {r['auc_population'] for r in val + test} == {'excluded negatives left out'}
  # Each row is a candidate of the file (its seriesuid with its own centre, exactly), and its
  # probability is that candidate's: the loss recomputed from the CSV's pairs, with the file's
  # labels, is the reported one (rows paired with another candidate's score would change it).
  with h5py.File(config.data.crops_file, 'r') as f:
    uids = np.char.decode(f['seriesuid'][:].astype('S'), 'ascii')
    truth = {(uids[i], *map(float, f['center_world'][i])): (int(f['label'][i]),
                                                             bool(f['exclude'][i]))
             for i in np.flatnonzero(in_test)}
  paired = [truth[(r['seriesuid'], float(r['coordX']), float(r['coordY']), float(r['coordZ']))]
            + (float(r['probability']),) for r in rows]
  assert len(set((r['seriesuid'], r['coordX'], r['coordY'], r['coordZ']) for r in rows)) == len(
      truth)
  kept = [(label, p) for label, exclude, p in paired if not exclude]
  recomputed = train.classification_metrics(np.array([k[0] for k in kept]),
                                            np.array([k[1] for k in kept]))
  for name in ('loss', 'auc', 'accuracy'):
    assert recomputed[name] == pytest.approx(metrics[name], abs=1e-6), name
  for name in PLOTS:
    assert os.path.getsize(os.path.join(workdir, name)) > 5_000, name


def test_eval_of_an_empty_workdir_is_one_line(tiny_dataset, tmp_path):
  args = ['--config=configs/default.py', '--mode=eval', *cli_overrides({**TINY, **tiny_dataset})]
  proc = run_main(args, str(tmp_path), check=False)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('jaxmed: error: no checkpoint') and 'train first' in last, last


def test_eval_of_a_missing_step_names_the_available_ones(trained):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.checkpoint.step = 3
  with pytest.raises(CheckpointError, match=r'no checkpoint at step 3 .*available: \[4\]'):
    evaluate.evaluate(config, workdir)


def test_crossval_merges_the_folds_into_one_froc(tiny_config, tmp_path):
  config = tiny_config(train__steps=2, eval__crossval_folds=(8, 9), eval__bootstrap_samples=50)
  metrics = crossval.run_crossval(config, str(tmp_path))
  with open(tmp_path / 'predictions.csv') as f:
    merged = list(csv.DictReader(f))
  per_fold = sum(len(list(csv.DictReader(open(tmp_path / f'fold_{k}' / 'predictions.csv'))))
                 for k in (8, 9))
  assert len(merged) == per_fold > 0
  assert crossval.fold_config(config, 0).data.val_subsets == (9,)
  assert set(crossval.fold_config(config, 8).data.train_subsets) == {0, 1, 2, 3, 4, 5, 6, 9}
  assert 0.0 <= metrics['cpm'] <= 1.0
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['split'] for r in records] == ['crossval']
  assert (tmp_path / 'froc.png').exists()


def test_eval_and_crossval_refuse_a_file_built_with_a_cap_on_negatives(tiny_config, tmp_path):
  from jaxmed.data import crops_file
  from jaxmed.data import preprocess
  capped = tiny_config(data__crops_file=str(tmp_path / 'capped.h5'),
                       data__negatives_per_scan=2)
  preprocess.preprocess(capped)
  message = (f'crops file {tmp_path / "capped.h5"} was built with data.negatives_per_scan=2 '
             '(a cap on negatives per scan, for training only), so its FROC would undercount '
             'false positives; build an uncapped one into another file (--mode=preprocess '
             '--config.data.negatives_per_scan=-1 --config.data.crops_file=<new file>) or point '
             '--config.data.crops_file at one')
  for run in (evaluate.evaluate, crossval.run_crossval):
    with pytest.raises(crops_file.CropsFileError) as error:
      run(capped, str(tmp_path / 'workdir'))
    assert str(error.value) == message
  assert not os.path.exists(tmp_path / 'workdir' / 'predictions.csv')
  assert not os.path.exists(tmp_path / 'workdir' / 'fold_0')


def test_eval_of_subsets_the_file_lacks_and_crossval_of_bad_folds_are_one_line(tiny_config,
                                                                             tmp_path):
  from jaxmed.errors import ConfigError
  config = tiny_config(data__test_subsets=(42,))
  with pytest.raises(ConfigError, match=r'holds no candidate of data.test_subsets \[42\]'):
    evaluate.evaluate(config, str(tmp_path))
  for folds in ((), (12,), (3, 3)):
    with pytest.raises(ConfigError, match='need distinct subsets out of 0..9'):
      crossval.run_crossval(tiny_config(eval__crossval_folds=folds), str(tmp_path))
  assert os.listdir(tmp_path) == []
