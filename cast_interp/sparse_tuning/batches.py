"""Training batches: seeded, shuffled, cycling, with an optional benign mix (`_BatchSource`: the
training seed alone sets the order), their fingerprints, and length-grouped micro-batches."""

from __future__ import annotations

import hashlib
from typing import Sequence, Union

import torch
from torch import Tensor

from ..backend import Model
from ..data import ChatBatch, ChatDataset, make_batches, pad_token_id
from .config import TuningConfig


def split_examples(batches: Sequence[ChatBatch]) -> list[tuple[Tensor, Tensor, int]]:
    """Single examples (tokens, loss_mask, prompt_length) of right-padded batches, padding cut.

    The last response token (end-of-turn) ends an example, so trailing padding is dropped exactly.
    """
    out = []
    for b in batches:
        for i in range(len(b)):
            where = b.loss_mask[i].nonzero()
            if len(where) == 0:
                continue  # no response: contributes nothing to the loss
            end = int(where[-1]) + 1
            out.append((b.tokens[i, :end].cpu(), b.loss_mask[i, :end].cpu(), b.prompt_lengths[i]))
    return out


def collate(examples: list[tuple[Tensor, Tensor, int]], pad: int) -> ChatBatch:
    width = max(len(t) for t, _, _ in examples)
    tokens = torch.full((len(examples), width), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, (t, m, _) in enumerate(examples):
        tokens[i, :len(t)] = t
        mask[i, :len(m)] = m
    return ChatBatch(tokens, mask, [n for _, _, n in examples])


class SeededStream:
    """Indices 0..n-1 in a fresh seeded permutation each epoch (every example once per epoch)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.gen, self.order, self.pos = n, generator, [], 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(self.n, generator=self.gen).tolist(), 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out


def _as_examples(model: Model, data: Union[ChatDataset, Sequence[ChatBatch]],
                 what: str) -> tuple[list[tuple[Tensor, Tensor, int]], dict]:
    if isinstance(data, ChatDataset):
        examples = split_examples(make_batches(model, data, batch_size=32))
        desc = data.describe()
    elif isinstance(data, (list, tuple)) and all(isinstance(b, ChatBatch) for b in data):
        examples = split_examples(data)
        desc = {"name": f"{what} batches", "n_batches": len(data), "n": len(examples)}
    else:
        raise TypeError(f"{what} data must be a ChatDataset or a list of ChatBatch, "
                        f"got {type(data).__name__}.")
    if not examples:
        raise ValueError(f"The {what} data has no example with response tokens: nothing to train on.")
    return examples, desc


def batch_fingerprint(batch: ChatBatch) -> str:
    """A short hash of a batch's tokens and loss mask (equal batches, equal fingerprints)."""
    h = hashlib.sha256(batch.tokens.cpu().numpy().tobytes())
    h.update(batch.loss_mask.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class _BatchSource:
    """Each step's batch: `n_safe` safety + `n_benign` benign examples from seeded per-epoch
    permutations of one generator (seeded by the training seed alone)."""

    def __init__(self, model, safety_data, benign_data, cfg: TuningConfig):
        if cfg.benign_mix > 0 and benign_data is None:
            raise ValueError(f"benign_mix={cfg.benign_mix} needs benign_data.")
        self.n_benign = int(round(cfg.benign_mix * cfg.batch_size)) if benign_data is not None \
            else 0
        self.n_safe = cfg.batch_size - self.n_benign
        if self.n_safe < 1:
            raise ValueError(f"benign_mix={cfg.benign_mix} leaves no safety example in a batch of "
                             f"{cfg.batch_size}; lower benign_mix or raise batch_size.")
        self.safe, self.safe_desc = _as_examples(model, safety_data, "safety")
        self.benign, self.benign_desc = (_as_examples(model, benign_data, "benign")
                                         if self.n_benign else ([], None))
        gen = torch.Generator().manual_seed(cfg.seed)
        self.safe_stream = SeededStream(len(self.safe), gen)
        self.benign_stream = SeededStream(len(self.benign), gen) if self.n_benign else None
        self.pad = pad_token_id(model)

    def next(self) -> ChatBatch:
        ex = [self.safe[i] for i in self.safe_stream.take(self.n_safe)]
        if self.benign_stream is not None:
            ex += [self.benign[i] for i in self.benign_stream.take(self.n_benign)]
        return collate(ex, self.pad)


LENGTH_GROUP_RATIO = 0.875  # ours: a micro-batch's shortest example is >= 7/8 of its longest


def length_groups(lengths: Sequence[int], *, ratio: float = LENGTH_GROUP_RATIO) -> list[list[int]]:
    """Indices of examples cut into micro-batches of similar length, longest first.

    Examples are sorted by length (longest first, ties in their given order); a micro-batch takes
    the next example while it is at least `ratio` of the micro-batch's longest, so at most
    `1 - ratio` of each micro-batch's tokens are padding. Deterministic.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}.")
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and int(lengths[i]) >= ratio * int(lengths[groups[-1][0]]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _rows(batch: ChatBatch, rows: list[int], width: int) -> ChatBatch:
    """Rows of a right-padded batch, cut to `width` tokens (their longest example)."""
    idx = torch.tensor(rows)
    return ChatBatch(batch.tokens[idx, :width], batch.loss_mask[idx, :width],
                     [batch.prompt_lengths[i] for i in rows], batch.content_mask[idx, :width])
