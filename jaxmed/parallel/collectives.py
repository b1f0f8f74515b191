"""Collective traffic of a compiled (per-device) HLO module, read from its text.

For each collective kind (all-reduce, all-gather, reduce-scatter, collective-permute,
all-to-all): how many ops and the bytes of their result buffers on one device, per execution of
the module (one step; loops are not unrolled). An async pair (-start / -done) is counted once.
"""

from __future__ import annotations

import math
import re

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
                'f8e4m3fn': 1, 'f8e5m2': 1}


def _shape_bytes(text: str) -> int:
  """Bytes of an HLO shape string: 'f32[64,3]{1,0}' or a tuple '(f32[2]{0}, bf16[4]{0})'."""
  total = 0
  for dtype, dims in re.findall(r'\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]', text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes'}} of the collectives in a compiled (per-device) HLO module.

  Bytes are each collective's result buffer on one device (for all-gather the gathered
  result, for reduce-scatter the scattered piece). Async pairs are counted once, at their
  '-done' (whose result is the collective's result); collectives wrapped in async computations
  are counted where they appear. Per execution of the module (a step), loops not unrolled.
  """
  pattern = re.compile(r'=\s+(?P<shape>.+?)\s+(?P<op>' + '|'.join(COLLECTIVES) +
                       r')(?P<suffix>-start|-done)?\(')
  out = {kind: {'count': 0, 'bytes': 0} for kind in COLLECTIVES}
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if not match or match.group('suffix') == '-start':
      continue
    out[match.group('op')]['count'] += 1
    out[match.group('op')]['bytes'] += _shape_bytes(match.group('shape'))
  return out
