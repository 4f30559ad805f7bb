"""Figures and the report: one colour per format everywhere, labelled axes, PNGs, skipped figures noted."""

from __future__ import annotations

import json

import matplotlib.colors as mcolors
import pytest

from echochamber import plots, report, store
from echochamber.formats import FORMATS
from test_store import write_fake_results

MIXTURES = {"mixA": {"as": 1, "tg": 1}, "mixA2": {"as": 1, "tg": 2}, "mixA4": {"as": 1, "tg": 4},
            "mixB": {"as": 1, "omi1": 1}}
RICH = [
    {"mixture": "mixA", "scale": "s", "algo": "ppo", "kl": 0.0, "seed": 0},
    {"mixture": "mixA", "scale": "s", "algo": "ppo", "kl": 0.0, "seed": 1},
    {"mixture": "mixA", "scale": "s", "algo": "ppo", "kl": 0.01, "seed": 0},
    {"mixture": "mixA2", "scale": "s", "algo": "ppo", "kl": 0.0, "seed": 0},
    {"mixture": "mixA4", "scale": "s", "algo": "ppo", "kl": 0.0, "seed": 0},
    {"mixture": "mixA", "scale": "m", "algo": "ppo", "kl": 0.0, "seed": 0},
    {"mixture": "mixA", "scale": "s", "algo": "grpo", "kl": 0.001, "seed": 0},
    {"mixture": "mixA", "scale": "s", "algo": "ei", "kl": 0.0, "seed": 0},
]


def _store(tmp_path, cells, mixtures_written=None):
    files, grid = write_fake_results(tmp_path / "results", cells)
    db = tmp_path / "results" / "echo.duckdb"
    store.build(db, files, cells=grid, benchmarks=["test", "hard"])
    return db


@pytest.fixture(scope="module")
def rich_sets(tmp_path_factory):
    db = _store(tmp_path_factory.mktemp("rich"), RICH)
    curves, bench = plots.load_curves(db)
    assert bench == "test"
    sets = plots.build_figures(curves, plots.load_rollouts(db), plots.load_before_after(db), MIXTURES, ["s", "m"])
    yield sets
    for fs in sets:
        for _, _, fig in fs.figures:
            plots.plt.close(fig)


def test_colour_map_has_one_distinct_colour_per_format():
    assert set(plots.FORMAT_COLORS) == set(FORMATS)
    rgb = {mcolors.to_hex(c) for c in plots.FORMAT_COLORS.values()}
    assert len(rgb) == len(FORMATS)
    metric_colours = {mcolors.to_hex(s["color"]) for s in plots.METRIC_STYLES.values()}
    assert not rgb & metric_colours


def test_every_figure_uses_the_format_colours_and_labels_its_axes(rich_sets):
    drawn = {fs.id: len(fs.figures) for fs in rich_sets}
    # fig1 per cell (seeds averaged); fig2: mixA/s/ppo has 2 KLs; fig3: tg x1, x2, x4 at s/ppo/kl0;
    # fig4: mixA at s and m; fig5: ppo, grpo, ei on mixA/s; fig6: one transfer figure
    assert drawn == {"fig1": 7, "fig2": 1, "fig3": 1, "fig4": 1, "fig5": 1, "fig6": 1}
    assert all(fs.note is None for fs in rich_sets)
    format_hex = {mcolors.to_hex(c) for c in plots.FORMAT_COLORS.values()}
    n_format_lines = 0
    for fs in rich_sets:
        for stem, _caption, fig in fs.figures:
            for ax in fig.axes:
                assert ax.get_xlabel() and ax.get_ylabel(), (stem, ax.get_title())
                for line in ax.get_lines():
                    colour = mcolors.to_hex(line.get_color())
                    gid = line.get_gid() or ""
                    if gid.startswith("format:"):
                        assert colour == mcolors.to_hex(plots.FORMAT_COLORS[gid.split(":")[1]]), stem
                        n_format_lines += 1
                    else:
                        assert colour not in format_hex, (stem, line.get_label())
    assert n_format_lines >= 3 * (7 + 2 + 3 + 2 + 3)


def test_figure3_columns_follow_the_repeated_dataset(rich_sets):
    fig3 = next(fs for fs in rich_sets if fs.id == "fig3")
    (stem, caption, fig), = fig3.figures
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["tg x1 (mixA)", "tg x2 (mixA2)", "tg x4 (mixA4)"]
    assert "tg repeated 1, 2, 4x" in caption


def test_repetition_families_are_detected_from_weights():
    fams = plots.repetition_families({
        "as_fm3_tg": {"as": 1, "fm3": 1, "tg": 1},
        "as_fm3_2xtg": {"as": 1, "fm3": 1, "tg": 2},
        "as_fm3_tg_1xomi1": {"as": 1, "fm3": 1, "tg": 1, "omi1": 1},
        "as_fm3_tg_4xomi1": {"as": 1, "fm3": 1, "tg": 1, "omi1": 4},
        "as_fm3_omi2_mmqa": {"as": 1, "fm3": 1, "omi2": 1, "mmqa": 1},
    })
    assert ("tg", [(1.0, "as_fm3_tg"), (2.0, "as_fm3_2xtg")]) in fams
    assert ("omi1", [(0.0, "as_fm3_tg"), (1.0, "as_fm3_tg_1xomi1"), (4.0, "as_fm3_tg_4xomi1")]) in fams
    assert len(fams) == 2


def test_absent_cells_are_skipped_with_a_note_and_pngs_written(tmp_path):
    db = _store(tmp_path, RICH[:1])
    out = tmp_path / "results" / "figures"
    sets = plots.render_all(db, out, MIXTURES, ["s"])
    by_id = {fs.id: fs for fs in sets}
    assert by_id["fig1"].files and by_id["fig6"].files and by_id["fig1"].note is None
    for fid in ("fig2", "fig3", "fig4", "fig5"):
        assert by_id[fid].note.startswith("skipped:") and not by_id[fid].files
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(by_id["fig1"].files + by_id["fig6"].files)
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    manifest = json.loads((out / "figures.json").read_text())
    assert [m["id"] for m in manifest] == ["fig1", "fig2", "fig3", "fig4", "fig5", "fig6"]
    assert manifest[1]["note"].startswith("skipped:") and manifest[1]["figures"] == []


def test_no_rl_cells_draws_nothing_empty(tmp_path):
    files, grid = write_fake_results(tmp_path / "r", RICH[:1])
    db = tmp_path / "r" / "echo.duckdb"
    store.build(db, [f for f in files if "algo=ppo" not in f and "/rl/" not in f], benchmarks=["test", "hard"])
    sets = plots.render_all(db, tmp_path / "figs", MIXTURES)
    assert all(fs.note and not fs.files for fs in sets)
    assert not list((tmp_path / "figs").glob("*.png"))


def test_report_and_summary(tmp_path):
    db = _store(tmp_path, RICH[:3])
    res = tmp_path / "results"
    sets = report.build(db, res / "report.html", res / "figures", res / "summary.txt", mixtures=MIXTURES,
                        scales=["s"])
    page = (res / "report.html").read_text()
    for fs in sets:
        for f in fs.files:
            assert f"src='figures/{f}'" in page
            assert (res / "figures" / f).exists()
        if fs.note:
            assert fs.note in page
    assert "Which format won" in page and "<table" in page
    assert "Machine: CPU Fake CPU (avx2 fma); GPU none; torch threads 2 (5 cells)" in page   # 2 pretraining, 3 RL cells
    text = (res / "summary.txt").read_text()
    assert text.strip() == report.summary(db)
    assert "mixA · s · ppo · KL 0 · seed 0" in text and "mixA · s · ppo · KL 0.01 · seed 0" in text
    assert "before RL (step     0): tinygsm 0.30  omi1 0.20  text 0.50   pass@1 0.200" in text
    assert "after RL  (step    10): tinygsm 1.00  omi1 0.00  text 0.00   pass@1 0.600" in text
    assert "most common format after RL: tinygsm" in text
    assert "pass@1 on other benchmarks: hard 0.200 -> 0.600" in text
    assert f"report: {res / 'report.html'}" in text and "not built" not in text
    assert report.main([str(db)]) == 0
    assert report.main([str(tmp_path / "nope.duckdb")]) == 1
