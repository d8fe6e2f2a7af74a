"""Plotly figures: training events (train loss and validation loss, learning rate on a second axis) and evaluation bars."""
from __future__ import annotations

import plotly.graph_objects as go

from core.api import CHART_POINTS, thin

TRAIN_COLOR, VAL_COLOR, LR_COLOR = "#4f46e5", "#f97316", "#94a3b8"


def loss_figure(points: list[dict], evals: list[dict], steps: int | None = None, title: str | None = None,
                height: int = 360) -> go.Figure:
    """points: [{"step", "loss", "lr"}] per optimizer step; evals: [{"step", "val_loss"}].
    The x axis grows with the run (a long plan would squeeze the first points); `steps`, the plan,
    is named in the axis title. Each line is thinned to about CHART_POINTS (its last and lowest points
    kept): a page redraws it every tick, however long the run."""
    points, evals = thin(points, "loss", CHART_POINTS), thin(evals, "val_loss", CHART_POINTS)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[p["step"] for p in points], y=[p["loss"] for p in points], name="train loss",
                             mode="lines", line=dict(color=TRAIN_COLOR, width=2),
                             hovertemplate="step %{x}<br>train loss %{y:.4f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[e["step"] for e in evals], y=[e["val_loss"] for e in evals],
                             name="validation loss", mode="lines+markers",
                             line=dict(color=VAL_COLOR, width=2), marker=dict(size=7),
                             hovertemplate="step %{x}<br>val loss %{y:.4f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[p["step"] for p in points], y=[p.get("lr") for p in points], name="learning rate",
                             mode="lines", line=dict(color=LR_COLOR, width=1.5, dash="dot"), yaxis="y2",
                             hovertemplate="step %{x}<br>lr %{y:.2e}<extra></extra>"))
    fig.update_layout(
        template="plotly_white", height=height, margin=dict(l=56, r=64, t=48 if title else 16, b=44),
        title=dict(text=title, x=0.01, font=dict(size=14)) if title else None,
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
        xaxis=dict(title=f"optimizer step (of {steps:,})" if steps else "optimizer step", rangemode="tozero",
                   zeroline=False),
        yaxis=dict(title="loss", rangemode="normal"),
        yaxis2=dict(title="learning rate", overlaying="y", side="right", showgrid=False,
                    rangemode="tozero", tickformat=".0e"),
        hovermode="x unified", uirevision="keep",  # keep the user's zoom across live refreshes
    )
    if not points and not evals:
        fig.add_annotation(text="No training points yet", showarrow=False, x=0.5, y=0.5, xref="paper",
                           yref="paper", font=dict(color="#64748b", size=14))
    return fig


def curve_figure(points_evals: tuple[list[dict], list[dict]], meta: dict, height: int = 320) -> go.Figure:
    """The loss curve of a saved adapter: its (train points, validation points) as Library.curve reads them
    from its history; `meta`, its studio.json, names the planned steps."""
    steps = (meta.get("training") or {}).get("steps") if isinstance(meta.get("training"), dict) else None
    return loss_figure(*points_evals, steps if isinstance(steps, int) else None, height=height)


OVERLAY_COLORS = ["#4f46e5", "#f97316", "#059669", "#dc2626", "#0891b2", "#a21caf", "#ca8a04", "#475569"]


def overlay_figure(runs: list[tuple[str, tuple[list[dict], list[dict]]]], height: int = 360) -> go.Figure:
    """Several saved adapters' curves on one chart: runs = [(name, (train points, validation points))] as
    Library.curve reads them; per adapter one colour, train loss as a line, validation loss dashed with markers."""
    fig = go.Figure()
    for i, (name, (points, evals)) in enumerate(runs):
        color = OVERLAY_COLORS[i % len(OVERLAY_COLORS)]
        points, evals = thin(points, "loss", CHART_POINTS), thin(evals, "val_loss", CHART_POINTS)
        fig.add_trace(go.Scatter(x=[p["step"] for p in points], y=[p["loss"] for p in points],
                                 name=f"{name} · train", mode="lines", line=dict(color=color, width=2),
                                 hovertemplate=f"{name}<br>step %{{x}}<br>train loss %{{y:.4f}}<extra></extra>"))
        fig.add_trace(go.Scatter(x=[e["step"] for e in evals], y=[e["val_loss"] for e in evals],
                                 name=f"{name} · validation", mode="lines+markers",
                                 line=dict(color=color, width=2, dash="dash"), marker=dict(size=6),
                                 hovertemplate=f"{name}<br>step %{{x}}<br>val loss %{{y:.4f}}<extra></extra>"))
    fig.update_layout(template="plotly_white", height=height, margin=dict(l=56, r=24, t=16, b=44),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
                      xaxis=dict(title="optimizer step", rangemode="tozero", zeroline=False),
                      yaxis=dict(title="loss"), hovermode="closest")
    if not runs:
        fig.add_annotation(text="Choose adapters to see their curves together", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper", font=dict(color="#64748b", size=14))
    return fig


def eval_figure(rows: list[dict], height: int = 340) -> go.Figure:
    """Bars of loss and perplexity per model, side by side. rows: [{"model", "loss", "ppl"}] (an evaluation)."""
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss (nats, lower is better)", "perplexity"),
                        horizontal_spacing=0.12)
    names = [r["model"] for r in rows]
    colors = [LR_COLOR if r.get("base") else TRAIN_COLOR for r in rows]  # the base grey, adapters indigo
    fig.add_trace(go.Bar(x=names, y=[r["loss"] for r in rows], marker_color=colors, name="loss",
                         text=[f"{r['loss']:.3f}" for r in rows], textposition="outside",
                         hovertemplate="%{x}<br>loss %{y:.4f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=[r["ppl"] for r in rows], marker_color=colors, name="perplexity",
                         text=[f"{r['ppl']:,.1f}" for r in rows], textposition="outside",
                         hovertemplate="%{x}<br>perplexity %{y:,.2f}<extra></extra>"), row=1, col=2)
    fig.update_layout(template="plotly_white", height=height, showlegend=False, margin=dict(l=48, r=24, t=40, b=40))
    for col, key in ((1, "loss"), (2, "ppl")):  # zoomed on the values: bars from 0 hide a 1% difference
        values = [r[key] for r in rows]
        if values:
            lo, hi = min(values), max(values)
            pad = max(hi - lo, abs(hi) * 0.01, 1e-3)
            fig.update_yaxes(range=[max(0.0, lo - pad), hi + pad * 0.6], row=1, col=col)
    if not rows:
        fig.add_annotation(text="No evaluation yet", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                           font=dict(color="#64748b", size=14))
    return fig
