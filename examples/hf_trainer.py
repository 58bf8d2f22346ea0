"""klkern with the Hugging Face Trainer.

    pip install transformers accelerate
    python examples/hf_trainer.py [--optimizer KLShampoo] [--steps 30]

``Trainer(optimizer_cls_and_kwargs=(cls, kwargs))`` builds the optimizer from the model's
parameters, so a klkern optimizer needs nothing else; the Trainer's learning-rate scheduler then
edits ``param_groups[...]["lr"]`` as it does for AdamW. A tiny GPT-2 learns a periodic token
sequence, on the CPU or whatever device the Trainer picks.
"""

import argparse
import sys
import tempfile

import torch

import klkern

try:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
except ImportError:
    sys.exit("examples/hf_trainer.py needs transformers (and accelerate): pip install transformers accelerate")


class PeriodicTokens(torch.utils.data.Dataset):
    """Sequences of a fixed period-7 token pattern at random offsets: learnable in a few steps."""

    def __init__(self, count=256, length=32, vocab=64):
        pattern = torch.tensor([3, 17, 5, 42, 8, 23, 11])
        gen = torch.Generator().manual_seed(0)
        starts = torch.randint(0, 7, (count,), generator=gen)
        self.data = [pattern.repeat(length // 7 + 2)[s:s + length] for s in starts.tolist()]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", default="KLShampoo", choices=["KLShampoo", "KLSOAP", "SOAP", "Shampoo"])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    training = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=16,
                                 learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=2,
                                 logging_steps=max(1, args.steps // 3), report_to=[], save_strategy="no",
                                 use_cpu=not torch.cuda.is_available())
    optimizer = getattr(klkern, args.optimizer)
    trainer = Trainer(model=model, args=training, train_dataset=PeriodicTokens(),
                      optimizer_cls_and_kwargs=(optimizer, {"lr": 1e-2, "weight_decay": 0.01}))
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"{args.optimizer} under the Trainer: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"(train_loss {result.training_loss:.3f}); lr at the end {trainer.optimizer.param_groups[0]['lr']:.2e}")
    if not losses[-1] < losses[0]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
