"""False-positive reduction: each detection re-scored by the crop classifier, scores combined.

The classifier is a workdir of the crop classifier (config.task 'classify'): its checkpoint and
the config it was trained with (stored in the checkpoint). A detection's crop is cut from the
original scan exactly as preprocessing cuts the crops file (luna16.crop_cubes at the classifier's
data.spacing_mm, data.stored_crop_size and data.interpolator, centred on the detection's world
point) and scored as --mode=predict scores a candidate. The classifier must have been trained on
the crop geometry this config's data section names (the crops the baseline is scored on);
another one is refused in one line.

COMBINE_RULES (detect.combine), for detector probability p_d and classifier probability p_c:
  'classifier'  p_c             the classifier decides, the detector only proposes
  'product'     p_d * p_c       both must agree (a geometric AND)
  'mean'        (p_d + p_c) / 2
  'detector'    p_d             no re-scoring (the classifier is not consulted)
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from jaxmed import checkpointing
from jaxmed import train
from jaxmed.errors import ConfigError
from jaxmed.parallel import sharding as sharding_lib
from jaxmed.scans import luna16

COMBINE_RULES = ('classifier', 'product', 'mean', 'detector')
# The keys that fix what a crop is: the classifier must have been trained on these values.
CROP_GEOMETRY = ('spacing_mm', 'stored_crop_size', 'crop_size', 'hu_window', 'interpolator')


def check_combine(rule: str) -> None:
  if rule not in COMBINE_RULES:
    raise ConfigError(f'detect.combine is {rule!r}, not one of {COMBINE_RULES}; set '
                      '--config.detect.combine')


def combine(detector: np.ndarray, classifier: np.ndarray | None, rule: str) -> np.ndarray:
  """Combined probability (N,) of detector and classifier probabilities (module docstring)."""
  check_combine(rule)
  detector = np.asarray(detector, np.float64)
  if rule == 'detector' or classifier is None:
    return detector
  classifier = np.asarray(classifier, np.float64)
  if rule == 'classifier':
    return classifier
  if rule == 'product':
    return detector * classifier
  return (detector + classifier) / 2.0


def classifier_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The classifier's own config (from its checkpoint) on this config's mesh and batch sizes.

  Raises CheckpointError when detect.classifier_workdir holds no checkpoint, ConfigError when
  its crop geometry differs from this config's data section.
  """
  workdir = config.detect.classifier_workdir
  saved, _ = checkpointing.saved_config(workdir)
  classifier = ml_collections.ConfigDict(saved)
  if classifier.get('task', 'classify') != 'classify':
    raise ConfigError(f'detect.classifier_workdir {workdir} holds a {classifier.task!r} model, '
                      'not a crop classifier; pass the workdir of a classify run')
  differ = [f'data.{key} {_value(classifier.data[key])} there, {_value(config.data[key])} here'
            for key in CROP_GEOMETRY if _value(classifier.data[key]) != _value(config.data[key])]
  if differ:
    raise ConfigError(
        f'detect.classifier_workdir {workdir} was trained on other crops ({"; ".join(differ)}); '
        'set those --config.data keys to its values or pass a classifier trained on these crops')
  with classifier.unlocked():
    classifier.mesh = config.mesh
    classifier.train.eval_batch_size = config.train.eval_batch_size
    classifier.train.global_batch_size = config.train.global_batch_size
    classifier.checkpoint.step = -1
  return classifier


def _value(v: Any) -> Any:
  return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else v


class Classifier:
  """The restored crop classifier on `mesh`: score(image, centers_world) -> probabilities.
  Build it inside sharding.use_rules(mesh, rules)."""

  def __init__(self, config: ml_collections.ConfigDict, classifier: ml_collections.ConfigDict,
               mesh, rules):
    self.config = config
    self.workdir = config.detect.classifier_workdir
    self.classifier_config = classifier  # classifier_config(config)
    graphdef, self.state, shardings, self.step = train.restore_for_eval(
        self.classifier_config, self.workdir, mesh, rules)
    self.eval_fn = train.make_eval_step(graphdef, shardings, mesh, self.classifier_config)
    self.batch_sharding = sharding_lib.batch_sharding(mesh, rules, ndim=1)
    self.crop_sharding = sharding_lib.batch_sharding(mesh, rules, ndim=4)

  def crops(self, image, centers_world: np.ndarray) -> np.ndarray:
    """(K, S, S, S) int16 HU crops around world (x, y, z) mm points, as preprocessing cuts."""
    data = self.classifier_config.data
    crops, _, _ = luna16.crop_cubes(image, centers_world, int(data.stored_crop_size),
                                    float(data.spacing_mm), data.interpolator)
    return crops

  def score(self, image, centers_world: np.ndarray) -> np.ndarray:
    """(K,) classifier probabilities of crops around the world points."""
    from jaxmed import predict  # predict imports this module's users; import at call time.
    if not len(centers_world):
      return np.zeros(0, np.float64)
    crops = self.crops(image, centers_world)
    return predict.score_crops(self.eval_fn, self.state, crops,
                               int(self.classifier_config.train.eval_batch_size),
                               self.batch_sharding, self.crop_sharding).astype(np.float64)
