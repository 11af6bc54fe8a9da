"""`hybridzoo compare` trains each cell through the recipes' trainer: a compare stopped mid-cell resumes that cell from
its checkpoint and ends with exactly the rows of an uninterrupted one; ParaRNN Newton counts reach the rows."""

import pytest

from hybridzoo.recipes import sweep, trainer
from hybridzoo.recipes.compare import CompareSettings, run_compare


def settings(output_dir) -> CompareSettings:
    return CompareSettings(architectures=["transformer", "paragru"], train_slices=[(16, 2), (32, 4)], d_models=[16],
                           steps=6, batch_size=4, vocab_size=64, test_examples=8, output_dir=str(output_dir))


def test_stopped_compare_resumes_mid_cell_to_the_same_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "CHECKPOINT_EVERY", 2)
    straight, _ = run_compare(settings(tmp_path / "straight"), log=lambda message: None)
    paragru = [r for r in straight if r["architecture"] == "paragru"]
    assert paragru and all(r["newton_solves"] > 0 and r["newton_mean_iterations"] >= 1 for r in paragru)
    assert all("newton_solves" not in r for r in straight if r["architecture"] == "transformer")

    real_loss = trainer.LanguageModelLoss.__call__
    calls = []

    def stopped(self, model, batch, head):
        calls.append(1)
        if len(calls) == 6 + 5:  # the transformer's 6 steps, then the 5th of the ParaGRU's (after its step-4 save)
            raise KeyboardInterrupt
        return real_loss(self, model, batch, head)

    monkeypatch.setattr(trainer.LanguageModelLoss, "__call__", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_compare(settings(tmp_path / "killed"), log=lambda message: None)
    monkeypatch.undo()
    monkeypatch.setattr(sweep, "CHECKPOINT_EVERY", 2)

    trained = []
    monkeypatch.setattr(trainer.LanguageModelLoss, "__call__",
                        lambda self, model, batch, head: trained.append(1) or real_loss(self, model, batch, head))
    messages = []
    resumed, written = run_compare(settings(tmp_path / "killed"), log=messages.append)
    assert len(trained) == 2  # only the ParaGRU's steps 5 and 6: the finished transformer is reused
    keys = ("architecture", "length", "num_kv_pairs", "metric", "value", "n", "final_train_loss", "newton_solves",
            "newton_mean_iterations")
    assert [{k: r.get(k) for k in keys} for r in resumed] == [{k: r.get(k) for k in keys} for r in straight]
    assert "| paragru | 16 |" in written["compare"].read_text()

    # other settings in the same folder: the cells start over instead of resuming someone else's run
    changed = settings(tmp_path / "killed")
    changed.steps = 4
    messages.clear()
    run_compare(changed, log=messages.append)
    assert sum("other settings" in m for m in messages) == 2
