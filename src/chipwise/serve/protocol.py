"""The OpenAI API's request bodies (the fields chipwise honours, checked by pydantic) and its response objects.

Fields the API defines but chipwise does not implement (n > 1, logprobs, echo, best_of, tools) are refused with a
400 that names them rather than silently ignored; unknown fields are ignored, as OpenAI-compatible servers do, so
a load generator's extensions (`ignore_eos`, `min_tokens`) pass.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # an extension (vLLM's): 0 or -1 keeps every token
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extension (vLLM's): load generators force output lengths with it
    n: int = 1
    logprobs: Any = None
    user: str | None = None

    def unsupported(self) -> str | None:
        if self.n != 1:
            return "n must be 1: chipwise returns one choice per request"
        if self.logprobs not in (None, False, 0):
            return "logprobs is not supported by chipwise serve"
        return None

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # the API's own default
    echo: bool = False
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo is not supported by chipwise serve"
        if self.best_of not in (None, 1):
            return "best_of must be 1"
        return super().unsupported()

    def single_prompt(self) -> str | list[int]:
        """The one prompt (a string or token ids); a batch of several is refused."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError("send one prompt per request (a list of several prompts is not supported)")
            return p[0]
        return p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts carry meaning here
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: Any = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools are not supported by chipwise serve"
        return super().unsupported()


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(rid: str, model: str, text: str, finish: str | None, use: dict | None, chat: bool,
                      chunk: bool) -> dict:
    """A completion, a chat completion, or one streamed chunk of either."""
    if chat:
        choice = {"index": 0, ("delta" if chunk else "message"): {"role": "assistant", "content": text},
                  "finish_reason": finish}
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
    if use is not None:
        body["usage"] = use
    return body


def render_chat(template: str, messages: list[ChatMessage], special_tokens: dict[str, str]) -> str:
    """The prompt text a chat template makes of `messages`, rendered as transformers renders it: a sandboxed Jinja
    environment with trimmed blocks, loop controls, `raise_exception`, and the generation prompt appended."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    return env.from_string(template).render(messages=plain, add_generation_prompt=True, **special_tokens)
