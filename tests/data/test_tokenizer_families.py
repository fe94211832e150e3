"""BOS, EOS and pad of the Qwen2 and Llama-3 families from real tokenizer folders (a tiny byte-level BPE trained
here with `tokenizers`, carrying each family's special tokens, plus the configs Hugging Face writes beside it), the
checkpoint record's facts, and the chat templates each tokenizer can serve."""

import json
import shutil
import types

import pytest
import torch

pytest.importorskip("tokenizers", reason="the tokenizers package is not installed (pip install tokenizers)")

from megatron_longvila.data.conversation import check_template, tokenize_conversation  # noqa: E402
from megatron_longvila.data.sample import IGNORE_INDEX  # noqa: E402
from megatron_longvila.data.tokenizer import (  # noqa: E402
    ByteTokenizer, HFTokenizerFile, load_tokenizer, load_tokenizer_for)
from megatron_longvila.errors import TokenizerError  # noqa: E402
from megatron_longvila.inference.prompts import stop_ids  # noqa: E402

QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]


def _train(specials, folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([f"the quick brown fox jumps over the lazy dog {i}" for i in range(100)]
                            + ["Describe the image. A dog."] * 20, trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _folder(base, name, files):
    """A copy of the tokenizer.json in `base` with `files` ({name: dict}) beside it."""
    d = base.parent / name
    d.mkdir()
    shutil.copy(base / "tokenizer.json", d / "tokenizer.json")
    for fname, content in files.items():
        (d / fname).write_text(json.dumps(content))
    return d


def _decoder(specials):
    return {str(i): {"content": t, "special": True} for i, t in enumerate(specials)}


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return _train(QWEN2_SPECIALS, tmp_path_factory.mktemp("families") / "qwen2_bare")


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return _train(LLAMA3_SPECIALS, tmp_path_factory.mktemp("families") / "llama3_bare")


def _ids(folder):
    return json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]


def _conv(*turns):
    return [{"from": r, "value": v} for r, v in turns]


def test_qwen2_instruct_and_base(qwen2):
    v = _ids(qwen2)
    instruct = _folder(qwen2, "qwen2_instruct", {"tokenizer_config.json": {
        "added_tokens_decoder": _decoder(QWEN2_SPECIALS), "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>"}})
    for path in (instruct, instruct / "tokenizer.json"):  # the folder, or the file with its configs beside it
        t = load_tokenizer(path)
        assert isinstance(t, HFTokenizerFile)
        assert (t.bos_id, t.eos_id, t.pad_id) == (None, v["<|im_end|>"], v["<|endoftext|>"])
        assert t.role_sources == {"eos": "tokenizer_config.json", "pad": "tokenizer_config.json"}
    base = _folder(qwen2, "qwen2_base", {"tokenizer_config.json": {"eos_token": "<|endoftext|>"},
                                         "special_tokens_map.json": {"eos_token": {"content": "<|endoftext|>"},
                                                                     "pad_token": "<|endoftext|>"}})
    t = load_tokenizer(base)
    assert (t.bos_id, t.eos_id, t.pad_id) == (None, v["<|endoftext|>"], v["<|endoftext|>"])
    assert t.role_sources["pad"] == "special_tokens_map.json"


def test_llama3_instruct_bos_eos_and_pad(llama3):
    v = _ids(llama3)
    folder = _folder(llama3, "llama3_instruct", {
        "tokenizer_config.json": {"added_tokens_decoder": _decoder(LLAMA3_SPECIALS),
                                  "bos_token": {"content": "<|begin_of_text|>", "__type": "AddedToken"},
                                  "eos_token": "<|eot_id|>"},
        "generation_config.json": {"bos_token_id": v["<|begin_of_text|>"],
                                   "eos_token_id": [v["<|end_of_text|>"], v["<|eot_id|>"]]}})
    t = load_tokenizer(folder)
    # Llama-3 names no pad: the pad is its EOS (fillers carry no loss), never id 0.
    assert (t.bos_id, t.eos_id, t.pad_id) == (v["<|begin_of_text|>"], v["<|eot_id|>"], v["<|eot_id|>"])
    assert t.pad_id != 0 and t.role_sources["pad"] == "the EOS (no pad token named)"
    # The base model's EOS, named only by generation_config.json as one id, is found there.
    base = _folder(llama3, "llama3_base", {"generation_config.json": {"bos_token_id": v["<|begin_of_text|>"],
                                                                      "eos_token_id": v["<|end_of_text|>"]}})
    t = load_tokenizer(base)
    assert (t.bos_id, t.eos_id) == (v["<|begin_of_text|>"], v["<|end_of_text|>"])
    assert t.role_sources["eos"] == "generation_config.json"


@pytest.mark.parametrize("files, words", ids=["gen_list", "disagree", "missing", "not_text", "gen_range"], argvalues=[
    ({"generation_config.json": {"eos_token_id": [1, 7]}}, ["lists eos_token_id [1, 7]", "tokenizer_config.json"]),
    ({"tokenizer_config.json": {"eos_token": "<|eot_id|>"},
      "special_tokens_map.json": {"eos_token": "<|end_of_text|>"}},
     ["'<|eot_id|>'", "'<|end_of_text|>'", "make them agree"]),
    ({"tokenizer_config.json": {"eos_token": "<|im_end|>"}}, ["'<|im_end|>'", "lacks"]),
    ({"tokenizer_config.json": {"eos_token": 5}}, ["eos_token must be"]),
    ({"generation_config.json": {"pad_token_id": 10 ** 6}}, ["pad_token_id 1000000"]),
])
def test_inconsistent_files_are_refused(llama3, files, words, request):
    folder = _folder(llama3, f"bad_{request.node.callspec.id}", files)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(folder)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_record_facts_fill_in_and_must_agree(llama3):
    v = _ids(llama3)
    eot, bot = v["<|eot_id|>"], v["<|begin_of_text|>"]
    # A bare tokenizer.json says nothing: before the record, no EOS and the last-resort pad id 0.
    bare = load_tokenizer(llama3)
    assert (bare.bos_id, bare.eos_id, bare.pad_id) == (None, None, 0)
    record = types.SimpleNamespace(tokenizer={"eos_id": eot, "bos_id": bot, "pad_id": v["<|finetune_right_pad_id|>"]})
    t = load_tokenizer_for(llama3, record)
    assert (t.bos_id, t.eos_id, t.pad_id) == (bot, eot, v["<|finetune_right_pad_id|>"])
    assert set(t.role_sources.values()) == {"the checkpoint's record"}
    # Where the files name the token, the record must agree (BOS and EOS decide what is learned and where it stops).
    folder = _folder(llama3, "llama3_with_record", {"tokenizer_config.json": {"bos_token": "<|begin_of_text|>",
                                                                              "eos_token": "<|eot_id|>"}})
    assert load_tokenizer_for(folder, record).eos_id == eot
    with pytest.raises(TokenizerError) as e:
        load_tokenizer_for(folder, types.SimpleNamespace(tokenizer={"eos_id": v["<|end_of_text|>"]}))
    assert "EOS id" in str(e.value) and "'<|end_of_text|>'" in str(e.value) and "'<|eot_id|>'" in str(e.value)
    # A pad the files do not name comes from the record; the record's pad never overrides the files' own.
    assert load_tokenizer_for(folder, types.SimpleNamespace(tokenizer={"pad_id": 3})).pad_id == 3
    with pytest.raises(TokenizerError, match="outside"):
        load_tokenizer_for(folder, types.SimpleNamespace(tokenizer={"bos_id": 10 ** 6}))
    # The byte tokenizer's layout is its file: a record from another tokenizer is refused.
    assert ByteTokenizer(facts={"eos_id": 257, "pad_id": 257}).eos_id == 257
    with pytest.raises(TokenizerError, match="EOS id 257"):
        load_tokenizer_for(None, types.SimpleNamespace(tokenizer={"eos_id": 2}))


def test_sentencepiece_ids_from_its_model(tokenizer):
    # train_sentencepiece's layout: UNK 0, BOS 1, EOS 2, PAD 3.
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)
    assert tokenizer.role_sources == {r: "tiny.model" for r in ("bos", "eos", "pad")}


def test_llama3_template_on_llama3_tokenizer(llama3):
    folder = _folder(llama3, "llama3_chat", {"tokenizer_config.json": {"bos_token": "<|begin_of_text|>",
                                                                       "eos_token": "<|eot_id|>"}})
    t = load_tokenizer(folder)
    s = tokenize_conversation(_conv(("human", "Describe the image."), ("gpt", "A dog.")), [], t, "llama3")
    assert t.decode(s.input_ids.tolist()) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
        "assistant. You are able to understand the visual content that the user provides, and assist the user with a "
        "variety of tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nDescribe the "
        "image.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA dog.<|eot_id|>")
    learned = s.labels != IGNORE_INDEX
    assert s.input_ids[0] == t.bos_id and s.labels[-1] == t.eos_id  # the reply ends with the learned EOS
    assert t.decode(s.labels[learned].tolist()) == "A dog.<|eot_id|>"
    # Every marker is one of the tokenizer's own ids, and generation stops at the EOS.
    for m in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert len(t.encode(m)) == 1 and t.encode(m)[0] < t.tok.get_vocab_size(with_added_tokens=True)
    assert stop_ids(t, "llama3") == {t.eos_id}


def test_templates_needing_an_eos_the_tokenizer_lacks_are_refused(llama3, qwen2):
    llama = load_tokenizer(_folder(llama3, "llama3_refuse", {"tokenizer_config.json": {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}}))
    qwen = load_tokenizer(_folder(qwen2, "qwen2_refuse", {"tokenizer_config.json": {
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}}))
    conv = _conv(("human", "Describe the image."), ("gpt", "A dog."))
    # chatml on Llama-3: <|im_end|> would be an appended id its model never saw.
    with pytest.raises(TokenizerError) as e:
        tokenize_conversation(conv, [], llama, "chatml")
    assert "ends each reply with '<|im_end|>'" in str(e.value) and "'<|eot_id|>'" in str(e.value)
    assert "llama3" in str(e.value) and "chatml," not in str(e.value)
    # llama3 on Qwen2: <|eot_id|> would be cut into byte pieces.
    with pytest.raises(TokenizerError) as e:
        check_template(qwen, "llama3")
    assert "ends each reply with '<|eot_id|>'" in str(e.value) and "(chatml, plain)" in str(e.value)
    assert check_template(qwen, "chatml").name == "chatml"
    # A template that appends the tokenizer's EOS, or starts with its BOS, on a tokenizer naming none.
    with pytest.raises(TokenizerError, match="starts with a BOS, and the tokenizer names none"):
        tokenize_conversation(conv, [], load_tokenizer(qwen2), "vicuna")
    bos_only = load_tokenizer_for(llama3, types.SimpleNamespace(tokenizer={"bos_id": llama.bos_id}))
    with pytest.raises(TokenizerError, match="the tokenizer's EOS, and the tokenizer names none"):
        tokenize_conversation(conv, [], bos_only, "vicuna")
    assert check_template(llama, "vicuna").name == "vicuna"
    # The byte tokenizer gets the project's chat markers appended (training learns them): chatml yes, llama3 no.
    byte = ByteTokenizer()
    assert torch.equal(tokenize_conversation(conv, [], byte, "chatml").input_ids[-2:],
                       torch.tensor([byte.token_id("<|im_end|>"), ord("\n")]))
    with pytest.raises(TokenizerError, match="lacks"):
        check_template(byte, "llama3")
