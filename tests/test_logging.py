"""lib/logging.py: readable numbers, unwrapped lines without a terminal, resume marks, plot grid."""

import json

import pytest
import torch
from PIL import Image

from lib.logging import NonFiniteLossError, RunLog, fmt, make_console, plot_curves


class FakeAccelerator:
    is_main_process = True
    device = torch.device("cpu")
    run_notes = ["mixed precision: no"]

    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append((step, values))

    def end_training(self):
        pass


def test_small_terms_are_readable():
    assert [fmt(v) for v in (1e-5, 5e-6, 0.1234567, 12.3456, 0.0, 0.005)] == \
        ["1e-05", "5e-06", "0.1235", "12.3456", "0", "0.005"]


def test_log_line_shows_small_terms_and_is_not_wrapped(tmp_path, capsys):
    log = RunLog(FakeAccelerator(), tmp_path, total_steps=2, log_interval=1)
    log.train_step(1, {"loss_kd": torch.tensor(1e-5), "loss_ce": torch.tensor(2.5),
                       "loss_with_a_very_long_name_" * 4 + "x": torch.tensor(0.25)}, lr=1e-3, images=4)
    log.info("x" * 190)
    log.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "mixed precision: no"  # setup_run's notes come first
    line = out[1]
    assert line.startswith("step 1/2  lr 1.000e-03  loss_kd 1e-05  loss_ce 2.5000  loss_with") and len(line) > 80
    assert "x" * 190 in out  # one line, no 80-column wrap
    assert "0.0000" not in line
    assert make_console().width >= 200 or make_console().is_terminal


def test_resumed_drops_later_records_and_marks_the_log(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "mIoU": s}) + "\n" for s in (2, 4, 6))
                                             + '{"step": 8, "mI')  # a line cut by a kill
    log = RunLog(FakeAccelerator(), tmp_path, total_steps=8)
    log.resumed(4, tmp_path / "checkpoints" / "step_4")
    log.interrupted(5, tmp_path / "checkpoints" / "step_5")
    log.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "train.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    text = (tmp_path / "log.txt").read_text()
    assert f"---- resumed at step 4 from {tmp_path / 'checkpoints' / 'step_4'}" in text
    assert f"interrupted at step 5; checkpoint saved to {tmp_path / 'checkpoints' / 'step_5'}; continue with resume=auto" in text


def test_ten_metrics_plot_as_a_grid(tmp_path):
    rec = {"step": 1, **{f"m{i}": float(i) for i in range(10)}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "step": 2}) + "\n")
    plot_curves(tmp_path)
    w, h = Image.open(tmp_path / "metrics.png").size
    assert (w, h) == (int(3.2 * 4 * 72), int(2.8 * 3 * 72)) == (921, 604)  # 4 columns x 3 rows, not 10 x 1


def test_logged_loss_is_the_mean_over_the_micro_batches_of_a_step(tmp_path):
    log = RunLog(FakeAccelerator(), tmp_path, total_steps=2, log_interval=1)
    for v in (1.0, 2.0, 6.0):  # 3 micro-batches of gradient accumulation
        log.micro_batch({"loss": torch.tensor(v)})
    log.train_step(1, lr=1e-3, images=12)
    log.train_step(2, {"loss": torch.tensor(5.0)}, lr=1e-3, images=12)  # one call, no accumulation
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [3.0, 5.0]
    log.micro_batch({"loss": torch.tensor(float("nan"))})  # a NaN in one micro-batch of step 3
    with pytest.raises(NonFiniteLossError, match="step 3: loss = nan"):
        log.train_step(3, {"loss": torch.tensor(1.0)}, lr=1e-3, images=12)
