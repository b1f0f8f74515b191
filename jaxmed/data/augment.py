"""On-device augmentation and normalisation of int16 HU crops and detection patches, in JAX (runs
inside the jitted step; patches: augment_patches and patches_to_unit at the end).

The host ships the stored crops as int16 (B, S, S, S) HU, axes (z, y, x). Everything here turns
them into the model's float32 input (B, c, c, c, 1) in [0, 1]:
  training:   random window of edge c inside the stored margin (translation), random flips of the
              three axes, one of the 24 rotations of the cube, intensity scale/shift/noise in HU,
              then the HU window mapped onto [0, 1] (clipped);
  evaluation: the centre window, then the HU window.
Translation, flips and rotation are one exact integer gather per example (a signed permutation of
the axes plus an offset): no interpolation, every output voxel is a stored voxel.

Each example's randomness comes from fold_in(fold_in(fold_in(PRNGKey(seed), AUGMENT_STREAM),
step), index), with `index` its global position step * B + i in the data stream, so the
augmentation of an example does not depend on the mesh, the batch composition or the order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.errors import ConfigError

# Folded into PRNGKey(seed) first so augmentation keys never coincide with other uses of the seed.
AUGMENT_STREAM = 0x417567  # 'Aug'


def _cube_rotations() -> tuple[np.ndarray, np.ndarray]:
  """The 24 rotations of the cube as (perm (24, 3), signs (24, 3)): det +1 signed permutations.

  Output axis a reads input axis perm[a], reversed where signs[a] == -1. Rotation 0 is identity.
  """
  perms, signs = [], []
  for perm in itertools.permutations(range(3)):
    parity = np.linalg.det(np.eye(3)[list(perm)])
    for sign in itertools.product((1, -1), repeat=3):
      if round(parity * np.prod(sign)) == 1:
        perms.append(perm)
        signs.append(sign)
  return np.array(perms, np.int32), np.array(signs, np.int32)


ROTATION_PERMS, ROTATION_SIGNS = _cube_rotations()
NUM_ROTATIONS = len(ROTATION_PERMS)  # 24

# Columns of each example's random bits: offset z, y, x; rotation; flip bits; scale; shift.
_OFFSET, _ROTATION, _FLIPS, _SCALE, _SHIFT, _NUM_DRAWS = 0, 3, 4, 5, 6, 8
_NOISE = 1  # Folded into the example's key for its noise field.


def _transform_one(crop: jax.Array, offset: jax.Array, perm: jax.Array, signs: jax.Array,
                   crop_size: int) -> jax.Array:
  """out[o] = crop[offset + signed_perm(o)] for one (S, S, S) crop -> (c, c, c), by one gather.

  Output axis a walks input axis perm[a] (reversed where signs[a] < 0) inside the window
  crop[offset[0]:+c, offset[1]:+c, offset[2]:+c].
  """
  size = crop.shape[0]
  c = crop_size
  input_strides = jnp.array([size * size, size, 1], jnp.int32)
  stride = input_strides[perm] * signs  # Flat-index step per output axis.
  start = offset[perm] + jnp.where(signs < 0, c - 1, 0)  # Input coordinate at output o[a] = 0.
  base = jnp.sum(start * input_strides[perm])
  ramp = jnp.arange(c, dtype=jnp.int32)
  flat_index = (base + ramp[:, None, None] * stride[0] + ramp[None, :, None] * stride[1]
                + ramp[None, None, :] * stride[2])
  # Indices are in bounds by construction (offset <= S - c) and distinct (a permutation).
  return crop.reshape(-1).at[flat_index].get(mode='promise_in_bounds', unique_indices=True)


def transform_crops(crops: jax.Array, offsets: jax.Array, rotations: jax.Array, flips: jax.Array,
                    crop_size: int) -> jax.Array:
  """Window, rotate and flip each crop exactly (no interpolation); keeps the dtype.

  Args:
    crops: (B, S, S, S) stored crops, axes (z, y, x).
    offsets: (B, 3) int voxel offsets of the window's corner, each in [0, S - crop_size].
    rotations: (B,) int in [0, 24): index into ROTATION_PERMS / ROTATION_SIGNS (0 = identity).
    flips: (B, 3) bool: reverse output axis z, y, x (applied after the rotation).
    crop_size: c, the window edge.
  Returns:
    (B, c, c, c) crops[b][window] rotated, then flipped.
  """
  if crops.ndim != 4 or not crops.shape[1] == crops.shape[2] == crops.shape[3]:
    raise ValueError(f'crops must be (B, S, S, S) cubes, got shape {crops.shape}')
  if not 0 < crop_size <= crops.shape[1]:
    raise ConfigError(f'crop_size {crop_size} must be in [1, stored size {crops.shape[1]}]')
  perms = jnp.asarray(ROTATION_PERMS)[rotations]
  signs = jnp.asarray(ROTATION_SIGNS)[rotations] * jnp.where(flips, -1, 1).astype(jnp.int32)
  offsets = jnp.asarray(offsets, jnp.int32)
  return jax.vmap(_transform_one, in_axes=(0, 0, 0, 0, None))(
      crops, offsets, perms, signs, crop_size)


def hu_to_unit(hu: jax.Array, hu_window: Sequence[float]) -> jax.Array:
  """HU -> float32 in [0, 1]: hu_window (low, high) mapped linearly, clipped outside."""
  low, high = (float(v) for v in hu_window)
  if not high > low:
    raise ConfigError(f'hu_window {tuple(hu_window)} must be (low, high) with high > low')
  return jnp.clip((hu.astype(jnp.float32) - low) / (high - low), 0.0, 1.0)


def center_crop_window(crops: jax.Array, crop_size: int,
                       hu_window: Sequence[float]) -> jax.Array:
  """Evaluation input: the centre (c, c, c) of each crop, HU window -> (B, c, c, c, 1) float32.

  The window starts at (S - c) // 2 on every axis (for odd S - c, half a voxel towards 0).
  """
  start = (crops.shape[1] - crop_size) // 2
  if start < 0:
    raise ConfigError(f'crop_size {crop_size} exceeds the stored crop size {crops.shape[1]}')
  window = crops[:, start:start + crop_size, start:start + crop_size, start:start + crop_size]
  return hu_to_unit(window, hu_window)[..., None]


def example_keys(seed, step, index: jax.Array) -> jax.Array:
  """(B,) PRNG keys: fold_in(fold_in(fold_in(PRNGKey(seed), AUGMENT_STREAM), step), index[b])."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), AUGMENT_STREAM), step)
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(index))


def augment_crops(crops: jax.Array, index: jax.Array, seed, step, aug_config, crop_size: int,
                  hu_window: Sequence[float]) -> jax.Array:
  """Training input: random window, flips, cube rotation and intensity change, HU window.

  Args:
    crops: (B, S, S, S) int16 HU, axes (z, y, x).
    index: (B,) int global example positions (step * B + i); they seed each example's key.
    seed, step: ints or scalar arrays (step is usually traced inside the jitted step).
    aug_config: config.data.augment (translate, flip, rotate: bool; intensity_scale,
      intensity_shift_hu, noise_std_hu: float); read at trace time.
    crop_size: c <= S. Without translation the window is the centre one.
    hu_window: (low, high) HU mapped onto [0, 1].
  Returns:
    (B, c, c, c, 1) float32 in [0, 1].
  """
  batch, size = crops.shape[0], crops.shape[1]
  margin = size - crop_size
  if margin < 0:
    raise ConfigError(f'crop_size {crop_size} exceeds the stored crop size {size}')
  keys = example_keys(seed, step, index)
  # One draw of random bits per example feeds every choice (one hash instead of one per choice:
  # much less to compile); the modulo bias is below 1e-8.
  bits = jax.vmap(lambda k: jax.random.bits(k, (_NUM_DRAWS,), jnp.uint32))(keys)  # (B, 8)

  if aug_config.translate:
    offsets = (bits[:, _OFFSET:_OFFSET + 3] % (margin + 1)).astype(jnp.int32)
  else:
    offsets = jnp.full((batch, 3), margin // 2, jnp.int32)
  if aug_config.rotate:
    rotations = (bits[:, _ROTATION] % NUM_ROTATIONS).astype(jnp.int32)
  else:
    rotations = jnp.zeros((batch,), jnp.int32)
  if aug_config.flip:
    flips = (bits[:, _FLIPS, None] >> jnp.arange(3, dtype=jnp.uint32)) & 1 == 1
  else:
    flips = jnp.zeros((batch, 3), bool)
  hu = transform_crops(crops, offsets, rotations, flips, crop_size).astype(jnp.float32)

  def uniform(column, bound):  # (B, 1, 1, 1) values in [-bound, bound), from 24 random bits.
    unit = (bits[:, column] >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
    return ((2.0 * unit - 1.0) * bound)[:, None, None, None]

  if aug_config.intensity_scale:
    hu = hu * (1.0 + uniform(_SCALE, float(aug_config.intensity_scale)))
  if aug_config.intensity_shift_hu:
    hu = hu + uniform(_SHIFT, float(aug_config.intensity_shift_hu))
  if aug_config.noise_std_hu:
    noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, _NOISE))(keys)
    noise = jax.vmap(lambda k: jax.random.normal(k, hu.shape[1:], jnp.float32))(noise_keys)
    hu = hu + float(aug_config.noise_std_hu) * noise
  return hu_to_unit(hu, hu_window)[..., None]


# ---- detection patches ------------------------------------------------------------------------

# Columns of each patch's random bits: transpose (y, x); flip bits; scale; shift.
_PATCH_TRANSPOSE, _PATCH_FLIPS, _PATCH_SCALE, _PATCH_SHIFT, _PATCH_DRAWS = 0, 1, 2, 3, 4


def patches_to_unit(patches: jax.Array, hu_window: Sequence[float]) -> jax.Array:
  """Evaluation input: int16 HU (B, D, H, W) -> float32 (B, D, H, W, 1) in [0, 1]."""
  return hu_to_unit(patches, hu_window)[..., None]


def _where_each(flag: jax.Array, changed: jax.Array, unchanged: jax.Array) -> jax.Array:
  """Per example b: changed[b] where flag[b], else unchanged[b]."""
  return jnp.where(flag.reshape((-1,) + (1,) * (changed.ndim - 1)), changed, unchanged)


def augment_patches(patches: jax.Array, centers: jax.Array, valid: jax.Array, index: jax.Array,
                    seed, step, aug_config,
                    hu_window: Sequence[float]) -> tuple[jax.Array, jax.Array]:
  """Training input for detection: random flips of z, y and x, rotations by 90 degrees in the
  axial (y, x) plane, intensity scale/shift/noise, HU window; the centres move with the voxels.

  The 90-degree rotations are the transpose of y and x combined with the flips (all 8 symmetries
  of the axial square, when H == W and aug_config.rotate); with the z flip that is 16 exact
  voxel permutations. Depth is never exchanged with another axis: it is the axis the mesh may
  split, and every transform here keeps each device's depth slab (the z flip only reverses the
  order of the slabs).

  Args:
    patches: int16 (B, D, H, W) HU, axes (z, y, x).
    centers: float (B, K, 3) nodule centres, patch voxel (z, y, x).
    valid: (B, K) 1 for a nodule, 0 for an empty slot (its centre moves too; it stays masked).
    index: (B,) int global example positions (step * B + i); they seed each example's key.
    seed, step: ints or scalar arrays (step is usually traced inside the jitted step).
    aug_config: config.data.augment (flip, rotate: bool; intensity_scale, intensity_shift_hu,
      noise_std_hu: float); read at trace time. `translate` does not apply (patch corners are
      already random).
    hu_window: (low, high) HU mapped onto [0, 1].
  Returns:
    (images float32 (B, D, H, W, 1) in [0, 1], centers float32 (B, K, 3) after the transform).
  """
  del valid  # Empty slots move like real ones; the loss masks them.
  batch, depth, height, width = patches.shape
  keys = example_keys(seed, step, index)
  bits = jax.vmap(lambda k: jax.random.bits(k, (_PATCH_DRAWS,), jnp.uint32))(keys)  # (B, 4)
  hu = patches.astype(jnp.float32)
  centers = jnp.asarray(centers, jnp.float32)
  if aug_config.rotate and height == width:
    transpose = (bits[:, _PATCH_TRANSPOSE] & 1) == 1
    hu = _where_each(transpose, jnp.swapaxes(hu, 2, 3), hu)
    centers = _where_each(transpose, centers[..., jnp.array([0, 2, 1])], centers)
  if aug_config.flip:
    sizes = jnp.array([depth, height, width], jnp.float32)
    for axis in range(3):
      flip = ((bits[:, _PATCH_FLIPS] >> axis) & 1) == 1
      hu = _where_each(flip, jnp.flip(hu, axis=axis + 1), hu)
      flipped = centers.at[..., axis].set(sizes[axis] - 1 - centers[..., axis])
      centers = _where_each(flip, flipped, centers)

  def uniform(column, bound):  # (B, 1, 1, 1) values in [-bound, bound), from 24 random bits.
    unit = (bits[:, column] >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
    return ((2.0 * unit - 1.0) * bound)[:, None, None, None]

  if aug_config.intensity_scale:
    hu = hu * (1.0 + uniform(_PATCH_SCALE, float(aug_config.intensity_scale)))
  if aug_config.intensity_shift_hu:
    hu = hu + uniform(_PATCH_SHIFT, float(aug_config.intensity_shift_hu))
  if aug_config.noise_std_hu:
    noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, _NOISE))(keys)
    noise = jax.vmap(lambda k: jax.random.normal(k, hu.shape[1:], jnp.float32))(noise_keys)
    hu = hu + float(aug_config.noise_std_hu) * noise
  return hu_to_unit(hu, hu_window)[..., None], centers
