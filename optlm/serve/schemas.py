"""Request bodies of the OpenAI-compatible API, with OpenAI's and vLLM's field names and defaults.

Types are checked here (pydantic, strict: no numbers from strings, no floats for integers); ranges are checked
by :class:`optlm.SamplingParams`, so the server and the offline API refuse the same values with the same words.
Unknown fields are ignored, as OpenAI's clients send some the server has no use for.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictInt | StrictFloat


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: StrictStr | None = None
    n: StrictInt = 1
    temperature: Number | None = None  # None: OpenAI's default 1
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    logit_bias: dict[StrictStr, Number] | None = None
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    user: StrictStr | None = None


TokenIds = list[StrictInt]


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None


class TokenizeRequest(_Body):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: TokenIds


class LoadLoRAAdapterRequest(_Body):
    """vLLM's body for ``POST /v1/load_lora_adapter``."""

    lora_name: StrictStr
    lora_path: StrictStr


class UnloadLoRAAdapterRequest(_Body):
    """vLLM's body for ``POST /v1/unload_lora_adapter``."""

    lora_name: StrictStr
    lora_int_id: StrictInt | None = None
