"""The command line's flag parsing: a missing or broken config file, an unknown config key or a
bad flag value ends in one `jaxmed: error:` line instead of absl's traceback."""

import os
import re

from absl import flags

from jaxmed.errors import ConfigError, exit_with_one_line

DEFAULT_CONFIG = 'configs/default.py'


def config_path(argv) -> str | None:
  """The config file named on the command line (absl's --config=F, --config F; F:args)."""
  path = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith('--config='):
      path = arg[len('--config='):]
    elif arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
  return path if path is None or os.path.isfile(path) else path.split(':', 1)[0]


def parse_flags(argv):
  """absl's flag parsing, where a missing or broken config file, an unknown key or a bad value
  ends in one `jaxmed: error:` line instead of a traceback."""
  with exit_with_one_line():
    path = config_path(argv)
    if path is None:
      path = DEFAULT_CONFIG
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
