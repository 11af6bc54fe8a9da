"""Sweeps as data: the grid, Zoology's best-learning-rate selection, resuming a killed sweep, the outputs and plots."""

import json

import pytest

from hybridzoo.cli import main
from hybridzoo.evaluation.references import beside_ours, matching_references, reference_points
from hybridzoo.recipes.sweep import (
    CELLS_FILE,
    Cell,
    best_learning_rates,
    builtin_sweeps,
    load_sweep,
    nearest_published,
    run_sweep,
    sweep_from_dict,
)

TINY = {
    "name": "tiny", "task": "mqar", "task_params": {"vocab_size": 64},
    "train": [{"seq_len": 16, "num_kv_pairs": 2}], "test": [{"seq_len": 16, "num_kv_pairs": 2},
                                                             {"seq_len": 32, "num_kv_pairs": 4}],
    "models": ["transformer", {"name": "gdn-neg", "zoo": "gated-deltanet",
                               "overrides": {"linear_allow_neg_eigval": True}}],
    "d_models": [16, 32], "learning_rates": [1e-3, 1e-2], "seeds": [0], "steps": 3, "batch_size": 4,
    "test_examples": 8,
}


def accuracy_row(cell: Cell, length: int, kv: int | None, value: float, n: int = 100) -> dict:
    return {"model": cell.model, "architecture": cell.model, "pattern": "AA", "d_model": cell.d_model,
            "state_bytes": 1000 * cell.d_model, "task": "mqar", "length": length, "num_kv_pairs": kv,
            "seed": cell.seed, "lr": cell.lr, "metric": "accuracy", "value": value, "ci_low": max(0, value - 0.05),
            "ci_high": min(1, value + 0.05), "n": n, "correct": round(value * n), "chance": 0.01}


def fake_runner(scores: dict[tuple, list[float]], calls: list[str], fail_at: int | None = None):
    """A cell runner that returns given accuracies per (model, d, lr, seed) and records what it ran."""

    def run(spec, cell, folder):
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # the sweep is killed while training this cell
        calls.append(cell.key)
        values = scores.get((cell.model, cell.d_model, cell.lr, cell.seed), [0.5, 0.5])
        return [accuracy_row(cell, t["seq_len"], t["num_kv_pairs"], v) for t, v in zip(spec.test, values,
                                                                                         strict=True)]

    return run


def test_best_learning_rate_is_the_best_mean_over_slices_averaged_over_seeds():
    cells = [Cell("m", 64, lr, seed) for lr in (1e-3, 1e-2) for seed in (0, 1)]
    values = {(1e-3, 0): [0.5, 0.7], (1e-3, 1): [0.6, 0.6],   # means 0.6, 0.6 -> 0.60
              (1e-2, 0): [0.9, 0.4], (1e-2, 1): [0.3, 0.3]}   # means 0.65, 0.3 -> 0.475 (seed 0 alone prefers 1e-2)
    rows = {c.key: [accuracy_row(c, 64, 4, values[(c.lr, c.seed)][0]), accuracy_row(c, 128, 8,
                                                                                      values[(c.lr, c.seed)][1])]
            for c in cells}
    best = best_learning_rates(rows, cells)[("m", 64)]
    assert best["lr"] == 1e-3 and best["score"] == pytest.approx(0.6)
    assert best["scores"][1e-2] == pytest.approx(0.475)
    # one seed only: its own best
    only_seed0 = {k: v for k, v in rows.items() if k.endswith("seed=0")}
    assert best_learning_rates(only_seed0, cells)[("m", 64)]["lr"] == 1e-2
    # a tie goes to the smaller rate
    tied = {c.key: [accuracy_row(c, 64, 4, 0.8)] for c in cells}
    assert best_learning_rates(tied, cells)[("m", 64)]["lr"] == 1e-3


def test_a_killed_sweep_resumes_where_it_stopped(tmp_path):
    spec = sweep_from_dict(TINY)
    cells = spec.cells()
    assert len(cells) == 2 * 2 * 2  # models x widths x learning rates
    scores = {("transformer", 16, 1e-2, 0): [0.9, 0.7], ("transformer", 16, 1e-3, 0): [0.2, 0.1]}
    first: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, tmp_path, runner=fake_runner(scores, first, fail_at=3), log=lambda _: None)
    assert first == [c.key for c in cells[:3]]
    with open(tmp_path / CELLS_FILE, "a") as f:
        f.write('{"fingerprint": "cut short by the ki')  # a record half-written when the process died
    second: list[str] = []
    messages: list[str] = []
    written = run_sweep(spec, tmp_path, runner=fake_runner(scores, second), log=messages.append)
    assert second == [c.key for c in cells[3:]]  # only what was left, in order
    assert "3 already done" in messages[0] and "ETA" in messages[-1]
    records = [json.loads(line) for line in (tmp_path / CELLS_FILE).read_text().splitlines()]
    assert sorted(r["cell"] for r in records) == sorted(c.key for c in cells)
    summary = json.loads(written["summary"].read_text())
    transformer16 = next(p for p in summary["points"] if p["model"] == "transformer" and p["d_model"] == 16)
    assert transformer16["best_lr"] == 1e-2 and transformer16["mean"]["value"] == pytest.approx(0.8)
    rows = [json.loads(line) for line in written["results"].read_text().splitlines()]
    assert len(rows) == 8 * 2 and sum(r["selected"] for r in rows) == 4 * 2
    assert written["plot"].read_bytes()[:4] == b"\x89PNG"
    # a third run has nothing left to do
    third: list[str] = []
    run_sweep(spec, tmp_path, runner=fake_runner(scores, third), log=lambda _: None)
    assert third == []


def test_another_sweep_in_the_same_folder_is_refused_unless_restarted(tmp_path):
    run_sweep(sweep_from_dict(TINY), tmp_path, runner=fake_runner({}, []), log=lambda _: None)
    changed = sweep_from_dict({**TINY, "steps": 4})
    with pytest.raises(ValueError, match=r"changed: steps.*--restart"):
        run_sweep(changed, tmp_path, runner=fake_runner({}, []), log=lambda _: None)
    calls: list[str] = []
    run_sweep(changed, tmp_path, runner=fake_runner({}, calls), restart=True, log=lambda _: None)
    assert len(calls) == 8 and (tmp_path / f"{CELLS_FILE}.bak").exists()


def test_sweep_fields_are_checked_with_the_fix_named():
    with pytest.raises(ValueError, match="`step` is not a sweep field"):
        sweep_from_dict({**TINY, "step": 3})
    with pytest.raises(ValueError, match="zoo architecture 'mamba'"):
        sweep_from_dict({**TINY, "models": [{"name": "m", "zoo": "mamba"}]})
    with pytest.raises(ValueError, match="rejects"):
        sweep_from_dict({**TINY, "test": [{"seq_len": 128, "num_kv_pairs": 4}]})  # V = 64 must exceed T
    assert sweep_from_dict({**TINY, "learning_rates": {"logspace": [-3, -1.5, 4]}}).learning_rates == \
        pytest.approx([1e-3, 10 ** -2.5, 1e-2, 10 ** -1.5])


def test_builtin_sweeps_load_and_zoology_has_the_reference_settings():
    assert {"zoology", "zoology-cpu", "parity-neg-eigval"} <= set(builtin_sweeps())
    for name in builtin_sweeps():
        load_sweep(name)
    zoology = load_sweep("zoology")
    assert zoology.task_params["vocab_size"] == 8192 and zoology.batch_size == 256
    assert [(t["seq_len"], t["num_kv_pairs"]) for t in zoology.test][0] == (64, 4)
    assert [(t["seq_len"], t["num_kv_pairs"]) for t in zoology.test][-1] == (1024, 256)
    assert (zoology.train[0]["seq_len"], zoology.train[-1]["seq_len"], zoology.train[-1]["num_kv_pairs"]) == \
        (64, 256, 64)
    assert zoology.learning_rates == pytest.approx([1e-3, 10 ** -2.5, 1e-2, 10 ** -1.5])


def test_sweep_cli_trains_for_real_and_writes_table_and_plot(tmp_path):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "d_models": [16], "models": ["transformer"]}))
    out = tmp_path / "out"
    assert main(["compare", "--sweep", str(path), "--output-dir", str(out)]) == 0
    table = (out / "sweep.md").read_text()
    assert "| transformer | 16 | AA |" in table and "T=32, kv=4" in table
    assert "Published reference numbers" in table  # Zoology's MQAR anchors, marked as another scale
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"transformer"} and {r["lr"] for r in rows} == {1e-3, 1e-2}
    assert (out / "accuracy_vs_state.png").read_bytes()[:4] == b"\x89PNG"


def test_state_tracking_sweep_plots_length_generalisation(tmp_path):
    spec = load_sweep("parity-neg-eigval")

    def runner(spec, cell, folder):
        return [dict(accuracy_row(cell, t["length"], None, 0.9 if cell.model == "lstm" else 0.5), task="parity")
                for t in spec.test]

    written = run_sweep(spec, tmp_path, runner=runner, log=lambda _: None)
    assert written["plot"].name == "length_generalisation.png"
    assert written["plot"].read_bytes()[:4] == b"\x89PNG"
    table = written["markdown"].read_text()
    assert "| lstm | 64 |" in table and "length 256" in table
    assert "0.900 (seed 0), 0.900 (seed 1), 0.900 (seed 2)" in table


def test_references_carry_citation_and_setting_and_sit_beside_matching_rows():
    points = reference_points()
    assert all(p["citation"] and p["setting"] and p["scale"] for p in points)
    gdn = [p for p in points if p["model"] == "Gated DeltaNet" and "niah_single_2" in p["tasks"]]
    assert {p["x"]: p["value"] for p in gdn} == {1024: 1.0, 2048: 0.998, 4096: 0.922, 8192: 0.296}
    ours = [{"model": "mine", "architecture": "gated-deltanet", "task": "niah_single_2", "length": 1024,
             "depth": 0.5, "metric": "exact", "value": 0.25, "ci_low": 0.1, "ci_high": 0.4},
            {"model": "mine", "architecture": "gated-deltanet", "task": "niah_single_2", "length": 300,
             "depth": 0.5, "metric": "exact", "value": 0.25, "ci_low": 0.1, "ci_high": 0.4}]
    section = beside_ours(ours)
    assert "orientation, not a claim of parity" in section and "| mine | niah_single_2 | length 1024" in section
    assert "length 300" not in section and "arXiv 2412.06464" in section


def test_a_sweep_point_is_shown_beside_the_published_point_of_its_architecture_and_state_size():
    mqar = matching_references("mqar")
    # Zoology's Gated DeltaNet points sit at 17,000 / 66,000 / 260,000 bytes
    assert nearest_published({"architecture": "gated-deltanet", "state_bytes": 20_992}, mqar) == \
        "0.89 at 17,000 B (zoology-tradeoff)"
    assert nearest_published({"architecture": "gated-deltanet", "state_bytes": 1_000}, mqar) == ""  # nothing near
    assert nearest_published({"architecture": "lstm", "state_bytes": 17_000}, mqar) == ""  # no published LSTM
