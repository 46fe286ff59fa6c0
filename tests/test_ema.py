"""The EMA of the weights (``diffusion.training.callbacks.EMA``): Lightning's ``EMAWeightAveraging`` with a foreach
update. It must average exactly as the recurrence says (and as Lightning's own callback does), and survive a
checkpoint: a run stopped and resumed ends with the EMA of an uninterrupted run.
"""

import pytorch_lightning as pl
import pytest
import torch
from pytorch_lightning.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint

from diffusion.training.callbacks import EMA

DECAY = 0.8


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.register_buffer("calls", torch.zeros(()))  # a buffer too: averaged like the weights (use_buffers)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.calls += 1
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Record(Callback):
    """The live weights after every optimizer step (before the EMA callback's own hook, which comes later)."""

    def __init__(self) -> None:
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append([p.detach().clone() for p in pl_module.parameters()])


def loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)  # 4 batches an epoch: the resume below starts on an epoch boundary
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)


def fit(ema: Callback, steps: int, root, ckpt_path=None, extra: tuple[Callback, ...] = ()) -> tuple[Tiny, Record, pl.Trainer]:
    model, record = Tiny(), Record()
    trainer = pl.Trainer(max_steps=steps, callbacks=[record, ema, *extra], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=bool(extra), accelerator="cpu", devices=1,
                         default_root_dir=root)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return model, record, trainer


def test_ema_follows_the_recurrence_and_lightnings_callback(tmp_path):
    ours, record, _ = fit(EMA(decay=DECAY, warmup=False), 6, tmp_path / "a")
    stock, _, _ = fit(EMAWeightAveraging(decay=DECAY), 6, tmp_path / "b")
    # ema_1 = w_1 (the first update copies), ema_k = decay * ema_{k-1} + (1 - decay) * w_k
    expected = record.weights[0]
    for weights in record.weights[1:]:
        expected = [DECAY * e + (1 - DECAY) * w for e, w in zip(expected, weights)]
    # At the end of fit the callback copies the average into the module.
    for got, ref, want, live in zip(ours.parameters(), stock.parameters(), expected, record.weights[-1]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(got, live, atol=1e-4), "the EMA must lag the live weights"
    assert 1 < ours.calls.item() < 6, "the buffer is averaged too (1 .. 6 over the steps)"


def test_ema_warms_up_its_decay_as_diffusers_emamodel(tmp_path):
    """diffusers' EMAModel.get_decay (its default, use_ema_warmup=False): update k (1-based) uses
    min(decay, k / (9 + k)), 0 for the first (a copy). Without it the average of a short run is mostly the
    weights of step 1."""
    decay = 0.95
    ours, record, _ = fit(EMA(decay=decay), 6, tmp_path / "a")
    expected = record.weights[0]
    for k, weights in enumerate(record.weights[1:], start=2):
        d = min(decay, k / (9 + k))  # 2/11, 3/12, ...: all below 0.95 over these 6 steps
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
    fixed, _, _ = fit(EMA(decay=decay, warmup=False), 6, tmp_path / "b")
    for got, want, without in zip(ours.parameters(), expected, fixed.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(got, without, atol=1e-4), "the warm-up must change the average"
    assert [EMA(decay=0.999).decay_at(g) for g in (2, 1000, 10**6)] == [2 / 11, 1000 / 1009, 0.999]


def test_ema_is_saved_in_and_restored_from_the_checkpoint(tmp_path):
    """A checkpoint written mid-run (as the train stage's, every N steps) holds the EMA; resuming from it ends
    with the EMA of the uninterrupted run."""
    every4 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    whole, _, _ = fit(EMA(decay=DECAY), 8, tmp_path / "whole", extra=(every4,))
    ckpt = next((tmp_path / "ckpt").glob("*step=4.ckpt"))
    model, record, trainer = fit(EMA(decay=DECAY), 8, tmp_path / "resumed", ckpt)
    assert trainer.global_step == 8 and len(record.weights) == 4
    for resumed, uninterrupted in zip(model.parameters(), whole.parameters()):
        torch.testing.assert_close(resumed, uninterrupted, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("decay", [0.5, 0.999])
def test_ema_hands_averagedmodel_one_foreach_function(decay):
    cb = EMA(decay=decay, warmup=False)
    assert "avg_fn" not in cb._kwargs and callable(cb._kwargs["multi_avg_fn"])
    ema, live = [torch.ones(3)], [torch.zeros(3)]
    cb._kwargs["multi_avg_fn"](ema, live, None)
    torch.testing.assert_close(ema[0], torch.full((3,), decay))


def test_ema_average_lives_on_the_training_device():
    """Lightning calls callbacks' setup before the strategy moves the module, so the default device (the module's)
    is still the CPU on a GPU run; the average must go to the strategy's device instead (here a meta device stands
    in for the GPU)."""
    from types import SimpleNamespace

    module = pl.LightningModule()
    module.layer = torch.nn.Linear(3, 2)
    callback = EMA(decay=0.9)
    callback.setup(SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta"))), module, "fit")
    assert all(p.device.type == "meta" for p in callback._average_model.parameters())
    assert module.layer.weight.device.type == "cpu"  # the live module is left where it is


def test_sample_grids_read_the_average_during_training(tmp_path):
    """`ema_model` (what the train stage's sample grids draw with) is the average mid-run, not the live weights:
    returning the live model drew every grid without the EMA, and the callback tests above stub it out."""
    from diffusion.training.callbacks import ema_model

    class WithModel(Tiny):  # ema_model reads the system's `.model`, as DiffusionSystem has it
        def __init__(self) -> None:
            super().__init__()
            self.model = self.net

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 3:
                self.seen = [p.detach().clone() for p in ema_model(trainer, pl_module).parameters()]

    record, probe = Record(), Probe()
    trainer = pl.Trainer(max_steps=4, callbacks=[record, EMA(decay=DECAY, warmup=False), probe], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accelerator="cpu", devices=1, default_root_dir=tmp_path)
    trainer.fit(WithModel(), loader())
    expected = record.weights[0]
    for weights in record.weights[1:3]:
        expected = [DECAY * e + (1 - DECAY) * w for e, w in zip(expected, weights)]
    for got, want, live in zip(probe.seen, expected, record.weights[2]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(got, live, atol=1e-4)
