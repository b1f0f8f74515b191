"""LUNA16 submission file: seriesuid,coordX,coordY,coordZ,probability, written atomically."""

from __future__ import annotations

import csv
import os

from jaxmed import files
from jaxmed.evaluation.froc import Predictions

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

