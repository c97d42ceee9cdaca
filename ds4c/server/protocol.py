"""The OpenAI request bodies ds4c serves, and how they become ``SamplingParams``.

Fields follow the OpenAI API (completions and chat completions); ``top_k``, ``min_p``,
``repetition_penalty``, ``stop_token_ids`` and ``ignore_eos`` are the common extensions (vLLM and
SGLang accept them too). Unknown fields are ignored, as OpenAI clients send some (``user``, ...).
A value outside its range is refused by ``SamplingParams`` with the field named."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ds4c.errors import InputError
from ds4c.runtime.sampling import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise InputError(f"stop: at most 4 stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise InputError("stop: stop strings must not be empty")
        return stops

    def sampling_params(self, max_tokens: int, eos_token_id: int | None, logprobs: int | None) -> SamplingParams:
        if self.n != 1:
            raise InputError(f"n = {self.n}: ds4c serve returns one choice per request; send n requests instead")
        stop_ids = list(self.stop_token_ids)
        if eos_token_id is not None and not self.ignore_eos:
            stop_ids.append(eos_token_id)
        return SamplingParams(max_new_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                              seed=self.seed, stop_token_ids=tuple(dict.fromkeys(stop_ids)), logprobs=logprobs)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` as text or token ids (one prompt per request)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    def prompt_input(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise InputError(f"prompt: {len(p)} prompts in one request; ds4c serve takes one prompt per request "
                                 "(send them as separate requests: they are batched on the server)")
            p = p[0]
        if self.echo:
            raise InputError("echo: not supported; the response holds the generated text only")
        return p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: passed to the template as given

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def for_template(self) -> dict[str, Any]:
        out = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):  # the parts form: text parts only
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InputError(f"messages: content part of type {part.get('type')!r}; this model takes text "
                                     "parts only ({'type': 'text', 'text': ...})")
                parts.append(part["text"])
            out["content"] = "".join(parts)
        return out


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: messages through the checkpoint's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InputError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None
