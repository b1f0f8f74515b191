"""Detection metrics on hand-built detections with known truth: sensitivities at 1/2/4/8 FPs per
scan and CPM through the official FROC arithmetic, and candidate recall."""

import numpy as np
import pytest

from jaxmed.detection import validation
from jaxmed.evaluation import froc

NODULES = {'A': [[0, 0, 0, 10], [50, 0, 0, 6]], 'B': [[0, 0, 0, 8]], 'C': []}
FP = [100.0, 100.0, 100.0]
# By probability: hit, FP, FP, FP, FP, hit, FP, FP, FP, hit -> hits at 0, 4/3 and 7/3 FPs/scan.
DETECTIONS = {
    'A': ([[1, 0, 0], FP, FP, [51, 0, 0]], [0.9, 0.8, 0.55, 0.3]),
    'B': ([FP, [0, 3, 0], FP], [0.7, 0.5, 0.34]),
    'C': ([FP, FP, FP], [0.6, 0.4, 0.35]),
}


def test_sensitivities_and_cpm_of_known_detections():
  metrics = validation.sensitivities(DETECTIONS, NODULES, ['A', 'B', 'C'])
  assert metrics['sens_at_1fp'] == pytest.approx(1 / 3)
  assert metrics['sens_at_2fp'] == pytest.approx(2 / 3)
  assert metrics['sens_at_4fp'] == pytest.approx(1.0)
  assert metrics['sens_at_8fp'] == pytest.approx(1.0)
  assert metrics['cpm'] == pytest.approx(4 / 7)
  # The same numbers as the project's FROC at the four rates it shares with the CPM.
  result = validation.froc_result(DETECTIONS, NODULES, ['A', 'B', 'C'])
  for rate in (1, 2, 4, 8):
    assert metrics[f'sens_at_{rate}fp'] == result.sensitivities[list(froc.FP_RATES).index(rate)]


def test_a_scan_without_detections_still_counts():
  # Scan D has no detection: 4 scans make every FP rate per scan smaller, the CPM higher.
  four = validation.sensitivities(DETECTIONS, NODULES, ['A', 'B', 'C', 'D'])
  three = validation.sensitivities(DETECTIONS, NODULES, ['A', 'B', 'C'])
  assert four['sens_at_1fp'] == pytest.approx(2 / 3) and four['cpm'] > three['cpm']


def test_candidate_recall_counts_the_top_detections_of_each_scan():
  recall = validation.candidate_recall(DETECTIONS, NODULES, counts=(1, 2, 4))
  assert recall == {'recall_at_1': pytest.approx(1 / 3), 'recall_at_2': pytest.approx(2 / 3),
                    'recall_at_4': pytest.approx(1.0)}
  # A hit needs the centre strictly inside the radius: 3 mm from a 6 mm nodule is a miss.
  moved = {**DETECTIONS, 'A': ([[1, 0, 0], FP, FP, [53, 0, 0]], [0.9, 0.8, 0.55, 0.3])}
  assert validation.candidate_recall(moved, NODULES, counts=(4,))['recall_at_4'] == \
      pytest.approx(2 / 3)
