"""Batches of tokenized examples, and the token-weighted loss of a model over a split.

Shared by training (train and validation batches) and evaluation (test loss in `generate`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, RandomSampler
from transformers import DataCollatorWithFlattening
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.trainer_pt_utils import LengthGroupedSampler

from tunelab.tokenize import IGNORE


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of {input_ids, labels} into tensors; padded labels are ignored by the loss."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        labels[row, :length] = torch.tensor(example["labels"])
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Concatenate examples into one row with no padding (transformers' DataCollatorWithFlattening).

    position_ids restart at 0 for every example, and attention stays within each example: flash-attn runs
    its variable-length kernel, and for sdpa/eager transformers builds the block-diagonal causal mask from
    the restarting position ids, which it does only without an attention_mask and without a KV cache: call
    the model with `use_cache=False`. The first label of each example is ignored, so no token is predicted
    across a boundary.
    """
    return DataCollatorWithFlattening()([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of the batch that are not padding."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def training_batches(examples: list[dict], batch_size: int, pad_id: int, *, seed: int, group_by_length: bool,
                     packing: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches, epoch after epoch, the same for the same seed.

    With `group_by_length`, transformers' LengthGroupedSampler puts examples of similar length together,
    which cuts the padded share of each batch; with `packing`, each batch is one padding-free row (`pack`).
    """
    generator = torch.Generator().manual_seed(seed)
    if group_by_length:
        sampler = LengthGroupedSampler(batch_size, lengths=[len(e["input_ids"]) for e in examples],
                                       generator=generator)
    else:
        sampler = RandomSampler(examples, generator=generator)
    loader = DataLoader(examples, batch_size=batch_size, sampler=sampler,
                        collate_fn=pack if packing else lambda batch: collate(batch, pad_id))
    return itertools.chain.from_iterable(loader for _ in itertools.count())


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken over: labelled positions after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


# Most logits one forward of `mean_loss` may produce: 2^27 (a 1,024-token row of a 131k vocabulary). With the
# half-precision logits, their fp32 copy and the loss's log-softmax that is about 1.3 GB at peak, whatever the
# batch size: a 152k vocabulary at 1,024 tokens goes one row at a time instead of 32 rows (about 40 GB).
LOGITS_BUDGET = 2 ** 27


@torch.no_grad()
def mean_loss(model, examples: list[dict], batch_size: int, pad_id: int, autocast,
              logits_budget: int = LOGITS_BUDGET) -> float:
    """Cross-entropy per label token over all `examples` (not a mean of batch means).

    Each batch of `batch_size` runs in chunks of rows whose logits (rows x width x vocabulary) stay within
    `logits_budget`: at long sequences and large vocabularies, fewer rows per forward. A row's loss does not
    depend on the other rows of its batch, so chunking changes no figure.
    The loss is taken from the logits, so AdaLoRA's orthogonality penalty (which PEFT adds to any
    returned loss) stays out of the figure.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    vocabulary = model.get_output_embeddings().out_features
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        rows = max(1, logits_budget // (batch["input_ids"].shape[1] * vocabulary))
        for first in range(0, len(batch["input_ids"]), rows):
            chunk = {k: v[first:first + rows].to(device) for k, v in batch.items()}
            tokens = label_tokens(chunk)
            if not tokens:  # rows without an answer token (all prompt after truncation) add nothing
                continue
            with autocast():
                logits = model(input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"],
                               use_cache=False).logits
            logits = logits.float()  # frees the half-precision logits before the loss: one copy less at peak
            loss = ForCausalLMLoss(logits, chunk["labels"], logits.shape[-1], num_items_in_batch=tokens)
            del logits  # not held through the next chunk's forward
            total += float(loss) * tokens
            count += tokens
    model.train(was_training)
    return total / max(count, 1)
