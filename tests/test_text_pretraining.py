"""Stage 3 of teacher training: every caption token learns to carry the caption's factors."""

import math

import lightning as L
import pytest
import torch
from torch import nn

from distill.teacher_training.settings import TextStageConfig
from distill.teacher_training.text_pretraining import (
    FACTOR_CLASSES,
    TextPretrainingModule,
    caption_loader,
    caption_table,
    per_token_factor_accuracy,
    per_token_factor_loss,
)
from eval.shapes_world import COLOURS, LANGS, MOTIONS, SHAPES, all_factors, caption
from teacher.config import SHAPES as SHAPES_PRESET
from teacher.tokenizer import ByteTokenizer


def test_caption_table_holds_every_caption_with_its_factors():
    tokenizer = ByteTokenizer()
    ids, mask, labels = caption_table(tokenizer, 64)
    assert ids.shape == mask.shape == (84 * len(LANGS), 64) and labels.shape == (168, 3)
    texts = [caption(f, lang) for f in all_factors() for lang in LANGS]
    expected_ids, _ = tokenizer(texts, text_len=64)
    assert torch.equal(ids, expected_ids)
    names = [(SHAPES[s], COLOURS[c], MOTIONS[m]) for s, c, m in labels.tolist()]
    assert names == [(f.shape, f.colour, f.motion) for f in all_factors() for _ in LANGS]


def _heads(dim: int, seed: int) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Linear(dim, len(values)) for _, values in FACTOR_CLASSES)


def test_loss_and_accuracy_against_a_token_by_token_computation():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    labels = torch.tensor([[0, 6, 3], [2, 1, 0], [1, 3, 2]])
    heads = _heads(8, 1)
    total, correct, valid = 0.0, [0, 0, 0], 0
    per_factor = [0.0, 0.0, 0.0]
    for b in range(3):
        for i in range(5):
            if not mask[b, i]:
                continue
            valid += 1
            for k, head in enumerate(heads):
                logits = head(hidden[b, i]).tolist()
                log_z = math.log(sum(math.exp(v) for v in logits))
                per_factor[k] += log_z - logits[labels[b, k]]
                correct[k] += int(max(range(len(logits)), key=logits.__getitem__) == labels[b, k])
    total = sum(p / valid for p in per_factor)
    loss = per_token_factor_loss(hidden, mask, labels, heads)
    assert loss.item() == pytest.approx(total, rel=1e-5)
    accuracy = per_token_factor_accuracy(hidden, mask, labels, heads)
    assert accuracy == pytest.approx({name: c / valid for (name, _), c in zip(FACTOR_CLASSES, correct)})


def test_padding_tokens_do_not_count():
    torch.manual_seed(0)
    hidden, heads = torch.randn(2, 4, 8), _heads(8, 2)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    labels = torch.tensor([[0, 1, 2], [1, 2, 3]])
    garbage = hidden.clone()
    garbage[~mask.bool()] = 1e4
    torch.testing.assert_close(per_token_factor_loss(garbage, mask, labels, heads),
                               per_token_factor_loss(hidden, mask, labels, heads))


def test_pretraining_makes_every_token_carry_the_direction():
    """A short stage-3 run of the shipped encoder's shape: from chance to every token naming its
    factors (the tiny test preset's 16-token text length would cut the direction word off)."""
    stage = TextStageConfig(steps=200, batch_size=32, lr=3e-3)
    L.seed_everything(0, verbose=False)
    module = TextPretrainingModule(SHAPES_PRESET.t5, stage)
    ids, mask, labels = caption_table(ByteTokenizer(), SHAPES_PRESET.dit.text_len)
    with torch.no_grad():
        before = per_token_factor_accuracy(module.text_encoder(ids, mask), mask, labels, module.heads)
    trainer = L.Trainer(max_steps=stage.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=caption_loader(ids, mask, labels, stage, seed=0))
    with torch.no_grad():
        after = per_token_factor_accuracy(module.text_encoder(ids, mask), mask, labels, module.heads)
    assert before["motion"] < 0.5
    assert after["motion"] > 0.95 and after["colour"] > 0.95 and after["shape"] > 0.95
