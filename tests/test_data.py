"""Data pipeline: formats, templates, masks, EOS, padding, truncation, pairing, and every bad input."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fastunlearn import data as fdata

WORDS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "[INST]",
    "[/INST]",
    "Question:",
    "Answer:",
    "Where",
    "was",
    "Ada",
    "born?",
    "in",
    "Paris.",
    "Hello",
    "world",
    "again",
    "say",
    "hi",
    "<|user|>",
    "<|assistant|>",
]
VOCAB = {w: i for i, w in enumerate(WORDS)}


def word_tokenizer(pad_is_eos: bool = False, eos: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with known ids (``VOCAB``) and BOS prepended."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kwargs = {"bos_token": "<s>", "unk_token": "<unk>"}
    if eos:
        kwargs["eos_token"] = "</s>"
    kwargs["pad_token"] = "</s>" if pad_is_eos else "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def ids(*words: str) -> list[int]:
    return [VOCAB[w] for w in words]


def write(path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


QA = {"question": "Where was Ada born?", "answer": "Ada was born in Paris."}
ANSWER = ("Ada", "was", "born", "in", "Paris.")


def test_qa_llama2_template_masks_prompt_and_targets_eos():
    tok = word_tokenizer()
    (ex,) = fdata.tokenize_records([QA], tok, data_format="qa", template="llama2")
    prompt = ids("<s>", "[INST]", "Where", "was", "Ada", "born?", "[/INST]")
    answer = [VOCAB.get(w, VOCAB["<unk>"]) for w in ANSWER] + ids("</s>")
    assert list(ex.input_ids) == prompt + answer
    assert list(ex.labels) == [-100] * len(prompt) + answer


def test_qa_phi_and_plain_templates():
    tok = word_tokenizer()
    (phi,) = fdata.tokenize_records([QA], tok, data_format="qa", template="phi")
    assert list(phi.input_ids[:7]) == ids("<s>", "Question:", "Where", "was", "Ada", "born?", "Answer:")
    assert phi.labels[:7] == (-100,) * 7
    assert phi.labels[-1] == VOCAB["</s>"] and phi.labels[7] == VOCAB["Ada"]
    (plain,) = fdata.tokenize_records([QA], tok, data_format="qa", template="plain")
    assert list(plain.input_ids[:5]) == ids("<s>", "Where", "was", "Ada", "born?")
    assert plain.labels[:5] == (-100,) * 5 and len(plain.input_ids) == 5 + len(ANSWER) + 1


def test_chat_template_masks_the_rendered_prompt():
    tok = word_tokenizer()
    tok.chat_template = "<s> {% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}<|assistant|>"
    (ex,) = fdata.tokenize_records([QA], tok, data_format="qa", template="chat")
    prompt = ids("<s>", "<|user|>", "Where", "was", "Ada", "born?", "<|assistant|>")
    assert list(ex.input_ids[: len(prompt)]) == prompt  # BOS from the template only, not doubled
    assert ex.labels[: len(prompt)] == (-100,) * len(prompt)
    assert ex.labels[len(prompt) :] == ex.input_ids[len(prompt) :] and ex.labels[-1] == VOCAB["</s>"]
    with pytest.raises(ValueError, match="chat template"):
        fdata.tokenize_records([QA], word_tokenizer(), data_format="qa", template="chat")


def test_text_and_prompt_completion_formats():
    tok = word_tokenizer()
    (text,) = fdata.tokenize_records([{"text": "Hello world again"}], tok, data_format="text")
    assert list(text.input_ids) == ids("<s>", "Hello", "world", "again") == list(text.labels)  # no EOS
    (pc,) = fdata.tokenize_records(
        [{"prompt": "say hi", "completion": "Hello world"}],
        tok,
        data_format="prompt_completion",
        template="llama2",
    )  # template unused
    assert list(pc.input_ids) == ids("<s>", "say", "hi", "Hello", "world", "</s>")
    assert list(pc.labels) == [-100, -100, -100, *ids("Hello", "world", "</s>")]


def test_padding_never_masks_a_real_eos_when_pad_is_eos():
    tok = word_tokenizer(pad_is_eos=True)
    short = fdata.tokenize_records(
        [{"prompt": "say", "completion": "hi"}], tok, data_format="prompt_completion"
    )
    long = fdata.tokenize_records(
        [{"prompt": "say", "completion": "Hello world again"}], tok, data_format="prompt_completion"
    )
    batch = fdata.collate(short + long, fdata.pad_id_of(tok))
    eos = VOCAB["</s>"]
    assert fdata.pad_id_of(tok) == eos
    torch.testing.assert_close(
        batch["input_ids"],
        torch.tensor(
            [
                ids("<s>", "say", "hi", "</s>", "</s>", "</s>"),
                ids("<s>", "say", "Hello", "world", "again", "</s>"),
            ]
        ),
    )
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]))
    # The short example's own EOS (position 3) is a target; the padding EOS ids are not.
    torch.testing.assert_close(
        batch["labels"],
        torch.tensor(
            [[-100, -100, VOCAB["hi"], eos, -100, -100], [-100, -100, *ids("Hello", "world", "again"), eos]]
        ),
    )


def test_truncation_warns_with_count_and_cuts_on_the_right():
    tok = word_tokenizer()
    records = [{"text": "Hello world again Hello"}, {"text": "Hello"}, {"text": "world world world world"}]
    with pytest.warns(UserWarning, match="2 of 3 examples were truncated to max_length=4"):
        out = fdata.tokenize_records(records, tok, data_format="text", max_length=4)
    assert [len(e.input_ids) for e in out] == [4, 2, 4]
    assert list(out[0].input_ids) == ids("<s>", "Hello", "world", "again")


def test_all_labels_masked_after_truncation_names_file_and_line(tmp_path):
    path = write(tmp_path / "f.json", [json.dumps({"question": "x y", "answer": "z"}), json.dumps(QA)])
    records, fmt = fdata.load_records(path)
    with pytest.raises(ValueError, match=r"f\.json:2: every label is masked"):
        fdata.tokenize_records(records, word_tokenizer(), data_format=fmt, template="llama2", max_length=6)


def test_read_json_skips_blank_lines_and_detects_formats(tmp_path):
    qa = write(tmp_path / "qa.json", [json.dumps(QA), "", json.dumps(QA)])
    records, fmt = fdata.load_records(qa)
    assert fmt == "qa" and len(records) == 2 and records[1]["_source"].endswith("qa.json:3")
    assert fdata.load_records(write(tmp_path / "t.json", ['{"text": "a"}']))[1] == "text"
    pc = write(tmp_path / "pc.json", ['{"prompt": "a", "completion": "b"}'])
    assert fdata.load_records(pc)[1] == "prompt_completion"
    assert fdata.load_records([QA], data_format="qa")[1] == "qa"
    # A JSON array of records reads as its JSON Lines twin, each record at its line.
    array = write(
        tmp_path / "a.json", ['[{"question": "a", "answer": "b"},', ' {"question": "c", "answer": "d"}]']
    )
    records, fmt = fdata.load_records(array)
    assert fmt == "qa" and [r["answer"] for r in records] == ["b", "d"]
    assert [r["_source"] for r in records] == [f"{array}:1", f"{array}:2"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question": "a", "answer": "b"}', '{"question": "a", "answer": '], r"bad\.json:2: invalid JSON"),
        (['{"question": "a", "answer": "b"}', '{"question": "a"}'], r"bad\.json:2: missing field 'answer'"),
        (['{"question": "a", "answer": 3}'], r"bad\.json:1: field 'answer' must be a string"),
        (
            ['{"question": "a" "answer": "b"}'],
            r"bad\.json:1: invalid JSON \(Expecting ',' delimiter at column 18\)$",
        ),
        (
            ['{"question": "a", "answer": '],
            r"bad\.json:1: invalid JSON \(Expecting value at the end of the line\)$",
        ),
        (['{"question": "a", "answer": "b"}', '["a", "b"]'], r"bad\.json:2: expected a JSON object"),
        (['{"title": "a"}'], r"bad\.json:1: cannot detect the data format"),
        (["", "   "], r"bad\.json: no records"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, lines, message):
    path = write(tmp_path / "bad.json", lines)
    with pytest.raises(ValueError, match=message):
        fdata.load_records(path)


def test_other_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        fdata.load_records(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="forget: no records"):
        fdata.load_records([], name="forget")
    with pytest.raises(ValueError, match="forget set is empty"):
        fdata.PairedDataset([], [])
    with pytest.raises(TypeError, match=r"retain\[1\]"):
        fdata.load_records([QA, "text"], name="retain")
    with pytest.raises(ValueError, match="format 'text' needs"):
        fdata.load_records([QA], data_format="text")
    with pytest.raises(ValueError, match="unknown data format"):
        fdata.load_records([QA], data_format="csv")
    with pytest.raises(ValueError, match="unknown template"):
        fdata.tokenize_records([QA], word_tokenizer(), data_format="qa", template="alpaca")
    with pytest.raises(ValueError, match="no EOS token"):
        fdata.tokenize_records([QA], word_tokenizer(eos=False), data_format="qa")


def test_pairing_is_seeded_per_epoch_and_collated():
    tok = word_tokenizer()
    forget = fdata.tokenize_records(
        [{"text": f"Hello {'world ' * i}"} for i in range(1, 8)], tok, data_format="text"
    )
    retain = fdata.tokenize_records(
        [{"text": f"again {'hi ' * i}"} for i in range(1, 30)], tok, data_format="text"
    )
    a, b = fdata.PairedDataset(forget, retain, seed=3), fdata.PairedDataset(forget, retain, seed=3)
    first = list(a.pairing)
    assert first == b.pairing and len(first) == len(forget) and all(0 <= j < len(retain) for j in first)
    assert first != fdata.PairedDataset(forget, retain, seed=4).pairing
    a.set_epoch(1)
    assert a.pairing != first
    a.set_epoch(0)
    assert a.pairing == first
    assert a[2]["forget"] is forget[2] and a[2]["retain"] is retain[first[2]]

    a.ref_logp = {"forget": torch.arange(len(forget), dtype=torch.float64)}
    batch = fdata.PairCollator(fdata.pad_id_of(tok))([a[i] for i in (1, 4)])
    torch.testing.assert_close(
        batch["forget"]["input_ids"], fdata.collate([forget[1], forget[4]], 0)["input_ids"]
    )
    torch.testing.assert_close(
        batch["retain"]["labels"], fdata.collate([retain[first[1]], retain[first[4]]], 0)["labels"]
    )
    torch.testing.assert_close(batch["forget"]["ref_logp"], torch.tensor([1.0, 4.0]))
    assert "retain" not in fdata.PairedDataset(forget, [])[0]


def test_batches_cover_every_example_in_order():
    tok = word_tokenizer()
    examples = fdata.tokenize_records([{"text": "Hello " * i} for i in range(1, 6)], tok, data_format="text")
    out = fdata.batches(examples, 0, 2)
    assert [b["input_ids"].shape[0] for b in out] == [2, 2, 1]
    assert [b["attention_mask"].sum().item() for b in out] == [2 + 3, 4 + 5, 6]
    with pytest.raises(ValueError, match="batch_size"):
        fdata.batches(examples, 0, 0)
