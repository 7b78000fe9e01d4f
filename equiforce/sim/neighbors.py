"""Torch-native neighbour lists for a batched state, reused within a Verlet skin.

The list is built with ``cutoff + skin`` and reused until some pair could have crossed the cutoff.  The
test is rigorous also when the cell changes (NPT, cell relaxation): with ``M`` the deformation of the cell
since the build and ``d_i`` each atom's non-affine displacement, every pair that was farther than
``cutoff + skin`` is still farther than ``cutoff`` while ``σ_min(M)(cutoff + skin) − 2 max|d_i| > cutoff``.

Two builders, chosen per system:

* small systems (``n² × images`` below a budget) — a batched all-pairs search on the state's device, one
  set of tensor operations for thousands of molecules at once;
* large systems — vesin's cell list (``vesin.torch`` on the device when installed, else vesin on the host).

The only host synchronisations are the rebuild decision (made at an adaptive interval, see
:meth:`VerletNeighborList.update`) and the build itself (its output size is data dependent).
"""

from __future__ import annotations

import numpy as np
import torch

from equiforce.data.neighbors import neighbor_list as host_neighbor_list

_TorchNeighborList = None  # vesin-torch's class, imported on first use (it loads a compiled library)
_TORCH_VESIN_TRIED = False


def _torch_vesin():
    """vesin-torch builds lists on the device (CPU or CUDA) without a host round trip; None when absent."""
    global _TorchNeighborList, _TORCH_VESIN_TRIED
    if not _TORCH_VESIN_TRIED:
        _TORCH_VESIN_TRIED = True
        try:
            from vesin_torch import NeighborList

            _TorchNeighborList = NeighborList
        except Exception:  # noqa: BLE001 - absent, or compiled for another torch version
            _TorchNeighborList = None
    return _TorchNeighborList

BRUTE_FORCE_BUDGET = 1 << 18  # candidate pairs per system (n² × images) below which all-pairs is used


def complete_cell(cell: torch.Tensor, pbc: torch.Tensor, length: float = 1.0) -> torch.Tensor:
    """[B, 3, 3] the cell with each non-periodic vector replaced by one orthogonal to the periodic ones.

    The replacements have norm ``length``; the periodic vectors are kept.  This gives every system a full
    basis for wrapping and for counting images, whatever its pbc (open, slab, wire or bulk).
    """
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
    out = torch.where(pbc[:, :, None], cell, eye * length)
    n_periodic = pbc.sum(1)
    for k in range(3):
        a, b = cell[:, (k + 1) % 3], cell[:, (k + 2) % 3]
        normal = torch.linalg.cross(a, b)
        normal = normal / torch.linalg.vector_norm(normal, dim=-1, keepdim=True).clamp_min(1e-12)
        out[:, k] = torch.where(((n_periodic == 2) & ~pbc[:, k])[:, None], normal * length, out[:, k])
    for k in range(3):
        u = cell[:, k] / torch.linalg.vector_norm(cell[:, k], dim=-1, keepdim=True).clamp_min(1e-12)
        helper = eye[:, 0].clone()
        helper = torch.where((u[:, 0].abs() > 0.9)[:, None], eye[:, 1], helper)
        v = torch.linalg.cross(u, helper)
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-12)
        w = torch.linalg.cross(u, v)
        select = ((n_periodic == 1) & pbc[:, k])[:, None]
        out[:, (k + 1) % 3] = torch.where(select, v * length, out[:, (k + 1) % 3])
        out[:, (k + 2) % 3] = torch.where(select, w * length, out[:, (k + 2) % 3])
    return out


def interplanar_spacings(cell: torch.Tensor) -> torch.Tensor:
    """[B, 3] distance between lattice planes along each vector of a full (non-degenerate) cell."""
    a, b, c = cell[:, 0], cell[:, 1], cell[:, 2]
    volume = torch.linalg.det(cell).abs()
    cross = torch.stack([torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)], dim=1)
    return volume[:, None] / torch.linalg.vector_norm(cross, dim=-1).clamp_min(1e-12)


def _image_counts(cell: torch.Tensor, pbc: torch.Tensor, cutoff: float) -> torch.Tensor:
    """[B, 3] how many periodic images each direction needs for wrapped positions (0 when not periodic)."""
    spacing = interplanar_spacings(complete_cell(cell, pbc))
    counts = torch.floor(cutoff / spacing.clamp_min(1e-12)) + 1
    return torch.where(pbc, counts, torch.zeros_like(counts)).long()


def wrap_positions(positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                   system: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions folded into the cell along periodic axes, and the integer image ``n`` of each atom.

    ``wrapped = positions - n @ cell``; a pair found with shift ``S`` between wrapped positions has shift
    ``S - n_j + n_i`` between the original ones.
    """
    full = complete_cell(cell, pbc)
    frac = torch.linalg.solve(full[system].transpose(1, 2), positions.unsqueeze(-1)).squeeze(-1)
    image = torch.where(pbc[system], torch.floor(frac), torch.zeros_like(frac))
    wrapped = positions - torch.einsum("ni,nij->nj", image, cell[system])
    return wrapped, image


def brute_force_pairs(positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, ptr: torch.Tensor,
                      systems: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs within ``cutoff`` for the listed systems, every periodic image included.

    Returns ``edge_index [2, E]`` (global atom indices) and integer ``shifts [E, 3]`` for the positions as
    given (unwrapped positions are fine).
    """
    device = positions.device
    starts, counts = ptr[systems], (ptr[systems + 1] - ptr[systems])
    pair_counts = counts * counts
    total = int(pair_counts.sum())
    owner = torch.repeat_interleave(torch.arange(len(systems), device=device), pair_counts)
    first = torch.cumsum(pair_counts, 0) - pair_counts
    local = torch.arange(total, device=device) - first[owner]
    i = starts[owner] + torch.div(local, counts[owner], rounding_mode="floor")
    j = starts[owner] + local % counts[owner]
    system_of_atom = torch.repeat_interleave(torch.arange(len(ptr) - 1, device=device), ptr[1:] - ptr[:-1])
    wrapped, image = wrap_positions(positions, cell, pbc, system_of_atom)
    images = _image_counts(cell[systems], pbc[systems], cutoff)
    reach = int(images.max()) if images.numel() else 0
    rng = torch.arange(-reach, reach + 1, device=device)
    all_shifts = torch.cartesian_prod(rng, rng, rng).reshape(-1, 3)
    limit = images[owner]
    base = wrapped[j] - wrapped[i]
    shift_vectors = torch.einsum("si,bij->bsj", all_shifts.to(cell.dtype), cell[systems])  # [b, S, 3]
    self_pair = i == j
    found_index, found_shift = [], []
    for s, shift in enumerate(all_shifts.tolist()):
        vec = base + shift_vectors[owner, s]
        keep = (vec * vec).sum(-1) < cutoff * cutoff
        if any(shift):
            keep = keep & (all_shifts[s].abs()[None, :] <= limit).all(-1)
        else:
            keep = keep & ~self_pair
        index = torch.nonzero(keep).squeeze(-1)
        found_index.append(index)
        found_shift.append(all_shifts[s].expand(index.shape[0], 3))
    index = torch.cat(found_index)
    shifts = torch.cat(found_shift).to(cell.dtype)
    pi, pj = i[index], j[index]
    shifts = shifts - image[pj] + image[pi]
    return torch.stack([pi, pj]), shifts


def cell_list_pairs(positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                    cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One system through vesin: on the device with ``vesin.torch`` when available, else on the host."""
    if _torch_vesin() is not None:
        try:
            return _device_cell_list(positions, cell, pbc, cutoff)
        except RuntimeError:  # e.g. a device vesin-torch was not built for: the host list always works
            pass
    i, j, shifts = host_neighbor_list(positions.detach().cpu().double().numpy(),
                                      cell.detach().cpu().double().numpy(), pbc.cpu().numpy(), cutoff)
    edge_index = torch.as_tensor(np.stack([i, j]), dtype=torch.long, device=positions.device)
    return edge_index, torch.as_tensor(shifts, dtype=positions.dtype, device=positions.device)


def _device_cell_list(positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                      cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    points = positions.detach().to(torch.float64)
    if bool(pbc.any()):
        span = float((points.max(0).values - points.min(0).values).max())
        box = complete_cell(cell.detach().to(torch.float64)[None], pbc[None], span + 2 * cutoff + 1.0)[0]
        periodic: bool | torch.Tensor = pbc
    else:
        box, periodic = torch.zeros(3, 3, dtype=torch.float64, device=positions.device), False
    i, j, shifts = _TorchNeighborList(cutoff=float(cutoff), full_list=True).compute(points, box, periodic, "ijS")
    return torch.stack([i.long(), j.long()]), shifts.to(positions.dtype)


def build_neighbor_list(positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, ptr: torch.Tensor,
                        cutoff: float, budget: int = BRUTE_FORCE_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """Full list (i→j and j→i) of all systems of a batch; ``r_ij = r_j - r_i + shifts @ cell``."""
    n_atoms = (ptr[1:] - ptr[:-1]).cpu()
    images = _image_counts(cell, pbc, cutoff).cpu()
    cost = n_atoms**2 * (2 * images + 1).prod(-1)
    small = torch.nonzero(cost <= budget).squeeze(-1)
    large = torch.nonzero(cost > budget).squeeze(-1).tolist()
    edges, shifts = [], []
    if small.numel():
        e, s = brute_force_pairs(positions, cell, pbc, ptr, small.to(positions.device), cutoff)
        edges.append(e)
        shifts.append(s)
    ptr_host = ptr.cpu().tolist()
    for b in large:
        lo, hi = ptr_host[b], ptr_host[b + 1]
        e, s = cell_list_pairs(positions[lo:hi], cell[b], pbc[b], cutoff)
        edges.append(e + lo)
        shifts.append(s)
    if not edges:
        return (torch.zeros(2, 0, dtype=torch.long, device=positions.device),
                torch.zeros(0, 3, dtype=positions.dtype, device=positions.device))
    return canonical_order(torch.cat(edges, dim=1), torch.cat(shifts), positions.shape[0])


def canonical_order(edge_index: torch.Tensor, shifts: torch.Tensor, n_atoms: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges sorted by (centre, neighbour, shift): the same pairs always come in the same order, whichever
    builder found them and from whichever positions, so sums over edges round the same way — a run resumed
    from a checkpoint (whose list is built afresh) continues bit for bit as the uninterrupted run would."""
    if edge_index.shape[1] == 0:
        return edge_index, shifts
    whole = shifts.round().long()
    reach = int(whole.abs().max())
    width = 2 * reach + 1
    code = ((whole[:, 0] + reach) * width + whole[:, 1] + reach) * width + whole[:, 2] + reach
    key = (edge_index[0] * n_atoms + edge_index[1]) * width**3 + code
    order = torch.argsort(key)
    return edge_index[:, order], shifts[order]


class VerletNeighborList:
    """A neighbour list with a skin, rebuilt only when a pair could have crossed the cutoff.

    ``check_interval="auto"`` tests the rebuild criterion at an adaptive interval, so a GPU run synchronises
    with the host roughly once per ``k`` steps instead of every step: after each test it skips the ``k`` steps
    whose worst case still fits in the remaining margin — twice the larger of (a) two atoms each moving at the
    fastest speed plus the fastest acceleration seen (from the velocities' change since the last test) and (b)
    the rate at which the margin was actually used since the last test (which also covers a changing cell in
    NPT).  Right after a build it tests every step until it has those rates.  This is a bound on what the
    dynamics did so far, not a proof: ``check_interval=1`` tests every step and is exact.
    """

    def __init__(self, cutoff: float, skin: float = 0.5, check_interval: int | str = "auto",
                 max_interval: int = 25, budget: int = BRUTE_FORCE_BUDGET) -> None:
        if skin < 0:
            raise ValueError("skin must be non-negative")
        self.cutoff, self.skin = float(cutoff), float(skin)
        self.check_interval, self.max_interval, self.budget = check_interval, max_interval, budget
        self.edge_index: torch.Tensor | None = None
        self.shifts: torch.Tensor | None = None
        self.builds = 0
        self._ref_positions: torch.Tensor | None = None
        self._ref_cell: torch.Tensor | None = None
        self._countdown = 0
        self._last_check: tuple[torch.Tensor, float] | None = None  # velocities and margin at the last test
        self._steps_since_check = 0

    def build(self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, ptr: torch.Tensor) -> None:
        self.edge_index, self.shifts = build_neighbor_list(positions.detach(), cell.detach(), pbc, ptr,
                                                           self.cutoff + self.skin, self.budget)
        self._ref_positions, self._ref_cell = positions.detach().clone(), cell.detach().clone()
        self.builds += 1
        self._countdown = 0
        self._last_check = None

    def margin(self, positions: torch.Tensor, cell: torch.Tensor, system: torch.Tensor) -> torch.Tensor:
        """[B] distance budget left before a pair outside the list could come within the cutoff."""
        ref_cell = self._ref_cell
        periodic = torch.linalg.det(ref_cell).abs() > 1e-8
        eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
        safe_ref = torch.where(periodic[:, None, None], ref_cell, eye)
        deform = torch.where(periodic[:, None, None], torch.linalg.solve(safe_ref, torch.where(
            periodic[:, None, None], cell.detach(), eye)), eye)  # cell = ref_cell @ deform
        affine = torch.einsum("ni,nij->nj", self._ref_positions, deform[system])
        displacement = torch.linalg.vector_norm(positions.detach() - affine, dim=-1)
        max_disp = torch.zeros(cell.shape[0], dtype=cell.dtype, device=cell.device)
        max_disp = max_disp.scatter_reduce(0, system, displacement, reduce="amax", include_self=True)
        sigma_min = torch.linalg.svdvals(deform)[:, -1]
        return sigma_min * (self.cutoff + self.skin) - 2.0 * max_disp - self.cutoff

    @property
    def due(self) -> bool:
        """Whether the next :meth:`update` tests the list (else it only counts down: no device work)."""
        return self.edge_index is None or self._countdown <= 0

    def update(self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, ptr: torch.Tensor,
               system: torch.Tensor, velocities: torch.Tensor | None = None, dt: float | None = None,
               lookahead: int = 0) -> bool:
        """Rebuild if needed; returns whether it did.  ``velocities`` and ``dt`` enable adaptive checks.

        ``lookahead`` k (needs ``velocities`` and ``dt``): the list must also hold for the positions k steps
        ahead — for a caller that checks before a step whose forces it cannot check itself (a CUDA graph)."""
        self._steps_since_check += 1
        if self.edge_index is None or self._ref_positions.shape != positions.shape:
            self.build(positions, cell, pbc, ptr)
            return True
        if self._countdown > 0:
            self._countdown -= 1
            return False
        margin = self.margin(positions, cell, system).min()
        adaptive = (self.check_interval == "auto" or lookahead > 0) and velocities is not None and dt is not None
        if not adaptive:
            if float(margin) <= 0:
                self.build(positions, cell, pbc, ptr)
                return True
            self._countdown = 0 if self.check_interval == "auto" else int(self.check_interval) - 1
            return False
        velocities = velocities.detach()
        vmax = torch.linalg.vector_norm(velocities, dim=-1).max()
        amax = torch.zeros_like(vmax)
        previous = self._last_check
        steps = max(self._steps_since_check, 1)
        if previous is not None and previous[0].shape == velocities.shape:
            amax = torch.linalg.vector_norm(velocities - previous[0], dim=-1).max() / (steps * dt)
        margin_value, vmax_value, amax_value = torch.stack([margin, vmax.to(margin.dtype),
                                                            amax.to(margin.dtype)]).tolist()
        used_rate = (previous[1] - margin_value) / steps if previous is not None else None
        self._last_check, self._steps_since_check = (velocities.clone(), margin_value), 0

        def worst(k: int) -> float:
            """Margin k steps may use up: twice the larger of the kinematic bound and the observed rate."""
            moved = 2.0 * (vmax_value * k * dt + 0.5 * amax_value * (k * dt) ** 2)  # a pair: two atoms
            return 2.0 * max(moved, (used_rate or 0.0) * k)

        if margin_value - worst(lookahead) <= 0:
            self.build(positions, cell, pbc, ptr)
            return True
        if self.check_interval == "auto":
            skip = 0
            if used_rate is not None:  # rates known: skip while the worst case of the steps skipped fits
                while skip < self.max_interval - 1 and margin_value - worst(lookahead + skip + 2) > 0:
                    skip += 1
            self._countdown = skip
        else:
            self._countdown = int(self.check_interval) - 1
        return False
