"""The printed tables: one per benchmark result (table_rows, format_table), and one summary of
every benchmark_*.json under a folder, with README-ready lines (summarize)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence


def _si(value: float, unit: str = '') -> str:
  if value is None:
    return '-'
  for scale, prefix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(value) >= scale:
      return f'{value / scale:.3g} {prefix}{unit}'
  return f'{value:.3g} {unit}'.rstrip()


def _gib(value) -> str:
  return '-' if value is None else f'{value / 2**30:.2f} GiB'


def _memory(m: dict) -> str:
  return (f"params {_si(m.get('parameters'), 'B')}, optimizer {_si(m.get('optimizer_state'), 'B')}"
          f", temporaries {_si(m.get('temporaries'), 'B')}")


def _head(r: dict) -> list[tuple[str, str]]:
  return [('model', f"{r['model']}-{r['depth']} width {r['width']} s2d {r['space_to_depth']} "
                    f"{r['dtype']}"),
          ('shapes', f"batch {r['global_batch_size']} x {r['crop_size']}^3 "
                     f"(stored {r['stored_crop_size']}^3)"),
          ('devices', f"{r['devices']} x {r['device_kind']} ({r['platform']}), mesh {r['mesh']}")]


def table_rows(what: str, r: dict) -> list[tuple[str, str]]:
  """(label, value) lines of the printed table for one result."""
  if what in ('step', 'compare', 'e2e', 'loop', 'comms', 'checkpoint', 'profile'):
    rows = _head(r)
  else:
    rows = []
  if what == 'detect_scale':
    from jaxmed.benchmarks import detect_scale
    return detect_scale.table_rows(r)
  if what == 'step':
    mem = r['memory']
    rows += [('train step', f"{r['samples_per_s']:,.1f} samples/s ({r['step_ms']:.2f} ms/step)"),
             ('model FLOPs', f"{r['forward_gflops_per_sample']:.4g} GFLOP fwd/sample, x3/step"),
             ('achieved', f"{r['model_tflops_per_s']:.4g} TFLOP/s"),
             ('matmul peak', f"{r['matmul_peak']['tflops']:.4g} TFLOP/s "
                             f"({r['matmul_peak']['dtype']}, {r['matmul_peak']['size']}^2)"),
             ('MFU', f"{100 * r['mfu']:.2f} %"), ('compile', f"{r['compile_s']:.1f} s"),
             ('memory/device', f"peak {_gib(mem.get('peak_bytes_in_use'))}, temp "
                               f"{_gib(mem.get('temp_bytes'))}, "
                               f"args {_gib(mem.get('argument_bytes'))}")]
  elif what == 'compare':
    rows += table_rows('step', r['jax'])[3:5]
    if r.get('torch'):
      t = r['torch']
      rows += [('pytorch eager', f"{t['samples_per_s']:,.1f} samples/s ({t['step_ms']:.2f} ms, "
                                 f"{t['precision']}, torch {t['torch']})"),
               ('jax / pytorch', f"{r['jax_over_torch']:.3f}")]
    else:
      rows += [('pytorch', r.get('note', 'not run'))]
  elif what == 'e2e':
    rows += [('crops file', r['crops_file']),
             ('step alone', f"{r['step_samples_per_s']:,.1f} samples/s"),
             ('end to end', f"{r['e2e_samples_per_s']:,.1f} samples/s "
                            f"({100 * r['fraction_of_step']:.1f} % of the step, "
                            f"cache={r.get('cache', 'none')}, {r['data_workers']} Grain workers)"),
             ('input wait', f"{100 * r['input_wait_fraction']:.1f} % of the time")]
  elif what == 'loop':
    rows += [('bare loop', f"{r['bare_steps_per_s']:,.1f} steps/s (the compiled step back to back, "
                           'batches on the device)'),
             ('train loop', f"{r['loop_steps_per_s']:,.1f} steps/s, {r['loop_over_bare']:.3f} of "
                            f"bare (train.TrainLoop fed by the input pipeline, "
                            f"{r['data_workers']} Grain workers)"),
             ('on device', f"{r['loop_on_device_steps_per_s']:,.1f} steps/s, "
                           f"{r['loop_on_device_over_bare']:.3f} of bare (train.TrainLoop fed "
                           'batches already on the device)'),
             ('loop', f"log every {r['log_every_steps']} steps, at most "
                      f"{r['max_steps_in_flight']} steps in flight")]
  elif what == 'comms':
    rows.append(('collective', "measured ring bytes/device (ops) | jaxmed's scheme"))
    for kind, c in r['collectives'].items():
      if c['count'] or r['scheme'].get(kind):
        rows.append((kind, f"{_si(c['ring_bytes'], 'B')} ({c['count']}) | "
                           f"{_si(r['scheme'].get(kind, 0), 'B')}"))
    show = lambda x: '-' if x is None else f'{x:.3f}'
    rows += [('total', f"measured {_si(r['measured_ring_bytes'], 'B')} | scheme "
                       f"{_si(r['scheme_ring_bytes'], 'B')}: ratio {show(r['ratio'])}"),
             ('lower bound', f"{_si(r['bound_ring_bytes'], 'B')} (any program of the stated "
                             f"ways): measured / bound {show(r['ratio_to_bound'])}"),
             ('memory/device', _memory(r['memory']))]
    if r.get('bound_ways'):  # Runs of layers served the same way, in the bound's assignment.
      runs = []
      for name, ways in r['bound_ways']:
        ways = '/'.join(ways)
        if runs and runs[-1][2] == ways:
          runs[-1][1] = name
        else:
          runs.append([name, name, ways])
      rows.append(('bound ways', '; '.join(f'{a}..{b}: {w}' if a != b else f'{a}: {w}'
                                           for a, b, w in runs)))
    if r['replicated_layers']:
      rows.append(('not split', ', '.join(f'layer {i} (depth {d})'
                                          for i, d in r['replicated_layers'])))
  elif what == 'meshes':
    rows.append(('mesh, crop, dtype', 'measured | scheme | bound ring bytes/device/step: '
                                      'measured/scheme, measured/bound; memory/device'))
    for row in r['rows']:
      show = lambda x: '-' if x is None else f'{x:.3f}'
      rows.append((f"{row['config']} ({row['mesh']}) {row['crop_size']}^3 {row['dtype']}",
                   f"{_si(row['measured_ring_bytes'], 'B')} | "
                   f"{_si(row['scheme_ring_bytes'], 'B')} | "
                   f"{_si(row['bound_ring_bytes'], 'B')}: {show(row['ratio'])}, "
                   f"{show(row['ratio_to_bound'])}; {_memory(row['memory'])}"))
  elif what == 'checkpoint':
    rows += [('train state', _si(r['state_bytes'], 'B')),
             ('save', f"{r['save_s']:.2f} s to disk ({r['save_gb_per_s']:.2f} GB/s); "
                      f"save() returns in {r['save_returns_s']:.2f} s"
                      f"{' (async)' if r['async_save'] else ''}"),
             ('restore', f"{r['restore_s']:.2f} s ({r['restore_gb_per_s']:.2f} GB/s)")]
  elif what == 'profile':
    rows += [('trace', r['profile_dir']), ('steps', str(r['profiled_steps'])),
             ('view', r['view'])]
  elif what == 'input':
    for row in r['rows']:
      cache = row.get('cache', 'none')
      where = '' if cache == 'none' else f' cache={cache}'
      rows.append((f"{row['mode']}{where} w={row['workers']} {row['crop_size']}^3",
                   f"{row['crops_per_s']:,.0f} crops/s"))
  elif what == 'patches':
    for row in r['rows']:
      rows.append((f"{row['mode']} w={row['workers']} {row['patch_size']}",
                   f"{row['patches_per_s']:,.1f} patches/s"))
  elif what == 'preprocess':
    rows += [('per scan/worker', f"{r['seconds_per_scan_per_worker']:.2f} s "
                                 f"({r['candidates']} candidates)")]
    rows += [(k, f'{v:.2f} s') for k, v in r.items()  # the breakdown preprocess reports
             if k.endswith('_s') and isinstance(v, (int, float)) and k != 'generate_s']
  return rows


def format_table(title: str, rows: Sequence[tuple[str, str]]) -> str:
  width = max((len(k) for k, _ in rows), default=0)
  return '\n'.join([title, '-' * len(title)] + [f'{k:<{width}}  {v}' for k, v in rows])


def summarize(root: str) -> tuple[str, list[str]]:
  """One table from every benchmark_*.json under `root`, and README-ready lines."""
  results = []
  for path in sorted(glob.glob(os.path.join(root, '**', 'benchmark_*.json'), recursive=True)):
    with open(path) as f:
      results.append((os.path.relpath(path, root), json.load(f)))
  header = ('run', 'crop', 'batch', 's2d', 'dtype', 'JAX samples/s', 'TFLOP/s', 'MFU',
            'PyTorch samples/s', 'JAX/PT', 'e2e samples/s', 'e2e/step', 'cache')
  lines, readme = [header], []
  for name, r in results:
    what = r.get('what')
    # compare nests the JAX step under 'jax', e2e under 'step'; a step result is the step itself
    # (its own 'jax' is the version string).
    step = {'compare': r.get('jax'), 'e2e': r.get('step'), 'step': r}.get(what)
    if step is None:
      continue
    torch_rate = r.get('torch_samples_per_s')
    lines.append((os.path.dirname(name) or name, f"{r['crop_size']}^3",
                  str(r['global_batch_size']), r['space_to_depth'], r['dtype'],
                  f"{step['samples_per_s']:,.0f}", f"{step['model_tflops_per_s']:.1f}",
                  f"{100 * step['mfu']:.1f}%", f'{torch_rate:,.0f}' if torch_rate else '-',
                  f"{r['jax_over_torch']:.2f}" if torch_rate else '-',
                  f"{r['e2e_samples_per_s']:,.0f}" if what == 'e2e' else '-',
                  f"{100 * r['fraction_of_step']:.0f}%" if what == 'e2e' else '-',
                  r.get('cache', 'none') if what == 'e2e' else '-'))
    if torch_rate:
      readme.append(
          f"| {r['model']}-{r['depth']} w{r['width']} | {r['crop_size']}^3 | "
          f"{r['global_batch_size']} | {r['device_kind']} | {step['samples_per_s']:,.0f} "
          f"samples/s ({step['model_tflops_per_s']:.0f} TFLOP/s, MFU "
          f"{100 * step['mfu']:.1f}%) | {torch_rate:,.0f} samples/s | "
          f"{r['jax_over_torch']:.2f} |")
  widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
  text = '\n'.join('  '.join(str(c).rjust(w) for c, w in zip(line, widths)) for line in lines)
  return text, readme
