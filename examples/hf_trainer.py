"""STAC in Hugging Face's Trainer: a tiny GPT-2 built from its config (nothing downloaded) trains 8 steps, and a
second run resumed from the step-4 checkpoint ends with the same parameters, bit for bit.

Trainer builds its optimizer as ``optimizer_cls(param_groups, **kwargs)``, but when the kwargs hold ``model`` it
passes that model in place of its param groups: ``optimizer_cls_and_kwargs=(STAC, {"model": model, ...})`` is
``STAC(model, ...)``. Trainer's own groups (``TrainingArguments.weight_decay`` on weights, none on biases and norms)
are dropped then, so the weight decay goes in STAC's kwargs. GPT-2's LM head is tied to its token embedding:
``adamw_output_layer=True`` puts that weight in the AdamW cap (without it STAC warns that only the final norm is).

Run: ``python examples/hf_trainer.py``.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access: the model comes from a config, the data is generated

import pathlib  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from stac_stam.torch import STAC  # noqa: E402

VOCAB, LENGTH = 64, 16


def tiny_gpt2(seed):
    torch.manual_seed(seed)
    # No dropout: a resumed run then draws no random numbers the checkpoint would have to carry.
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


class CountingSequences(torch.utils.data.Dataset):
    """Sequences ``a, a+1, a+2, ...`` (mod the vocabulary): a language a tiny model learns in a few steps."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        tokens = (index * 7 + torch.arange(LENGTH)) % VOCAB
        return {"input_ids": tokens, "labels": tokens}


def make_trainer(output_dir, seed=0):
    model = tiny_gpt2(seed)
    args = TrainingArguments(output_dir=str(output_dir), max_steps=8, save_steps=4, per_device_train_batch_size=8,
                             use_cpu=True, seed=0, report_to="none", logging_strategy="no", disable_tqdm=True)
    stac_kwargs = dict(model=model, lr=3e-3, weight_decay=0.01, adamw_output_layer=True,
                       fused=False)  # op by op: a model this small gains nothing from compiling the trunk's kernel
    return Trainer(model=model, args=args, train_dataset=CountingSequences(),
                   optimizer_cls_and_kwargs=(STAC, stac_kwargs))


def main(output_dir):
    """Train 8 steps, then resume a fresh Trainer from the step-4 checkpoint; returns both Trainers."""
    output_dir = pathlib.Path(output_dir)
    uninterrupted = make_trainer(output_dir / "uninterrupted")
    result = uninterrupted.train()
    # Another initialization: the resumed run takes everything from the checkpoint.
    resumed = make_trainer(output_dir / "resumed", seed=1)
    resumed.train(resume_from_checkpoint=str(output_dir / "uninterrupted" / "checkpoint-4"))
    same = all(torch.equal(a, b) for a, b in zip(uninterrupted.model.state_dict().values(),
                                                 resumed.model.state_dict().values()))
    print("AdamW cap:", uninterrupted.optimizer.optimizer.partition.adamw_parameter_names)
    print(f"training loss: {result.training_loss:.4f}")
    print("resumed from checkpoint-4, same parameters as uninterrupted:", same)
    return uninterrupted, resumed


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as directory:
        main(directory)
