"""Text <-> token ids for ``ds4c run --prompt`` and ``ds4c serve``: the checkpoint's own
tokenizer.json when the artifact embeds one (with its chat template and special tokens, when the
checkpoint's tokenizer_config.json / chat_template.jinja has them), else UTF-8 bytes as ids
(presets: random weights, so text is only a demo).

The chat template comes from the artifact, which is untrusted: it is rendered by transformers'
``render_jinja_template``, whose Jinja environment is sandboxed (no attribute access to Python
internals, no file or module access), never by a plain ``jinja2.Template``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ds4c.errors import ArtifactError, InputError


@dataclass
class Tokenizer:
    kind: str
    impl: Any = None
    vocab_size: int = 0
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... as text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens``: the tokenizer's post-processor (e.g. a BOS)
        runs, as for a raw prompt; off for text a chat template rendered (it has them already)."""
        if self.kind == "hf":
            return self.impl.encode(text, add_special_tokens=add_special_tokens).ids
        if self.kind == "bytes":
            return list(text.encode("utf-8"))
        raise InputError("this artifact has no tokenizer (vocabulary smaller than 256 and no tokenizer.json in the "
                         "checkpoint); use --prompt-ids")

    def decode(self, ids: list[int]) -> str:
        if self.kind == "hf":
            return self.impl.decode(ids)
        if self.kind == "bytes":
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return ""

    @property
    def has_text(self) -> bool:
        return self.kind in ("hf", "bytes")

    @property
    def eos_token_id(self) -> int | None:
        """The id of the checkpoint's end-of-sequence token, if it names one the vocabulary has."""
        eos = self.special_tokens.get("eos_token")
        if self.kind != "hf" or not eos:
            return None
        return self.impl.token_to_id(eos)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text of an OpenAI-style conversation, through the checkpoint's chat template
        (sandboxed), with the generation prompt added."""
        if self.chat_template is None:
            raise InputError("this artifact has no chat template (the checkpoint ships no tokenizer_config.json "
                             "chat_template or chat_template.jinja): use /v1/completions with a prompt")
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.chat_template,
                                                add_generation_prompt=True, **self.special_tokens)
        except Exception as e:  # noqa: BLE001 - a template error, or the sandbox refusing something
            raise InputError(f"the artifact's chat template failed on these messages: {type(e).__name__}: {e}") from None
        return rendered[0]


def tokenizer_for(model: Any) -> Tokenizer:
    info = model.manifest.get("tokenizer", {"kind": "none"})
    if info["kind"] == "hf":
        from tokenizers import Tokenizer as HFTokenizer

        container = getattr(model, "container", None)
        blob = container.read_bytes(info["member"]) if container is not None else None
        if blob is None:
            raise InputError("artifact tokenizer is not available")
        template = None
        if info.get("chat_template"):
            raw = container.read_bytes(info["chat_template"]) if isinstance(info["chat_template"], str) else None
            try:
                template = raw.decode("utf-8") if raw is not None else None
            except UnicodeDecodeError:
                template = None
            if template is None:
                raise ArtifactError(f"the artifact's manifest names a chat template member "
                                    f"{info['chat_template']!r} that is missing or not UTF-8 text; recompile the artifact")
        special = info.get("special_tokens") or {}
        if not isinstance(special, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in special.items()):
            raise ArtifactError("the artifact's manifest field tokenizer.special_tokens must map names to token "
                                "text; recompile the artifact")
        return Tokenizer("hf", HFTokenizer.from_str(blob.decode()), model.vocab_size, template, dict(special))
    return Tokenizer(info["kind"], vocab_size=model.vocab_size)


def checkpoint_tokenizer(directory) -> tuple[dict[str, Any], dict[str, bytes]] | None:
    """The manifest record and artifact members of a checkpoint directory's tokenizer:
    tokenizer.json, and its chat template (chat_template.jinja, or tokenizer_config.json's
    ``chat_template`` string) and special tokens (``bos_token`` / ``eos_token`` / ``pad_token``
    / ``unk_token`` as text) when tokenizer_config.json has them. None without tokenizer.json."""
    tok = directory / "tokenizer.json"
    if not tok.is_file():
        return None
    record: dict[str, Any] = {"kind": "hf", "member": "tokenizer/tokenizer.json"}
    members = {"tokenizer/tokenizer.json": tok.read_bytes()}
    config: dict[str, Any] = {}
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{cfg_path}: not valid JSON ({e}); fix or remove it") from None
        if not isinstance(config, dict):
            raise InputError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    template = None
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(config.get("chat_template"), str):
        template = config["chat_template"]
    if template is not None:
        members["tokenizer/chat_template.jinja"] = template.encode("utf-8")
        record["chat_template"] = "tokenizer/chat_template.jinja"
    special = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(name)
        if isinstance(value, dict):  # the AddedToken form
            value = value.get("content")
        if isinstance(value, str):
            special[name] = value
    if special:
        record["special_tokens"] = special
    return record, members
