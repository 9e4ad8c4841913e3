"""Prompt cleaning, the byte tokenizer, and the umT5 tokenizer against transformers.

The umT5 oracle (no network): the test trains a small SentencePiece-style Unigram model with the
``tokenizers`` library on shapes-world captions (English and Chinese), with T5's layout
(``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), the Metaspace pre-tokenizer and the ``$A </s>``
post-processor, and saves it as ``tokenizer.json``. transformers then loads that folder two ways:
``AutoTokenizer`` with ``tokenizer_class: T5Tokenizer`` (what the official Wan code calls; in
transformers 5 it rebuilds the backend from the file's vocabulary with its own T5 rules) and
``PreTrainedTokenizerFast(tokenizer_file=...)`` (the file as is). Both are asked for
``padding='max_length', truncation=True, add_special_tokens=True`` on the cleaned text, and must
return exactly the ids and masks of ``UMT5Tokenizer`` for raw text, including truncation.

One known split: a literal special token typed inside a prompt ("x </s>"). The file as is (the
transformers 4 behaviour the official Wan code ran with, and ours) keeps the "▁" before it, while
transformers 5's T5Tokenizer rebuild pre-splits on whitespace and drops it. Those prompts are
compared with the file-as-is oracle only.
"""

from __future__ import annotations

import json

import pytest
import torch

from teacher.config import SHAPES
from teacher.tokenizer import (
    ByteTokenizer,
    TextTokenizer,
    UMT5Tokenizer,
    clean_text,
    load_tokenizer,
)

EN = "a red circle moving left"
ZH = "一个红色的圆形向左移动"


# ----------------------------------------------------------------------------- clean_text

@pytest.mark.parametrize("raw, want", [
    ("  a\n\tb \u3000 c  ", "a b c"),  # newline, tab and ideographic space runs -> one space
    ("caf\u00c3\u00a9 cr\u00c3\u00a8me", "café crème"),  # UTF-8 read as Latin-1 (mojibake), fixed by ftfy
    ("&lt;3 &quot;hi&quot;", '<3 "hi"'),
    # ftfy leaves entities alone once the text has a '<'; the two html.unescape passes then
    # undo a double escape that a single pass would leave as '&amp;'.
    ("<b> Tom &amp;amp; Jerry", "<b> Tom & Jerry"),
    (ZH, ZH),
])
def test_clean_text(raw, want):
    assert clean_text(raw) == want


# ----------------------------------------------------------------------------- ByteTokenizer

def test_byte_tokenizer_english_and_chinese_round_trip():
    tok = ByteTokenizer()
    ids, mask = tok([EN, ZH], text_len=48)
    assert ids.shape == mask.shape == (2, 48) and ids.dtype == mask.dtype == torch.int64
    for row, text in enumerate([EN, ZH]):
        raw = list(text.encode("utf-8"))  # 24 bytes for EN, 33 for ZH (3 per character)
        n = len(raw)
        assert ids[row, :n].tolist() == [b + 3 for b in raw]
        assert ids[row, n].item() == 1  # EOS right after the content
        assert (ids[row, n + 1:] == 0).all()  # pad after EOS
        assert mask[row].tolist() == [1] * (n + 1) + [0] * (48 - n - 1)
        assert tok.decode(ids[row]) == text
    assert mask[1].sum().item() == 34  # 11 characters x 3 bytes + EOS


def test_byte_tokenizer_truncation_keeps_eos_last():
    tok = ByteTokenizer()
    ids, mask = tok([EN, ZH], text_len=10)
    assert ids[:, -1].tolist() == [1, 1]
    assert mask.sum(1).tolist() == [10, 10]
    assert tok.decode(ids[0]) == EN[:9]
    # 9 bytes = 3 whole Chinese characters.
    assert tok.decode(ids[1]) == ZH[:3]
    ids, _ = tok([ZH], text_len=9)  # 8 bytes: the third character is cut
    assert tok.decode(ids[0]) == ZH[:2] + "\ufffd"


def test_byte_tokenizer_cleans_and_matches_shapes_vocab():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259 == SHAPES.t5.vocab_size
    a, _ = tok(["  a red\n circle moving &amp;amp; left "], text_len=40)
    b, _ = tok(["a red circle moving & left"], text_len=40)
    assert torch.equal(a, b)
    assert isinstance(tok, TextTokenizer)
    assert ByteTokenizer(offset=5).vocab_size == 261
    with pytest.raises(ValueError, match="offset"):
        ByteTokenizer(offset=1)
    with pytest.raises(ValueError, match="outside"):
        tok.decode([300])


def test_byte_tokenizer_save_and_load(tmp_path):
    ByteTokenizer(offset=4).save(tmp_path / "tok")
    marker = json.loads((tmp_path / "tok" / "byte_tokenizer.json").read_text())
    assert marker == {"kind": "byte", "offset": 4}
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, ByteTokenizer) and loaded.offset == 4
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "byte_tokenizer.json").write_text('{"kind": "bpe"}')
    with pytest.raises(ValueError, match="kind"):
        load_tokenizer(tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_empty_prompt_is_an_error_unless_allowed():
    tok = ByteTokenizer()
    for empty in ("", "  \n\t ", "&nbsp;"):
        with pytest.raises(ValueError, match="empty after cleaning"):
            tok([EN, empty], text_len=8)
    ids, mask = tok([""], text_len=4, allow_empty=True)
    assert ids.tolist() == [[1, 0, 0, 0]] and mask.tolist() == [[1, 0, 0, 0]]
    with pytest.raises(TypeError, match="list"):
        tok(EN, text_len=8)


# ----------------------------------------------------------------------------- UMT5Tokenizer

def _captions() -> list[str]:
    colours = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "cyan": "青色",
               "magenta": "品红色", "white": "白色"}
    shapes = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
    moves = {"left": "向左", "right": "向右", "up": "向上", "down": "向下"}
    out = ["The quick brown fox jumps over the lazy dog, 0123456789 times!",
           "Pack my box with five dozen liquor jugs."]
    for c, cz in colours.items():
        for s, sz in shapes.items():
            for m, mz in moves.items():
                out += [f"a {c} {s} moving {m}", f"一个{cz}的{sz}{mz}移动"]
    return out


@pytest.fixture(scope="module")
def umt5_folder(tmp_path_factory):
    """A T5-layout Unigram tokenizer.json trained here on the captions (see module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(_captions(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    folder = tmp_path_factory.mktemp("umt5")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "extra_ids": 0}))
    return folder


PROMPTS = [
    EN,
    ZH,
    "  A  BLUE square,\n moving   up &amp;amp; down  ",
    "caf\u00c3\u00a9 emoji 🙂 and unknown Ω ＡＢＣ",
    "a magenta triangle moving right " * 6,  # longer than every text_len below
    "x",
]
# A special token typed by the user; see the module docstring.
SPECIAL_INSIDE = ["a </s> inside", "x </s>", "a</s>b"]


@pytest.mark.parametrize("text_len", [64, 12])
def test_umt5_tokenizer_matches_transformers(umt5_folder, text_len):
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(umt5_folder)
    assert isinstance(ours, UMT5Tokenizer)
    file_as_is = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(umt5_folder / "tokenizer.json"),
        eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    auto_t5 = transformers.AutoTokenizer.from_pretrained(umt5_folder)
    for prompts, oracles in ((PROMPTS, [auto_t5, file_as_is]), (SPECIAL_INSIDE, [file_as_is])):
        ids, mask = ours(prompts, text_len=text_len)
        assert ids.shape == mask.shape == (len(prompts), text_len)
        assert ids.dtype == mask.dtype == torch.int64
        for oracle in oracles:
            want = oracle([clean_text(p) for p in prompts], padding="max_length", truncation=True,
                          max_length=text_len, add_special_tokens=True, return_tensors="pt")
            assert torch.equal(ids, want["input_ids"]), type(oracle).__name__
            assert torch.equal(mask, want["attention_mask"].long()), type(oracle).__name__
    ids, mask = ours(PROMPTS, text_len=text_len)
    if text_len == 12:
        assert mask[4].sum() == 12 and ids[4, -1] == 1  # truncated, EOS kept last
    else:
        assert ours.decode(ids[0]) == EN


def test_umt5_tokenizer_save_round_trip(umt5_folder, tmp_path):
    ours = UMT5Tokenizer.from_dir(umt5_folder)
    ours.save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    a, b = ours(PROMPTS, text_len=20), again(PROMPTS, text_len=20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert again.vocab_size == ours.vocab_size


def test_umt5_tokenizer_errors(umt5_folder, tmp_path):
    only_spm = tmp_path / "spm"
    only_spm.mkdir()
    (only_spm / "spiece.model").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*save_pretrained"):
        load_tokenizer(only_spm)

    # A post-processor that also prepends a BOS is not T5's; refuse it rather than differ silently.
    from tokenizers import Tokenizer, processors
    tok = Tokenizer.from_file(str(umt5_folder / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(
        single="<unk> $A </s>", special_tokens=[("<unk>", 2), ("</s>", 1)])
    with pytest.raises(ValueError, match="post-processor"):
        UMT5Tokenizer(tok)

    with pytest.raises(ValueError, match="empty after cleaning"):
        UMT5Tokenizer.from_dir(umt5_folder)(["   "])
