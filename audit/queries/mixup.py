"""`mixup`: convex mixtures of two training rows, x = λ·x_i + (1 − λ)·x_j, λ ~ Beta(α, α) (Zhang et al. 2018;
function matching, Beyer et al. 2022, distils on such inputs). Each round draws as many mixtures as there are
training rows, with i and j uniform over them; the pairs and λ come from the seed alone (one wave per round).

Label-only counterpart: the same inputs with the mixed one-hot labels λ·e_{y_i} + (1 − λ)·e_{y_j}, smoothed like
the LS reference; the soft families' CE term uses the label of the larger share (y_i when λ ≥ ½).
"""
from __future__ import annotations

import numpy as np

from audit.queries.base import Ask, QueryContext, QuerySpec, SyntheticSet, one_hot

MIXUP_ALPHA = 1.0  # Beta(1, 1): λ uniform on [0, 1]


def synthesise(ctx: QueryContext, ask: Ask) -> SyntheticSet:
    n = len(ctx.y)
    rng = np.random.default_rng([ctx.seed, 1])
    xs, answers, ys, targets = [], [], [], []
    eye = one_hot(np.arange(ctx.num_classes), ctx.num_classes)
    for _ in range(ctx.rounds):
        i, j = rng.integers(0, n, size=n), rng.integers(0, n, size=n)
        lam = rng.beta(MIXUP_ALPHA, MIXUP_ALPHA, size=n).astype(np.float32)
        lx = lam[:, None, None, None]
        x = (lx * ctx.x[i] + (1 - lx) * ctx.x[j]).astype(np.float32)
        xs.append(x)
        answers.append(ask(x))
        ys.append(np.where(lam >= 0.5, ctx.y[i], ctx.y[j]))
        targets.append(lam[:, None] * eye[ctx.y[i]] + (1 - lam[:, None]) * eye[ctx.y[j]])
    return SyntheticSet(np.concatenate(xs), np.concatenate(answers), np.concatenate(ys).astype(np.int64),
                        np.concatenate(targets).astype(np.float32))


MIXUP = QuerySpec("mixup", f"λ·x_i + (1−λ)·x_j of two training rows, λ ~ Beta({MIXUP_ALPHA:g}, {MIXUP_ALPHA:g}); "
                  "--query-rounds × the training rows", synthesise=synthesise,
                  size=lambda n_train, rounds: n_train * rounds, recipe={"alpha": MIXUP_ALPHA},
                  reference="LS on the mixed one-hot labels λ·e_i + (1−λ)·e_j of the same inputs")
