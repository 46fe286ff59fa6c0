"""StepMeans: the training values logged, drawn and reported are means over each logging window and every rank."""

import json
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

from diffusion.training.step_means import StepMeans, step_means


class Recorder(Logger):
    """A Lightning logger that keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    name, version = "recorder", 0

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, {k: v for k, v in metrics.items() if k.startswith("train/")}))

    def log_hyperparams(self, *args, **kwargs):
        pass


class Counting(pl.LightningModule):
    """Its loss is the batch's value (0, 1, 2, ... in order), with an extra term 10x that."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        value = batch.sum()
        return {"loss": (self.w * 0).sum() + value, "tenfold": 10 * value}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Clock:
    """Seconds that pass only when a training step runs (one per micro-batch)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_means_over_the_window_s_micro_batches_reach_the_logger_the_curve_and_last(tmp_path):
    """Two optimizer steps a window, three micro-batches of 2 samples a step: each logged loss is the mean of six
    batches' (Lightning's on_step logging gave the last micro-batch's, divided by 3), at the steps Lightning logs
    at, with the window's samples over its seconds."""
    clock = Clock()

    class Timed(Counting):
        def training_step(self, batch, batch_idx):
            clock.now += 0.5
            return super().training_step(batch, batch_idx)

    means, logger = StepMeans(every_n_steps=2, curve_path=tmp_path / "curve.csv", clock=clock), Recorder()
    trainer = pl.Trainer(max_steps=4, accumulate_grad_batches=3, log_every_n_steps=2, callbacks=[means],
                         logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Timed(), torch.utils.data.DataLoader(torch.arange(64.0), batch_size=2))
    assert means.points == [(2, 11.0), (4, 35.0)]  # batches (0+1, 2+3, ... 10+11), then (12+13, ... 22+23)
    assert means.last == {"loss": 35.0, "tenfold": 350.0}
    assert [(step, values) for step, values in logger.logged if values] == [
        (2, {"train/loss": 11.0, "train/tenfold": 110.0, "train/samples_per_second": 4.0, "train/lr": 0.1}),
        (4, {"train/loss": 35.0, "train/tenfold": 350.0, "train/samples_per_second": 4.0, "train/lr": 0.1})]
    assert (tmp_path / "curve.csv").read_text().splitlines() == ["step,loss", "2,11.000000", "4,35.000000"]
    assert step_means(trainer) is means


def _trainer(step, reduce=lambda t, **k: t, logger=None, accumulate=1):
    """What StepMeans reads of a Trainer at optimizer step `step`."""
    return SimpleNamespace(global_step=step, accumulate_grad_batches=accumulate, max_steps=-1, optimizers=[],
                           world_size=1, strategy=SimpleNamespace(reduce=reduce, root_device=torch.device("cpu")),
                           loggers=[logger] if logger else [])


def test_manual_optimization_loss_is_taken_as_returned():
    """Lightning divides the loss by accumulate_grad_batches only under automatic optimization."""
    means = StepMeans(every_n_steps=1)
    means.on_train_batch_end(_trainer(1, accumulate=4), SimpleNamespace(automatic_optimization=False),
                             {"loss": torch.tensor(3.0)}, None, 0)
    assert means.last == {"loss": 3.0}


def _feed(means, steps, values_at, reduce=lambda t, **k: t):
    """Run `means`'s hooks for optimizer steps `steps` (one micro-batch each) with the values `values_at(step)`;
    returns what its loggers got."""
    logger, module = Recorder(), SimpleNamespace(automatic_optimization=True)
    for step in steps:
        trainer = _trainer(step - 1, reduce, logger)
        means.on_train_batch_start(trainer)
        trainer.global_step = step
        means.on_train_batch_end(trainer, module, values_at(step), None, step - 1)
    return [values for _, values in logger.logged]


def test_the_means_are_averaged_over_the_ranks_in_one_collective():
    """Each rank's window sums and counts go through strategy.reduce once, stacked, and their totals' ratios are
    logged: here another rank had 3 micro-batches (summing 60 and 9) to this one's 2."""
    calls = []

    def reduce(t, reduce_op):
        calls.append((t.clone(), reduce_op))
        return t + torch.tensor([60.0, 9.0, 3.0, 3.0])

    logged = _feed(StepMeans(every_n_steps=2), [1, 2], lambda s: {"loss": torch.tensor(float(s)),
                                                                    "aux": torch.tensor(10.0 * s)}, reduce)
    assert len(calls) == 1 and calls[0][1] == "sum"
    assert calls[0][0].tolist() == [30.0, 3.0, 2.0, 2.0]  # the local sums in name order (aux, loss), the counts
    assert logged == [{"train/aux": 18.0, "train/loss": pytest.approx(2.4)}]  # (30 + 60) / 5, (3 + 9) / 5


def test_a_value_that_appears_mid_window_is_averaged_over_the_batches_that_had_it():
    """The GAN's terms start at discriminator.start_step, inside a window: their mean is over those steps only."""
    logged = _feed(StepMeans(every_n_steps=4), [1, 2, 3, 4], lambda s: {
        "loss": torch.tensor(float(s)), **({"g_loss": torch.tensor(float(s))} if s >= 3 else {})})
    assert logged == [{"train/g_loss": 3.5, "train/loss": 2.5}]


@pytest.mark.parametrize("stop", [1, 3, 5])
def test_a_run_resumed_mid_window_logs_what_an_uninterrupted_one_logs(stop):
    """The open window's sums travel in the checkpoint: resumed after step `stop` (inside a window of 4 steps),
    the curve and the last means are the uninterrupted run's, to the bit."""
    values = {s: {"loss": torch.tensor(1.0 / s), "aux": torch.tensor(s / 7.0)} for s in range(1, 9)}
    whole = StepMeans(every_n_steps=4)
    _feed(whole, range(1, 9), values.get)

    first = StepMeans(every_n_steps=4)
    _feed(first, range(1, stop + 1), values.get)
    state = torch.load(_saved(first.state_dict()), weights_only=False)  # as a checkpoint holds it
    resumed = StepMeans(every_n_steps=4)
    resumed.load_state_dict(state)
    _feed(resumed, range(stop + 1, 9), values.get)
    assert resumed.points == whole.points and len(whole.points) == 2
    assert resumed.last == whole.last


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_the_steps_after_the_last_multiple_make_a_last_window_when_training_ends(tmp_path):
    """max_steps 5 logging every 2: the curve, the last means and the loggers reach step 5 (batches 4, its own)."""
    means, logger = StepMeans(every_n_steps=2, curve_path=tmp_path / "curve.csv"), Recorder()
    trainer = pl.Trainer(max_steps=5, log_every_n_steps=2, callbacks=[means], logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Counting(), torch.utils.data.DataLoader(torch.arange(64.0), batch_size=1))
    assert means.points == [(2, 0.5), (4, 2.5), (5, 4.0)]
    assert means.last["loss"] == 4.0
    assert {k: v for k, v in logger.logged[-1][1].items() if k not in ("train/samples_per_second", "train/lr")} == {
        "train/loss": 4.0, "train/tenfold": 40.0}


def test_a_step_s_means_are_logged_before_that_step_s_checkpoint_is_written(tmp_path):
    """A kill right after a checkpoint must not lose the point MLflow would have got at that step: the resumed run
    starts after it. Through Lightning's self.log the metrics reached the logger after every callback's
    on_train_batch_end, the checkpoint's included."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    logger, seen = Recorder(), []

    class Watched(ModelCheckpoint):
        def _save_checkpoint(self, trainer, filepath):
            seen.append((trainer.global_step, [step for step, values in logger.logged if values]))
            super()._save_checkpoint(trainer, filepath)

    trainer = pl.Trainer(max_steps=4, log_every_n_steps=2, logger=logger, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[StepMeans(every_n_steps=2), Watched(dirpath=tmp_path, every_n_train_steps=2)])
    trainer.fit(Counting(), torch.utils.data.DataLoader(torch.arange(64.0), batch_size=1))
    assert [(step, logged[-1]) for step, logged in seen] == [(2, 2), (4, 4)]


def test_under_ddp_every_rank_resumes_from_the_ranks_mean_of_the_open_window():
    """Only rank 0's checkpoint is written: with its own open sums in it, every rank resumed with rank 0's (the
    window's mean came out 5.0 here instead of 7.5). The checkpoint holds the ranks' mean sums and counts, which give
    the window the uninterrupted mean over the ranks."""
    values = [{s: {"loss": torch.tensor(10.0 * rank + s)} for s in range(1, 5)} for rank in (0, 1)]
    expected = sum(float(v["loss"]) for per_rank in values for v in per_rank.values()) / 8  # 7.5

    before = [StepMeans(every_n_steps=4), StepMeans(every_n_steps=4)]
    for rank, means in enumerate(before):
        _feed(means, [1, 2], values[rank].get)  # killed after step 2, inside the window
    other = torch.stack([before[1].sums["loss"], torch.tensor(float(before[1].counts["loss"]))])  # sums, counts
    before[0]._strategy = SimpleNamespace(root_device=torch.device("cpu"),
                                          reduce=lambda t, reduce_op: (t + other) / 2)  # the collective of 2 ranks
    state = torch.load(_saved(before[0].state_dict()), weights_only=False)

    window_means = []
    for rank in (0, 1):
        resumed = StepMeans(every_n_steps=4)
        resumed.load_state_dict(state)
        _feed(resumed, [3, 4], values[rank].get, reduce=lambda t, **k: window_means.append(t.clone()) or t)
    total_sum, total_count = sum(window_means).tolist()  # what the collective's sum over the two ranks gives
    assert total_sum / total_count == expected


def test_a_finished_run_s_checkpoint_holds_its_last_window(tmp_path):
    """max_steps 5 logging every 2: the short window of step 5 is closed before last.ckpt is written, so rerunning
    the finished run (which resumes from it and runs no training hook) reports the same curve and final means."""
    from diffusion.training.checkpointing import checkpoint_callback

    def fit(ckpt_path=None):
        means = StepMeans(every_n_steps=2)
        trainer = pl.Trainer(max_steps=5, log_every_n_steps=2, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[means, checkpoint_callback(tmp_path, 100)])
        trainer.fit(Counting(), torch.utils.data.DataLoader(torch.arange(64.0), batch_size=1), ckpt_path=ckpt_path)
        return means

    first = fit()
    again = fit(tmp_path / "last.ckpt")
    assert first.points == again.points == [(2, 0.5), (4, 2.5), (5, 4.0)]
    assert again.last == first.last == {"loss": 4.0, "tenfold": 40.0}


def test_recent_loss_weights_each_window_by_its_steps():
    """The final loss is the mean over the last windows' steps: a last window of 1 step (max_steps off the grid)
    weighs as 1 step, not as a whole window of 10."""
    means = StepMeans(every_n_steps=10)
    assert means.recent_loss() is None
    means.points = [(10, 4.0), (20, 2.0), (30, 1.0), (31, 7.0)]
    assert means.recent_loss(2) == pytest.approx((10 * 1.0 + 1 * 7.0) / 11)
    assert means.recent_loss(10) == pytest.approx((10 * 4.0 + 10 * 2.0 + 10 * 1.0 + 7.0) / 31)


def test_the_learning_rate_logged_is_the_one_the_window_s_last_step_ran_at():
    """lr 1 / (step + 1), stepped after each optimizer step: steps 2 and 4 ran at 1/2 and 1/4."""

    class Scheduled(Counting):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (step + 1))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    logger = Recorder()
    trainer = pl.Trainer(max_steps=4, log_every_n_steps=2, callbacks=[StepMeans(every_n_steps=2)], logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Scheduled(), torch.utils.data.DataLoader(torch.arange(64.0), batch_size=1))
    assert [values["train/lr"] for _, values in logger.logged if values] == [0.5, 0.25]


DDP_SCRIPT = textwrap.dedent(
    """
    import io, json, sys
    from types import SimpleNamespace
    import torch, torch.distributed as dist
    from diffusion.training.step_means import StepMeans

    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def reduce(t, reduce_op):
        t = t.clone()
        dist.all_reduce(t)
        return t / 2

    strategy = SimpleNamespace(reduce=reduce, root_device=torch.device("cpu"), world_size=2)
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    module = SimpleNamespace(automatic_optimization=True)

    def values(step):
        # Rank 1 alone returns "extra" (a term of some batches only), and at step 2 rank 0 returns nothing at all.
        if rank == 0:
            return {} if step == 2 else {"loss": torch.tensor(float(step))}
        return {"loss": torch.tensor(10.0 * step), "extra": torch.tensor(100.0 * step)}

    def feed(means, steps):
        for step in steps:
            trainer = SimpleNamespace(global_step=step - 1, accumulate_grad_batches=1, max_steps=-1, optimizers=[],
                                      world_size=2, strategy=strategy, loggers=[logger])
            means.on_train_batch_start(trainer)
            trainer.global_step = step
            means.on_train_batch_end(trainer, module, values(step), None, step - 1)

    whole = StepMeans(every_n_steps=4)
    whole.setup(SimpleNamespace(strategy=strategy), module, "fit")
    feed(whole, range(1, 5))
    # Killed after step 3 and resumed: every rank loads the checkpoint rank 0 wrote.
    first = StepMeans(every_n_steps=4)
    first.setup(SimpleNamespace(strategy=strategy), module, "fit")
    feed(first, range(1, 4))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    state = [buffer.getvalue()]
    dist.broadcast_object_list(state, src=0)
    resumed = StepMeans(every_n_steps=4)
    resumed.load_state_dict(torch.load(io.BytesIO(state[0]), weights_only=False))
    feed(resumed, [4])
    dist.destroy_process_group()
    print(json.dumps({"rank": rank, "whole": whole.last, "resumed": resumed.last}))
    """
)


@pytest.mark.timeout(120)
def test_values_only_some_ranks_return_are_averaged_over_those_ranks_without_a_hang():
    """Each window's means are one collective over one value per name: a rank that returned a value the others did
    not stacked more values than they did, and the collective waited forever. Now the ranks agree on the names
    first, and a value is averaged over the ranks that returned it (2 real gloo processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, str(r), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=100)
            assert proc.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    # loss: the mean over the 7 micro-batches that returned it (rank 0's steps 1, 3, 4 and rank 1's 10 to 40);
    # extra: over rank 1's 4 alone.
    expected = {"loss": (1 + 3 + 4 + 10 + 20 + 30 + 40) / 7, "extra": 250.0}
    for r in results:
        assert r["whole"] == pytest.approx(expected, rel=1e-6)
        # Resumed mid-window from rank 0's checkpoint, which holds the ranks' mean sums and counts.
        assert r["resumed"] == pytest.approx(r["whole"], rel=1e-6)
