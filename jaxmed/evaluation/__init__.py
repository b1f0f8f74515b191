"""LUNA16 evaluation: FROC / CPM with bootstrap CI, candidate ROC, submission CSV, figures.

Pure numpy (figures: matplotlib, imported with `from jaxmed.evaluation import plots`).
"""

from jaxmed.evaluation.froc import (ARITHMETICS, FP_RATES, OFFICIAL_MAX_CANDIDATES_PER_SCAN,
                                    FROCResult, compute_froc)
from jaxmed.evaluation.froc_bootstrap import FROCBand, FROCConfidence, bootstrap_froc
from jaxmed.evaluation.roc import accuracy, roc_auc, roc_curve
from jaxmed.evaluation.submission import (Annotations, EvaluationInputError, Predictions,
                                          read_annotations, read_predictions, read_seriesuids,
                                          write_predictions_csv)

__all__ = [
    'ARITHMETICS', 'FP_RATES', 'OFFICIAL_MAX_CANDIDATES_PER_SCAN', 'Annotations',
    'EvaluationInputError',
    'FROCBand', 'FROCConfidence', 'FROCResult', 'Predictions', 'bootstrap_froc', 'compute_froc',
    'read_annotations', 'read_predictions', 'read_seriesuids', 'accuracy', 'roc_auc',
    'roc_curve', 'write_predictions_csv',
]
