"""jaxmed's one entry point.

  python -m jaxmed.main --config=configs/mesh_2x4.py [--config.key=value ...] [--workdir=DIR]
                        [--mode=train|eval|crossval|predict|preprocess|synthesize]
"""

import logging as logging_std
import os
import re

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxmed.errors import ConfigError, exit_with_one_line

_DEFAULT_CONFIG = 'configs/default.py'
# No default here: absl would load it at import, before a mistake can become one line.
_CONFIG = config_flags.DEFINE_config_file('config', None,
                                          f'Config file (default: {_DEFAULT_CONFIG}).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default: workdirs/<config.name>).')
_MODE = flags.DEFINE_enum('mode', 'train',
                          ['train', 'eval', 'crossval', 'predict', 'preprocess',
                           'synthesize'], 'What to do.')


class _LibraryInfoFilter(logging_std.Filter):
  """Keeps the log readable: drops INFO lines from Orbax's and Grain's internals."""

  _NOISY = (f'{os.sep}orbax{os.sep}', f'{os.sep}grain{os.sep}', f'{os.sep}etils{os.sep}')

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno > logging_std.INFO or not any(n in record.pathname for n in self._NOISY)


def _config_path(argv) -> str | None:
  """The config file named on the command line (absl's --config=F, --config F; F:args)."""
  path = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith('--config='):
      path = arg[len('--config='):]
    elif arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
  return path if path is None or os.path.isfile(path) else path.split(':', 1)[0]


def _parse_flags(argv):
  """absl's flag parsing, where a missing or broken config file, an unknown key or a bad value
  ends in one `jaxmed: error:` line instead of a traceback."""
  with exit_with_one_line():
    path = _config_path(argv)
    if path is None:
      path = _DEFAULT_CONFIG
      argv = [argv[0], f'--config={path}', *argv[1:]]
    if not os.path.isfile(path):
      raise ConfigError(f'config file {path} not found; pass --config=<file>.py, e.g. one of '
                        'configs/*.py, from the repository root')
    try:
      args = flags.FLAGS(argv)
    except flags.Error as e:  # a bad value: absl names the flag and the value
      where = ('configs/default.py lists every key' if 'flag --config.' in str(e)
               else 'python -m jaxmed.main --helpshort lists the flags')
      raise ConfigError(f'{e}; {where}') from None
    except (KeyError, AttributeError) as e:  # --config.<key>=... names a key the config lacks
      message = str(e).replace('\\', '')
      key = re.findall(r"'([^']+)'", message)[:1] or ['?']
      overrides = [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
      named = ' '.join([o for o in overrides if key[0] in o.split('.')] or overrides)
      guess = re.findall(r'Did you mean "([^"]+)"', message)
      hint = f' (did you mean {guess[0]}?)' if guess else ''
      raise ConfigError(f'{named}: {path} has no key {key[0]}{hint}; configs/default.py lists '
                        'every key') from None
    except (SyntaxError, ImportError, NameError, TypeError, ValueError, OSError) as e:
      raise ConfigError(f'config file {path} could not be loaded ({type(e).__name__}: '
                        f'{" ".join(str(e).split())}); fix the file or pass another') from None
    if len(args) > 1:
      raise ConfigError(f'unexpected arguments: {" ".join(args[1:])}; the command takes only '
                        'flags (--config, --config.<key>=<value>, --workdir, --mode)')
    return args


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
  with exit_with_one_line():
    distributed.initialize(config)
    if _MODE.value == 'synthesize':
      from jaxmed.data import synthetic
      synthetic.synthesize(config)
    elif _MODE.value == 'preprocess':
      from jaxmed.data import preprocess
      preprocess.preprocess(config)
    elif _MODE.value == 'train':
      from jaxmed import train
      train.train_and_evaluate(config, workdir)
    elif _MODE.value == 'eval':
      from jaxmed import evaluate
      evaluate.evaluate(config, workdir)
    elif _MODE.value == 'crossval':
      from jaxmed import crossval
      crossval.run_crossval(config, workdir)
    elif _MODE.value == 'predict':
      from jaxmed import predict
      predict.predict(config, workdir)

if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
