"""Is the update low-rank? The LoRA paper's §7 ("Understanding the Low-Rank Updates", Hu et al. 2021,
https://arxiv.org/abs/2106.09685) on SmolLM2 and mini-WikiSQL, written to data/lora_subspace.json.

A LoRA update ΔW = (α/r) B A has rank ≤ r by construction, so its own spectrum proves nothing. Two measurements
that are not circular:

* the singular values of the **full fine-tuning** update ΔW = W_after − W_before of W_q and W_v, from the
  Table 2 run (``lorabook.experiments`` run "full": 30 AdamW steps of 8 examples, lr 1e-4, seed 0, one
  thread — deterministic, so re-running gives that run's weights; the loss curve is compared to check it).
  Nothing constrains its rank; next to it the spectrum of a Gaussian matrix of the same shape (full rank);
* the paper's subspace similarity (its §7.2, Figure 3) of the adapters learned at r = 8 and r = 64 (the
  Table 6 runs "lora-qv-r8" and "lora-qv-r64"): with U_r the right-singular vectors of A_r (r, in),

      φ(A_8, A_64, i, j) = ||U_8[:, :i]^T U_64[:, :j]||_F^2 / min(i, j)   ∈ [0, 1]

  (1: one subspace contains the other; for random subspaces of R^d its expectation is max(i, j) / d).

    python -m lorabook.experiments subspace        # three training runs, ~10 minutes of one CPU thread

The file holds only spectra and overlaps (no weights): per layer the top ``TOP`` singular values and the total
squared norm of each ΔW, the energy in the top 1/8/64 directions; φ averaged over the 30 layers, whole for
layer ``EXAMPLE_LAYER``, and φ(1, 1) of every layer.
"""
from __future__ import annotations

import os
import time

import torch

from .._checks import check_int, check_positive_int
from . import COMMON, DATA, load, tables

__all__ = ["SUBSPACE_OUT", "TARGETS", "TOP", "subspace_similarity", "expected_random_overlap", "energy_fraction",
           "spectrum_summary", "train_weights", "subspace", "EXAMPLE_LAYER"]
SUBSPACE_OUT = DATA / "lora_subspace.json"
TARGETS = ("q_proj", "v_proj")
TOP = 64  # singular values kept per layer
EXAMPLE_LAYER = 15  # the layer whose φ matrix is kept whole (the paper's Figure 3 shows one layer too)


def _right_singular(A: torch.Tensor) -> torch.Tensor:
    """(in, r) orthonormal columns spanning the row space of A (r, in), by decreasing singular value."""
    return torch.linalg.svd(A.double(), full_matrices=False).Vh.T  # Vh: (r, in)


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int | None = None, j: int | None = None):
    """The LoRA paper's φ(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j) (its eq. in §7.2).

    A1 (r1, in), A2 (r2, in): LoRA down-projections of one layer. U are their right-singular vectors.
    With i and j: one float in [0, 1]. Without: the (r1, r2) matrix of φ over every i ≤ r1, j ≤ r2.
    """
    if not (isinstance(A1, torch.Tensor) and isinstance(A2, torch.Tensor) and A1.dim() == A2.dim() == 2):
        raise TypeError("A1 and A2 must be 2-D tensors (r, in)")
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(f"A1 and A2 must have the same input width, got {tuple(A1.shape)} and {tuple(A2.shape)}")
    U1, U2 = _right_singular(A1), _right_singular(A2)  # (in, r1), (in, r2)
    cum = (U1.T @ U2).square().cumsum(0).cumsum(1)  # (r1, r2): cum[i-1, j-1] = ||U1[:, :i]^T U2[:, :j]||_F^2
    ii = torch.arange(1, cum.shape[0] + 1, dtype=cum.dtype)[:, None]
    jj = torch.arange(1, cum.shape[1] + 1, dtype=cum.dtype)[None, :]
    phi = cum / torch.minimum(ii, jj)  # (r1, r2)
    if i is None and j is None:
        return phi
    if i is None or j is None:
        raise ValueError("give both i and j, or neither")
    check_int("i", i, low=1, high=cum.shape[0]), check_int("j", j, low=1, high=cum.shape[1])
    return float(phi[i - 1, j - 1])


def expected_random_overlap(d: int, i: int, j: int) -> float:
    """E φ for a uniformly random i-dim and j-dim subspace of R^d: each of the i unit vectors keeps, in
    expectation, j/d of its squared length in the other subspace, so E||U_i^T U_j||^2 = ij/d and
    φ = ij / (d · min(i, j)) = max(i, j) / d."""
    check_positive_int("d", d)
    check_int("i", i, low=1, high=d), check_int("j", j, low=1, high=d)
    return max(i, j) / d


def energy_fraction(singular_values: torch.Tensor, k: int) -> float:
    """The share of ||ΔW||_F^2 in the top k directions: Σ_{i≤k} σ_i^2 / Σ σ_i^2 (singular values in any order)."""
    s = torch.as_tensor(singular_values, dtype=torch.float64)
    if s.dim() != 1 or s.numel() == 0 or bool((s < 0).any()) or not bool(torch.isfinite(s).all()):
        raise ValueError("singular_values must be a non-empty 1-D tensor of finite values >= 0")
    check_positive_int("k", k)
    sq = s.sort(descending=True).values.square()
    total = float(sq.sum())
    if total == 0:
        raise ValueError("singular_values are all 0: no update to measure")
    return float(sq[:k].sum()) / total


def spectrum_summary(delta: torch.Tensor, top: int = TOP) -> dict:
    """What the notebook plots of one update ΔW (out, in): its top singular values, total squared norm,
    and the energy share of its top 1, 8 and 64 directions."""
    s = torch.linalg.svdvals(delta.double())  # (min(out, in),)
    return dict(shape=list(delta.shape), sv=[float(f"{x:.5g}") for x in s[:top]], sq_total=float(s.square().sum()),
                energy={str(k): round(energy_fraction(s, k), 5) for k in (1, 8, 64)})


def train_weights(run: str, snapshot=TARGETS) -> tuple[torch.nn.Module, dict, list[float]]:
    """Re-run the run ``run`` of lorabook.experiments' tables exactly as ``python -m lorabook.train`` does (same
    arguments, seed, one thread, no scoring): (trained model, {layer path: weight before training} of the
    ``snapshot`` layers, loss curve)."""
    from ..train.__main__ import method_kwargs, parse_args
    from ..train.loop import load_model, prepare, train
    from .. import data

    commands = {r: a for t in tables().values() for r, a in t.values()}
    if run not in commands:
        raise ValueError(f"run must be one of {sorted(commands)}, got {run!r}")
    args = parse_args(commands[run] + COMMON)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, args.seed, "cpu")
    before = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if n.split(".")[-1] in snapshot and hasattr(m, "weight")}
    prepare(model, args.method, **method_kwargs(args, tok))
    history = train(model, data.load_split("train"), tok, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                    grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm or None,
                    weight_decay=args.weight_decay, warmup_steps=args.warmup, schedule=args.schedule,
                    max_len=args.max_len, seed=args.seed, progress=False, log_every=0, optimizer=args.optimizer)
    return model, before, history.loss


def _same_as_table(run: str, loss: list[float]) -> float | None:
    """Largest |loss - the table run's loss| over the steps (None when the table run is not in data/)."""
    stored = load().get(run, {}).get("loss_curve")
    return None if stored is None else max(abs(a - b) for a, b in zip(loss, stored))


def subspace(r_small: int = 8, r_large: int = 64, top: int = TOP) -> dict:
    """The three runs and what data/lora_subspace.json holds (see the module docstring)."""
    from ..lora import lora_layers

    t0, out = time.perf_counter(), {}
    model, before, loss = train_weights("full")
    modules = dict(model.named_modules())
    full, gen = {t: [] for t in TARGETS}, torch.Generator().manual_seed(0)
    for name in sorted(before, key=lambda n: int(n.split(".")[2])):  # model.layers.<i>.self_attn.<t>
        delta = modules[name].weight.detach() - before[name]  # (out, in)
        summary = spectrum_summary(delta, top)
        summary["rel_norm"] = float(delta.norm() / before[name].norm())
        full[name.split(".")[-1]].append(summary)
    out["full"] = dict(run="full", loss_max_diff_vs_table=_same_as_table("full", loss), layers=full,
                       random={t: spectrum_summary(torch.randn(tuple(full[t][0]["shape"]), generator=gen), top)
                               for t in TARGETS})
    del model, before, modules
    A = {}
    for r in (r_small, r_large):
        run = f"lora-qv-r{r}"
        model, _, loss = train_weights(run, snapshot=())
        A[r] = {n: layer.lora_A["default"].detach().clone() for n, layer in lora_layers(model).items()}
        out[run] = dict(loss_max_diff_vs_table=_same_as_table(run, loss))
        del model
    phi = {t: [] for t in TARGETS}
    for name in sorted(A[r_small], key=lambda n: int(n.split(".")[2])):
        phi[name.split(".")[-1]].append(subspace_similarity(A[r_small][name], A[r_large][name]))  # (r_s, r_l)
    rounded = lambda x: [[round(v, 4) for v in row] for row in x.tolist()]  # noqa: E731
    out["phi"] = dict(r=[r_small, r_large], d_in=int(next(iter(A[r_small].values())).shape[1]),
                      example_layer=EXAMPLE_LAYER,
                      mean={t: rounded(torch.stack(v).mean(0)) for t, v in phi.items()},
                      example={t: rounded(v[EXAMPLE_LAYER]) for t, v in phi.items()},
                      top1={t: [round(float(p[0, 0]), 4) for p in v] for t, v in phi.items()})
    return dict(command="python -m lorabook.experiments subspace", threads=torch.get_num_threads(),
                torch=torch.__version__, wall_time_s=time.perf_counter() - t0, load_avg_1m=os.getloadavg()[0],
                **out)
