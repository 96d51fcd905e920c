"""A self-contained HTML report reproducing the VAE-TracIn paper's analyses on an index.

Kong & Chaudhuri (NeurIPS 2021), §5, on the user's own index:

* self-influence versus negative loss with a linear fit and R² (Fig. 2);
* the highest and lowest self-influence training images (Fig. 3);
* when injected outliers are known: the detection curve (fraction of injected samples found
  versus fraction of the data inspected in decreasing self-influence order) and its AUC
  (Fig. 15, Appendix B.6);
* the strongest proponents and opponents of chosen query samples (Fig. 4);
* same-class rates and latent distances of the strongest proponents / opponents (Table 2)
  and latent norms (Table 3);
* the mutual information between the input and each latent factor (arXiv 1809.01804).

:func:`write_report` writes ``report.html`` (images embedded as base64 PNG) and a JSON
sidecar with the numbers (``report.json`` next to it).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from proponent.analysis.factors import index_factors
from proponent.analysis.scoring_comparison import compare_scorings
from proponent.api.registry import PRECONDITIONS
from proponent.api.schemas import DEFAULT_SCORING, InfluenceParams
from proponent.format import whiten
from proponent.format.fsio import atomic_write_bytes, atomic_write_json
from proponent.query.index import open_index
from proponent.query.usecase import all_scores, answer_batch

SECTION_IDS = (
    "self-influence-vs-loss",
    "extremes",
    "detection",
    "proponents",
    "class-stats",
    "latent-norms",
    "scorings",
    "factors",
)
N_SCORING_QUERIES = 48  # clean training rows compared under each scoring
N_SCORING_SELF = 24
TOP_FRACTION = 0.001  # the paper's "top-0.1%" strongest proponents / opponents
N_EXTREMES = 16
N_SHOWN = 8  # proponents / opponents shown per query
N_DEFAULT_QUERIES = 4


# ------------------------------------------------------------------------------------ pure numbers


def detection_curve(
    scores: Sequence[float] | np.ndarray, is_outlier: Sequence[bool] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Outlier detection by inspecting samples in decreasing ``scores`` order.

    Returns ``(fractions_inspected, fraction_found, auc)``: after inspecting the first
    ``i`` samples (``fractions_inspected[i-1] = i / N``), ``fraction_found[i-1]`` of the
    outliers have been found. ``auc`` is the mean of ``fraction_found`` over i = 1..N (the
    area under the curve): ≈ 1 when the outliers come first, ≈ 0.5 for a random order, ≈ 0
    when they come last. Ties are broken by position (stable), so the result is deterministic.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(is_outlier, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and is_outlier ({y.size}) must have the same length")
    if s.size == 0:
        raise ValueError("detection curve of an empty set")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    n_out = int(y.sum())
    if n_out == 0:
        raise ValueError("no outliers marked: the detection curve needs at least one")
    order = np.argsort(-s, kind="stable")
    found = np.cumsum(y[order]) / n_out
    inspected = np.arange(1, s.size + 1) / s.size
    return inspected, found, float(found.mean())


def linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``y ≈ slope·x + intercept`` and its R²."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        return 0.0, float(y.mean()) if y.size else 0.0, 0.0
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 0.0
    return float(slope), float(intercept), r2


def _mean_std(v: np.ndarray) -> dict[str, float | None]:
    v = np.asarray(v, np.float64)
    if not v.size:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


# ------------------------------------------------------------------------------------ figures


def _plt():
    import matplotlib  # lazy: matplotlib only for figures

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # lazy: matplotlib only for figures

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _display(img: np.ndarray) -> tuple[np.ndarray, str | None]:
    """An image array ready for imshow, and its colormap."""
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] == 1:
        return a[0], "gray"
    if a.ndim == 3 and a.shape[0] in (3, 4):
        return np.clip(a[:3].transpose(1, 2, 0), 0, 1), None
    if a.ndim == 1:
        side = math.isqrt(a.size)
        if side * side == a.size:
            return a.reshape(side, side), "gray"
        if a.size % 3 == 0 and 3 * math.isqrt(a.size // 3) ** 2 == a.size:
            s = math.isqrt(a.size // 3)
            return a.reshape(3, s, s).transpose(1, 2, 0), None
        return a.reshape(1, -1), "gray"
    return a.reshape(a.shape[-2], a.shape[-1]), "gray"


def _font(size: int) -> Any:
    from PIL import ImageFont  # lazy: Pillow only for figures

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _grid(
    images: list[np.ndarray | None],
    titles: list[str],
    ncols: int,
    row_labels: list[str] | None = None,
    highlight: list[bool] | None = None,
    cell: int = 72,
) -> str:
    """An image grid as a base64 PNG, drawn with Pillow (much faster than one Axes per image).

    ``None`` images leave their cell empty; titles may have two lines; highlighted cells get
    a red frame.
    """
    from PIL import Image, ImageDraw  # lazy: Pillow only for figures

    font = _font(11)
    n = len(images)
    nrows = max(1, math.ceil(n / ncols))
    pad, cap = 10, 28
    left = 78 if row_labels else 0
    canvas = Image.new("RGB", (left + pad + ncols * (cell + pad), pad + nrows * (cell + cap + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for k in range(n):
        r, c = divmod(k, ncols)
        x0, y0 = left + pad + c * (cell + pad), pad + r * (cell + cap + pad)
        for j, line in enumerate(titles[k].split("\n")[:2]):
            draw.text((x0, y0 + 13 * j), line, fill="black", font=font)
        if images[k] is None:
            continue
        im, cmap = _display(images[k])  # type: ignore[arg-type]
        arr = np.round(np.clip(im, 0, 1) * 255).astype(np.uint8)
        tile = Image.fromarray(arr, mode="L" if cmap else "RGB").convert("RGB")
        scale = cell / max(tile.size)
        size = (max(1, round(tile.size[0] * scale)), max(1, round(tile.size[1] * scale)))
        tile = tile.resize(size, Image.Resampling.NEAREST)
        canvas.paste(tile, (x0, y0 + cap))
        if highlight is not None and highlight[k]:
            box = [x0 - 3, y0 + cap - 3, x0 + tile.size[0] + 2, y0 + cap + tile.size[1] + 2]
            draw.rectangle(box, outline="red", width=3)
    if row_labels:
        for r, lab in enumerate(row_labels[:nrows]):
            draw.text((4, pad + r * (cell + cap + pad) + cap + cell // 2 - 6), lab, fill="black", font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------ the report


def _parse_ids(index: Any, ids: Sequence[int] | None, what: str) -> list[int]:
    rows = []
    for i in ids or []:
        try:
            rows.append(index.row_of(int(i)))
        except KeyError:
            known = np.asarray(index.meta.ids)
            raise ValueError(
                f"{what}: sample id {i} is not in the index (ids {int(known.min())}..{int(known.max())})"
            ) from None
    return rows


def _default_queries(index: Any, seed: int, n: int, exclude: np.ndarray) -> list[int]:
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(~exclude)
    if pool.size == 0:
        pool = np.arange(index.n)
    labels = np.asarray(index.meta.labels)
    if (labels >= 0).any():  # one query per class first, so the grids show different classes
        rows: list[int] = []
        for lab in rng.permutation(np.unique(labels[pool][labels[pool] >= 0])):
            rows.append(int(rng.choice(pool[labels[pool] == lab])))
            if len(rows) == n:
                break
        return sorted(rows)
    return sorted(int(r) for r in rng.choice(pool, size=min(n, pool.size), replace=False))


@dataclass
class ReportContext:
    """What every section reads: the index, the chosen queries and outliers, settings, the numbers so far."""

    idx: Any
    q_rows: list[int]
    is_out: np.ndarray
    outlier_source: str
    convention: str
    scoring: str
    seed: int
    numbers: dict[str, Any]
    plt: Any
    precondition: str = "none"
    si: np.ndarray = field(default_factory=lambda: np.empty(0))
    neg_loss: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def n(self) -> int:
        return int(self.idx.n)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.idx.meta.labels)

    @property
    def has_labels(self) -> bool:
        return bool(self.idx.meta.has_labels)

    @property
    def mu(self) -> np.ndarray | None:
        m = self.idx.meta.latent_mu
        return None if m is None else np.asarray(m, np.float64)

    def image(self, row: int) -> np.ndarray:
        return self.idx.input(int(row))


def section_self_influence_vs_loss(ctx: ReportContext) -> str:
    """Self-influence versus negative loss (Fig. 2)."""
    idx, n, plt = ctx.idx, ctx.n, ctx.plt
    si = ctx.si = np.asarray(idx.self_influence(ctx.convention), np.float64)
    neg_loss = ctx.neg_loss = -np.asarray(idx.losses(), np.float64)
    slope, intercept, r2 = linear_fit(neg_loss, si)
    corr = float(np.corrcoef(neg_loss, si)[0, 1]) if np.ptp(si) > 0 and np.ptp(neg_loss) > 0 else 0.0
    ctx.numbers["self_influence_vs_loss"] = {"slope": slope, "intercept": intercept, "r2": r2, "pearson": corr}
    fig, ax = plt.subplots(figsize=(5.5, 4))
    show = np.random.default_rng(ctx.seed).permutation(n)[:20000]
    ax.scatter(neg_loss[show], si[show], s=4, alpha=0.4, c="tab:blue", label="training samples", linewidths=0)
    if ctx.is_out.any():
        sel = show[ctx.is_out[show]]
        ax.scatter(
            neg_loss[sel], si[sel], s=8, alpha=0.8, c="tab:red", label=f"outliers ({ctx.outlier_source})", linewidths=0
        )
    xs = np.linspace(neg_loss.min(), neg_loss.max(), 50)
    ax.plot(xs, slope * xs + intercept, "k--", label=f"linear fit, $R^2$ = {r2:.3f}")
    ax.set_xlabel("negative loss  −l(x)  (final checkpoint)")
    ax.set_ylabel(f"self-influence  Σ w_c ||g_c(x)||²  ({ctx.convention})")
    ax.legend(fontsize=8)
    return _section(
        "self-influence-vs-loss",
        "Self-influence versus negative loss",
        "Every training sample's self-influence (the weighted squared norm of its loss gradient, summed "
        "over checkpoints, from the exact unprojected norms) against its negative loss at the final "
        "checkpoint, with a least-squares line and its R² (paper Fig. 2). The paper finds that high "
        "self-influence samples have large losses, i.e. a negative slope: the model has not absorbed them. "
        f"Here: slope {slope:.4g}, R² = {r2:.3f}, Pearson r = {corr:.3f} over {n} samples.",
        _img(_png(fig), "self-influence versus negative loss"),
    )


def section_extremes(ctx: ReportContext) -> str:
    """Highest and lowest self-influence training samples (Fig. 3)."""
    si, ids = ctx.si, ctx.idx.meta.ids
    order = np.argsort(-si, kind="stable")
    k_ext = min(N_EXTREMES, ctx.n)
    hi, lo = order[:k_ext], order[::-1][:k_ext]
    ctx.numbers["extremes"] = {
        "highest": [{"id": int(ids[r]), "self_influence": float(si[r])} for r in hi],
        "lowest": [{"id": int(ids[r]), "self_influence": float(si[r])} for r in lo],
    }

    def ext_grid(rows: np.ndarray) -> str:
        return _grid(
            [ctx.image(int(r)) for r in rows],
            [f"#{int(ids[r])}\n{si[r]:.3g}" for r in rows],
            ncols=8,
            highlight=[bool(ctx.is_out[r]) for r in rows],
        )

    return _section(
        "extremes",
        "Highest and lowest self-influence training samples",
        "The training samples with the highest self-influence (top) and the lowest (bottom), titled with "
        "sample id and self-influence (paper Fig. 3); outliers are framed in red. The paper finds high "
        "self-influence samples hard to recognise or high-contrast, and low self-influence samples "
        "simple, sharing shapes or background with many others: the candidates to inspect when cleaning data.",
        "<h3>Highest self-influence</h3>"
        + _img(ext_grid(hi), "highest self-influence")
        + "<h3>Lowest self-influence</h3>"
        + _img(ext_grid(lo), "lowest self-influence"),
    )


def section_detection(ctx: ReportContext) -> str:
    """Outlier detection by self-influence (Fig. 15)."""
    n, is_out, plt = ctx.n, ctx.is_out, ctx.plt
    if not is_out.any():
        ctx.numbers["detection"] = None
        text = (
            "No outliers are known for this index: mark a data part with the <code>injected</code> flag when "
            "indexing, or pass sample ids (<code>--outliers</code>), to see the detection curve and its AUC."
        )
        return _section("detection", "Outlier detection by self-influence", text, "")
    frac, found, auc = detection_curve(ctx.si, is_out)
    _, found_loss, auc_loss = detection_curve(-ctx.neg_loss, is_out)
    ctx.numbers["detection"] = {
        "auc": auc,
        "auc_loss": auc_loss,
        "n_outliers": int(is_out.sum()),
        "source": ctx.outlier_source,
        "found_at_10pct": float(found[max(0, int(math.ceil(0.1 * n)) - 1)]),
    }
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(np.concatenate([[0], frac]), np.concatenate([[0], found]), label=f"self-influence (AUC {auc:.3f})")
    ax.plot(np.concatenate([[0], frac]), np.concatenate([[0], found_loss]), ":", label=f"loss (AUC {auc_loss:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="random order (AUC 0.5)")
    ax.set_xlabel("fraction of training data inspected")
    ax.set_ylabel("fraction of outliers found")
    ax.legend(fontsize=8)
    body = _img(_png(fig), "detection curve") + f'<p class="num">AUC = <b id="auc">{auc:.4f}</b></p>'
    origin = "the index’s injected data parts" if ctx.outlier_source == "injected" else "given by the user"
    text = (
        f"{int(is_out.sum())} samples are marked as outliers ({origin}). "
        "Inspecting the training set in decreasing self-influence order, the curve shows the fraction of "
        "them found against the fraction of data inspected (paper Fig. 15, Appendix B.6); the AUC is the "
        "mean of the curve: ≈1 for a perfect detector, ≈0.5 for a random order. The paper reports 0.887 "
        f"for EMNIST letters injected into MNIST. Here the AUC is {auc:.3f} "
        f"(ranking by loss alone: {auc_loss:.3f})."
    )
    return _section("detection", "Outlier detection by self-influence", text, body)


def _query_grid(ctx: ReportContext, r: int, shown: dict[str, list[tuple[int, float]]]) -> str:
    ids, labels = ctx.idx.meta.ids, ctx.labels
    lab_txt = (lambda rr: f" y={int(labels[rr])}") if ctx.has_labels else (lambda rr: "")
    ncols = N_SHOWN + 1
    imgs: list[np.ndarray | None] = []
    titles: list[str] = []
    for d in ("proponents", "opponents"):
        hits = shown[d]
        imgs += [ctx.image(r)] + [ctx.image(rr) for rr, _ in hits] + [None] * (ncols - 1 - len(hits))
        titles += [f"query\n#{int(ids[r])}{lab_txt(r)}"] + [f"#{int(ids[rr])}{lab_txt(rr)}\n{s:+.3g}" for rr, s in hits]
        titles += [""] * (ncols - 1 - len(hits))
    return f"<h3>Query #{int(ids[r])}</h3>" + _img(
        _grid(imgs, titles, ncols=ncols, row_labels=["proponents", "opponents"]),
        f"proponents and opponents of {int(ids[r])}",
    )


def section_proponents(ctx: ReportContext) -> str:
    """Proponents and opponents of the queries (Fig. 4), answered by the query use case; Table 2/3 statistics."""
    idx, n, labels, mu = ctx.idx, ctx.n, ctx.labels, ctx.mu
    n_top = max(1, int(math.ceil(TOP_FRACTION * (n - 1))))
    keys = ("same+", "same-", "same_all", "dist+", "dist-", "dist_all", "norm+", "norm-")
    stats: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    grids, per_query = [], []
    params = InfluenceParams(
        k=min(n, N_SHOWN + 1),
        direction="both",
        convention=ctx.convention,
        scoring=ctx.scoring,
        seed=ctx.seed,
        precondition=ctx.precondition,
    )
    sids = [int(idx.meta.ids[r]) for r in ctx.q_rows]
    # the server's answers to POST /v1/influence/batch (each one its POST /v1/influence/samples/{id}): one scan
    answers = answer_batch(idx, params, sample_ids=sids) if sids else []
    for r, sid, res in zip(ctx.q_rows, sids, answers, strict=True):
        shown = {
            d: [(idx.row_of(h.id), h.score) for h in (getattr(res, d) or []) if h.id != sid][:N_SHOWN]
            for d in ("proponents", "opponents")
        }
        scores = all_scores(idx, params, sample_id=sid)
        others = np.flatnonzero(np.arange(n) != r)
        o_sorted = others[np.argsort(-scores[others], kind="stable")]
        plus, minus = o_sorted[:n_top], o_sorted[::-1][:n_top]
        per_query.append(
            {
                "id": sid,
                "label": int(labels[r]) if ctx.has_labels else None,
                "proponents": [{"id": int(idx.meta.ids[rr]), "score": s} for rr, s in shown["proponents"]],
                "opponents": [{"id": int(idx.meta.ids[rr]), "score": s} for rr, s in shown["opponents"]],
                "self_rank": int((scores > scores[r]).sum()) + 1,
            }
        )
        if ctx.has_labels and labels[r] >= 0:
            stats["same+"].append(labels[plus] == labels[r])
            stats["same-"].append(labels[minus] == labels[r])
            stats["same_all"].append(labels[others] == labels[r])
        if mu is not None:
            d = np.linalg.norm(mu - mu[r], axis=1)
            stats["dist+"].append(d[plus])
            stats["dist-"].append(d[minus])
            stats["dist_all"].append(d[others])
            norms = np.linalg.norm(mu, axis=1)
            stats["norm+"].append(norms[plus])
            stats["norm-"].append(norms[minus])
        grids.append(_query_grid(ctx, r, shown))
    ctx.numbers["proponents"] = per_query
    ctx.numbers["_stats"] = {k: (np.concatenate(v) if v else np.array([])) for k, v in stats.items()}
    ctx.numbers["_n_top"] = n_top
    pre = "" if ctx.precondition == "none" else f" (preconditioner {ctx.precondition})"
    return _section(
        "proponents",
        f"Strongest proponents and opponents{pre}",
        "For each query (a training sample, its gradient recomputed from its exact stored input with fresh "
        "query draws, as the service answers it), the training samples with the largest influence scores "
        "(proponents, top row: they lower the query's loss) and the most negative ones (opponents, bottom row: "
        "they raise it), the query itself left out (paper Fig. 4); scoring "
        f"<code>{ctx.scoring}</code>, preconditioner <code>{ctx.precondition}</code>. Titles give sample id, "
        "label and score. The paper finds MNIST "
        "proponents visually similar to the query and opponents often the same class in a different style.",
        "".join(grids),
    )


def section_class_stats(ctx: ReportContext) -> str:
    """Same-class rates and latent distances of the strongest proponents / opponents (Table 2)."""
    cat, n_top = ctx.numbers["_stats"], ctx.numbers["_n_top"]
    class_stats: dict[str, Any] = {"top_k_per_query": n_top, "top_fraction": TOP_FRACTION, "n_queries": len(ctx.q_rows)}
    rows_html = []
    if ctx.has_labels and cat["same+"].size:
        for key, name in (
            ("same+", "same class rate (+)"),
            ("same-", "same class rate (−)"),
            ("same_all", "same class rate (all)"),
        ):
            class_stats[key.replace("+", "_plus").replace("-", "_minus")] = float(cat[key].mean())
            rows_html.append((name, f"{100 * cat[key].mean():.1f}%"))
    if ctx.mu is not None:
        for key, name in (
            ("dist+", "latent distance (+)"),
            ("dist-", "latent distance (−)"),
            ("dist_all", "latent distance (all)"),
        ):
            ms = _mean_std(cat[key])
            class_stats[key.replace("+", "_plus").replace("-", "_minus")] = ms
            rows_html.append((name, f"{ms['mean']:.3f} ± {ms['std']:.3f}"))
    ctx.numbers["class_stats"] = class_stats
    if not rows_html:
        text = "This index has neither labels nor latent means (a classifier index?), so Table 2 cannot be computed."
        return _section("class-stats", "Class and latent-distance statistics of proponents and opponents", text, "")
    text = (
        f"Over {len(ctx.q_rows)} queries, the top-{TOP_FRACTION:.1%} strongest proponents (+) and opponents (−) "
        f"of each query ({n_top} per query, at least one) compared with the whole training set (all), as in "
        "paper Table 2: the fraction sharing the query's class"
        + (" (this index has no labels, so only distances are shown)" if not ctx.has_labels else "")
        + ", and the Euclidean distance between encoder means (final checkpoint), mean ± standard deviation. "
        "The paper (MNIST) finds ~80% of proponents and ~40% of opponents in the query's class, both "
        "closer than average in latent space."
    )
    return _section(
        "class-stats",
        "Class and latent-distance statistics of proponents and opponents",
        text,
        _table(["statistic", "value"], rows_html),
    )


def section_latent_norms(ctx: ReportContext) -> str:
    """Latent norms of the strongest proponents / opponents (Table 3)."""
    mu, cat = ctx.mu, ctx.numbers["_stats"]
    if mu is None:
        ctx.numbers["latent_norms"] = None
        text = "This index stores no latent means, so latent norms cannot be computed."
        return _section("latent-norms", "Latent norms of proponents and opponents", text, "")
    latent_norms = {
        "plus": _mean_std(cat["norm+"]),
        "minus": _mean_std(cat["norm-"]),
        "all": _mean_std(np.linalg.norm(mu, axis=1)),
    }
    ctx.numbers["latent_norms"] = latent_norms
    body = _table(
        ["samples", "latent norm ||μ(x)||"],
        [
            (name, f"{latent_norms[key]['mean']:.3f} ± {latent_norms[key]['std']:.3f}")
            for key, name in (
                ("plus", "strongest proponents (+)"),
                ("minus", "strongest opponents (−)"),
                ("all", "all training samples"),
            )
        ],
    )
    text = (
        "Norms of the encoder means of the strongest proponents (+) and opponents (−) of the queries, and "
        "of all training samples (paper Table 3, mean ± standard deviation). On CIFAR the paper finds "
        "proponents with much larger norms than average: large-norm samples influence a large region."
    )
    return _section("latent-norms", "Latent norms of proponents and opponents", text, body)


def section_scorings(ctx: ReportContext) -> str:
    """Raw, cosine and RelatIF compared on the index's own data (outliers among proponents, classes, self-match)."""
    clean = np.flatnonzero(~ctx.is_out)
    rng = np.random.default_rng(ctx.seed)
    rows = np.sort(rng.choice(clean, size=min(N_SCORING_QUERIES, len(clean)), replace=False))
    res = compare_scorings(ctx.idx, rows=rows, convention=ctx.convention, seed=ctx.seed, n_self=N_SCORING_SELF)
    ctx.numbers["scorings"] = res
    has_out = res["n_injected"] > 0

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}%"

    header = ["scoring", "outliers in top-10 proponents", "same class (top-10)", "finds itself first"]
    body = _table(
        header,
        [
            (
                r["scoring"] + (" (default)" if r["scoring"] == ctx.scoring else ""),
                pct(r["injected_share_proponents"]) if has_out else "—",
                pct(r["same_class_proponents"]),
                pct(r["self_top1"]),
            )
            for r in res["scorings"]
        ],
    )
    ratio = res["self_influence_ratio"]
    text = (
        f"The top-10 proponents of {res['n_queries']} clean training samples (each left out of its own list), "
        "under each query-time scoring: <code>raw</code> (paper eq. 10), <code>cosine</code> (per-checkpoint "
        "unit-normalised gradients) and <code>relatif</code> (divided by the square root of the training "
        "sample's self-influence). Raw scores grow with a training sample's gradient norm, so samples with "
        "large gradients -- outliers -- crowd the proponents of ordinary queries; the other two remove that. "
    )
    if has_out:
        text += (
            f"{res['n_injected']} samples ({res['injected_fraction']:.1%}) are marked as outliers; their median "
            f"self-influence is {ratio:.1f}× the clean samples'. "
        )
    else:
        text += "No outliers are marked in this index, so the outlier column is empty. "
    text += (
        f"'Finds itself first': the share of {res['n_self']} training samples whose exact input, queried, has "
        "itself as its strongest proponent."
    )
    return _section("scorings", "Scorings compared", text, body)


def section_factors(ctx: ReportContext) -> str:
    """Influential latent factors (mutual information), via the same analysis as the API and CLI."""
    if ctx.mu is None:
        ctx.numbers["factors"] = None
        text = "This index stores no latent posteriors (not a VAE), so no factor analysis."
        return _section("factors", "Influential latent factors", text, "")
    res = ctx.numbers["factors"] = index_factors(ctx.idx, seed=ctx.seed)
    mi = np.asarray(res["mi"])
    inf = set(res["influential"])
    fig, ax = ctx.plt.subplots(figsize=(max(4, 0.35 * mi.size + 1.5), 3.2))
    ax.bar(np.arange(mi.size), mi, color=["tab:blue" if j in inf else "tab:gray" for j in range(mi.size)])
    ax.axhline(res["threshold"], color="k", ls=":", lw=0.8)
    ax.set_xlabel("latent dimension j")
    ax.set_ylabel("I(x; z_j)  [nats]")
    ax.set_xticks(np.arange(mi.size))
    text = (
        f"Mutual information between the input and each latent factor, estimated on {res['rows_used']} training "
        "samples from the stored encoder posteriors (arXiv 1809.01804). Blue factors are influential "
        f"(≥ {res['threshold']:.3g} nats), grey ones collapsed to the prior: {len(inf)} of "
        f"{mi.size} factors carry information."
    )
    return _section(
        "factors", "Influential latent factors", text, _img(_png(fig), "mutual information per latent factor")
    )


SECTIONS = (
    section_self_influence_vs_loss,
    section_extremes,
    section_detection,
    section_proponents,
    section_class_stats,
    section_latent_norms,
    section_scorings,
    section_factors,
)


def write_report(
    index_path: str | Path,
    out_html: str | Path,
    *,
    queries: Sequence[int] | None = None,
    outliers: Sequence[int] | None = None,
    convention: str = "lr",
    scoring: str | None = None,
    seed: int = 0,
    index: Any = None,
    precondition: str = "none",
) -> Path:
    """Write the analysis report of the index at ``index_path`` to ``out_html``.

    Args:
        queries: sample ids whose proponents / opponents are shown and whose statistics
            (Table 2, Table 3) are computed; default: a few training samples of different classes.
        outliers: sample ids known to be outliers, for the detection curve; default: the rows
            the index marks as injected (``injected`` data parts), if any.
        convention: checkpoint weights, ``lr`` or ``visits``.
        scoring: raw | cosine | relatif (default: the API's default scoring).
        precondition: none | gram | kfac | ekfac: the preconditioner of the proponents/opponents section (each needs a
            stored one: ``proponent precondition``); named in that section's header.
        seed: chooses the default queries and the query-side noise draws.
        index: an already opened :class:`~proponent.query.index.InfluenceIndex` (skips re-opening).

    Returns the HTML path; the numbers are also written to ``<out_html stem>.json``.
    """
    if convention not in ("lr", "visits"):
        raise ValueError(f"convention must be 'lr' or 'visits', got {convention!r}")
    t0 = time.perf_counter()
    idx = index if index is not None else open_index(index_path, device="cpu", use_gpu_faiss=False)
    out_html = Path(out_html)
    if outliers is not None:
        is_out = np.zeros(idx.n, bool)
        is_out[_parse_ids(idx, outliers, "outliers")] = True
        outlier_source = "given"
    else:
        is_out = np.asarray(idx.meta.injected, dtype=bool).copy()
        outlier_source = "injected"
    q_rows = (
        _parse_ids(idx, queries, "queries")
        if queries is not None
        else _default_queries(idx, seed, N_DEFAULT_QUERIES, is_out)
    )
    if not q_rows:
        raise ValueError("queries: give at least one sample id")
    numbers: dict[str, Any] = {
        "index": str(Path(index_path)),
        "n": idx.n,
        "checkpoints": len(idx.checkpoints),
        "convention": convention,
        "scoring": scoring or DEFAULT_SCORING,
        "precondition": PRECONDITIONS.check(precondition),
        "seed": seed,
        "queries": [int(idx.meta.ids[r]) for r in q_rows],
        "fidelity": None if idx.manifest.fidelity is None else idx.manifest.fidelity.model_dump(),
    }
    ctx = ReportContext(
        idx, q_rows, is_out, outlier_source, convention, scoring or DEFAULT_SCORING, seed, numbers, _plt(), precondition
    )
    sections = [section(ctx) for section in SECTIONS]
    numbers.pop("_stats", None)
    numbers.pop("_n_top", None)
    numbers["seconds"] = time.perf_counter() - t0
    doc = _document(idx, numbers, sections)
    atomic_write_bytes(out_html, doc.encode("utf-8"))
    atomic_write_json(out_html.with_suffix(".json"), numbers)
    return out_html


# ------------------------------------------------------------------------------------ HTML


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _section(sid: str, title: str, text: str, body: str) -> str:
    return f'<section id="{sid}">\n<h2>{html.escape(title)}</h2>\n<p>{text}</p>\n{body}\n</section>\n'


def _table(header: list[str], rows: Sequence[tuple[str, ...]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em} h3{font-size:1em;color:#444}
p{line-height:1.45} img{max-width:100%} table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.3em .8em;text-align:left} code{background:#f4f4f4;padding:0 .2em}
nav a{margin-right:1em} .num{font-size:1.1em} .meta{color:#666;font-size:.9em}
.warn{color:#7a4b00;background:#fff4d6;border:1px solid #e8c36a;padding:.3em .5em}
"""


def _document(idx: Any, numbers: dict[str, Any], sections: list[str]) -> str:
    man = idx.manifest
    model = man.model.config.get("kind", "builtin") if man.model.config else f"user model ({man.model.plugin.factory})"
    meta = (
        f"Index <code>{html.escape(str(idx.where))}</code>: {man.n} samples of "
        f"<code>{html.escape(man.dataset.spec)}</code>, {model} model (latent {man.model.latent_dim}), "
        f"{len(man.checkpoints)} checkpoints, m = {man.objective.m}, projection "
        f"{man.projection.kind} (D = {man.dim} {man.storage.dtype}), weights convention "
        f"<code>{numbers['convention']}</code>, scoring <code>{numbers['scoring']}</code>."
    )
    whitened = whiten.describe(man)
    if whitened:
        meta += f' <span id="whiten">{html.escape(whitened[0].upper() + whitened[1:])}.</span>'

    nav = "".join(f'<a href="#{s}">{s}</a>' for s in SECTION_IDS)
    fid = man.fidelity
    if fid is None:
        fidelity = '<p class="meta" id="fidelity">No fidelity check recorded (an index built before it existed).</p>'
    else:
        warn = fid.warning()
        rows = [
            (
                str(ch.checkpoint),
                f"{ch.recall_proponents:.2f}",
                f"{ch.recall_opponents:.2f}",
                f"{ch.relative_error:.3f}",
            )
            for ch in fid.checkpoints
        ]
        fidelity = (
            f'<div id="fidelity"><p class="meta">Fidelity of the stored features ({fid.queries} rows scored against '
            f"{fid.pool} others, against exact gradients; medians; bar {fid.bar_proponents:.2f} / "
            f"{fid.bar_opponents:.2f}):</p>"
            + _table(["checkpoint", f"recall@{fid.top} proponents", "opponents", "relative score error"], rows)
            + (f'<p class="warn"><b>Warning:</b> {html.escape(warn)}</p>' if warn else "")
            + "</div>\n"
        )
    blob = json.dumps(numbers, default=float).replace("</", "<\\/")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>proponent report</title>'
        f"<style>{_CSS}</style></head><body>\n<h1>Influence report (VAE-TracIn)</h1>\n"
        f'<p class="meta">{meta}</p>\n{fidelity}<nav>{nav}</nav>\n'
        + "".join(sections)
        + f'<script type="application/json" id="numbers">{blob}</script>\n</body></html>\n'
    )
