"""LUNA16 evaluation files: scored candidates (a submission) and findings, read and written.

`Predictions` and `Annotations` are the validated in-memory tables the FROC metric takes;
read_predictions / read_annotations / read_seriesuids read the LUNA16 CSVs, and
write_predictions_csv writes a submission atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

from jaxmed import files
from jaxmed.scans import luna16
from jaxmed.errors import UserError


class EvaluationInputError(UserError, ValueError):
  """Evaluation input (CSV, arrays) that is missing or malformed; the message says the fix."""


def as_uids(values, what: str) -> np.ndarray:
  """(N,) str array from str, bytes (HDF5) or object arrays."""
  arr = np.asarray(values)
  if arr.ndim != 1:
    raise EvaluationInputError(f'{what}: seriesuid must be 1-D, got shape {arr.shape}')
  if arr.dtype.kind == 'S':
    return np.char.decode(arr, 'utf-8')
  if arr.dtype.kind == 'O':
    return np.array([v.decode('utf-8') if isinstance(v, bytes) else str(v) for v in arr],
                    dtype=str)
  return arr.astype(str)


def _as_centers(values, n: int, what: str) -> np.ndarray:
  arr = np.asarray(values, dtype=np.float64)
  if arr.shape != (n, 3):
    raise EvaluationInputError(f'{what}: center_world must have shape ({n}, 3) (x, y, z mm), '
                               f'got {arr.shape}')
  return arr


def _as_vector(values, n: int, what: str, name: str) -> np.ndarray:
  arr = np.asarray(values, dtype=np.float64)
  if arr.shape != (n,):
    raise EvaluationInputError(f'{what}: {name} must have shape ({n},), got {arr.shape}')
  return arr


@dataclasses.dataclass(frozen=True)
class Predictions:
  """Scored candidates (CAD marks), the rows of a LUNA16 submission.

  seriesuid: (N,) str (bytes are decoded); center_world: (N, 3) float64 world mm (x, y, z);
  probability: (N,) float64, higher = more likely a nodule.
  """
  seriesuid: np.ndarray
  center_world: np.ndarray
  probability: np.ndarray

  def __post_init__(self):
    uids = as_uids(self.seriesuid, 'predictions')
    object.__setattr__(self, 'seriesuid', uids)
    object.__setattr__(self, 'center_world',
                       _as_centers(self.center_world, len(uids), 'predictions'))
    prob = _as_vector(self.probability, len(uids), 'predictions', 'probability')
    if np.isnan(prob).any():
      raise EvaluationInputError(
          f'predictions: {int(np.isnan(prob).sum())} probabilities are NaN; '
          'score every candidate with a finite number')
    object.__setattr__(self, 'probability', prob)

  def __len__(self) -> int:
    return len(self.seriesuid)


@dataclasses.dataclass(frozen=True)
class Annotations:
  """Findings: nodules (annotations.csv) or excluded findings (annotations_excluded.csv).

  seriesuid: (M,) str; center_world: (M, 3) float64 world mm (x, y, z); diameter_mm: (M,)
  float64 (negative = unknown, counted as 10 mm).
  """
  seriesuid: np.ndarray
  center_world: np.ndarray
  diameter_mm: np.ndarray

  def __post_init__(self):
    uids = as_uids(self.seriesuid, 'annotations')
    object.__setattr__(self, 'seriesuid', uids)
    object.__setattr__(self, 'center_world',
                       _as_centers(self.center_world, len(uids), 'annotations'))
    object.__setattr__(self, 'diameter_mm',
                       _as_vector(self.diameter_mm, len(uids), 'annotations', 'diameter_mm'))

  def __len__(self) -> int:
    return len(self.seriesuid)

  @classmethod
  def empty(cls) -> Annotations:
    return cls(np.zeros(0, str), np.zeros((0, 3)), np.zeros(0))



# ---- LUNA16 CSV files ---------------------------------------------------------------------

_ANNOTATION_COLUMNS = ('seriesuid', 'coordX', 'coordY', 'coordZ', 'diameter_mm')
_PREDICTION_COLUMNS = ('seriesuid', 'coordX', 'coordY', 'coordZ', 'probability')


def _read_columns(path, columns: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(seriesuids (rows,) str, (rows, len(columns) - 1) float64) from a CSV with a header row.

  Missing file or column, or a non-number, raise luna16.DataError (one line naming the file).
  """
  table = luna16.read_csv(path, columns)
  numbers = np.stack([table[c] for c in columns[1:]], axis=1).reshape(-1, len(columns) - 1)
  return table['seriesuid'].astype(str), numbers


def read_annotations(path) -> Annotations:
  """Findings from a LUNA16 annotations.csv / annotations_excluded.csv.

  Columns seriesuid,coordX,coordY,coordZ,diameter_mm (world mm); others are ignored.
  """
  uids, numbers = _read_columns(path, _ANNOTATION_COLUMNS)
  return Annotations(uids, numbers[:, :3], numbers[:, 3])


def read_predictions(path) -> Predictions:
  """Scored candidates from a LUNA16 submission CSV: seriesuid,coordX,coordY,coordZ,probability."""
  uids, numbers = _read_columns(path, _PREDICTION_COLUMNS)
  return Predictions(uids, numbers[:, :3], numbers[:, 3])


def read_seriesuids(path) -> np.ndarray:
  """(S,) str: the scans to evaluate, one seriesuid per line (LUNA16 seriesuids.csv).

  The first column of each line is used; a first line reading 'seriesuid' is a header.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise EvaluationInputError(f'seriesuids file {path} not found: pass a CSV with one '
                               'seriesuid per line')
  with open(path, newline='', encoding='utf-8-sig') as f:
    uids = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
  if uids and uids[0] == 'seriesuid':
    uids = uids[1:]
  return np.asarray(uids, dtype=str)


# ---- submission ------------------------------------------------------------------------------

HEADER = ('seriesuid', 'coordX', 'coordY', 'coordZ', 'probability')


def write_predictions_csv(path, seriesuid, center_world, probability) -> str:
  """Writes one row per candidate to `path` (LUNA16 submission format); returns the path.

  seriesuid: (N,) str or bytes; center_world: (N, 3) world mm (x, y, z); probability: (N,).
  Floats are written as the shortest text that reads back to the same float64. The file
  appears complete or not at all: rows go to a temporary file next to it, then a rename.
  """
  # Predictions validates shapes, decodes bytes uids and rejects NaN probabilities.
  rows = Predictions(seriesuid, center_world, probability)
  with files.atomic_write(path, 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(HEADER)
    # repr of a Python float is the shortest round-trip form.
    xyz = rows.center_world.tolist()
    prob = rows.probability.tolist()
    writer.writerows(
        (uid, repr(x), repr(y), repr(z), repr(p))
        for uid, (x, y, z), p in zip(rows.seriesuid.tolist(), xyz, prob))
  return os.fspath(path)

