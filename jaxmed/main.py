"""jaxmed's one entry point.

  python -m jaxmed.main --config=configs/mesh_2x4.py [--config.key=value ...] [--workdir=DIR]
                        [--mode=train|eval|crossval|predict|detect|preprocess|synthesize]
"""

import contextlib
import logging as logging_std
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxmed import cli
from jaxmed import termination
from jaxmed.errors import ConfigError, exit_with_one_line

# No default here: absl would load it at import, before a mistake can become one line.
_CONFIG = config_flags.DEFINE_config_file('config', None,
                                          f'Config file (default: {cli.DEFAULT_CONFIG}).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default: workdirs/<config.name>).')
_MODE = flags.DEFINE_enum('mode', 'train',
                          ['train', 'eval', 'crossval', 'predict', 'detect', 'preprocess',
                           'synthesize'], 'What to do.')


class _LibraryInfoFilter(logging_std.Filter):
  """Keeps the log readable: drops INFO lines from Orbax's and Grain's internals."""

  _NOISY = (f'{os.sep}orbax{os.sep}', f'{os.sep}grain{os.sep}', f'{os.sep}etils{os.sep}')

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno > logging_std.INFO or not any(n in record.pathname for n in self._NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  workdir = _WORKDIR.value or os.path.join('workdirs', config.name)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    with exit_with_one_line():
      raise ConfigError(f'workdir {workdir} is a file, not a folder; pass another --workdir')

  # Before anything touches a JAX backend: compilation cache, device count, other processes.
  import jax
  if config.compilation_cache_dir and not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir',
                      os.path.expanduser(config.compilation_cache_dir))
  from jaxmed.parallel import distributed
  # Errors a user can fix end in one line naming the cause and the fix, not a traceback.
  with exit_with_one_line(), contextlib.ExitStack() as stack:
    distributed.initialize(config)
    # SIGTERM ends every mode cleanly (jaxmed/termination.py); a training loop saves first.
    # Not where XLA's preemption notifier must see it: training across processes.
    if _MODE.value not in ('train', 'crossval') or jax.process_count() == 1:
      stack.enter_context(termination.sigterm_raises(_MODE.value))
    if _MODE.value == 'synthesize':
      from jaxmed.scans import synthetic
      synthetic.synthesize(config)
    elif _MODE.value == 'preprocess':
      from jaxmed.data import prepare
      prepare.preprocess(config)  # Crops, volumes or both: data.build, else config.task.
    elif _MODE.value == 'train':
      from jaxmed import train
      train.train_and_evaluate(config, workdir)
    elif _MODE.value == 'eval' and config.get('task', 'classify') == 'detect':
      from jaxmed.detection import evaluation
      evaluation.evaluate(config, workdir)
    elif _MODE.value == 'eval':
      from jaxmed import evaluate
      evaluate.evaluate(config, workdir)
    elif _MODE.value == 'crossval':
      from jaxmed import crossval
      crossval.run_crossval(config, workdir)
    elif _MODE.value == 'predict':
      from jaxmed import predict
      predict.predict(config, workdir)
    elif _MODE.value == 'detect':
      from jaxmed import detect
      detect.detect(config, workdir)

if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
