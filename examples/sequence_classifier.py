"""Classify handwritten digits with an RNN reading each 8×8 image row by row, and show that
fused_rnn.RNN trains exactly like torch.nn.RNN, faster.

Data: the UCI optical digits set (1,797 images) that ships inside scikit-learn (no download).
Both models start from the same seed, see the same batches, and are trained side by side; the
loss and accuracy curves are saved to a PNG.

    python examples/sequence_classifier.py [--epochs 20] [--out digits.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_rnn  # noqa: E402
from _progress import Progress  # noqa: E402


class DigitRNN(nn.Module):
    def __init__(self, rnn_cls):
        super().__init__()
        # The one-line swap: rnn_cls is torch.nn.RNN or fused_rnn.RNN, same arguments.
        self.rnn = rnn_cls(input_size=8, hidden_size=128, num_layers=2, batch_first=True,
                           bidirectional=True, dropout=0.1)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def load_data(seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8 rows, 8 columns)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    return (x[perm[:split]], y[perm[:split]]), (x[perm[split:]], y[perm[split:]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="digits_training.png")
    args = p.parse_args(argv)

    (xtr, ytr), (xte, yte) = load_data(args.seed)
    runs = {}
    for name, cls in (("nn.RNN", nn.RNN), ("fused_rnn.RNN", fused_rnn.RNN)):
        torch.manual_seed(args.seed)
        model = DigitRNN(cls)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        hist = {"loss": [], "acc": [], "seconds": 0.0}
        bar = Progress(args.epochs, f"{name:>14}")
        for _ in range(args.epochs):
            model.train()
            order = torch.randperm(len(xtr))
            t0 = time.perf_counter()
            total = 0.0
            for i in range(0, len(xtr), args.batch):
                idx = order[i:i + args.batch]
                loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            hist["seconds"] += time.perf_counter() - t0
            model.eval()
            with torch.no_grad():
                acc = (model(xte).argmax(1) == yte).float().mean().item()
            hist["loss"].append(total / len(xtr))
            hist["acc"].append(acc)
            bar.update(loss=hist["loss"][-1], test_acc=acc)
        runs[name] = hist

    for name, h in runs.items():
        print(f"{name:>14}: final loss {h['loss'][-1]:.4f}, test accuracy {h['acc'][-1]:.3f}, "
              f"training time {h['seconds']:.1f} s")
    a, b = runs["nn.RNN"], runs["fused_rnn.RNN"]
    print(f"max difference of the per-epoch losses: "
          f"{max(abs(u - v) for u, v in zip(a['loss'], b['loss'])):.2e}; "
          f"speedup {a['seconds'] / b['seconds']:.2f}×")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, h in runs.items():
        style = "-" if name == "nn.RNN" else "--"
        axes[0].plot(h["loss"], style, label=name)
        axes[1].plot(h["acc"], style, label=name)
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].set(title="test accuracy", xlabel="epoch")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"curves: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
