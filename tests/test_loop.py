"""The training loop: nothing moves off the device between log steps, a non-finite step is named
and never saved, and a SIGTERM on a checkpoint step, on the last step or during evaluation saves
once, stops cleanly and resumes exactly."""

import signal

import jax
import pytest

from conftest import complete_steps, train_losses
from jaxmed import train
from jaxmed.data import loader


def test_between_log_steps_nothing_leaves_the_device(tiny_config, tmp_path, monkeypatch):
  config = tiny_config(train__steps=8, train__log_every_steps=4, checkpoint__every_steps=1000)
  fetches = []
  device_get = jax.device_get
  monkeypatch.setattr(jax, 'device_get', lambda tree: fetches.append(1) or device_get(tree))
  with train.training_loop(config, str(tmp_path)) as loop:
    loop.run(5)  # Compiles; logs step 4: one fetch.
    assert len(fetches) == 1
    # Steps 6 and 7: no log, no evaluation, no checkpoint. The next batches still go onto the
    # device (explicit transfers); no implicit transfer, and no fetch.
    with jax.transfer_guard('disallow'):
      loop.run(7)
    assert len(fetches) == 1 and loop.step == 7
    loop.run(8)  # Logs, evaluates and saves step 8: one fetch serves the log and the NaN guard.
  eval_batches = loader.eval_num_batches(config, config.data.val_subsets, skip_excluded=True)
  assert len(fetches) == 2 + eval_batches
  assert sorted(train_losses(tmp_path)) == [4, 8]


def test_a_non_finite_step_is_named_and_never_saved(tiny_config, tmp_path):
  # Step 4 is poisoned; the host learns it only at the step-6 checkpoint, and names step 4.
  config = tiny_config(train__steps=8, train__log_every_steps=100, train__nan_at_step=4,
                       checkpoint__every_steps=3)
  with pytest.raises(train.NonFiniteLossError,
                     match=r'^loss and grad_norm became nan at step 4; stopped without saving '
                           r'it \(last good checkpoint: step 3\)'):
    train.train_and_evaluate(config, str(tmp_path))
  assert complete_steps(tmp_path) == [3]


# 6 steps; checkpoints at 2, 4 and 6; validation at 3 and 6.
RUN = dict(train__steps=6, checkpoint__every_steps=2, train__eval_every_steps=3)
_UNINTERRUPTED = {}


def uninterrupted(tiny_config, tmp_path_factory):
  if not _UNINTERRUPTED:
    workdir = str(tmp_path_factory.mktemp('uninterrupted'))
    _UNINTERRUPTED['result'] = train.train_and_evaluate(tiny_config(**RUN), workdir)
    _UNINTERRUPTED['losses'] = train_losses(workdir)
  return _UNINTERRUPTED


@pytest.mark.slow
@pytest.mark.parametrize('at_step, during_eval', [(4, False), (6, False), (3, True)],
                         ids=['checkpoint_step', 'last_step', 'during_evaluation'])
def test_sigterm_saves_once_stops_and_resumes_exactly(at_step, during_eval, tiny_config, tmp_path,
                                                      tmp_path_factory, caplog):
  expected = uninterrupted(tiny_config, tmp_path_factory)
  workdir = str(tmp_path)
  # The hook raises a real SIGTERM in this process at that step (or in its evaluation).
  config = tiny_config(**RUN, train__sigterm_at_step=at_step,
                       train__sigterm_during_eval=during_eval)
  handler = signal.getsignal(signal.SIGTERM)
  stopped = train.train_and_evaluate(config, workdir)  # Returns: no StepAlreadyExistsError.
  assert signal.getsignal(signal.SIGTERM) is handler  # The run put the handler back.
  assert stopped['step'] == at_step
  assert f'saved step {at_step}' in caplog.text
  assert complete_steps(workdir)[-1] == at_step

  # The same command resumes and ends where the uninterrupted run ended.
  resumed = train.train_and_evaluate(config, workdir) if at_step < 6 else stopped
  assert resumed == expected['result']
  assert train_losses(workdir) == expected['losses']
  assert complete_steps(workdir)[-1] == 6
