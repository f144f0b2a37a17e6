"""Plotly figures built from the plain data the library returns (usable without the UI).

One palette for the parts of a model in every figure (vision, Q-Former, projection,
language), shown as shaded bands behind the layers or groups; runs are told apart by
their own colour and dash, with a legend entry that carries their target.
"""

from __future__ import annotations

import plotly.graph_objects as go

from .curves import summarise
from .naming import friendly
from .sweep import full_value, with_y

MODALITY_COLORS = {"vision": "#1f77b4", "qformer": "#9467bd", "projection": "#8c564b", "language": "#d62728"}
MODALITY_NAMES = {"vision": "Vision", "qformer": "Q-Former", "projection": "Projection", "language": "Language"}
RUN_COLORS = ["#222222", "#e6850e", "#2ca02c", "#9c27b0", "#17becf", "#bcbd22"]
RUN_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
LAYOUT = dict(template="plotly_white", margin={"t": 60, "l": 55, "r": 55, "b": 40},
              legend={"orientation": "h", "y": -0.18, "x": 0})


# What one line of a title holds on a phone's chart (about 320 px wide): titles wrap there
# instead of running off the edge.
TITLE_CHARS, NOTE_CHARS = 34, 50


def _lines(pieces, width: int) -> list[str]:
    """Greedy wrap that never breaks a piece (a run's label, a measure's name) inside itself."""
    words = pieces.split() if isinstance(pieces, str) else [p for p in pieces if p]
    lines: list[str] = []
    for word in words:
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _title(fig: go.Figure, main, notes=()):
    """Set a title that fits a phone: `main` (text, or pieces kept whole) in large type,
    each note under it in small type."""
    big = _lines(main, TITLE_CHARS)
    small = [line for note in notes for line in _lines(note, NOTE_CHARS)]
    text = "<br>".join(big) + "".join(f"<br><sup>{line}</sup>" for line in small)
    # above the plotting area (and the band labels on its edge), in a top margin made to hold it
    # (plotly's automargin redraws the axes after the traces, which a phone shows mid-way). Plotly
    # puts the first line at the anchor and the others below it: the padding lifts them all.
    below = 24 * (len(big) - 1) + 16 * len(small)
    fig.update_layout(title={"text": text, "yref": "paper", "y": 1, "yanchor": "bottom", "pad": {"b": 26 + below}},
                      margin={**LAYOUT["margin"], "t": 64 + below})


def _run_style(i: int) -> dict:
    return {"color": RUN_COLORS[i % len(RUN_COLORS)], "dash": RUN_DASHES[i % len(RUN_DASHES)]}


def _bands(fig: go.Figure, rows: list[dict], key: str, label_key: str):
    """Shade consecutive items of one stack in their modality's colour, labelled on top."""
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i][key] != rows[start][key]:
            modality = rows[start].get("modality", "")
            fig.add_vrect(x0=start - 0.5, x1=i - 0.5, fillcolor=MODALITY_COLORS.get(modality, "#888"),
                          opacity=0.09, layer="below", line_width=0)
            fig.add_annotation(x=(start + i - 1) / 2, y=1.0, yref="paper", yanchor="bottom", showarrow=False,
                               text=str(rows[start][label_key]), font={"size": 11,
                                                                      "color": MODALITY_COLORS.get(modality, "#555")})
            start = i


def sparsity_figure(runs: list[dict]) -> go.Figure:
    """Per-layer sparsity in forward order for one or more runs.

    Each run is {"label", "layers": [report rows], "target_sparsity", "warnings"?}; the
    background shows which part of the model each layer belongs to. A run's warnings (a
    model calibrated on data it was not trained on) are in the title, where nobody misses them.
    """
    fig = go.Figure()
    for r, run in enumerate(runs):
        style = _run_style(r)
        rows = run["layers"]
        achieved = sum(x["zeros"] for x in rows) / max(1, sum(x["numel"] for x in rows))
        fig.add_trace(go.Scatter(
            x=list(range(len(rows))), y=[row["sparsity"] for row in rows], mode="lines+markers",
            name=f"{run['label']} · target {run['target_sparsity']:.2f}, achieved {achieved:.3f}",
            legendgroup=str(r), line={"color": style["color"], "dash": style["dash"], "width": 1.5},
            marker={"color": [MODALITY_COLORS.get(row["modality"], "#888") for row in rows], "size": 6,
                    "line": {"width": 1, "color": style["color"]}},
            customdata=[[row["name"], row["numel"], row["zeros"], run["label"], row["stack"], friendly(row["name"])]
                        for row in rows],
            hovertemplate="%{customdata[3]}<br><b>%{customdata[5]}</b><br>%{customdata[0]}<br>sparsity %{y:.3f}"
                          "<br>%{customdata[2]:,} zeros of %{customdata[1]:,}<extra></extra>",
        ))
        fig.add_hline(y=run["target_sparsity"], line_dash=style["dash"], line_color=style["color"], line_width=1,
                      opacity=0.6)
    if runs:
        _bands(fig, runs[0]["layers"], "stack", "stack")
    warned = list(dict.fromkeys(w.split(":")[0] for run in runs for w in run.get("warnings") or []))
    named = [runs[0]["label"]] if len(runs) == 1 else []  # a single run's chart says whose it is
    fig.update_layout(xaxis_title="prunable layer (forward order)", yaxis_title="sparsity of the layer",
                      yaxis_range=[0, 1.02], **LAYOUT)
    _title(fig, ["Sparsity", "of", "each", "prunable", "layer" + (":" if named else ""), *named],
           [f"⚠ {w}" for w in warned])
    return fig


def group_scores_figure(runs: list[dict]) -> go.Figure:
    """ECoFLaP stage 1 per run: each group's share of the total score (what the allocation
    hands out the kept weights by, beyond every group's minimum) and the sparsity it got.

    Each run is {"label", "groups": [report group rows]}, all with the same groups; a
    run whose allocation has no scores (per-modality, global magnitude) shows only its
    sparsities.
    """
    fig = go.Figure()
    for r, run in enumerate(runs):
        style = _run_style(r)
        groups = run["groups"]
        x = list(range(len(groups)))
        scored = all(isinstance(g.get("score"), (int, float)) for g in groups)
        total = (sum(g["score"] for g in groups) or 1.0) if scored else 1.0
        fig.add_trace(go.Bar(visible=scored,
            x=x, y=[g["score"] / total if scored else 0 for g in groups], name=f"{run['label']} · share of score",
            legendgroup=str(r), marker={"color": style["color"], "opacity": 0.75},
            customdata=[[g["name"], g["score"], g["keep"], g["numel"]] for g in groups],
            hovertemplate="%{customdata[0]}<br>share %{y:.3f} (score %{customdata[1]:.4g})"
                          "<br>keeps %{customdata[2]:,} of %{customdata[3]:,}<extra>" + run["label"] + "</extra>",
        ))
        fig.add_trace(go.Scatter(
            x=x, y=[g["sparsity"] for g in groups], yaxis="y2", mode="lines+markers",
            name=f"{run['label']} · allocated sparsity", legendgroup=str(r),
            line={"color": style["color"], "dash": style["dash"]}, marker={"symbol": "diamond", "size": 7},
            hovertemplate="sparsity %{y:.3f}<extra>" + run["label"] + "</extra>",
        ))
    if runs:
        groups = runs[0]["groups"]
        _bands(fig, [{**g, "part": g["name"].rsplit(".", 1)[0]} for g in groups], "part", "part")
        fig.update_xaxes(tickvals=list(range(len(groups))),
                         ticktext=[g["name"].rsplit(".", 1)[-1] for g in groups])
    fig.update_layout(barmode="group", xaxis_title="group (block) in forward order",
                      yaxis={"title": "share of the total score", "rangemode": "tozero"},
                      yaxis2={"title": "allocated sparsity", "overlaying": "y", "side": "right", "range": [0, 1]},
                      **LAYOUT)
    _title(fig, "Share of the score and sparsity per group")
    return fig


def histogram_figure(series: dict[str, dict[str, dict]], title: str, xlabel: str) -> go.Figure:
    """Log-magnitude histograms per modality (colour) and model (dash).

    `series` is {model label: {modality: stats histogram}}. Each curve is the fraction
    of all that modality's weights in each bin, zeros included in the total but not
    drawn, so a pruned model's curve sits lower by exactly its share of zeros.
    """
    fig = go.Figure()
    order = list(MODALITY_NAMES)  # one legend order in every plot
    for i, (label, histograms) in enumerate(series.items()):
        for modality in sorted(histograms, key=lambda m: order.index(m) if m in order else len(order)):
            hist = histograms[modality]
            edges = hist["log10_edges"]
            centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
            total = max(1, hist["nonzero"] + hist["zeros"])
            name = f"{MODALITY_NAMES.get(modality, modality)} · {label} ({hist['zeros'] / total:.0%} zeros)"
            fig.add_trace(go.Scatter(
                x=[10**c for c in centers], y=[c / total for c in hist["counts"]], mode="lines", line_shape="hvh",
                name=name, line={"color": MODALITY_COLORS.get(modality, "#888"), "dash": RUN_DASHES[i % 6]},
                hovertemplate="|value| %{x:.2e}<br>fraction %{y:.4f}<extra>" + name + "</extra>",
            ))
    # ticks as powers of ten (10⁻⁶), not SI prefixes ("1µ", "100n") that read as units
    fig.update_layout(xaxis={"title": xlabel, "type": "log", "exponentformat": "power", "dtick": 1},
                      yaxis_title="fraction of the modality's weights", **LAYOUT)
    _title(fig, title)
    return fig


def sweep_figure(rows: list[dict], score_name: str, title: str | None = None,
                 full_score: float | None = None, subtitle: tuple[str, ...] = ()) -> go.Figure:
    """Score against sparsity, one line per method; rows are {method, label?, sparsity,
    score, score_min?, score_max?, seeds?} (the range over seeds as error bars). The full
    model's score, where given, is a grey line: the baseline every curve falls from."""
    fig = go.Figure()
    if full_score is not None:
        shown = f"{full_score:.1%}" if score_name == "accuracy" else f"{full_score:.3f}"
        fig.add_hline(y=full_score, line={"color": "#888", "dash": "dot", "width": 2},
                      annotation_text=f"full model {shown}", annotation_position="top right")
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["sparsity"])
        label = points[0].get("label", method)
        style = _run_style(i)
        error = None
        if all("score_min" in p and "score_max" in p for p in points):
            error = {"type": "data", "symmetric": False, "array": [p["score_max"] - p["score"] for p in points],
                     "arrayminus": [p["score"] - p["score_min"] for p in points], "thickness": 1}
        notes = []
        for p in points:
            note = f"<br>mean of {p['seeds']} seeds, {p['score_min']:.4f} to {p['score_max']:.4f}" \
                if p.get("seeds", 1) > 1 else ""
            if p.get("split"):
                note += "<br>split: " + ", ".join(f"{k} {v:.2f}" for k, v in p["split"].items())
            notes.append(note)
        fig.add_trace(go.Scatter(
            x=[p["sparsity"] for p in points], y=[p["score"] for p in points], mode="lines+markers", name=label,
            line={"color": style["color"], "dash": style["dash"]}, error_y=error, customdata=notes,
            hovertemplate="sparsity %{x:.2f}<br>" + score_name + " %{y:.4f}%{customdata}<extra>" + label + "</extra>",
        ))
    fig.update_layout(xaxis_title="sparsity", yaxis_title=score_name, **LAYOUT)
    # the measure's name stays whole ("99th percentile KL(full || pruned)"): it is what the axis says
    _title(fig, title or [score_name, "against", "sparsity"], subtitle)
    return fig


def sweep_chart(rows: list[dict], y: str, full_score: dict | None = None, title: str | None = None) -> go.Figure:
    """A sweep's rows (`sweep.sweep`) drawn with column `y` as the curve (see
    `sweep.y_choices`), with the full model's line where the measure has one; repeated
    seeds become a mean with its range. Only draws: nothing is measured again."""
    shown, name = with_y(rows, y)
    if len({(r["method"], r["sparsity"]) for r in shown}) < len(shown):
        shown = summarise(shown)
    return sweep_figure(shown, name, title, full_value(rows, y, full_score))


def distribution_figures(distributions: dict) -> tuple[go.Figure, go.Figure]:
    """The weight and the gradient histograms of `Session.distributions()`."""
    series = distributions["series"]
    weights = histogram_figure({label: s["weights"] for label, s in series.items()},
                               "|W| per part of the model (zeros counted apart)", "|W|")
    gradients = histogram_figure({label: s["gradients"] for label, s in series.items()},
                                 f"|dL/dW| of the calibration loss, one batch of {distributions['batch']}", "|dL/dW|")
    return weights, gradients


def curves_figure(curves: dict) -> go.Figure:
    """The accuracy-against-sparsity curves shipped with a model (see `curves.shipped_curves`)."""
    seeds = max((r["seeds"] for r in curves["rows"]), default=1)
    spread = f"; mean and range over {seeds} seeds where a method is random" if seeds > 1 else ""
    return sweep_figure(curves["rows"], curves["metric"], None, curves.get("full_score"),
                        (f"measured ahead of time{spread}",))


def loss_figure(losses: list[float], steps: int | None = None, title: str = "Fine-tuning loss") -> go.Figure:
    """The training loss at every recovery step, and its running mean over 10 steps
    (one batch's loss is noisy: batches mix question types); the axis spans all `steps`,
    so a curve drawn while training fills it from the left."""
    x = list(range(1, len(losses) + 1))
    smooth = [sum(losses[max(0, i - 9): i + 1]) / len(losses[max(0, i - 9): i + 1]) for i in range(len(losses))]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=losses, mode="lines", name="loss per step",
                             line={"color": "#bbbbbb", "width": 1}))
    fig.add_trace(go.Scatter(x=x, y=smooth, mode="lines", name="mean of the last 10 steps",
                             line={"color": RUN_COLORS[1], "width": 2}))
    fig.update_layout(xaxis_title="step", yaxis_title="loss (target tokens)", **LAYOUT)
    _title(fig, title)
    fig.update_xaxes(range=[1, max(steps or len(losses), 2)], tickformat="d")
    return fig
