"""Collective traffic of a compiled (per-device) HLO module, read from its text.

For each collective: its kind, the bytes of its result buffer on one device, the size of its
replica groups, and the bytes that cross each device's links when the collective runs as a ring
(`ring_bytes`), so that all-reduce, all-gather and reduce-scatter compare fairly:

  all-reduce of S bytes over g devices      2 (g - 1) / g * S
  all-gather to a result of S bytes         (g - 1) / g * S
  reduce-scatter to a piece of S bytes      (g - 1) * S        (= (g - 1) / g * input bytes)
  all-to-all of S bytes                     (g - 1) / g * S
  collective-permute of S bytes             S                  (each device sends its buffer)

XLA:CPU has no reduce-scatter: a reduction whose result is sharded compiles to an all-reduce
whose every user takes a 1/g dynamic slice of it (GPU and TPU pipelines turn exactly that pattern
into a reduce-scatter). Such an all-reduce is counted as the reduce-scatter it stands for, with
`from_pattern=True`, at reduce-scatter ring bytes, and only when it is that pattern strictly:
every user reads nothing but dynamic slices of exactly 1/g of it, whose offsets are computed
from the device's own partition (or replica) id, so that the g devices' pieces differ and
together cover the result. Slices at one fixed offset keep it an all-reduce. Counts are per execution of the module (one
step); loops are not unrolled; an async pair (-start / -done) is counted once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
                'f8e4m3fn': 1, 'f8e5m2': 1}

# '%name = SHAPE opcode(operands), attributes'. SHAPE may be a tuple '(f32[2]{0}, ...)'.
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>\([^=]*?\)|\S+)\s+'
                          r'(?P<op>[a-z][\w\-]*)\(')
_OPERAND = re.compile(r'%([\w.\-]+)')
_NUM_PARTITIONS = re.compile(r'num_partitions=(\d+)')


def _shape_bytes(text: str) -> int:
  """Bytes of an HLO shape string: 'f32[64,3]{1,0}' or a tuple '(f32[2]{0}, bf16[4]{0})'."""
  total = 0
  for dtype, dims in re.findall(r'\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]', text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _group_size(attrs: str, num_devices: int) -> int:
  """Devices per replica group, from any of XLA's three spellings of replica_groups."""
  match = re.search(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]\s*\{(?P<used>[^}]*)\}", attrs)
  if match:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", match.group('axes'))}
    return math.prod(sizes.get(name, 1) for name in re.findall(r"'([^']+)'",
                                                               match.group('used')))
  match = re.search(r'replica_groups=\[([\d,]+)\]<=', attrs)
  if match:  # [2,4]<=[8]: 2 groups of 4
    return int(match.group(1).split(',')[-1])
  match = re.search(r'replica_groups=\{\{([\d,]*)\}', attrs)
  if match:  # {{0,1,2,3},{4,5,6,7}}
    return len([d for d in match.group(1).split(',') if d])
  return num_devices  # replica_groups={} (or absent): every device.


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled step, on one device."""
  kind: str  # one of COLLECTIVES
  name: str  # the HLO instruction
  result_bytes: int  # its result buffer (for an all-reduce counted as reduce-scatter: the full)
  group_size: int  # devices per replica group
  ring_bytes: float  # bytes through each device's links, ring algorithms (module docstring)
  from_pattern: bool = False  # an all-reduce + 1/g dynamic slices, counted as reduce-scatter
  op_name: str = ''  # the jax operation it came from (HLO metadata)


@dataclasses.dataclass
class _Instruction:
  name: str
  shape: str
  op: str
  operands: list[str]
  attrs: str
  attrs_operand: str = ''  # the raw operand text, e.g. '3' for parameter(3)


def _instructions(hlo_text: str) -> list[_Instruction]:
  out = []
  for line in hlo_text.splitlines():
    line = re.sub(r'/\*.*?\*/', '', line)  # Tuple shapes carry /*index=5*/ comments.
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    depth, end = 1, match.end()
    while end < len(line) and depth:  # The operand list ends at the matching parenthesis.
      depth += {'(': 1, ')': -1}.get(line[end], 0)
      end += 1
    raw = line[match.end():end - 1]
    out.append(_Instruction(match.group('name'), match.group('shape'), match.group('op'),
                            _OPERAND.findall(raw), line[end:], raw))
  return out


def _computations(hlo_text: str) -> dict[str, str]:
  """{computation name: its body text}: to look inside the fusions an all-reduce feeds."""
  bodies, name, lines = {}, None, []
  for line in hlo_text.splitlines():
    header = re.match(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if header and '=' not in line.split('{')[0]:
      name, lines = header.group(1), []
    elif line.strip() == '}' and name is not None:
      bodies[name] = '\n'.join(lines)
      name = None
    elif name is not None:
      lines.append(line)
  return bodies


def _from_device_id(names: list[str], defs: dict[str, _Instruction],
                    outer: tuple[_Instruction, dict[str, _Instruction]] | None = None) -> bool:
  """Whether any of the values `names` (in `defs`) is computed from partition-id or
  replica-id. Inside a fusion body, `outer` = (the fusion, the module's instructions): a
  parameter of the body is followed to the fusion's operand."""
  seen, todo = set(), list(names)
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    instruction = defs.get(name)
    if instruction is None:
      continue
    if instruction.op in ('partition-id', 'replica-id'):
      return True
    if instruction.op == 'parameter' and outer is not None:
      fusion, module = outer
      index = int(instruction.attrs_operand.strip() or -1)
      if 0 <= index < len(fusion.operands) and _from_device_id([fusion.operands[index]],
                                                                module):
        return True
      continue
    todo.extend(instruction.operands)
  return False


def _is_piece(shape: str, piece: float) -> bool:
  return abs(_shape_bytes(shape) - piece) <= piece * 1e-4


def _sliced_in_fusion(user: _Instruction, operand: str, piece: float,
                      bodies: dict[str, str], module: dict[str, _Instruction]) -> bool:
  """Whether fusion `user` reads its operand `operand` only through dynamic slices of `piece`
  bytes at offsets computed from the device's id."""
  called = re.search(r'calls=%?([\w.\-]+)', user.attrs)
  body = bodies.get(called.group(1), '') if called else ''
  positions = [i for i, name in enumerate(user.operands) if name == operand]
  inner = _instructions(body)
  defs = {i.name: i for i in inner}
  for position in positions:
    parameter = next((i.name for i in inner if i.op == 'parameter'
                      and re.match(rf'\s*{position}\s*$', i.attrs_operand or '')), None)
    if parameter is None:
      return False
    readers = [i for i in inner if parameter in i.operands]
    if not readers or any(i.op != 'dynamic-slice' or i.operands[0] != parameter
                          or not _is_piece(i.shape, piece)
                          or not _from_device_id(i.operands[1:], defs, (user, module))
                          for i in readers):
      return False
  return bool(positions)


def _slices_only(size: int, users: list[tuple[_Instruction, str]], group: int,
                 bodies: dict[str, str], module: dict[str, _Instruction]) -> bool:
  """Whether every (user, operand name) reads only this device's 1/group dynamic slice of a
  `size`-byte result: a dynamic-slice, or a fusion whose parameter feeds only such slices
  (module docstring)."""
  if group < 2 or not users:
    return False
  piece = size / group
  for user, operand in users:
    if user.op == 'dynamic-slice':
      if (user.operands[0] != operand or not _is_piece(user.shape, piece)
          or not _from_device_id(user.operands[1:], module)):
        return False
    elif user.op != 'fusion' or not _sliced_in_fusion(user, operand, piece, bodies, module):
      return False
  return True


def _tuple_elements(shape: str) -> list[str]:
  """The element shapes of a tuple shape '(f32[2]{0}, bf16[4]{0})'; [shape] for an array."""
  if not shape.startswith('('):
    return [shape]
  return re.findall(r'[a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?\[[0-9,]*\](?:\{[^}]*\})?', shape)


def _element_users(instruction: _Instruction, users: dict[str, list[_Instruction]],
                   index: int, num_elements: int) -> list[tuple[_Instruction, str]]:
  """(user, the name it reads) of element `index` of a (possibly tuple) instruction's result."""
  direct = users.get(instruction.name, [])
  if num_elements == 1:
    return [(user, instruction.name) for user in direct]
  found = []
  for user in direct:
    if user.op != 'get-tuple-element':
      return []  # A user of the whole tuple: no element is used as a slice only.
    if re.search(r'index=(\d+)', user.attrs).group(1) == str(index):
      found.extend((reader, user.name) for reader in users.get(user.name, []))
  return found


def parse_collectives(hlo_text: str) -> list[Collective]:
  """Every collective of a compiled (per-device) HLO module, in program order.

  A collective over a tuple (XLA combines many small all-reduces into one) is listed once per
  element, named 'name[i]'.
  """
  match = _NUM_PARTITIONS.search(hlo_text)
  num_devices = int(match.group(1)) if match else 1
  instructions = _instructions(hlo_text)
  users: dict[str, list[_Instruction]] = {}
  for instruction in instructions:
    for operand in instruction.operands:
      users.setdefault(operand, []).append(instruction)
  bodies = _computations(hlo_text)
  starts = module = {i.name: i for i in instructions}
  found = []
  for instruction in instructions:
    op, attrs, shape = instruction.op, instruction.attrs, instruction.shape
    if op.endswith('-start'):
      continue
    if op.endswith('-done'):  # Result shape here; replica groups on the matching -start.
      op = op[:-len('-done')]
      start = starts.get(instruction.operands[0]) if instruction.operands else None
      attrs = start.attrs if start is not None else attrs
    if op not in COLLECTIVES:
      continue
    group = 2 if op == 'collective-permute' else _group_size(attrs, num_devices)
    op_name = (re.search(r'op_name="([^"]*)"', attrs) or [None, ''])[1]
    elements = _tuple_elements(shape) if op == 'all-reduce' else [shape]
    for index, element in enumerate(elements):
      size = _shape_bytes(element)
      name = instruction.name if len(elements) == 1 else f'{instruction.name}[{index}]'
      kind, from_pattern = op, False
      if op == 'all-reduce' and _slices_only(
          size, _element_users(instruction, users, index, len(elements)), group, bodies,
          module):
        kind, from_pattern = 'reduce-scatter', True
        ring = (group - 1) / group * size
      elif op == 'all-reduce':
        ring = 2 * (group - 1) / group * size
      elif op == 'reduce-scatter':
        ring = (group - 1) * size
      elif op == 'collective-permute':
        ring = float(size)
      else:  # all-gather, all-to-all
        ring = (group - 1) / group * size
      found.append(Collective(kind, name, size, group, ring, from_pattern, op_name))
  return found


def summarize(collectives: Iterable[Collective]) -> dict[str, dict[str, float]]:
  """{kind: {'count', 'bytes' (result bytes), 'ring_bytes'}} over COLLECTIVES."""
  out = {kind: {'count': 0, 'bytes': 0, 'ring_bytes': 0.0} for kind in COLLECTIVES}
  for c in collectives:
    out[c.kind]['count'] += 1
    out[c.kind]['bytes'] += c.result_bytes
    out[c.kind]['ring_bytes'] += c.ring_bytes
  return out


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes'}}: ops and result bytes per device of each kind, as XLA wrote them.

  Unlike summarize(parse_collectives(...)), an all-reduce stays an all-reduce here even when
  only slices of it are used.
  """
  out = {kind: {'count': 0, 'bytes': 0} for kind in COLLECTIVES}
  seen = set()
  for c in parse_collectives(hlo_text):
    kind = 'all-reduce' if c.from_pattern else c.kind
    op = c.name.split('[')[0]  # The elements of a tuple collective are one op.
    out[kind]['count'] += (op, kind) not in seen
    seen.add((op, kind))
    out[kind]['bytes'] += c.result_bytes
  return out
