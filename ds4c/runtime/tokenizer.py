"""Text <-> token ids for ``ds4c run --prompt``: the checkpoint's own tokenizer.json when the
artifact embeds one, else UTF-8 bytes as ids (presets: random weights, so text is only a demo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ds4c.errors import InputError


@dataclass
class Tokenizer:
    kind: str
    impl: Any = None
    vocab_size: int = 0

    def encode(self, text: str) -> list[int]:
        if self.kind == "hf":
            return self.impl.encode(text).ids
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


def tokenizer_for(model: Any) -> Tokenizer:
    info = model.manifest.get("tokenizer", {"kind": "none"})
    if info["kind"] == "hf":
        from tokenizers import Tokenizer as HFTokenizer

        container = getattr(model, "container", None)
        blob = container.read_bytes(info["member"]) if container is not None else None
        if blob is None:
            raise InputError("artifact tokenizer is not available")
        return Tokenizer("hf", HFTokenizer.from_str(blob.decode()))
    return Tokenizer(info["kind"], vocab_size=model.vocab_size)
