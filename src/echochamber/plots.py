"""The paper's figures, drawn from the results store for whatever the grid contains.

1. Format share over RL steps with pass@1 / pass@k / maj@k beneath, one figure per RL cell.
2. The same side by side for each KL coefficient of a (mixture, scale, algorithm).
3. Mixtures that differ only in how often one dataset is repeated (detected from the mixture weights).
4. Scales on the same mixture.
5. PPO vs GRPO vs Expert Iteration on the same mixture and scale.
6. Transfer: pass@1 before and after RL on every benchmark.

A figure whose cells are absent from the grid is skipped with a note, never drawn empty. Every format
has one colour in every figure (``FORMAT_COLORS``); every axis is labelled. Seeds are averaged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from echochamber.formats import FORMATS  # noqa: E402

FORMAT_COLORS = {"tinygsm": "#1f77b4", "omi1": "#ff7f0e", "text": "#2ca02c"}
FORMAT_LABELS = {"tinygsm": "TinyGSM (code)", "omi1": "OMI1 (code + text)", "text": "text"}
METRIC_STYLES = {
    "pass1": {"color": "black", "linestyle": "-", "marker": "o"},
    "pass_k": {"color": "0.45", "linestyle": "--", "marker": "s"},
    "maj_k": {"color": "#9467bd", "linestyle": ":", "marker": "^"},
}
ALGO_ORDER = ("ppo", "grpo", "ei")
CURVE_COLUMNS = (*(f"share_{f}" for f in FORMATS), "pass1", "pass_k", "maj_k")


@dataclass
class FigureSet:
    """One of the paper's figures: the PNGs drawn for this grid, or the note saying why it was skipped."""
    id: str
    title: str
    figures: list[tuple[str, str, object]] = field(default_factory=list)  # (file stem, caption, Figure)
    note: str | None = None
    files: list[str] = field(default_factory=list)


def metric_label(metric: str, k: int) -> str:
    return {"pass1": "pass@1 (greedy)", "pass_k": f"pass@{k}", "maj_k": f"maj@{k}"}[metric]


def cell_label(row, keys=("mixture", "scale", "algo", "kl")) -> str:
    parts = []
    for key in keys:
        v = row[key]
        parts.append(f"KL {float(v):g}" if key == "kl" else str(v))
    return " · ".join(parts)


def _slug(*parts) -> str:
    return "_".join(str(p).replace("/", "-").replace(" ", "") for p in parts)


# ------------------------------------------------------------------------------------------ data


def load_curves(db_path: str | os.PathLike, benchmark: str | None = None) -> tuple[pd.DataFrame, str | None]:
    """Evaluation curves of every RL cell on one benchmark (step 0 = base model), averaged over seeds."""
    from echochamber import store

    if benchmark is None:
        benchmarks = store.meta(db_path)["benchmarks"]
        benchmark = benchmarks[0] if benchmarks else None
    if benchmark is None:
        return pd.DataFrame(columns=["mixture", "scale", "algo", "kl", "step", "k", "seeds", *CURVE_COLUMNS]), None
    means = ", ".join(f"avg({c}) AS {c}" for c in CURVE_COLUMNS)
    df = store.fetch(db_path, f"SELECT mixture, scale, algo, kl, step, any_value(k) AS k, count(*) AS seeds, {means} "
                              f"FROM eval_curves WHERE benchmark = ? GROUP BY mixture, scale, algo, kl, step "
                              f"ORDER BY mixture, scale, algo, kl, step", [benchmark])
    return df, benchmark


def load_rollouts(db_path: str | os.PathLike) -> pd.DataFrame:
    """Format shares of the RL training rollouts per step, averaged over seeds."""
    from echochamber import store

    shares = ", ".join(f"avg(share_{f}) AS share_{f}" for f in FORMATS)
    return store.fetch(db_path, f"SELECT mixture, scale, algo, kl, step, {shares} FROM rl_steps "
                                f"GROUP BY mixture, scale, algo, kl, step ORDER BY mixture, scale, algo, kl, step")


def load_before_after(db_path: str | os.PathLike) -> pd.DataFrame:
    from echochamber import store

    return store.fetch(db_path, "pass1_before_after")


# ------------------------------------------------------------------------------------------ drawing


def _steps_axis(ax, steps) -> None:
    ax.set_xlabel("RL step")
    if len(steps) and max(steps) > 20:
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(0, max(steps) * 1.1)  # no negative margin on the symlog axis


def draw_shares(ax, df: pd.DataFrame, rollouts: pd.DataFrame | None = None) -> None:
    """Format share over steps, one line per format in its colour (rollout shares dashed, thinner)."""
    for f in FORMATS:
        ax.plot(df["step"], df[f"share_{f}"], color=FORMAT_COLORS[f], marker="o", linewidth=2,
                label=FORMAT_LABELS[f], gid=f"format:{f}")
        if rollouts is not None and not rollouts.empty:
            ax.plot(rollouts["step"], rollouts[f"share_{f}"], color=FORMAT_COLORS[f], linestyle="--",
                    linewidth=1, alpha=0.6, label=f"{FORMAT_LABELS[f]} (rollouts)", gid=f"format:{f}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("format share")
    _steps_axis(ax, df["step"])
    ax.grid(alpha=0.3)


def draw_accuracy(ax, df: pd.DataFrame) -> None:
    k = int(df["k"].dropna().iloc[0]) if df["k"].notna().any() else 0
    for m, style in METRIC_STYLES.items():
        ax.plot(df["step"], df[m], label=metric_label(m, k), **style)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy")
    _steps_axis(ax, df["step"])
    ax.grid(alpha=0.3)


def panel_figure(columns: list[tuple[str, pd.DataFrame, pd.DataFrame | None]], suptitle: str):
    """A figure with one column per cell: format shares on top, accuracies beneath."""
    n = len(columns)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 6.4), squeeze=False, sharey="row")
    for j, (title, df, roll) in enumerate(columns):
        draw_shares(axes[0, j], df, roll)
        axes[0, j].set_title(title, fontsize=9)
        draw_accuracy(axes[1, j], df)
        if j > 0:   # shared y: keep the label readable on every panel anyway
            axes[0, j].tick_params(labelleft=True)
            axes[1, j].tick_params(labelleft=True)
    axes[0, -1].legend(fontsize=7, loc="best")
    axes[1, -1].legend(fontsize=7, loc="best")
    fig.suptitle(suptitle, fontsize=11, wrap=True)   # a long mixture name must not run off a one-column figure
    fig.tight_layout()
    return fig


def _groups(curves: pd.DataFrame, keys: list[str]):
    for key, df in curves.groupby(keys, sort=True):
        yield (key if isinstance(key, tuple) else (key,)), df.sort_values("step")


def _cell(curves: pd.DataFrame, **coords) -> pd.DataFrame:
    mask = pd.Series(True, index=curves.index)
    for k, v in coords.items():
        mask &= curves[k] == v
    return curves[mask].sort_values("step")


# ------------------------------------------------------------------------------------------ figures


def figure1(curves: pd.DataFrame, rollouts: pd.DataFrame | None = None) -> FigureSet:
    fs = FigureSet("fig1", "Format share over RL steps, with pass@1 / pass@k / maj@k beneath (per cell)")
    for (m, z, a, kl), df in _groups(curves, ["mixture", "scale", "algo", "kl"]):
        roll = None
        if rollouts is not None and not rollouts.empty:
            roll = _cell(rollouts, mixture=m, scale=z, algo=a, kl=kl)
        label = cell_label(df.iloc[0])
        fig = panel_figure([(label, df, roll)], f"Echo chamber: {label}")
        fs.figures.append((_slug("fig1", m, z, a, f"kl{kl:g}"), f"{label} (mean over {int(df['seeds'].max())} "
                           f"seed(s)); dashed: shares in the training rollouts", fig))
    if not fs.figures:
        fs.note = "skipped: the grid has no evaluated RL cell"
    return fs


def figure2(curves: pd.DataFrame) -> FigureSet:
    fs = FigureSet("fig2", "Format share and accuracy for each KL coefficient")
    for (m, z, a), df in _groups(curves, ["mixture", "scale", "algo"]):
        kls = sorted(df["kl"].unique())
        if len(kls) < 2:
            continue
        cols = [(f"KL {kl:g}", _cell(df, kl=kl), None) for kl in kls]
        label = f"{m} · {z} · {a}"
        fs.figures.append((_slug("fig2", m, z, a), label, panel_figure(cols, f"KL coefficients: {label}")))
    if not fs.figures:
        fs.note = "skipped: no (mixture, scale, algorithm) of the grid has more than one KL coefficient"
    return fs


def repetition_families(mixtures: dict[str, dict[str, float]]) -> list[tuple[str, list[tuple[float, str]]]]:
    """Groups of mixtures that differ only in the weight of one source (an absent source weighs 0).

    Returns ``[(source, [(weight, mixture), ...] sorted by weight), ...]`` for groups of two or more.
    """
    sources = sorted({s for mix in mixtures.values() for s in mix})
    families = []
    for s in sources:
        groups: dict[tuple, list[tuple[float, str]]] = {}
        for name, mix in mixtures.items():
            rest = tuple(sorted((src, float(w)) for src, w in mix.items() if src != s and w > 0))
            groups.setdefault(rest, []).append((float(mix.get(s, 0.0)), name))
        for members in groups.values():
            weights = {w for w, _ in members}
            if len(members) >= 2 and len(weights) == len(members):
                families.append((s, sorted(members)))
    return families


def figure3(curves: pd.DataFrame, mixtures: dict[str, dict[str, float]]) -> FigureSet:
    fs = FigureSet("fig3", "Repetitions of one dataset in the mixture: format shares and accuracy")
    present = set(curves["mixture"].unique()) if not curves.empty else set()
    for source, members in repetition_families({m: w for m, w in mixtures.items() if m in present}):
        names = [m for _, m in members]
        sub = curves[curves["mixture"].isin(names)]
        for (z, a, kl), df in _groups(sub, ["scale", "algo", "kl"]):
            have = [(w, m) for w, m in members if (df["mixture"] == m).any()]
            if len(have) < 2:
                continue
            cols = [(f"{source} x{w:g} ({m})", _cell(df, mixture=m), None) for w, m in have]
            label = f"{source} repeated {', '.join(f'{w:g}' for w, _ in have)}x · {z} · {a} · KL {kl:g}"
            fs.figures.append((_slug("fig3", source, z, a, f"kl{kl:g}", *[m for _, m in have]), label,
                               panel_figure(cols, label)))
    if not fs.figures:
        fs.note = ("skipped: the grid has no mixtures that differ only in the weight of one dataset "
                   "(e.g. as_fm3_tg_1xomi1 and as_fm3_tg_2xomi1) with evaluated RL cells")
    return fs


def figure4(curves: pd.DataFrame, scales: list[str] | None = None) -> FigureSet:
    fs = FigureSet("fig4", "Model scales on the same mixture")
    order = {s: i for i, s in enumerate(scales or [])}
    for (m, a, kl), df in _groups(curves, ["mixture", "algo", "kl"]):
        zs = sorted(df["scale"].unique(), key=lambda z: (order.get(z, len(order)), z))
        if len(zs) < 2:
            continue
        cols = [(f"scale {z}", _cell(df, scale=z), None) for z in zs]
        label = f"{m} · {a} · KL {kl:g}"
        fs.figures.append((_slug("fig4", m, a, f"kl{kl:g}"), label, panel_figure(cols, f"Scales: {label}")))
    if not fs.figures:
        fs.note = "skipped: no mixture of the grid is trained at more than one scale with the same RL setting"
    return fs


def figure5(curves: pd.DataFrame) -> FigureSet:
    fs = FigureSet("fig5", "PPO vs GRPO vs Expert Iteration")
    for (m, z), df in _groups(curves, ["mixture", "scale"]):
        algos = sorted(df["algo"].unique(), key=lambda a: (ALGO_ORDER.index(a) if a in ALGO_ORDER else 99, a))
        if len(algos) < 2:
            continue
        cols = []
        for a in algos:
            kl = sorted(df[df["algo"] == a]["kl"].unique())[0]   # each algorithm at its smallest KL
            x = "round" if a == "ei" else "step"
            cols.append((f"{a.upper()} (KL {kl:g}; x: {x})", _cell(df, algo=a, kl=kl), None))
        label = f"{m} · {z}"
        fs.figures.append((_slug("fig5", m, z), label, panel_figure(cols, f"RL algorithms: {label}")))
    if not fs.figures:
        fs.note = "skipped: no (mixture, scale) of the grid is trained with more than one RL algorithm"
    return fs


def figure6(before_after: pd.DataFrame, benchmarks: list[str] | None = None) -> FigureSet:
    fs = FigureSet("fig6", "Transfer: pass@1 before and after RL on every benchmark")
    df = before_after.dropna(subset=["pass1_before", "pass1_after"]) if not before_after.empty else before_after
    if df.empty:
        fs.note = "skipped: no RL cell has both a base-model and a final evaluation"
        return fs
    df = df.groupby(["mixture", "scale", "algo", "kl", "benchmark"], as_index=False)[
        ["pass1_before", "pass1_after"]].mean()
    present = list(dict.fromkeys(df["benchmark"]))
    benches = [b for b in (benchmarks or []) if b in present] + [b for b in present if b not in (benchmarks or [])]
    width = max(6.0, 0.9 * df.groupby("benchmark").size().max() + 2)
    fig, axes = plt.subplots(len(benches), 1, figsize=(width, 3.8 * len(benches)), squeeze=False)
    for ax, b in zip(axes[:, 0], benches):
        sub = df[df["benchmark"] == b].reset_index(drop=True)
        xs = range(len(sub))
        ax.bar([x - 0.2 for x in xs], sub["pass1_before"], width=0.4, color="0.7", label="before RL")
        ax.bar([x + 0.2 for x in xs], sub["pass1_after"], width=0.4, color="0.2", label="after RL")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([cell_label(r) for _, r in sub.iterrows()], rotation=30, ha="right", fontsize=7)
        ax.set_xlabel("cell (mixture · scale · algorithm · KL)")
        ax.set_ylabel("pass@1 (greedy)")
        ax.set_ylim(0, 1)
        ax.set_title(f"benchmark {b}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fs.figures.append(("fig6_transfer", "pass@1 of the pretrained model and of the last RL checkpoint", fig))
    return fs


# ------------------------------------------------------------------------------------------ all


def build_figures(curves: pd.DataFrame, rollouts: pd.DataFrame | None, before_after: pd.DataFrame,
                  mixtures: dict[str, dict[str, float]], scales: list[str] | None = None,
                  benchmarks: list[str] | None = None) -> list[FigureSet]:
    return [figure1(curves, rollouts), figure2(curves), figure3(curves, mixtures), figure4(curves, scales),
            figure5(curves), figure6(before_after, benchmarks)]


def save(sets: list[FigureSet], out_dir: str | os.PathLike, dpi: int = 110) -> list[FigureSet]:
    """Write every figure as PNG under ``out_dir`` and a ``figures.json`` manifest (notes included)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for fs in sets:
        for stem, _, fig in fs.figures:
            path = out_dir / f"{stem}.png"
            fig.savefig(path, dpi=dpi)
            plt.close(fig)
            fs.files.append(path.name)
    manifest = [{"id": fs.id, "title": fs.title, "note": fs.note,
                 "figures": [{"file": f, "caption": cap} for f, (_, cap, _) in zip(fs.files, fs.figures)]}
                for fs in sets]
    (out_dir / "figures.json").write_text(json.dumps(manifest, indent=1))
    return sets


def render_all(db_path: str | os.PathLike, out_dir: str | os.PathLike, mixtures: dict[str, dict[str, float]],
               scales: list[str] | None = None, benchmark: str | None = None) -> list[FigureSet]:
    """Draw the paper's figures from the store into ``out_dir``; return them with their notes."""
    from echochamber import store

    curves, benchmark = load_curves(db_path, benchmark)
    sets = build_figures(curves, load_rollouts(db_path), load_before_after(db_path), mixtures, scales,
                         store.meta(db_path)["benchmarks"])
    for fs in sets:
        if benchmark and fs.id != "fig6":
            fs.title += f" — benchmark {benchmark}"
    return save(sets, out_dir)
