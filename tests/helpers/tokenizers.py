"""Real tokenizer families trained offline in a few milliseconds, for token-exact tests (no download).

- :func:`sentencepiece_llama` — a SentencePiece BPE model (dummy prefix ``▁``, byte fallback, identity
  normalisation: Llama-2's ``tokenizer.model`` settings) trained with ``sentencepiece`` and wrapped in
  ``transformers.LlamaTokenizer`` exactly as transformers 5 loads Llama-2 from the Hub: vocabulary and
  merges extracted from the model, ``Metaspace`` pre-tokenizer, BOS added, no EOS.
- :func:`byte_level_bpe` — a GPT-2 style byte-level BPE (``ByteLevel`` pre-tokenizer with GPT-2's
  regex, no prefix space) trained with ``tokenizers`` and wrapped in ``PreTrainedTokenizerFast``:
  with ``bos=False`` it behaves like Phi-1.5 / Pythia / StableLM (``<|endoftext|>`` is BOS and EOS,
  nothing added by ``add_special_tokens``); with ``bos=True`` like Llama-3 (``<|begin_of_text|>``
  prepended, ``<|end_of_text|>`` EOS).

The corpus contains the TOFU tags (``[INST]``, ``Question:``, ``Answer:``), digits, punctuation and
accented letters, so merges form around the prompt/answer boundary, where the tokenisation of a joint
string and of separately tokenised parts differ.

Why ``legacy=True`` for the SentencePiece tokenizer: it is Llama-2's SentencePiece behaviour, and the
only difference from ``legacy=False`` (``prepend_scheme`` "always" vs "first") is the ``▁`` after an
added/special token inside the text; TOFU strings contain none, so both give the same ids here.
"""

from __future__ import annotations

import io
import random
from functools import cache

_WORDS = " ".join(
    (
        "the author was born in city of Paris and wrote many books about history science love war peace",
        "novel award prize genre fiction mystery mother father worked as a teacher doctor writer her his",
        "their first second name is called known for famous 1987 2001 1955 12 3rd café naïve Zürich",
    )
).split()
_PUNCT = (".", "?", "!", ",", ";", ":", "'s", "-")


def corpus(lines: int = 300, seed: int = 0) -> list[str]:
    """Seeded sentences and TOFU-formatted ones (``[INST] q [/INST]a``, ``Question: q\\nAnswer: a``)."""
    rng = random.Random(seed)

    def sentence() -> str:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
        return " ".join(words).capitalize() + rng.choice(_PUNCT)

    out = [sentence() for _ in range(lines)]
    for _ in range(lines // 3):
        q, a = sentence(), sentence()
        out.append(f"[INST] {q} [/INST]{a}")
        out.append(f"Question: {q}\nAnswer: {a}")
    return out


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges of a SentencePiece BPE vocabulary: every split of a piece into two pieces, in the order
    the pieces were learnt (their ids), as transformers' SentencePiece conversion orders them."""
    merges = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((pid, len(left), len(right), vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[-2], m[-1]) for m in merges]


@cache
def sentencepiece_model(vocab_size: int = 600) -> bytes:
    """A serialised SentencePiece BPE model, Llama-2's settings (ids 0/1/2: ``<unk>``, ``<s>``, ``</s>``)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def sentencepiece_processor():
    """The raw ``sentencepiece`` processor of :func:`sentencepiece_model`: the wrapper's ground truth."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=sentencepiece_model())


def sentencepiece_llama():
    """``LlamaTokenizer`` over :func:`sentencepiece_model` (BOS ``<s>`` added, EOS ``</s>``, no pad token)."""
    from transformers import LlamaTokenizer

    sp = sentencepiece_processor()
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    return LlamaTokenizer(
        vocab=vocab,
        merges=_bpe_merges(vocab),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
        legacy=True,
    )


def byte_level_bpe(*, bos: bool = False, vocab_size: int = 1000):
    """A trained GPT-2 style byte-level BPE in ``PreTrainedTokenizerFast``.

    ``bos=False``: Phi-1.5 / Pythia style, ``<|endoftext|>`` is BOS and EOS and nothing is added.
    ``bos=True``: Llama-3 style, ``<|begin_of_text|>`` prepended by ``add_special_tokens``,
    ``<|end_of_text|>`` is EOS. The corpus runs out of pairs at about 540 tokens, so the default
    ``vocab_size`` learns every merge it offers (`` The``, `` 1987``, ``Answer``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>"] if bos else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if bos:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|begin_of_text|>",
            eos_token="<|end_of_text|>",
            add_bos_token=True,
            add_eos_token=False,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
