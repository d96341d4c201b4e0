"""What a run prints besides its metrics: the closing summary of `r1mega-train`, and the one
`backends:` line in place of the third-party warnings known to be harmless."""

from __future__ import annotations

import warnings

import pytest

from r1mega.config.loader import load_config
from r1mega.platform import logs
from r1mega.trainer.rl.train import summary


def _eval(step, greedy, mean, passk):
    return {"step": step, "eval/greedy_accuracy": greedy, "eval/mean_at_k": mean, "eval/pass_at_k": passk,
            "eval/k": 4.0, "eval/prompts": 200.0}


def test_summary_shows_accuracy_before_and_after(tmp_path):
    cfg = load_config([f"trainer.output_dir={tmp_path}"])
    (tmp_path / "curves.png").write_bytes(b"png")
    (tmp_path / "model").mkdir()
    rows = [_eval(0, 0.585, 0.50125, 0.745), {"step": 1, "loss": 0.1}, _eval(20, 0.9, 0.6, 0.9),
            {"step": 40, "loss": 0.2}, _eval(40, 0.5, 0.5, 0.5),
            {"step": 40, "loss": 0.2}, _eval(40, 0.96, 0.765, 0.97)]  # a resumed run wrote step 40 again
    text = summary(cfg, rows, 401.4)
    lines = text.splitlines()
    assert lines[0] == f"r1mega: 40 steps of {cfg.algorithm.name} on {cfg.model.name} / {cfg.data.name} in 6 min 41 s"
    assert lines[1].split() == ["held-out", "accuracy,", "200", "prompts", "step", "0", "step", "40"]
    assert lines[2].split() == ["greedy", "pass@1", "58.5%", "96.0%"]
    assert lines[3].split() == ["sampled", "pass@1", "(mean", "of", "4)", "50.1%", "76.5%"]
    assert lines[4].split() == ["pass@4", "74.5%", "97.0%"]
    assert lines[5] == f"curves: {tmp_path / 'curves.png'}" and lines[6] == f"model:  {tmp_path / 'model'}"


def test_summary_without_evaluations(tmp_path):
    cfg = load_config([f"trainer.output_dir={tmp_path}"])
    assert summary(cfg, [{"step": 1}, {"step": 2}], 12.0).splitlines() == [
        f"r1mega: 2 steps of {cfg.algorithm.name} on {cfg.model.name} / {cfg.data.name} in 12 s"]


@pytest.fixture
def collapsed(monkeypatch):
    shown = []
    monkeypatch.setattr(logs, "_SHOW", lambda message, *rest: shown.append(str(message)))
    monkeypatch.setattr(logs, "_HELD", {})
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    logs.collapse_known_warnings()
    return shown


def test_known_warnings_collapse_into_one_line_and_others_show(collapsed):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = logs._show  # catch_warnings restores the hook it found on exit
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to local implementations of "
                      "multi_tensor_applier and multi_tensor_scale")
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("something the user must see", UserWarning)
    assert collapsed == ["something the user must see"]
    assert logs.backends_line() == ("backends: no Apex or Transformer Engine: local multi-tensor ops, torch norms, "
                                    "torch optimizers; 1 deprecation warnings inside megatron-core and torch hidden")


def test_nothing_held_says_so(collapsed):
    assert logs.backends_line() == "backends: as installed"
