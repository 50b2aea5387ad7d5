"""Chat template rendering (jinja2) and tokenisation (`tokenizers`) from a checkpoint's files,
matching what transformers 5's processor and `TokenizersBackend` do with the same files."""

from __future__ import annotations

import json
from datetime import datetime

from edgevlm.errors import UsageError, require

from ..families import user_turn
from .common import CheckpointFiles, read_json


def _token_text(value) -> str | None:
    """A token as tokenizer_config.json stores it: a string or a serialized AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def template_wrote_bos(text: str, bos_token: str | None) -> bool:
    """transformers' processor rule for a rendered chat: a text that already starts with the
    BOS token is tokenized without special tokens, so the template's BOS is the only one."""
    return bool(bos_token) and text.startswith(bos_token)


def chat_template_of(files: CheckpointFiles) -> str | None:
    """The chat template, looked up where transformers' processor finds it first:
    chat_template.jinja, chat_template.json, processor_config.json, tokenizer_config.json."""
    jinja_file = files.folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = (read_json(files.folder / "chat_template.json") or {}).get("chat_template")
    template = (template or files.processor.get("chat_template")
                or files.tokenizer_config.get("chat_template"))
    if isinstance(template, list):  # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (spaces before punctuation and contractions)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text


def compile_template(template: str):
    """The template compiled the way transformers' `_compile_jinja_template` does."""
    jinja2 = require("jinja2", "runtime", "rendering the chat template")
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}` marks assistant text for training masks; it renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class ChatTokenizer:
    """The chat template and tokenizer of a checkpoint, without transformers."""

    def __init__(self, files: CheckpointFiles):
        tokenizers = require("tokenizers", "runtime", "tokenising prompts")
        path = files.folder / "tokenizer.json"
        if not path.is_file():
            raise UsageError(f"{files.folder} has no tokenizer.json",
                             "save the tokenizer with the model (transformers writes tokenizer.json)")
        self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        config = files.tokenizer_config
        # Named special tokens (bos_token, eos_token, image_token, ...) are template variables.
        self.special_tokens = {key: text for key, value in config.items()
                               if key.endswith("_token") and (text := _token_text(value)) is not None}
        # The file's post-processor decides which special tokens encoding adds: transformers
        # ignores tokenizer_config's add_bos_token / add_eos_token when tokenizer.json exists.
        self.tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        # transformers applies its clean-up to decoded text only for non-BPE models.
        self.clean_up_spaces = (bool(config.get("clean_up_tokenization_spaces"))
                                and type(self.tokenizer.model).__name__ != "BPE")
        self.chat_template = chat_template_of(files)
        self._template = None
        self.eos_token_ids = self._eos_ids(files)

    def _eos_ids(self, files: CheckpointFiles) -> tuple[int, ...]:
        ids = set()
        eos = self.special_tokens.get("eos_token")
        if eos is not None and (eos_id := self.tokenizer.token_to_id(eos)) is not None:
            ids.add(eos_id)
        generation = files.generation_config.get("eos_token_id")
        if generation is None:  # generate() falls back to the model config
            text_config = files.config.get("text_config") or {}
            generation = files.config.get("eos_token_id", text_config.get("eos_token_id"))
        if isinstance(generation, int):
            generation = [generation]
        ids.update(int(i) for i in generation or [])
        return tuple(sorted(ids))

    def token_id(self, token: str | None) -> int | None:
        """The id of a token string (special tokens included), None when unknown."""
        return None if token is None else self.tokenizer.token_to_id(token)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render the chat template as the processor's `apply_chat_template(tokenize=False)`."""
        if self.chat_template is None:
            raise UsageError("the model folder has no chat template",
                             "save the processor with its chat template (chat_template.jinja)")
        if self._template is None:
            self._template = compile_template(self.chat_template)
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)

    def chat_text(self, prompt: str, num_images: int = 1) -> str:
        """One user turn with `num_images` images then the prompt, plus the generation prompt."""
        return self.render(user_turn(prompt, num_images))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids for a text, as the processor's tokenizer call (`add_special_tokens=True`)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat(self, text: str) -> list[int]:
        """Token ids for a rendered chat, as the processor's `apply_chat_template(tokenize=True)`."""
        bos = self.special_tokens.get("bos_token")
        return self.encode(text, add_special_tokens=not template_wrote_bos(text, bos))

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Text for token ids, as the transformers tokenizer's `decode`."""
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def stream(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder for streaming generated text token by token."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turns generated ids into text pieces as they arrive, in constant time per token.

    Each step decodes only the last few tokens, with the token before them as context so that
    leading-space handling matches a full decode. A tail that ends inside a multi-byte character
    decodes to U+FFFD and is held back until the next token completes it.
    """

    def __init__(self, tokenizer: ChatTokenizer, *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # end of the text already returned

    def _decode(self, ids) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; returns the newly completed text (possibly empty)."""
        self.ids.append(int(token_id))
        done = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if text.endswith("\ufffd"):
            return ""  # inside a multi-byte character: wait for the bytes that complete it
        # A token that adds no text (a skipped special token) is consumed too: holding it
        # back would widen the window at every such token (quadratic time).
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        done = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done):]
