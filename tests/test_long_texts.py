"""A text far longer than the tokens a model reads is cut before it is tokenized, to the same tokens the
tokenizer's own truncation gives: tokenizing a line of megabytes whole took seconds and gigabytes."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import transformers

from lmmc.data import encode_text, short_texts, unseen_texts
from lmmc.runtime import open_dir
from lmmc.runtime.texts import clip_text
from tests.conftest import _WORDS, compile_tiny_text, save_tiny, siglip_sentencepiece, tiny_vocab
from tests.test_clip_tokenizer import clip_tokenizer


class Recorder:
    """A tokenizer that remembers the longest text it was given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text, *args, **kwargs):
        texts = [text] if isinstance(text, str) else text
        self.longest = max(self.longest, *(len(t) for t in texts))
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def long_texts() -> dict[str, str]:
    gen = random.Random(0)
    words = " ".join(gen.choice(_WORDS + ["cold,", "x\ty", "a\nb", "qzv"]) for _ in range(60_000))
    return {"words": words, "no spaces": "qzvwk" * 40_000, "spaces far apart": " ".join(["abcdefgh" * 700] * 30)}


def tokenizers(tmp_path) -> dict[str, object]:
    siglip = siglip_sentencepiece(save_tiny("siglip", tmp_path / "siglip"))
    return {"wordpiece": transformers.BertTokenizerFast(vocab_file=str(tiny_vocab(tmp_path / "vocab.txt"))),
            "byte-level BPE": clip_tokenizer(),
            "sentencepiece": transformers.AutoTokenizer.from_pretrained(siglip)}


@pytest.mark.parametrize("length", [12, 128])
def test_a_long_text_gives_the_tokens_the_tokenizer_gives_it_whole_from_a_short_prefix(tmp_path, length):
    for name, tok in tokenizers(tmp_path).items():
        for kind, text in long_texts().items():
            whole = tok(text, truncation=True, max_length=length)["input_ids"]
            clipped = clip_text(tok, text, length)
            if name != "wordpiece" or kind == "words":  # WordPiece reads a word of over 100 letters as one [UNK]
                assert len(clipped) <= 4 * 32 * length < len(text), (name, kind)
            assert tok(clipped, truncation=True, max_length=length)["input_ids"] == whole, (name, kind)
            rec = Recorder(tok)
            batch = encode_text(rec, [text, "the water"], 2, length)[0]
            assert rec.longest == len(clipped)
            assert batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist() == whole, (name, kind)
            assert unseen_texts(rec, [text, text[:-5]], set(), length) == [0]  # the same first tokens: one kept


def test_cutting_a_text_raises_no_warning_of_indexing_errors(tmp_path):
    """The prefix a text is cut to is past a 24-token tokenizer's limit by design: transformers' warning that
    running it "will result in indexing errors" would describe a feed that never happens."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        tok = transformers.BertTokenizerFast(vocab_file=str(tiny_vocab(tmp_path / "vocab.txt")), model_max_length=24)
        clipped = clip_text(tok, long_texts()["words"], 24)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert len(tok(clipped, add_special_tokens=False, verbose=False)["input_ids"]) > 24
    assert not [r for r in records if "indexing errors" in r.getMessage()]


def test_texts_under_the_budget_and_left_truncation_are_tokenized_whole(tmp_path):
    tok = transformers.BertTokenizerFast(vocab_file=str(tiny_vocab(tmp_path / "vocab.txt")))
    text = "the water " * 60  # 600 characters: under 32 a token at 128 tokens
    assert clip_text(tok, text, 128) is text
    long = "the water " * 5_000
    assert len(clip_text(tok, long, 12)) < 400
    tok.truncation_side = "left"  # the end of the text is kept: a prefix would change it
    assert clip_text(tok, long, 12) is long


def test_short_texts_of_a_long_word_read_only_its_opening():
    rec = Recorder(clip_tokenizer())
    (short,) = short_texts(["qzvwk" * 40_000], 0, rec)  # seed 0 draws 4 tokens of a text without a space
    assert short == "qzvw" and rec.longest <= 4 * 32


def test_the_runtime_encodes_a_long_text_from_its_opening_as_it_encodes_that_opening(tmp_path):
    out = compile_tiny_text(save_tiny("bert", tmp_path / "teacher"), tmp_path / "out", [])
    dep = open_dir(out, threads=1)
    rec = Recorder(dep._preprocessor("text"))
    dep._preprocessors["text"] = rec
    text = long_texts()["words"]
    opening = " ".join(text.split()[:150])  # more than the 64 tokens the model reads
    np.testing.assert_array_equal(dep.encode([text, "the water"]), dep.encode([opening, "the water"]))
    assert rec.longest <= 64 * 32  # the text is 300,000 characters long


def test_threads_sharing_a_deployment_get_what_one_thread_gets(tmp_path):
    """A fast tokenizer applies each call's truncation by changing its own state: with a long text's cut in
    one thread, another's text came back uncut, a wrong embedding with no error, or failed on the positions."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    out = compile_tiny_text(save_tiny("bert", tmp_path / "teacher"), tmp_path / "out", [])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["preprocessing"]["text"]["max_length"] = 16  # users' cut below the 64 positions, as MiniLM's 256 of 512
    (out / "manifest.json").write_text(json.dumps(manifest))
    dep = open_dir(out, threads=1)
    medium, long = " ".join(["the water of the road"] * 8), "the water " * 1_000  # 40 tokens; one cut first
    alone = dep.encode([medium])
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: dep.encode([medium if i % 2 == 0 else long]), range(400)))
    np.testing.assert_array_equal(np.concatenate(got[0::2]), np.repeat(alone, 200, axis=0))
