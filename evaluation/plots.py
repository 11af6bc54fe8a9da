"""PNG plots from the long-format result rows (one dict per measurement, as written to results.jsonl)."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def model_name(row: dict) -> str:
    """The model a row belongs to (rows written before the `model` field name only the architecture)."""
    return row.get("model") or row["architecture"]


def save_png(figure, path: Path) -> Path:
    """Lay out, write atomically (a temporary file renamed into place: a kill never leaves half a PNG) and close."""
    path = Path(path)
    figure.tight_layout()
    tmp = path.with_name(".tmp-" + path.name)
    figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    os.replace(tmp, path)
    return path


def recall_vs_state(rows: list[dict], path: Path, task: str = "mqar") -> Path | None:
    """The Zoology/Based recall–memory plot: mean accuracy over the MQAR slices vs state bytes (log x), one marker
    per architecture and width. The state is the bytes needed at the longest slice (KV cache for attention)."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["task"] == task and row["metric"] == "accuracy" and row.get("state_bytes"):
            groups[(row["architecture"], row.get("d_model"))].append(row)  # a line per architecture across widths
    for (architecture, _d), cells in groups.items():
        longest = max(cells, key=lambda r: r["length"])
        points[architecture].append((longest["state_bytes"], sum(r["value"] for r in cells) / len(cells)))
    if not points:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for architecture, xy in sorted(points.items()):
        xy.sort()
        axis.plot(*zip(*xy, strict=True), marker="o", label=architecture)
    axis.set_xscale("log")
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("state bytes at the longest slice (recurrent + KV)")
    axis.set_ylabel(f"{task} accuracy (mean over slices)")
    axis.set_title("recall vs memory")
    axis.grid(alpha=0.3)
    axis.legend()
    return save_png(figure, path)


def niah_heatmap(rows: list[dict], path: Path, task: str, model: str) -> Path | None:
    """Length × depth heatmap of exact-match accuracy for one NIAH-style task and one model."""
    cells = {(r["length"], r["depth"]): r["value"] for r in rows
             if r["task"] == task and model_name(r) == model and r["metric"] == "exact"
             and r.get("depth") is not None}
    if not cells:
        return None
    lengths = sorted({length for length, _ in cells})
    depths = sorted({depth for _, depth in cells})
    grid = [[cells.get((length, depth), math.nan) for length in lengths] for depth in depths]
    figure, axis = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    axis.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    axis.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not math.isnan(value):
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    axis.set_title(f"{task}: {model}")
    figure.colorbar(image, ax=axis, label="exact match")
    return save_png(figure, path)


def loss_by_position(curves: dict[str, list[float]], path: Path, train_length: int | None) -> Path | None:
    """Cross-entropy by position (log x), one line per model, the training length marked.

    Per-position losses of a few documents are noisy, so each line is the mean over log-spaced position bins (about
    12 per decade), drawn at the bins' geometric centres; the raw curves stay in the JSON next to the plot.
    """
    if not curves:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, losses in sorted(curves.items()):
        edges = sorted({round(10 ** (i / 12)) for i in range(int(12 * math.log10(len(losses) + 1)) + 2)})
        edges = [e for e in edges if e <= len(losses)] + [len(losses) + 1]
        centres, means = [], []
        for low, high in zip(edges[:-1], edges[1:], strict=True):  # positions [low, high), 1-based
            if high > low:
                centres.append(math.sqrt(low * (high - 1)))
                means.append(sum(losses[low - 1 : high - 1]) / (high - low))
        axis.plot(centres, means, label=label, linewidth=1.5, marker=".")
    if train_length:
        axis.axvline(train_length, color="black", linestyle="--", linewidth=1, label=f"train length {train_length}")
    axis.set_xscale("log")
    axis.set_xlabel("position")
    axis.set_ylabel("loss (nats/token)")
    axis.set_title("loss by position")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_png(figure, path)


def decode_cost(rows: list[dict], path: Path) -> Path | None:
    """Milliseconds per generated token vs prefilled context length (log-log), one line per model."""
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row["task"] == "decode_cost" and row["metric"] == "ms_per_token":
            lines[model_name(row)].append((row["length"], row["value"]))
    if not lines:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for architecture, xy in sorted(lines.items()):
        xy.sort()
        axis.plot(*zip(*xy, strict=True), marker="o", label=architecture)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("prefilled context (tokens)")
    axis.set_ylabel("ms per generated token")
    axis.set_title("decode cost")
    axis.grid(alpha=0.3)
    axis.legend()
    return save_png(figure, path)


def accuracy_bars(rows: list[dict], path: Path, metric: str = "accuracy") -> Path | None:
    """Accuracy with its 95% interval per (task cell, architecture): the compare side-by-side."""
    cells = [r for r in rows if r["metric"] == metric and r.get("ci_low") is not None]
    if not cells:
        return None
    keys = sorted({_cell(r) for r in cells})
    architectures = sorted({model_name(r) for r in cells})
    width = 0.8 / len(architectures)
    figure, axis = plt.subplots(figsize=(max(6, 1.5 * len(keys)), 4))
    for a, architecture in enumerate(architectures):
        xs, ys, errors = [], [], [[], []]
        for k, key in enumerate(keys):
            match = [r for r in cells if model_name(r) == architecture and _cell(r) == key]
            if match:
                r = match[0]
                xs.append(k + (a - (len(architectures) - 1) / 2) * width)
                ys.append(r["value"])
                errors[0].append(max(0.0, r["value"] - r["ci_low"]))
                errors[1].append(max(0.0, r["ci_high"] - r["value"]))
        axis.bar(xs, ys, width=width, yerr=errors, capsize=3, label=architecture)
    axis.set_xticks(range(len(keys)), keys, rotation=20, fontsize=8)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel(f"{metric} (95% Wilson interval)")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the axes: bars reach 1.0
    return save_png(figure, path)


def _cell(row: dict) -> str:
    extra = f" kv={row['num_kv_pairs']}" if row.get("num_kv_pairs") else ""
    d = f" d={row['d_model']}" if row.get("d_model") else ""
    return f"{row['task']} T={row['length']}{extra}{d}"


def accuracy_vs_state(points: list[dict], path: Path, references: list[dict] | None = None,
                      title: str = "recall vs state size") -> Path | None:
    """A sweep's recall-memory trade-off: per model, mean accuracy over the test slices at the best learning rate vs
    state bytes (log x), one point per width with its 95% interval; published points (hollow, dashed) beside them."""
    lines: dict[str, list[dict]] = defaultdict(list)
    for point in points:
        if point.get("state_bytes"):
            lines[point["model"]].append(point)
    if not lines:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for model, xy in sorted(lines.items()):
        xy.sort(key=lambda p: p["state_bytes"])
        xs = [p["state_bytes"] for p in xy]
        ys = [p["mean"]["value"] for p in xy]
        errors = [[max(0.0, p["mean"]["value"] - p["mean"]["ci_low"]) for p in xy],
                  [max(0.0, p["mean"]["ci_high"] - p["mean"]["value"]) for p in xy]]
        axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=model)
        for p in xy:
            axis.annotate(f"d={p['d_model']}", (p["state_bytes"], p["mean"]["value"]), fontsize=7,
                          textcoords="offset points", xytext=(3, -9))
    published: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for ref in references or []:
        if ref["x_kind"] == "state_bytes" and isinstance(ref["value"], float | int):
            published[ref["model"]].append((float(ref["x"]), float(ref["value"])))
    for model, xy in sorted(published.items()):
        xy.sort()
        axis.plot(*zip(*xy, strict=True), linestyle="--", marker="o", markerfacecolor="none", alpha=0.6,
                  linewidth=1, label=f"{model} (published, other scale)")
    axis.set_xscale("log")
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("state bytes (attention: KV cache at the longest test slice)")
    axis.set_ylabel("accuracy, mean over test slices (95% CI)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_png(figure, path)


def length_generalisation(points: list[dict], path: Path, train_length: int | None = None,
                          title: str = "length generalisation") -> Path | None:
    """Accuracy vs test length (log x), one line per (model, width) with its 95% band; the training length and chance
    marked."""
    if not points:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for point in sorted(points, key=lambda p: (p["model"], p["d_model"])):
        slices = sorted(point["slices"], key=lambda s: s["length"])
        xs = [s["length"] for s in slices]
        label = point["model"] + (f" d={point['d_model']}" if len({p["d_model"] for p in points}) > 1 else "")
        (line,) = axis.plot(xs, [s["value"] for s in slices], marker="o", label=label)
        axis.fill_between(xs, [s["ci_low"] for s in slices], [s["ci_high"] for s in slices], alpha=0.15,
                          color=line.get_color())
    chance = points[0].get("chance")
    if chance:
        axis.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance {chance:.2f}")
    if train_length:
        axis.axvline(train_length, color="black", linestyle="--", linewidth=1, label=f"train length {train_length}")
    axis.set_xscale("log", base=2)
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("test length")
    axis.set_ylabel("accuracy (95% CI)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_png(figure, path)
