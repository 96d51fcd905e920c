"""The API's named choices, each kind listed once: scorings (and, the same way, any other kind of choice).

A :class:`Registry` holds the names of one kind (a ``Literal`` type, so the wire schema, the client's
signatures and mypy all see them), a one-line summary of each and the default. Everything else asks
it: the request schema's type and description, the CLI's ``choices``, ``GET /v1/index``'s list,
the web page (from that list), the analyses. The implementations register against the same names
(scorings: :data:`proponent.query.scoring.SCORERS`; a test checks that both sides list the same).

To add a kind of choice, write its ``Literal`` and a ``Registry`` next to :data:`SCORINGS`; to add
a scoring, add its name to :data:`ScoringName`, its summary here and its implementation in
:mod:`proponent.query.scoring`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args, overload

__all__ = ["PRECONDITIONS", "SCORINGS", "PreconditionName", "Registry", "ScoringName"]


class Registry(Sequence[str]):
    """The names of one kind of choice (a ``Literal``), their summaries and the default; a sequence of the names."""

    def __init__(self, kind: str, names: Any, summaries: Mapping[str, str], default: str):
        self.kind = kind
        self.names: tuple[str, ...] = tuple(get_args(names))
        if set(summaries) != set(self.names):
            raise TypeError(f"{kind}: summaries for {sorted(summaries)} but the names are {list(self.names)}")
        if default not in self.names:
            raise TypeError(f"{kind}: default {default!r} is not one of {list(self.names)}")
        self.summaries = dict(summaries)
        self.default = default

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[str, ...]: ...
    def __getitem__(self, i: int | slice) -> str | tuple[str, ...]:
        return self.names[i]

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self.names)}, default={self.default!r})"

    def check(self, name: str) -> str:
        """``name`` when it is one of the names, else a one-line ValueError listing them."""
        if name not in self.names:
            raise ValueError(f"{self.kind} must be one of {', '.join(self.names)}, got {name!r}")
        return name

    def describe(self) -> str:
        """One line per choice, default marked: for help texts and the schema's descriptions."""
        return "; ".join(f"{n} ({self.summaries[n]})" + (" [default]" if n == self.default else "") for n in self.names)


ScoringName = Literal["raw", "cosine", "relatif"]
SCORINGS = Registry(
    "scoring",
    ScoringName,
    {
        "raw": "paper eq. 10",
        "cosine": "per-checkpoint unit-normalised gradients",
        "relatif": "divided by the square root of the training sample's self-influence",
    },
    # measured: benchmarks/outliers.py, benchmarks/lds.py (README "Scoring")
    default="cosine",
)

PreconditionName = Literal["none", "gram", "kfac", "ekfac", "adam"]
PRECONDITIONS = Registry(
    "precondition",
    PreconditionName,
    {
        "none": "plain gradient inner products",
        "gram": "TRAK's (Φ_cᵀΦ_c + λ_c I)⁻¹ over the stored features, applied to the query "
        "(needs `proponent precondition --index DIR`)",
        "kfac": "K-FAC per layer (kronfluence's (S ⊗ A + λI)⁻¹) on the query's exact gradient "
        "(needs `proponent precondition --index DIR --kind kfac`)",
        "ekfac": "EK-FAC per layer (K-FAC's eigenbases, eigenvalues fitted to the training gradients) on the "
        "query's exact gradient (needs `proponent precondition --index DIR --kind ekfac`)",
        "adam": "Adam's second moments per layer, diag(1/(v̂ + λ)), from the checkpoints' optimizer state, on the "
        "query's exact gradient (needs `proponent precondition --index DIR --kind adam`)",
    },
    # measured: benchmarks/lds_precondition.py (LDS +0.002 [-0.001, +0.005] over raw at α=1000: README "Queries")
    default="none",
)
