"""The analysis report and the analysis CLI commands.

The end-to-end test injects rendered letters (A-Z, Pillow's default font) into the digits,
trains a small VAE, indexes it and checks that the report finds the letters by
self-influence (detection AUC >= 0.8, paper Fig. 15) and has every section.
"""

from __future__ import annotations

import json
import re
import shutil
import string

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from proponent import cli
from proponent.analysis.report import SECTION_IDS, detection_curve, linear_fit, write_report
from proponent.indexer.data import load_dataset
from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import ModelConfig
from proponent.model.projection import ProjectionSpec
from proponent.query.index import open_index

N_LETTERS = 40  # 2% of the data, like the paper's 1000 EMNIST letters in 60000 MNIST digits


# ------------------------------------------------------------------------------------ detection_curve


def test_detection_curve_perfect_ranking():
    scores = np.arange(100, 0, -1, dtype=float)  # row 0 scores highest
    is_out = np.zeros(100, bool)
    is_out[:5] = True
    frac, found, auc = detection_curve(scores, is_out)
    assert frac[0] == pytest.approx(0.01) and frac[-1] == 1.0
    assert found[4] == 1.0 and found[3] == pytest.approx(0.8)
    assert np.all(np.diff(found) >= 0)
    assert auc == pytest.approx(1 - 4 / 2 / 100)  # mean of (0.2, 0.4, ..., 1, 1, ...)
    assert auc > 0.95


def test_detection_curve_reversed_ranking():
    scores = np.arange(100, dtype=float)  # outliers (rows 0-4) score lowest
    is_out = np.zeros(100, bool)
    is_out[:5] = True
    _, found, auc = detection_curve(scores, is_out)
    assert found[94] == 0.0 and found[-1] == 1.0
    assert auc == pytest.approx(3 / 100)  # (0.2 + 0.4 + 0.6 + 0.8 + 1.0) / 100
    assert auc < 0.05


def test_detection_curve_random_and_single():
    rng = np.random.default_rng(0)
    is_out = rng.random(20000) < 0.05
    _, _, auc = detection_curve(rng.random(20000), is_out)
    assert auc == pytest.approx(0.5, abs=0.03)
    # one outlier at rank r (1-based) of N: the curve is 0 before r and 1 from r on
    _, found, auc = detection_curve([3.0, 9.0, 1.0, 5.0], [False, False, False, True])
    assert found.tolist() == [0.0, 1.0, 1.0, 1.0] and auc == pytest.approx(0.75)
    # all outliers: found rises linearly
    _, _, auc = detection_curve([1.0, 2.0], [True, True])
    assert auc == pytest.approx(0.75)


def test_detection_curve_ties_are_stable():
    _, found, auc = detection_curve(np.zeros(4), [True, False, False, False])
    assert found.tolist() == [1.0, 1.0, 1.0, 1.0] and auc == 1.0


def test_detection_curve_errors():
    with pytest.raises(ValueError, match="no outliers"):
        detection_curve([1.0, 2.0], [False, False])
    with pytest.raises(ValueError, match="same length"):
        detection_curve([1.0, 2.0], [True])
    with pytest.raises(ValueError, match="empty"):
        detection_curve([], [])
    with pytest.raises(ValueError, match="finite"):
        detection_curve([np.nan, 1.0], [True, False])


def test_linear_fit():
    x = np.linspace(0, 1, 50)
    slope, intercept, r2 = linear_fit(x, 3 * x - 1)
    assert slope == pytest.approx(3) and intercept == pytest.approx(-1) and r2 == pytest.approx(1)
    _, _, r2 = linear_fit(x, np.random.default_rng(0).normal(size=50))
    assert r2 < 0.2


# ------------------------------------------------------------------------------------ end to end


def render_letters(n: int = N_LETTERS, seed: int = 0) -> np.ndarray:
    """``n`` capital letters (A-Z cycling) as 8x8 uint8 images: drawn bold at 32x32, resized."""
    rng = np.random.default_rng(seed)
    try:
        font = ImageFont.load_default(size=36)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        font = ImageFont.load_default()
    out = []
    for i in range(n):
        im = Image.new("L", (32, 32), 0)
        xy = (16 + int(rng.integers(-2, 3)), 16 + int(rng.integers(-2, 3)))
        ImageDraw.Draw(im).text(
            xy, string.ascii_uppercase[i % 26], fill=255, font=font, anchor="mm", stroke_width=2, stroke_fill=255
        )
        out.append(np.asarray(im.resize((8, 8), Image.BILINEAR), dtype=np.float32))
    x = np.stack(out)
    return np.round(255 * x / max(x.max(), 1.0)).astype(np.uint8)


@pytest.fixture(scope="module")
def letters_index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    np.savez(tmp / "letters.npz", x=render_letters())
    data = load_dataset(f"digits+npz:{tmp / 'letters.npz'},injected")
    assert int(data.injected.sum()) == N_LETTERS
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, latent_dim=8, hidden=(64, 32), likelihood="bernoulli")
    run = train(
        data, cfg, tmp / "run", TrainConfig(epochs=8, batch_size=64, checkpoints=3, seed=0), show_progress=False
    )
    specs, _ = checkpoints_from_run(run)
    opts = IndexOptions(m=4, projection=ProjectionSpec(kind="kron", k=8), featurizer="dense", device="cpu")
    return build_index(data, specs, tmp / "idx", opts, show_progress=False)


def test_report_detects_injected_letters(letters_index, tmp_path):
    out = write_report(letters_index, tmp_path / "report.html", seed=0)
    doc = out.read_text()
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in doc, sid
    assert doc.count("data:image/png;base64,") >= 5  # self-contained: figures embedded
    numbers = json.loads((tmp_path / "report.json").read_text())
    det = numbers["detection"]
    assert det["n_outliers"] == N_LETTERS and det["source"] == "injected"
    assert det["auc"] >= 0.8, det
    m = re.search(r'id="auc">([0-9.]+)<', doc)
    assert m and float(m.group(1)) == pytest.approx(det["auc"], abs=1e-4)
    # the paper's Fig. 2: high self-influence goes with large loss (negative slope in -loss)
    assert numbers["self_influence_vs_loss"]["slope"] < 0
    cs = numbers["class_stats"]
    assert 0 <= cs["same_plus"] <= 1 and cs["top_k_per_query"] >= 1 and cs["n_queries"] >= 1
    assert numbers["latent_norms"]["all"]["n"] == numbers["n"]
    assert len(numbers["factors"]["mi"]) == 8
    sc = {r["scoring"]: r for r in numbers["scorings"]["scorings"]}
    assert set(sc) == {"raw", "cosine", "relatif"} and numbers["scorings"]["n_injected"] == N_LETTERS
    assert all(0 <= r["injected_share_proponents"] <= 1 and 0 <= r["self_top1"] <= 1 for r in sc.values())
    assert numbers["scoring"] == "cosine" and "cosine (default)" in doc
    for q in numbers["proponents"]:
        assert len(q["proponents"]) > 0 and len(q["opponents"]) > 0
        assert all(p["id"] != q["id"] for p in q["proponents"] + q["opponents"])  # the query itself is left out


def test_report_with_given_queries_and_outliers(letters_index, tmp_path):
    out = write_report(letters_index, tmp_path / "r.html", queries=[3, 100], outliers=[0, 1, 2], convention="visits")
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert numbers["queries"] == [3, 100] and numbers["convention"] == "visits"
    assert numbers["detection"]["n_outliers"] == 3 and numbers["detection"]["source"] == "given"
    with pytest.raises(ValueError, match="not in the index"):
        write_report(letters_index, tmp_path / "bad.html", queries=[10**9])
    # the proponents section with the Gram preconditioner: named in its header; none stored: the command named
    with pytest.raises(ValueError, match="proponent precondition --index"):
        write_report(letters_index, tmp_path / "nopre.html", queries=[3], precondition="gram")
    copy = tmp_path / "idx"
    shutil.copytree(letters_index, copy)
    assert cli.main(["precondition", "--index", str(copy)]) == 0
    doc = write_report(copy, tmp_path / "g.html", queries=[3], precondition="gram").read_text()
    assert "Strongest proponents and opponents (preconditioner gram)" in doc
    numbers = json.loads((tmp_path / "g.json").read_text())
    want = open_index(copy, device="cpu").influence(sample_id=3, k=8, direction="proponents", precondition="gram")
    assert numbers["precondition"] == "gram"
    assert [p["id"] for p in numbers["proponents"][0]["proponents"]][:3] == [i for i in want.ids() if i != 3][:3]


# ------------------------------------------------------------------------------------ CLI


def test_cli_analysis_commands(letters_index, tmp_path, capsys):
    assert cli.main(["classical", "--method", "kde", "--out", str(tmp_path / "cl")]) == 0
    assert sorted(p.name for p in (tmp_path / "cl").iterdir()) == [
        "kde_influence_over_test.png",
        "kde_self_influence.png",
    ]

    capsys.readouterr()
    assert cli.main(["factors", "--index", str(letters_index), "--json"]) == 0
    fac = json.loads(capsys.readouterr().out)
    assert len(fac["mi"]) == 8 and sorted(fac["influential"] + fac["collapsed"]) == list(range(8))
    assert cli.main(["factors", "--index", str(letters_index)]) == 0
    assert "influential:" in capsys.readouterr().out

    ids = tmp_path / "ids.txt"
    ids.write_text("# outliers\n1800\n1801, 1802\n")
    html = tmp_path / "rep.html"
    assert (
        cli.main(
            [
                "report",
                "--index",
                str(letters_index),
                "--out",
                str(html),
                "--queries",
                "4",
                "--outliers",
                f"@{ids}",
                "--convention",
                "visits",
            ]
        )
        == 0
    )
    assert "AUC" in capsys.readouterr().out
    assert json.loads(html.with_suffix(".json").read_text())["detection"]["n_outliers"] == 3

    assert cli.main(["influence", "--index", str(letters_index), "--sample-id", "7", "--k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["proponents"]) == 3 and len(res["opponents"]) == 3
    assert res["proponents"][0]["score"] >= res["proponents"][-1]["score"]
    assert res["opponents"][0]["score"] <= res["opponents"][-1]["score"] < 0

    img = tmp_path / "q.png"
    Image.fromarray(render_letters(1)[0]).save(img)
    assert (
        cli.main(
            [
                "influence",
                "--index",
                str(letters_index),
                "--image",
                str(img),
                "--k",
                "2",
                "--direction",
                "proponents",
                "--objective",
                "reconstruction",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("proponents (exact; scoring ")
    # no opponents section (a fidelity note among the approximations may still name opponents' recall)
    assert not any(line.startswith("opponents") for line in out.splitlines())
    assert (
        cli.main(
            [
                "influence",
                "--index",
                str(letters_index),
                "--sample-id",
                "7",
                "--k",
                "2",
                "--objective",
                "probe",
                "--json",
            ]
        )
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["proponents"]) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["influence", "--k", "2"], "exactly one of --sample-id"),
        (["influence", "--sample-id", "99999"], "not in the index"),
        (["influence", "--sample-id", "1", "--objective", "elbo_beta"], "needs beta"),
        (["influence", "--sample-id", "1", "--objective", "nope"], "unknown objective"),
        (["report", "--out", "X", "--queries", "99999"], "not in the index"),
        (["report", "--out", "X", "--outliers", "@/nonexistent/ids.txt"], "cannot read id file"),
    ],
)
def test_cli_errors(letters_index, tmp_path, capsys, argv, message):
    argv = [a.replace("X", str(tmp_path / "x.html")) for a in argv]
    argv = [argv[0], "--index", str(letters_index), *argv[1:]]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse type errors exit directly
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 or message in err.splitlines()[-1]
