"""Conditional mutual information (CMI) of a classifier's tempered outputs, and the losses built on it.

Notation (docs/design.md §2): logits z(x), tempered output P_x^T = softmax(z/T), label y.
Class centroid Q_y^T = E[P^T | Y=y]; CMI I_T = E[KL(P_X^T || Q_Y^T)].
Separation Γ_T = E[mean_{v≠Y} KL(P_X^T || Q_v^T)]; NCMI = I / Γ (small: tight, far-apart clusters).

Because E[KL(P||Q_Y)] = I + E_Y[KL(Q*_Y||Q_Y)] ≥ I for any Q, the losses hold the centroids as
buffers updated apart from the weights (an EMA of detached batch means, optionally an exact pass
per epoch) and take gradients through P only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

Aggregator = Literal["mean", "max", "softmax"]
Weighting = Literal["1", "T2"]

_EPS = 1e-12


def tempered_probs(logits: Tensor, temperature: float) -> Tensor:
    # half precision is too coarse for KL terms near zero; float64 inputs stay float64
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.softmax(logits / temperature, dim=-1)


def class_centroids(probs: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class sums of probability vectors and counts: (C, C) sums, (C,) counts."""
    sums = torch.zeros(num_classes, probs.shape[-1], dtype=probs.dtype, device=probs.device)
    sums.index_add_(0, labels, probs)
    counts = torch.bincount(labels, minlength=num_classes).to(probs.dtype)
    return sums, counts


def kl_to_centroids(probs: Tensor, centroids: Tensor) -> Tensor:
    """KL(P_i || Q_v) for every row i and every class v: (N, C_classes)."""
    log_p = torch.log(probs.clamp_min(_EPS))
    log_q = torch.log(centroids.to(probs.dtype).clamp_min(_EPS))
    neg_entropy = (probs * log_p).sum(-1, keepdim=True)  # (N,1)
    cross = probs @ log_q.T  # (N, C)
    return neg_entropy - cross


def conditional_mutual_information(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    num_classes: int | None = None,
    centroids: Tensor | None = None,
) -> Tensor:
    """Empirical CMI Î_T = mean_i KL(P_i^T || Q_{y_i}^T), with Q the empirical class means unless given.

    Classes absent from `labels` contribute nothing. Returns a scalar tensor (differentiable).
    """
    num_classes = num_classes or int(logits.shape[-1])
    p = tempered_probs(logits, temperature)
    if centroids is None:
        sums, counts = class_centroids(p, labels, num_classes)
        centroids = sums / counts.clamp_min(1).unsqueeze(1)
    kl = kl_to_centroids(p, centroids)
    return kl.gather(1, labels.unsqueeze(1)).mean()


def cmi_spectrum(
    logits: Tensor, labels: Tensor, temperatures: Sequence[float], num_classes: int | None = None
) -> dict[float, float]:
    """CMI at each temperature, with exact class means, as plain floats."""
    with torch.no_grad():
        return {
            float(t): float(conditional_mutual_information(logits, labels, t, num_classes))
            for t in temperatures
        }


def separation(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, num_classes: int | None = None
) -> float:
    """Γ_T = mean_i mean_{v≠y_i, v present} KL(P_i^T || Q_v^T)."""
    num_classes = num_classes or int(logits.shape[-1])
    with torch.no_grad():
        p = tempered_probs(logits, temperature)
        sums, counts = class_centroids(p, labels, num_classes)
        centroids = sums / counts.clamp_min(1).unsqueeze(1)
        kl = kl_to_centroids(p, centroids)
        present = (counts > 0).to(kl.dtype)
        mask = present.unsqueeze(0).expand_as(kl).clone()
        mask.scatter_(1, labels.unsqueeze(1), 0.0)
        per_row = (kl * mask).sum(1) / mask.sum(1).clamp_min(1)
        return float(per_row.mean())


def normalised_cmi(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, num_classes: int | None = None
) -> float:
    """NCMI = I_T / Γ_T."""
    i_t = float(conditional_mutual_information(logits, labels, temperature, num_classes))
    gamma = separation(logits, labels, temperature, num_classes)
    return i_t / gamma if gamma > 0 else float("inf")


def log_spaced_temperatures(t_min: float = 1.0, t_max: float = 32.0, count: int = 6) -> list[float]:
    """A log-spaced grid, e.g. 1, 2, 4, 8, 16, 32."""
    if count == 1:
        return [float(t_min)]
    ratio = (t_max / t_min) ** (1.0 / (count - 1))
    return [round(t_min * ratio**i, 6) for i in range(count)]


class CentroidBank(torch.nn.Module):
    """Class centroids Q_y^T for a grid of temperatures, held apart from the weights (the Q-step).

    Updated by an EMA of detached batch means; under DistributedDataParallel the batch sums and counts
    are all-reduced first, so every rank holds identical centroids.
    """

    def __init__(self, num_classes: int, temperatures: Sequence[float], momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"centroid momentum must be in [0, 1), got {momentum}")
        self.num_classes = num_classes
        self.temperatures = [float(t) for t in temperatures]
        self.momentum = momentum
        uniform = torch.full((len(self.temperatures), num_classes, num_classes), 1.0 / num_classes)
        self.register_buffer("centroids", uniform)
        self.register_buffer("initialised", torch.zeros(len(self.temperatures), num_classes, dtype=torch.bool))

    @torch.no_grad()
    def _reduce(self, sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        return sums, counts

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor) -> None:
        """EMA step towards this batch's (all-reduced) class means; first sight of a class copies it."""
        stacked_sums, stacked_counts = [], []
        for t in self.temperatures:
            s, c = class_centroids(tempered_probs(logits.detach(), t), labels, self.num_classes)
            stacked_sums.append(s)
            stacked_counts.append(c)
        sums, counts = self._reduce(torch.stack(stacked_sums), torch.stack(stacked_counts))
        self._blend(sums, counts, self.momentum)

    @torch.no_grad()
    def _blend(self, sums: Tensor, counts: Tensor, momentum: float) -> None:
        seen = counts > 0  # (K, C)
        means = sums / counts.clamp_min(1).unsqueeze(-1)
        means = means.to(self.centroids.device, self.centroids.dtype)
        seen = seen.to(self.centroids.device)
        fresh = seen & ~self.initialised
        old = self.centroids
        blended = momentum * old + (1 - momentum) * means
        new = torch.where(fresh.unsqueeze(-1), means, torch.where(seen.unsqueeze(-1), blended, old))
        self.centroids.copy_(new)
        self.initialised |= seen

    @torch.no_grad()
    def exact_pass(self, model: torch.nn.Module, loader, device: torch.device) -> None:
        """Replace the centroids by exact class means over a whole loader (all ranks reduced)."""
        k, c = len(self.temperatures), self.num_classes
        sums = torch.zeros(k, c, c, device=device)
        counts = torch.zeros(k, c, device=device)
        was_training = model.training
        model.eval()
        for batch in loader:
            x = batch["x"].to(device, non_blocking=True)
            y = batch["y"].to(device, non_blocking=True)
            logits = model(x).float()
            for i, t in enumerate(self.temperatures):
                s, n = class_centroids(tempered_probs(logits, t), y, c)
                sums[i] += s
                counts[i] += n
        model.train(was_training)
        sums, counts = self._reduce(sums, counts)
        self.initialised.zero_()
        self._blend(sums, counts, momentum=0.0)

    def cmi_terms(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Î_T for each grid temperature against the held centroids: (K,), differentiable in logits."""
        terms = []
        for i, t in enumerate(self.temperatures):
            p = tempered_probs(logits, t)
            q = self.centroids[i][labels]  # (B, C)
            kl = (p * (torch.log(p.clamp_min(_EPS)) - torch.log(q.clamp_min(_EPS)))).sum(-1)
            terms.append(kl.mean())
        return torch.stack(terms)


def aggregate(terms: Tensor, temperatures: Sequence[float], aggregator: Aggregator, weighting: Weighting,
              softmax_beta: float = 10.0) -> Tensor:
    """A_T[w(T) · Î_T]: mean (the paper), max (worst case over T) or a soft-max (smooth worst case)."""
    if weighting == "T2":
        w = torch.tensor([t * t for t in temperatures], dtype=terms.dtype, device=terms.device)
        terms = terms * w
    elif weighting != "1":
        raise ValueError(f"unknown weighting {weighting!r}; choose '1' or 'T2'")
    if aggregator == "mean":
        return terms.mean()
    if aggregator == "max":
        return terms.max()
    if aggregator == "softmax":
        weights = torch.softmax(softmax_beta * terms.detach() / terms.detach().abs().max().clamp_min(_EPS), 0)
        return (weights * terms).sum()
    raise ValueError(f"unknown aggregator {aggregator!r}; choose mean, max or softmax")


# Chosen by experiments/ablation.py at the converged regime against the whole battery (bench/results/
# ablation-battery-lam20-T2-fashion-mnist.md, 8 paired seeds): λ 20, w(T) = T², T from 0.25 to 16, λ ramped in over
# the first 30% of the epochs was undistillable against all nine families at CE − 0.08 points. T < 1 covers the
# attacker's recalibration (calibrated-kd sharpens a CMIM teacher to τ ≈ 0.2); w(T) = T² keeps the high-T terms
# (the within-class spread of all logits, which logit-mse regresses on) from vanishing. The former default
# (λ 40, w 1, T 1–16) was inconclusive against calibrated-kd and logit-mse (bench/results/ablation-battery-*.md).
# Lower λ on this grid leaks: λ 10 via vid, λ 15 via logit-mse (+0.28 points at 12 seeds, bench/results/
# protection-cmim-lam15-12seeds-fashion-mnist.md), and λ 17.5 cannot bound logit-mse's gain (+0.13, ≤ +0.34 at 12
# seeds), though all three keep CE's accuracy.
CMIM_DEFAULT_LAMBDA = 20.0
CMIM_DEFAULT_TEMPERATURES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
CMIM_DEFAULT_WEIGHTING: Weighting = "T2"
CMIM_DEFAULT_WARMUP = 0.3


class CMIMLoss(torch.nn.Module):
    """CMIM: CE + λ · A_{T∈grid}[w(T) · Î_T], minimising CMI across the temperature spectrum.

    `calibrated`: the grid's temperatures are relative to the teacher's calibration temperature τ (NLL-optimal on
    the batch's labels, an EMA over batches, no gradient), i.e. Î_{τT}. A plain CMIM teacher can meet its term by
    shrinking its logits (under-confident answers), which an attacker's own temperature scaling undoes
    (`calibrated-kd`); measured at its calibrated scale the term can only be met by making each class's outputs alike.

    Call `loss(logits, labels)` inside a training loop; it updates the centroids (EMA) in training mode
    and returns the total loss. `last_terms` holds the parts of the last call for logging.
    """

    def __init__(self, num_classes: int, lam: float = CMIM_DEFAULT_LAMBDA,
                 temperatures: Sequence[float] = CMIM_DEFAULT_TEMPERATURES, aggregator: Aggregator = "mean",
                 weighting: Weighting = CMIM_DEFAULT_WEIGHTING, momentum: float = 0.9,
                 sign: float = 1.0, calibrated: bool = False, tau_momentum: float = 0.9):
        super().__init__()
        if lam < 0:
            raise ValueError(f"lambda must be >= 0, got {lam}")
        self.lam = lam
        self.sign = sign
        self.calibrated = calibrated
        self.tau_momentum = tau_momentum
        if calibrated:  # only then: checkpoints of plain CMIM keep their keys
            self.register_buffer("log_tau", torch.zeros(()))
            self.register_buffer("tau_initialised", torch.zeros((), dtype=torch.bool))
        self.aggregator = aggregator
        self.weighting = weighting
        self.bank = CentroidBank(num_classes, temperatures, momentum)
        self.last_terms: dict[str, float] = {}

    @property
    def temperatures(self) -> list[float]:
        return self.bank.temperatures

    def parts(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The loss as named parts: {'ce': ..., 'cmi': ±λ·A[...]}, summing to the total."""
        z = self._calibrate(logits, labels) if self.calibrated else logits
        if self.training:
            self.bank.update(z, labels)
        terms = self.bank.cmi_terms(z, labels)
        agg = aggregate(terms, self.temperatures, self.aggregator, self.weighting)
        return {"ce": F.cross_entropy(logits.float(), labels), "cmi": self.sign * self.lam * agg}

    def _calibrate(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The logits over the (EMA) calibration temperature; τ is a constant to the gradient."""
        if self.training:
            from protect.metrics import TAU_BOUNDS, fit_temperature  # metrics imports this module

            # calibrated-kd's own search (cross-entropy is blind to a per-row shift, so logits serve as log-probs)
            fresh = torch.tensor(math.log(fit_temperature(logits.detach(), labels, *TAU_BOUNDS))).to(self.log_tau)
            m = self.tau_momentum if bool(self.tau_initialised) else 0.0
            self.log_tau.copy_(m * self.log_tau + (1 - m) * fresh)
            self.tau_initialised.fill_(True)
        return logits / torch.exp(self.log_tau).to(logits.dtype)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        parts = self.parts(logits, labels)
        self.last_terms = {k: float(v.detach()) for k, v in parts.items()}
        return sum(parts.values())


class MCMILoss(CMIMLoss):
    """MCMI: CE − λ · Î_1 (maximise CMI at T=1), for distillation-friendly teachers."""

    def __init__(self, num_classes: int, lam: float = 0.25, momentum: float = 0.9,
                 temperatures: Sequence[float] = (1.0,)):
        super().__init__(num_classes, lam=lam, temperatures=temperatures, aggregator="mean",
                         weighting="1", momentum=momentum, sign=-1.0)
