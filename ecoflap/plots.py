"""Plotly figures built from the plain data the library returns (usable without the UI)."""

from __future__ import annotations

import plotly.graph_objects as go

MODALITY_COLORS = {"vision": "#1f77b4", "qformer": "#9467bd", "language": "#d62728"}
MODALITY_NAMES = {"vision": "Vision", "qformer": "Q-Former", "language": "Language"}
RUN_SYMBOLS = ["circle", "diamond", "square", "triangle-up", "x", "star"]


def sparsity_figure(runs: list[dict]) -> go.Figure:
    """Per-layer sparsity in forward order, coloured by modality, for one or more runs.

    Each run is {"label": str, "layers": [report rows], "target_sparsity": float}.
    """
    fig = go.Figure()
    for r, run in enumerate(runs):
        symbol = RUN_SYMBOLS[r % len(RUN_SYMBOLS)]
        for modality in MODALITY_COLORS:
            points = [(i, row) for i, row in enumerate(run["layers"]) if row["modality"] == modality]
            if not points:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[i for i, _ in points],
                    y=[row["sparsity"] for _, row in points],
                    mode="markers",
                    name=f"{run['label']} · {MODALITY_NAMES[modality]}",
                    legendgroup=run["label"],
                    marker={"color": MODALITY_COLORS[modality], "symbol": symbol, "size": 7,
                            "opacity": 0.9 if r == 0 else 0.7, "line": {"width": 1 if r else 0, "color": "#222"}},
                    customdata=[[row["name"], row["numel"], row["zeros"], run["label"]] for _, row in points],
                    hovertemplate="%{customdata[3]}<br>%{customdata[0]}<br>sparsity %{y:.3f}"
                    "<br>%{customdata[2]:,} zeros of %{customdata[1]:,}<extra></extra>",
                )
            )
        fig.add_hline(y=run["target_sparsity"], line_dash="dot", line_color="#666",
                      annotation_text=f"target {run['label']}" if len(runs) > 1 else "target",
                      annotation_position="top left")
    if runs:
        _mark_boundaries(fig, runs[0]["layers"])
    fig.update_layout(
        title="Where the sparsity went (layers in forward order)",
        xaxis_title="prunable layer (forward order)",
        yaxis_title="sparsity",
        yaxis_range=[0, 1.02],
        legend={"orientation": "h", "y": -0.2},
        margin={"t": 50, "l": 50, "r": 20, "b": 40},
        template="plotly_white",
    )
    return fig


def _mark_boundaries(fig: go.Figure, layers: list[dict]):
    """Vertical lines where one stack ends and the next begins, labelled by stack."""
    start = 0
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i]["stack"] != layers[start]["stack"]:
            if start > 0:
                fig.add_vline(x=start - 0.5, line_color="#999", line_dash="dash")
            fig.add_annotation(x=(start + i - 1) / 2, y=1.02, text=layers[start]["stack"], showarrow=False,
                               yanchor="bottom", font={"size": 11, "color": "#555"})
            start = i


def group_scores_figure(groups: list[dict], label: str = "") -> go.Figure:
    """ECoFLaP's group scores (bars) and the sparsity each group received (line)."""
    fig = go.Figure()
    names = [g["name"] for g in groups]
    fig.add_trace(go.Bar(x=names, y=[g["score"] for g in groups], name="importance score",
                         marker_color=[MODALITY_COLORS.get(g.get("modality"), "#888") for g in groups],
                         hovertemplate="%{x}<br>score %{y:.4g}<extra></extra>"))
    fig.add_trace(go.Scatter(x=names, y=[g["sparsity"] for g in groups], name="allocated sparsity",
                             yaxis="y2", mode="lines+markers", line={"color": "#222"},
                             hovertemplate="%{x}<br>sparsity %{y:.3f}<extra></extra>"))
    fig.update_layout(
        title=f"ECoFLaP stage 1: group scores and allocated sparsity {label}".strip(),
        yaxis={"title": "score", "type": "log"},
        yaxis2={"title": "sparsity", "overlaying": "y", "side": "right", "range": [0, 1]},
        legend={"orientation": "h", "y": -0.3},
        margin={"t": 50, "l": 50, "r": 50, "b": 40},
        template="plotly_white",
    )
    return fig


def histogram_figure(series: list[tuple[str, dict]], title: str, xlabel: str) -> go.Figure:
    """Overlaid log-magnitude histograms; each series is (label, stats histogram dict)."""
    fig = go.Figure()
    for label, hist in series:
        edges = hist["log10_edges"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        total = max(1, hist["nonzero"] + hist["zeros"])
        fig.add_trace(go.Scatter(
            x=[10**c for c in centers], y=[c / total for c in hist["counts"]], mode="lines",
            line_shape="hvh", name=f"{label} ({hist['zeros'] / total:.0%} zeros)",
            hovertemplate="|value| %{x:.2e}<br>fraction %{y:.4f}<extra>" + label + "</extra>",
        ))
    fig.update_layout(
        title=title, xaxis={"title": xlabel, "type": "log"}, yaxis_title="fraction of weights",
        legend={"orientation": "h", "y": -0.3}, margin={"t": 50, "l": 50, "r": 20, "b": 40},
        template="plotly_white",
    )
    return fig


def sweep_figure(rows: list[dict], score_name: str) -> go.Figure:
    """Score against sparsity, one line per method; rows are {method, sparsity, score}."""
    fig = go.Figure()
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["sparsity"], r["score"]) for r in rows if r["method"] == method)
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                                 name=method, hovertemplate="sparsity %{x:.2f}<br>" + score_name + " %{y:.4f}<extra>" + method + "</extra>"))
    fig.update_layout(title=f"{score_name} against sparsity", xaxis_title="sparsity", yaxis_title=score_name,
                      template="plotly_white", margin={"t": 50, "l": 50, "r": 20, "b": 40})
    return fig
