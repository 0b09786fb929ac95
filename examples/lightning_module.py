"""STAC in a Lightning module: a tiny Llama-style model (untied LM head, built from its config: nothing
downloaded) trains 2 epochs, and a second run resumed from the first epoch's checkpoint ends with the same
parameters, bit for bit.

``configure_optimizers`` returns STAC with a scheduler. It passes param groups with the module as ``model=``: the
module gives STAC its layers, the groups give biases and norms (here the RMSNorm weights) no weight decay, as
minGPT's ``configure_optimizers`` does. ``STAC(self, ...)`` alone would decay every parameter alike.

Run: ``python examples/lightning_module.py``.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access: the model comes from a config, the data is generated

import pathlib  # noqa: E402
import tempfile  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from stac_stam.torch import STAC  # noqa: E402

VOCAB, LENGTH, EPOCHS = 64, 16, 2


class TinyLlama(pl.LightningModule):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=LENGTH, tie_word_embeddings=False))

    def training_step(self, batch, batch_index):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        optimizer = STAC([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], model=self, lr=3e-3,
                         weight_decay=0.1,
                         fused=False)  # op by op: a model this small gains nothing from compiling the trunk's kernel
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS * 4)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def batches():
    """Sequences ``a, a+1, a+2, ...`` (mod the vocabulary), 4 batches of 8, in a fixed order."""
    tokens = (torch.arange(32)[:, None] * 7 + torch.arange(LENGTH)) % VOCAB
    return torch.utils.data.DataLoader(tokens, batch_size=8, shuffle=False)


def make_trainer(checkpoints):
    return pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False,
                      callbacks=[pl.callbacks.ModelCheckpoint(dirpath=checkpoints, save_top_k=-1)])  # every epoch


def main(output_dir):
    """Train 2 epochs saving a checkpoint each, then resume a fresh module from the first; returns both modules."""
    output_dir = pathlib.Path(output_dir)
    uninterrupted = TinyLlama()
    make_trainer(output_dir / "uninterrupted").fit(uninterrupted, batches())
    resumed = TinyLlama(seed=1)  # another initialization: the resumed run takes everything from the checkpoint
    make_trainer(output_dir / "resumed").fit(resumed, batches(),
                                             ckpt_path=output_dir / "uninterrupted" / "epoch=0-step=4.ckpt")
    same = all(torch.equal(a, b) for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()))
    print("param groups (role, weight decay):",
          [(group["role"], group["weight_decay"]) for group in uninterrupted.optimizers().optimizer.param_groups])
    print("resumed from epoch 0's checkpoint, same parameters as uninterrupted:", same)
    return uninterrupted, resumed


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as directory:
        main(directory)
