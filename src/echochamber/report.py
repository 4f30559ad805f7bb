"""The HTML report (figures + summary tables) and the short text summary printed at the end of a run.

    python -m echochamber.report results/echo.duckdb      # print the summary of a store
"""

from __future__ import annotations

import html
import os
import sys
from pathlib import Path

from echochamber import findings, plots, store
from echochamber.formats import FORMATS
from echochamber.io import atomic_path

_CELL = ("mixture", "scale", "algo", "kl", "seed")


def _shares_before_after(db_path, benchmark: str):
    cols = ", ".join(f"e.share_{f}" for f in FORMATS)
    return store.fetch(db_path, f"""
        WITH last AS (SELECT mixture, scale, algo, kl, seed, max(step) AS step FROM eval_curves
                      WHERE benchmark = ? GROUP BY mixture, scale, algo, kl, seed)
        SELECT e.mixture, e.scale, e.algo, e.kl, e.seed, e.step, e.pass1, {cols},
               CASE WHEN e.step = 0 THEN 'before' ELSE 'after' END AS phase
        FROM eval_curves e JOIN last l USING (mixture, scale, algo, kl, seed)
        WHERE e.benchmark = ? AND (e.step = 0 OR e.step = l.step)
        ORDER BY e.mixture, e.scale, e.algo, e.kl, e.seed, e.step""", [benchmark, benchmark])


def summary(db_path: str | os.PathLike, report_path: str | os.PathLike | None = None) -> str:
    """Per RL cell: format shares and pass@1 before and after RL (primary benchmark), other benchmarks'
    pass@1, and the paths of the store and the report (by default ``report.html`` beside the store)."""
    db_path = Path(db_path)
    benchmarks = store.meta(db_path)["benchmarks"]
    lines = []
    if not benchmarks:
        lines.append("No benchmarks are configured (eval.benchmarks): nothing was evaluated.")
    else:
        primary = benchmarks[0]
        df = _shares_before_after(db_path, primary)
        ba = store.fetch(db_path, "pass1_before_after")
        lines.append(f"Echo chamber summary: benchmark {primary} (format shares of the sampled answers, "
                     f"pass@1 greedy)")
        if df.empty:
            lines.append("  no RL cell has been evaluated yet")
        for key, cell in df.groupby(list(_CELL), sort=True):
            m, z, a, kl, seed = key
            lines.append(f"{m} · {z} · {a} · KL {kl:g} · seed {seed}")
            for _, r in cell.iterrows():
                phase = "before RL" if r["phase"] == "before" else "after RL "
                shares = "  ".join(f"{f} {r[f'share_{f}']:.2f}" for f in FORMATS)
                lines.append(f"  {phase} (step {int(r['step']):>5}): {shares}   pass@1 {r['pass1']:.3f}")
            last = cell.iloc[-1]
            if last["phase"] == "after":
                winner = max(FORMATS, key=lambda f: last[f"share_{f}"])
                lines.append(f"  most common format after RL: {winner}")
            mine = ba[(ba["mixture"] == m) & (ba["scale"] == z) & (ba["algo"] == a) & (ba["kl"] == kl)
                      & (ba["seed"] == seed) & (ba["benchmark"] != primary)]
            if not mine.empty:
                other = ", ".join(f"{r['benchmark']} {r['pass1_before']:.3f} -> {r['pass1_after']:.3f}"
                                  for _, r in mine.iterrows())
                lines.append(f"  pass@1 on other benchmarks: {other}")
    lines.append(f"store:  {db_path}   (query it: echochamber sql \"SELECT * FROM cells\")")
    if report_path is None:
        report_path = db_path.parent / "report.html"
        lines.append(f"report: {report_path}" + ("" if report_path.exists() else " (not built yet)"))
    else:
        lines.append(f"report: {report_path}")
    return "\n".join(lines)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; } figure { margin: 1em 0; }
.note { color: #8a5a00; background: #fff6e0; padding: 0.4em 0.8em; border-left: 4px solid #e0a000; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
"""


def _table(df, title: str, note: str = "") -> str:
    body = "<p><em>no rows</em></p>" if df.empty else df.to_html(index=False, float_format=lambda x: f"{x:.3f}",
                                                                   na_rep="", border=0)
    return f"<h3>{html.escape(title)}</h3>{f'<p>{html.escape(note)}</p>' if note else ''}{body}"


def render_html(db_path, sets: list[plots.FigureSet], figures_rel: str, text_summary: str,
                judged: list[findings.Finding]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>echo-chamber report</title>"
             f"<style>{_STYLE}</style></head><body><h1>Echo chamber: results report</h1>",
             f"<p>Store: <code>{html.escape(str(db_path))}</code>, built "
             f"{html.escape(store.meta(db_path).get('built_at', '?'))}. Every number below is a query on it.</p>",
             f"<p>Machine: {html.escape(findings.machine_line(db_path))} (table <code>machines</code>).</p>",
             "<h2>Summary</h2>", f"<pre>{html.escape(text_summary)}</pre>",
             "<h2>The paper's findings</h2>",
             _table(findings.frame(judged), "F1-F7 as this grid shows them",
                    "criteria: echochamber.findings (docs/results.md); `echochamber findings` prints the same table"),
             "<h2>Tables</h2>"]
    for name, title in (("pass1_before_after", "pass@1, pass@k and maj@k before and after RL"),
                        ("winning_format", "Which format won in each cell (primary benchmark)"),
                        ("cells", "Grid cells and their status")):
        parts.append(_table(store.fetch(db_path, name), title, store.saved_queries().get(name, "")))
    parts.append("<h2>Figures</h2>")
    for fs in sets:
        parts.append(f"<h3>{html.escape(fs.id)}: {html.escape(fs.title)}</h3>")
        if fs.note:
            parts.append(f"<p class='note'>{html.escape(fs.note)}</p>")
        for file, (_, caption, _) in zip(fs.files, fs.figures):
            parts.append(f"<figure><img src='{html.escape(figures_rel)}/{html.escape(file)}' "
                         f"alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build(db_path: str | os.PathLike, html_out: str | os.PathLike, figures_dir: str | os.PathLike,
          summary_out: str | os.PathLike | None = None, *, mixtures: dict[str, dict[str, float]],
          scales: list[str] | None = None, findings_out: str | os.PathLike | None = None,
          log=None) -> list[plots.FigureSet]:
    """Draw the figures into ``figures_dir`` and write the HTML report (and the text summary and the
    findings table), atomically; the findings are judged once for both."""
    html_out, figures_dir = Path(html_out), Path(figures_dir)
    with atomic_path(figures_dir) as tmp:
        sets = plots.render_all(db_path, tmp, mixtures, scales)
    for fs in sets:
        if log:
            log.info("%s: %s", fs.id, fs.note or f"{len(fs.files)} figure(s)")
    text = summary(db_path, report_path=html_out)
    rel = os.path.relpath(figures_dir, html_out.parent)
    judged = findings.judge(db_path)
    with atomic_path(html_out) as tmp:
        tmp.write_text(render_html(db_path, sets, rel, text, judged))
    if findings_out:
        findings.write_tsv(judged, findings_out)
    if summary_out:
        with atomic_path(summary_out) as tmp:
            tmp.write_text(text + "\n")
    return sets


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m echochamber.report RESULTS/echo.duckdb", file=sys.stderr)
        return 2
    try:
        print(summary(argv[0]))
    except store.StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
