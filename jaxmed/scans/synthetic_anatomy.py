"""The phantom of a synthetic chest CT, in world mm: lungs, branching vessels, nodules.

Everything is defined in world (x, y, z) mm and painted onto a scan's canonical grid (`Grid`,
axes z, y, x increasing), only inside the bounding box of each shape, so a 512 x 512 x 250 scan
takes about 2.5 s. Vessels are trees of tapering tubes from each hilum; their branch points are
the hard negatives of detection (tube junctions look most like round blobs). Nodules are solid
ellipsoids of the configured diameters: isolated, juxta-pleural (touching the lung wall) or
juxta-vascular (touching a vessel). This module imports no JAX.
"""

from __future__ import annotations

import dataclasses

import numpy as np

JUXTAPLEURAL_FRACTION = 0.3  # Nodules whose centre sits 0.8 radius inside the lung wall.
JUXTAVASCULAR_FRACTION = 0.25  # Nodules whose surface touches a vessel.


@dataclasses.dataclass
class Grid:
  """The canonical grid: world coordinate of every index along x, y, z (increasing)."""
  xs: np.ndarray
  ys: np.ndarray
  zs: np.ndarray
  low: np.ndarray  # World (x, y, z) of voxel (0, 0, 0) of the canonical array.
  spacing: np.ndarray

  def box(self, low_xyz, high_xyz):
    """Index slices (z, y, x) of the canonical array covering the world box, and its coords."""
    lo = np.maximum(np.floor((np.asarray(low_xyz) - self.low) / self.spacing), 0).astype(int)
    hi = np.ceil((np.asarray(high_xyz) - self.low) / self.spacing).astype(int) + 1
    hi = np.minimum(hi, [len(self.xs), len(self.ys), len(self.zs)])
    if np.any(hi <= lo):
      return None
    slices = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    coords = (self.xs[lo[0]:hi[0]][None, None, :], self.ys[lo[1]:hi[1]][None, :, None],
              self.zs[lo[2]:hi[2]][:, None, None])
    return slices, coords


@dataclasses.dataclass
class Ellipsoid:
  center: np.ndarray  # World (x, y, z) mm.
  axes: np.ndarray  # Semi-axes, mm.

  def inside(self, points_xyz, shrink=1.0):
    return np.sum(((np.asarray(points_xyz) - self.center) / (self.axes * shrink)) ** 2, -1) <= 1

  def mask(self, coords):
    x, y, z = coords
    c, a = self.center, self.axes
    return ((x - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((z - c[2]) / a[2]) ** 2 <= 1


def unit(v):
  return v / np.linalg.norm(v)


# ---- vessels --------------------------------------------------------------------------------

def vessel_tree(rng, lung: Ellipsoid, medial_sign: float):
  """Branching, curving tubes from the hilum, in world mm.

  Returns (segments [(p0, p1, radius_mm)], branch_points [(point, radius_mm)]).
  """
  scale = float(np.min(lung.axes))
  r_start_max = float(np.clip(0.15 * scale, 1.2, 4.0))
  n_trees = int(np.clip(np.prod(lung.axes) / 2500.0, 4, 24))
  segments = []
  for _ in range(n_trees):
    hilum = lung.center + lung.axes * np.array(
        [medial_sign * 0.55, rng.uniform(-0.3, 0.3), rng.uniform(-0.35, 0.35)])
    heading = unit(np.array([-medial_sign, 0.0, 0.0]) + rng.normal(0, 0.6, 3))
    stack = [(hilum, heading, rng.uniform(0.7, 1.0) * r_start_max, 0)]
    while stack:
      point, heading, radius, depth = stack.pop()
      for _ in range(40):
        heading = unit(heading + rng.normal(0, 0.25, 3))
        step = radius * rng.uniform(2.0, 3.5) + 1.5
        nxt = point + heading * step
        if not lung.inside(nxt, shrink=0.93):
          break
        segments.append((point, nxt, radius))
        point, radius = nxt, radius * 0.92
        if radius < 1.0:
          break
        if depth < 4 and rng.random() < 0.35:
          stack.append((point, unit(heading + rng.normal(0, 0.8, 3)), radius * 0.85, depth + 1))
  # A branch point: where two segments start (a branch that left the lung at once is no branch).
  starts = {}
  for p0, _, radius in segments:
    starts.setdefault(tuple(p0), []).append(radius)
  branch_points = [(np.array(p), max(r)) for p, r in starts.items() if len(r) >= 2]
  return segments, branch_points


def paint_segment(volume, grid: Grid, p0, p1, radius, hu, lungs):
  """Sets voxels within `radius` of segment p0-p1 that lie in a lung to `hu`."""
  found = grid.box(np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius)
  if found is None:
    return
  slices, (x, y, z) = found
  d = p1 - p0
  t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / max(float(d @ d), 1e-9)
  t = np.clip(t, 0.0, 1.0)
  dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
  in_lung = lungs[0].mask((x, y, z)) | lungs[1].mask((x, y, z))
  volume[slices][(dist2 <= radius * radius) & in_lung] = hu


# ---- nodules --------------------------------------------------------------------------------

def _nodule_center(rng, lung: Ellipsoid, radius: float, segments, kind: str):
  """A centre for a nodule of `radius` mm in `lung`, of kind isolated / pleural / vascular."""
  if kind == 'pleural':  # Centre 0.8 radius inside the lung wall.
    u = unit(rng.normal(size=3))
    surface = lung.center + u * lung.axes
    return surface - unit(u / lung.axes) * 0.8 * radius
  if kind == 'vascular':  # Surface on a vessel's: centre radius + vessel radius off its axis.
    p0, p1, vessel_radius = segments[rng.integers(len(segments))]
    along = p1 - p0
    side = unit(np.cross(along, rng.normal(size=3)))
    center = p0 + rng.uniform(0, 1) * along + side * (radius + 0.7 * vessel_radius)
    if lung.inside(center, shrink=0.95):
      return center
  room = np.maximum(lung.axes - radius - 1.0, 0.5)
  return lung.center + unit(rng.normal(size=3)) * rng.uniform(0, 1) ** (1 / 3) * room


def place_nodules(rng, lungs, vessels_by_lung, synthetic, count):
  """Nodules (dicts: center world mm, diameter, semi-axes, rotation, hu, kind) and how many
  diameters were clamped to fit a lung; vessels_by_lung: each lung's segments."""
  d_min, d_max = (float(v) for v in synthetic.nodule_diameter_mm)
  nodules, clamped = [], 0
  for _ in range(count):
    side = int(rng.integers(0, 2))
    lung = lungs[side]
    diameter = float(np.exp(rng.uniform(np.log(d_min), np.log(d_max))))
    cap = 1.2 * float(np.min(lung.axes))  # A nodule must fit in a lung (small test scans).
    if diameter > cap:
      diameter, clamped = cap, clamped + 1
    radius = diameter / 2
    axes = radius * rng.uniform(0.85, 1.15, 3)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    rotation = q * np.sign(np.diag(r))
    draw = rng.random()
    kind = ('pleural' if draw < JUXTAPLEURAL_FRACTION else
            'vascular' if draw < JUXTAPLEURAL_FRACTION + JUXTAVASCULAR_FRACTION
            and vessels_by_lung[side] else 'isolated')
    for _ in range(50):
      center = _nodule_center(rng, lung, radius, vessels_by_lung[side], kind)
      if all(np.linalg.norm(center - n['center']) > radius + n['diameter'] / 2 + 3.0
             for n in nodules):
        break
    nodules.append({'center': center, 'diameter': diameter, 'axes': axes, 'kind': kind,
                    'rotation': rotation, 'hu': int(rng.integers(0, 61))})
  return nodules, clamped


def paint_nodule(volume, grid: Grid, nodule):
  """Sets the voxels inside the nodule's rotated ellipsoid to its HU."""
  reach = float(np.max(nodule['axes']))
  c = nodule['center']
  found = grid.box(c - reach, c + reach)
  if found is None:
    return
  slices, (x, y, z) = found
  dx, dy, dz = x - c[0], y - c[1], z - c[2]
  rot, axes = nodule['rotation'], nodule['axes']
  total = 0.0
  for k in range(3):  # Coordinates along the nodule's own axes: rot.T @ (p - c).
    along = rot[0, k] * dx + rot[1, k] * dy + rot[2, k] * dz
    total = total + (along / axes[k]) ** 2
  volume[slices][total <= 1.0] = nodule['hu']
