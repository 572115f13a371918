"""Structured output (quill/structured.py) on random-weight models, whose unconstrained output is noise: every
constrained output matches its constraint; greedy equals transformers' `generate` with a logits processor over an
llguidance matcher of llguidance's own tokenizer wrapper; unconstrained rows beside constrained ones are
untouched; budgets split a constrained generation without changing it."""

from __future__ import annotations

import json
import re

import jsonschema
import llguidance
import llguidance.hf
import numpy
import pytest
import torch

import quill
from quill.continuation import ContinuationStore, state_from_json, state_to_json
from quill.errors import InvalidParameter
from quill.generate import DecodeBatch, new_sequences, run
from quill import kernels, structured
from quill.structured import Constraint, constraint_from

from conftest import make_tiny_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 8},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "kind": {"enum": ["cat", "dog", "owl"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                   "floor": {"type": "integer", "minimum": -2, "maximum": 9}},
                 "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "kind", "tags", "home"],
    "additionalProperties": False,
}
SAMPLERS = {
    "greedy": dict(temperature=0),
    "plain": dict(),
    "warped": dict(temperature=1.3, top_k=40, top_p=0.9),
    "min_p": dict(min_p=0.05, repetition_penalty=1.2),
    "typical": dict(typical_p=0.8, presence_penalty=0.5, frequency_penalty=0.3),
}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("structured") / "gpt2", tokenizer="gpt2", n_positions=256)


@pytest.fixture(scope="module")
def engine(gpt2_dir):
    return quill.load(gpt2_dir)


@pytest.fixture(scope="module")
def chars(tiny_model_dir):
    return quill.load(tiny_model_dir)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_json_schema_outputs_validate(engine, sampler):
    out = engine.generate("Describe a pet:", 200, n=6, json_schema=SCHEMA, seed=7, **SAMPLERS[sampler])
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.text
        jsonschema.validate(json.loads(choice.text), SCHEMA)


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "greedy"])
def test_sampling_among_allowed_ids_equals_the_masked_vocabulary(engine, sampler, monkeypatch):
    """A sampled row draws among the grammar's allowed ids where they are few; drawing over the whole masked
    vocabulary (the path taken where they are many) gives the same tokens."""
    if not kernels.available():
        pytest.skip("the allowed ids are listed by the C kernels, which this CPU cannot run")
    kw = dict(prompt="Describe a pet:", max_tokens=120, n=3, json_schema=SCHEMA, seed=11, **SAMPLERS[sampler])
    listed = structured.GrammarState.allowed_ids
    few = []
    monkeypatch.setattr(structured.GrammarState, "allowed_ids",
                        lambda self, *a: few.append(listed(self, *a)) or few[-1])
    among = [c.text for c in engine.generate(**kw).choices]
    assert sum(ids is not None for ids in few) > len(few) / 2  # most steps drew among a few ids
    monkeypatch.setattr(structured.GrammarState, "allowed_ids", lambda self, *a: None)
    assert [c.text for c in engine.generate(**kw).choices] == among


@pytest.mark.parametrize("sampler", ["greedy", "plain", "warped"])
def test_banning_every_allowed_token_fails(engine, sampler):
    """The grammar allows one token here and banned_tokens bans it: no token is left, whichever path chose."""
    with pytest.raises(InvalidParameter, match="left no allowed token"):
        engine.generate("Pick:", 5, regex="x", banned_tokens=engine.tokenizer.encode("x"), seed=3, **SAMPLERS[sampler])


def test_json_object_outputs_parse(engine):
    bounded = {"type": "object", "maxProperties": 2, "additionalProperties": False,
               "patternProperties": {"^[a-z]{1,3}$": {"type": "integer", "minimum": 0, "maximum": 999}}}
    for choice in engine.generate("{", 120, n=8, json_schema=bounded, seed=3).choices:
        assert choice.finish_reason == "stop", choice.text
        assert isinstance(json.loads(choice.text), dict)


@pytest.mark.parametrize("model", ["engine", "chars"])
def test_regex_and_choice(model, request):
    e = request.getfixturevalue(model)
    pattern = r"[a-c]{2,5}-[0-9]{1,3}"
    for seed in range(3):
        out = e.generate("x", 40, n=4, regex=pattern, seed=seed, temperature=1.5)
        for choice in out.choices:
            assert re.fullmatch(pattern, choice.text) and choice.finish_reason == "stop", choice.text
        out = e.generate("x", 40, n=4, choice=["yes", "no", "not sure"], seed=seed)
        assert all(c.text in ("yes", "no", "not sure") and c.finish_reason == "stop" for c in out.choices)


def test_grammar_lark_and_gbnf(engine):
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'
    gbnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    for grammar in (lark, gbnf):
        for c in engine.generate("sum:", 60, n=4, grammar=grammar, seed=5).choices:
            assert re.fullmatch(r"\((?:[1-9][0-9]?)(?:\+[1-9][0-9]?)*\)", c.text) and c.finish_reason == "stop"


def test_stream_concatenates_to_the_document(engine):
    kw = dict(json_schema=SCHEMA, seed=11, stop=["never-here"])
    text = "".join(engine.stream("Pet:", 200, **kw))
    assert text == engine.generate("Pet:", 200, **kw).text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_max_tokens_cut_is_length(engine):
    out = engine.generate("Pet:", 5, json_schema=SCHEMA, seed=1)
    assert out.finish_reason == "length" and len(out.tokens) == 5 and out.text.startswith("{")


def test_logprobs_are_the_masked_distribution(engine):
    out = engine.generate("Pick:", 10, choice=["cat", "dog"], logprobs=20, temperature=0)
    assert out.text in ("cat", "dog")
    done = ""
    for lp in out.logprobs:  # every alternative keeps the text a prefix of a choice; together they hold all mass
        texts = [done + engine.tokenizer.decode([i]) for i, _ in lp.top]
        assert texts and all("cat".startswith(t) or "dog".startswith(t) for t in texts)
        assert abs(sum(numpy.exp(v) for _, v in lp.top) - 1) < 1e-5
        done += engine.tokenizer.decode([lp.token])


def test_greedy_equals_transformers_with_llguidance(engine, gpt2_dir):
    """An independent reference: transformers' `generate` (greedy) over the same checkpoint, with a logits
    processor that masks by an llguidance matcher built from llguidance's own wrapper of transformers' tokenizer
    and its own JSON-schema compiler (llguidance ships no processor of its own; this is the few lines one is)."""
    from transformers import GPT2LMHeadModel, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast

    class Masked(LogitsProcessor):
        def __init__(self, matcher: llguidance.LLMatcher, prompt_len: int):
            self.matcher, self.prompt_len, self.consumed, self.stopped_at = matcher, prompt_len, 0, None

        def __call__(self, input_ids, scores):
            new = input_ids[0, self.prompt_len + self.consumed:].tolist()
            assert self.matcher.consume_tokens(new)
            self.consumed += len(new)
            if self.matcher.is_stopped() and self.stopped_at is None:
                self.stopped_at = self.consumed  # complete: Quill ends here, generate goes on to the EOS it forces
            bits = numpy.unpackbits(numpy.frombuffer(self.matcher.compute_bitmask(), numpy.uint8),
                                    bitorder="little")[: scores.shape[-1]]
            return scores.masked_fill(torch.from_numpy(bits == 0), float("-inf"))

    hf = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    hf_tok = PreTrainedTokenizerFast.from_pretrained(gpt2_dir)
    info = llguidance.hf.from_tokenizer(hf_tok)
    regex = r"[a-z]{3,6}( [a-z]{2,4}){2}"
    for kw, grammar in [(dict(json_schema=SCHEMA), llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(SCHEMA), defaults={"whitespace_flexible": False, "item_separator": ", ",
                                          "key_separator": ": "})),
                        (dict(regex=regex), llguidance.grammar_from("regex", regex))]:
        ids = hf_tok("A pet:", return_tensors="pt")["input_ids"]
        masked = Masked(llguidance.LLMatcher(info, grammar), ids.shape[1])
        with torch.no_grad():
            seq = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=200,
                              logits_processor=LogitsProcessorList([masked]), eos_token_id=hf_tok.eos_token_id,
                              pad_token_id=hf_tok.eos_token_id)
        expected = seq[0, ids.shape[1]:].tolist()[: masked.stopped_at]
        out = engine.generate("A pet:", 200, temperature=0, **kw)
        assert out.tokens == expected and out.finish_reason == "stop", (kw, out.tokens, expected)


def test_unconstrained_rows_beside_constrained_equal_their_solo_runs(engine):
    model, tok = engine.model, engine.tokenizer
    plain = [engine.request("Once", 30, seed=4, top_k=50), engine.request("Twice", 24, temperature=0)]
    solo = [[ev.token for ev in run(model, tok, r)] for r in plain]
    shaped = engine.request("Pet:", 200, json_schema=SCHEMA, seed=9)
    chosen = engine.request("Pick:", 10, choice=["left", "right"], temperature=0)
    batch = DecodeBatch(model, 6, 256)
    seqs = {name: new_sequences(model, tok, r, n) for name, r, n in
            [("a", plain[0], 1), ("s", shaped, 2), ("b", plain[1], 1), ("c", chosen, 1)]}
    for group in seqs.values():
        batch.add(group)
    while batch.rows:
        batch.step()
    assert seqs["a"][0].generated == solo[0] and seqs["b"][0].generated == solo[1]
    for seq in seqs["s"]:
        jsonschema.validate(json.loads("".join(seq.text)), SCHEMA)
    assert "".join(seqs["c"][0].text) in ("left", "right")


def test_budgeted_pieces_and_a_restart_equal_one_call(engine, tmp_path):
    kw = dict(prompt="Pet:", max_tokens=200, json_schema=SCHEMA, seed=21, top_p=0.95)
    whole = engine.generate(**kw)
    assert whole.finish_reason == "stop"
    saved = engine.continuations
    try:
        engine.continuations = ContinuationStore(tmp_path)
        out = engine.generate(max_flops=whole.usage.flops // 4, **kw)
        tokens, calls = list(out.tokens), 1
        while out.finish_reason == "budget":
            engine.continuations = ContinuationStore(tmp_path)  # a restart: the grammar state is replayed
            out = engine.generate(continuation=out.continuation, max_flops=whole.usage.flops // 4)
            tokens += out.tokens
            calls += 1
        assert calls >= 4 and tokens == whole.tokens and out.finish_reason == "stop"
    finally:
        engine.continuations = saved


def test_constraint_round_trips_through_json(engine):
    seq = new_sequences(engine.model, engine.tokenizer, engine.request("x", 5, regex="ab+"), 1)[0]
    state = state_from_json(json.loads(json.dumps(state_to_json(seq.state()))))
    assert state.request.constraint == Constraint("regex", "ab+")


@pytest.mark.parametrize("kw, param, words", [
    (dict(json_schema={"type": "nonsense"}), "json_schema", "Invalid type"),
    (dict(json_schema={"type": "object", "if": {}}), "json_schema", "Unimplemented keys"),
    (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 2}), "json_schema", "Unsatisfiable"),
    (dict(json_schema="{not json"), "json_schema", "not valid JSON"),
    (dict(json_schema=[1]), "json_schema", "JSON object"),
    (dict(regex="a(b"), "regex", "unclosed group"),
    (dict(regex=""), "regex", "non-empty"),
    (dict(choice=[]), "choice", "non-empty list"),
    (dict(choice=["a", 3]), "choice", "non-empty list"),
    (dict(grammar="start: foo"), "grammar", "unknown name"),
    (dict(grammar="root ::= yes |"), "grammar", "not found"),
    (dict(regex="a+", choice=["a"]), "choice", "one constraint at a time"),
])
def test_errors_name_the_argument(engine, kw, param, words):
    with pytest.raises(InvalidParameter) as e:
        engine.generate("x", 5, **kw)
    assert e.value.param == param and words in str(e.value)


def test_refusals(engine, chars):
    with pytest.raises(InvalidParameter) as e:
        engine.generate("x", 5, regex="a+", num_beams=2)
    assert e.value.param == "regex" and "beam" in str(e.value)
    with pytest.raises(InvalidParameter) as e:
        engine.generate("x", 5, choice=["a", "b"], penalty_alpha=0.5, top_k=4)
    assert e.value.param == "choice"
    with pytest.raises(InvalidParameter) as e:  # the character vocabulary has no '{'
        chars.generate("x", 5, json_schema={"type": "object"})
    assert e.value.param == "json_schema" and "vocabulary" in str(e.value)
    assert constraint_from(regex="x", param="structured_outputs").param == "structured_outputs"


def test_cli_flags(engine, gpt2_dir, tmp_path, capsys):
    from quill.cli import main

    schema_file, grammar_file = tmp_path / "schema.json", tmp_path / "g.gbnf"
    schema_file.write_text(json.dumps(SCHEMA))
    grammar_file.write_text('root ::= "<" [a-z]+ ">"')
    base = ["generate", str(gpt2_dir), "Pet:", "--max-tokens", "200", "--seed", "3"]
    cases = [(["--json-schema", str(schema_file)], dict(json_schema=SCHEMA)),
             (["--json-schema", json.dumps(SCHEMA), "--stream"], dict(json_schema=SCHEMA)),
             (["--regex", "[0-9]{2}x"], dict(regex="[0-9]{2}x")),
             (["--choice", "up", "--choice", "down"], dict(choice=["up", "down"])),
             (["--grammar", str(grammar_file)], dict(grammar=grammar_file.read_text()))]
    for flags, kw in cases:
        assert main(base + flags) == 0
        assert capsys.readouterr().out == engine.generate("Pet:", 200, seed=3, **kw).text + "\n"
    for flags, words in [(["--regex", "a(b"], "unclosed group"), (["--regex", "a", "--choice", "a"], "one constraint"),
                         (["--grammar", str(tmp_path / "missing")], "cannot read grammar file")]:
        assert main(base + flags) == 2
        err = capsys.readouterr().err
        assert err.startswith("quill: error:") and words in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_constrained_rows_equal_cpu_and_conform(engine, gpt2_dir):
    gpu = quill.load(gpt2_dir, device="cuda")
    kw = dict(prompt="Describe a pet:", max_tokens=200, json_schema=SCHEMA)
    assert gpu.generate(**kw, temperature=0).choices[0].text == engine.generate(**kw, temperature=0).choices[0].text
    for choice in gpu.generate(**kw, n=3, seed=5, top_p=0.9).choices:
        jsonschema.validate(json.loads(choice.text), SCHEMA)
