"""Cross-loss influence (Silva, Chopra & Gombolay 2020): the query's objective may
differ from the training objective.

score(x, z) = Σ_c w_c <∇ l_train(x; θ_c), ∇ l_query(z; θ_c)>

The index stores ∇ l_train of every training sample; only the query side changes,
so any query objective works with an existing index. Built-in query objectives:

* ``elbo`` -- the training objective (default);
* ``reconstruction`` -- −E log P(z|ξ) only;
* ``kl`` -- KL(Q(·|z) || N(0, I)) only;
* ``elbo_beta`` -- the ELBO with another β (``beta=``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .objectives import ELBO, Objective

if TYPE_CHECKING:
    from .influence import InfluenceIndex

QUERY_OBJECTIVES = ("elbo", "reconstruction", "kl", "elbo_beta")


class ObjectiveError(ValueError):
    pass


def make_query_objective(
    index: InfluenceIndex, name: str = "elbo", *, beta: float | None = None, label: int | None = None
) -> Objective:
    """The query objective ``name`` for this index (same m and likelihood as training)."""
    train = index.objective
    if name == "elbo":
        return train
    if not isinstance(train, ELBO):
        raise ObjectiveError(f"objective {name!r} needs a VAE index; this index uses {train.name!r}")
    if name == "reconstruction":
        return ELBO(beta=0.0, likelihood=train.likelihood, m=train.m, name="reconstruction")
    if name == "kl":
        return ELBO(beta=1.0, likelihood=train.likelihood, m=train.m, recon_weight=0.0, name="kl")
    if name == "elbo_beta":
        if beta is None or beta < 0:
            raise ObjectiveError("objective 'elbo_beta' needs beta >= 0")
        return ELBO(beta=float(beta), likelihood=train.likelihood, m=train.m, name="elbo_beta")
    raise ObjectiveError(f"unknown objective {name!r}; choose from {', '.join(QUERY_OBJECTIVES)}")
