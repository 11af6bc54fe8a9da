"""Published reference numbers (`references.yaml`), printed beside ours where the task matches.

Every number carries its citation, its setting and its scale, and is printed under a heading that says it comes
from a different scale: orientation, not a claim of parity. `reference_points()` flattens the file into one dict per
number: `x_kind` is `length` (tokens), `state_bytes` or `slice` ("T,kv"), `x` its value.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

REFERENCES_FILE = Path(__file__).parent / "references.yaml"
HEADING = "Published reference numbers (a different scale and setting: orientation, not a claim of parity)"


@lru_cache(maxsize=1)
def reference_points() -> tuple[dict, ...]:
    data = yaml.safe_load(REFERENCES_FILE.read_text())
    sources = data["sources"]
    points = []
    for entry in data["references"]:
        source = sources[entry["source"]]  # a KeyError here is a typo in references.yaml (a test reads every entry)
        for x_kind in ("values", "state_bytes", "slices"):
            for x, value in (entry.get(x_kind) or {}).items():
                points.append({
                    "source": entry["source"], "citation": source["citation"], "setting": source["setting"],
                    "scale": source["scale"], "provenance": source["provenance"], "model": entry["model"],
                    "architecture": entry.get("architecture"), "tasks": list(entry["task"]), "metric": entry["metric"],
                    "x_kind": {"values": "length", "slices": "slice"}.get(x_kind, x_kind), "x": x, "value": value,
                    "note": entry.get("note", ""),
                })
    return tuple(points)


def matching_references(task: str, test: list[dict] | None = None, task_params: dict | None = None) -> list[dict]:
    """Every reference number for `task` (a sweep shows them all: the setting column says how they differ)."""
    return [dict(p) for p in reference_points() if task in p["tasks"]]


def _value(value) -> str:
    return f"{value:.3f}" if isinstance(value, float | int) else str(value)


def _x(point: dict) -> str:
    if point["x_kind"] == "state_bytes":
        return f"{point['x']:,} state bytes"
    if point["x_kind"] == "slice":
        return "T={}, kv={}".format(*str(point["x"]).split(","))
    return f"length {point['x']:,}"


def references_markdown(points: list[dict]) -> str:
    """The reference numbers as a markdown section: model, where, metric, value, source, with each source's setting."""
    if not points:
        return ""
    lines = [f"## {HEADING}", "", "| published model | at | metric | value | source | provenance |",
             "|---|---|---|---:|---|---|"]
    for p in points:
        note = f" ({p['note']})" if p["note"] else ""
        lines.append(f"| {p['model']} | {_x(p)} | {p['metric']} | {_value(p['value'])}{note} | {p['source']} | "
                     f"{p['provenance']} |")
    lines.append("")
    for source in dict.fromkeys(p["source"] for p in points):
        first = next(p for p in points if p["source"] == source)
        lines.append(f"- `{source}`: {first['citation']}. Setting: {first['setting']}. Scale: {first['scale']}.")
    return "\n".join(lines)


def beside_ours(rows: list[dict]) -> str:
    """Our eval rows next to the published numbers of the same task, metric and length (or MQAR slice): a markdown
    section, empty when nothing matches."""
    lines = []
    for row in rows:
        for p in reference_points():
            if row["task"] not in p["tasks"] or row["metric"] != p["metric"]:
                continue
            if p["x_kind"] == "length" and row["length"] == p["x"]:
                where = f"length {row['length']}"
            elif p["x_kind"] == "slice" and f"{row['length']},{row.get('num_kv_pairs')}" == str(p["x"]):
                where = f"T={row['length']}, kv={row['num_kv_pairs']}"
            else:
                continue
            depth = f", depth {row['depth']}" if row.get("depth") is not None else ""
            ci = f" [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" if row.get("ci_low") is not None else ""
            lines.append(f"| {row.get('model') or row['architecture']} | {row['task']} | {where}{depth} | "
                         f"{row['metric']} | {row['value']:.3f}{ci} | {p['model']} | {_value(p['value'])} | "
                         f"{p['source']} |")
    if not lines:
        return ""
    used = [p for p in reference_points() if any(f"| {p['source']} |" in line for line in lines)]
    sources = "\n".join(f"- `{s}`: {p['citation']}. Setting: {p['setting']}. Scale: {p['scale']}."
                        for s, p in {p["source"]: p for p in used}.items())
    return "\n".join([f"## Ours beside the published numbers ({HEADING.split('(', 1)[1]}", "",
                      "| our model | task | at | metric | ours [95% CI] | published model | published | source |",
                      "|---|---|---|---|---:|---|---:|---|", *lines, "", sources])
