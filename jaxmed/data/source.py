"""The HDF5 crops source: a picklable Grain random-access source over a schema-v1 crops file,
opened lazily by the process that reads, and the row lists (subsets, labels) read from its columns.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import h5py
import numpy as np

from jaxmed.data import crops_file


class LazyFile:
  """An HDF5 file opened lazily by the process that reads: `_handle` = (pid, h5py.File, ...),
  reopened after a fork, dropped when pickled (h5py handles cannot cross processes)."""

  _handle = None

  def __getstate__(self):
    state = self.__dict__.copy()
    state['_handle'] = None
    return state

  def close(self) -> None:
    if self._handle is not None and self._handle[0] == os.getpid():
      self._handle[1].close()
    self._handle = None


class CropsSource(LazyFile):
  """Grain random-access source over a schema-v1 crops file.

  Item `row` is {'crops': int16 (S, S, S) HU, 'label': int32 (), 'index': int64 () = row}.
  Picklable: the HDF5 file is opened lazily by the process that reads (again after a fork),
  because h5py handles cannot cross process boundaries.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._length = crops_file.check_crops_file(self.path)
    with h5py.File(self.path, 'r') as f:
      self.crop_shape = tuple(int(s) for s in f['crops'].shape[1:])
    self._handle = None  # (pid, h5py.File, crops, labels int32 (N,), direct), per process.

  def _open(self):
    if self._handle is None or self._handle[0] != os.getpid():
      f = h5py.File(self.path, 'r')
      crops = f['crops']
      # One unfiltered chunk per crop: read its bytes straight into the output (no selection).
      direct = (crops.chunks == (1,) + self.crop_shape
                and crops.id.get_create_plist().get_nfilters() == 0)
      self._handle = (os.getpid(), f, crops, f['label'][:].astype(np.int32), direct)
    return self._handle

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    row = int(row)
    if not 0 <= row < self._length:
      raise IndexError(f'row {row} outside crops file {self.path} of {self._length} crops')
    crop = self.read_crops(np.array([row]))[0]
    return {'crops': crop, 'label': self.labels(row), 'index': np.int64(row)}

  def read(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """`rows` in order: {'crops': int16 (n, S, S, S), 'label': int32 (n,), 'index': int64 (n,)}."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    return {'crops': self.read_crops(rows), 'label': self.labels(rows), 'index': rows}

  def labels(self, rows: np.ndarray) -> np.ndarray:
    """int32 labels of `rows` (1 = nodule)."""
    return self._open()[3][np.asarray(rows, np.int64)]

  def read_crops(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """int16 (n, S, S, S) crops of `rows` in the given order, written into `out` if given.

    Runs of consecutive rows are read with one HDF5 call (evaluation reads in file order).
    """
    rows = np.asarray(rows, np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= self._length):
      raise IndexError(f'rows outside crops file {self.path} of {self._length} crops')
    _, _, crops, _, direct = self._open()
    if out is None:
      out = np.empty((rows.size,) + self.crop_shape, np.int16)
    elif (out.shape != (rows.size,) + self.crop_shape or out.dtype != np.int16
          or not out.flags.c_contiguous):
      raise ValueError(f'out must be a C-contiguous int16 array of shape '
                       f'{(rows.size,) + self.crop_shape}, got {out.dtype} {out.shape}')
    run_starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)
    run_stops = np.append(run_starts[1:], rows.size)
    for start, stop in zip(run_starts.tolist(), run_stops.tolist()):
      first = int(rows[start])
      if direct and stop - start == 1:
        crops.id.read_direct_chunk((first, 0, 0, 0), out=out[start].reshape(-1).view(np.uint8))
      else:
        file_space = crops.id.get_space()
        file_space.select_hyperslab((first, 0, 0, 0), (stop - start,) + self.crop_shape)
        memory_space = h5py.h5s.create_simple((stop - start,) + self.crop_shape)
        crops.id.read(memory_space, file_space, out[start:stop])
    return out

  def __repr__(self) -> str:
    return f'CropsSource(path={self.path!r}, crops={self._length}, crop_shape={self.crop_shape})'


# ---- splits ----------------------------------------------------------------------------------


def _read_columns(path: str | os.PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
  crops_file.check_crops_file(path)
  with h5py.File(path, 'r') as f:
    return {name: f[name][:] for name in names}


def split_rows(path: str | os.PathLike, subsets: Iterable[int], *,
               skip_excluded: bool) -> np.ndarray:
  """File rows (int64, increasing) of the LUNA `subsets`, without exclude=True rows if asked.

  Training and validation skip excluded negatives (too close to a nodule to call negative);
  LUNA16 scoring (--mode=eval) keeps every candidate, since FROC decides hits by distance.
  """
  columns = _read_columns(path, ('subset', 'exclude'))
  keep = np.isin(columns['subset'], np.asarray(tuple(subsets), np.int64))
  if skip_excluded:
    keep &= ~columns['exclude']
  return np.flatnonzero(keep).astype(np.int64)


def split_by_label(path: str | os.PathLike, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(positive_rows, negative_rows) of `rows` (int64, order kept), by the file's label."""
  rows = np.asarray(rows, np.int64)
  positive = _read_columns(path, ('label',))['label'][rows] > 0
  return rows[positive], rows[~positive]
