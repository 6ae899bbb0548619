"""A character-level language model on real English text, then sampling from it.

Text: the Python documentation's topic pages, which ship inside every CPython install
(pydoc_data.topics; no download). An embedding, a 2-layer fused_rnn.RNN and a linear read-out are
trained with truncated backpropagation through time; the hidden state is carried across chunks.

    python examples/char_lm.py [--steps 400] [--sample 400] [--out char_lm_loss.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_rnn  # noqa: E402
from _progress import Progress  # noqa: E402


def load_text(max_chars: int) -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[:max_chars]


class CharRNN(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.rnn = fused_rnn.RNN(64, hidden, num_layers=2, batch_first=True, dropout=0.1)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x, h=None):
        y, h = self.rnn(self.embed(x), h)
        return self.out(y), h


def sample(model: CharRNN, itos, stoi, prompt: str, n: int, temperature: float) -> str:
    model.eval()
    chars = list(prompt)
    with torch.no_grad():
        logits, h = model(torch.tensor([[stoi[c] for c in prompt]]))
        for _ in range(n):
            probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1))
            chars.append(itos[nxt])
            logits, h = model(torch.tensor([[nxt]]), h)
    return "".join(chars)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chars", type=int, default=300_000)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--bptt", type=int, default=100)
    p.add_argument("--sample", type=int, default=400)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="char_lm_loss.png")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    text = load_text(args.chars)
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    data = torch.tensor([stoi[c] for c in text])
    # `batch` parallel streams through the text, each read in bptt-long chunks.
    per_stream = (len(data) - 1) // args.batch
    streams = data[:per_stream * args.batch].view(args.batch, per_stream)
    targets = data[1:per_stream * args.batch + 1].view(args.batch, per_stream)
    print(f"text: {len(text):,} characters, vocabulary {len(itos)}; backend "
          f"{fused_rnn.backend('cpu')}")

    model = CharRNN(len(itos), args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    h = None
    pos = 0
    bar = Progress(args.steps, "training")
    for _ in range(args.steps):
        if pos + args.bptt > per_stream:
            pos, h = 0, None
        x = streams[:, pos:pos + args.bptt]
        y = targets[:, pos:pos + args.bptt]
        pos += args.bptt
        model.train()
        logits, h = model(x, h)
        h = h.detach()
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(itos)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.update(loss=losses[-1])

    print(f"loss: first {losses[0]:.3f}, last 20 steps {sum(losses[-20:]) / len(losses[-20:]):.3f} "
          f"(uniform guess: {torch.log(torch.tensor(float(len(itos)))).item():.3f})")
    print("sample:\n" + sample(model, itos, stoi, "The ", args.sample, args.temperature))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses)
    ax.set(title="character LM training loss", xlabel="step", ylabel="cross-entropy (nats)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"loss curve: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
