"""Pure parts of the API: request parsing, reply shapes, stop-string streaming."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import ollama_format, openai_format
from agent.json_fields import InvalidFieldError
from agent.reply_text import ReplyText, split_at_stop
from agent.service import BadRequestError, ChatMessage, Usage
from models.tokenizer import StreamDecoder

USER = [{"role": "user", "content": "hi"}]


# -- OpenAI requests -------------------------------------------------------------------------------


def test_openai_chat_fields() -> None:
    parsed = openai_format.parse_chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ],
            "temperature": 0.5,
            "top_p": 0.9,
            "max_tokens": 7,
            "max_completion_tokens": 9,  # the newer name wins
            "stop": "END",
            "seed": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "ignored", "presence_penalty": 0, "metadata": {"a": 1},  # harmless extras
        }
    )  # fmt: skip
    g = parsed.generation
    assert g.messages == (
        ChatMessage("system", "be brief"),
        ChatMessage("user", "ab"),
        ChatMessage("assistant", ""),
    )
    assert (g.temperature, g.top_p, g.max_tokens, g.seed, g.stop) == (0.5, 0.9, 9, 3, ("END",))
    assert parsed.stream and parsed.include_usage


def test_openai_defaults() -> None:
    parsed = openai_format.parse_chat_request({"model": "m", "messages": USER})
    g = parsed.generation
    assert (g.temperature, g.top_p, g.seed, g.stop) == (1.0, 1.0, None, ())
    assert g.max_tokens == openai_format.DEFAULT_MAX_TOKENS
    assert not parsed.stream and not parsed.include_usage
    # include_usage only means something for streams
    body = {"model": "m", "messages": USER, "stream_options": {"include_usage": True}}
    assert not openai_format.parse_chat_request(body).include_usage
    # top_p 0 keeps only the likeliest token: greedy
    greedy = openai_format.parse_chat_request({"model": "m", "messages": USER, "top_p": 0})
    assert (greedy.generation.temperature, greedy.generation.top_p) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": "1"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": False}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"seed": "7"}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stream": 1}, "stream"),
        ({"stream_options": []}, "stream_options"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"model": 3}, "model"),
    ],
)  # fmt: skip
def test_openai_chat_rejects(change: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidFieldError) as info:
        openai_format.parse_chat_request({"model": "m", "messages": USER, **change})
    assert info.value.param == param
    assert param.split("[")[0].split(".")[0] in str(info.value)
    assert info.value.status == 400


def test_openai_completion_prompt_forms() -> None:
    one = openai_format.parse_completion_request({"model": "m", "prompt": ["text"]})
    assert one.generation.prompt == "text" and one.generation.messages is None
    for bad in ([1, 2, 3], ["a", "b"], None):
        with pytest.raises(InvalidFieldError, match="prompt"):
            openai_format.parse_completion_request({"model": "m", "prompt": bad})
    with pytest.raises(InvalidFieldError, match="echo"):
        openai_format.parse_completion_request({"model": "m", "prompt": "x", "echo": True})


def test_openai_reply_shapes() -> None:
    usage = Usage(5, 2, {"node": "n1", "acceptance": 0.5})
    chat = openai_format.ChatReply("chatcmpl-1", 100, "m", include_usage=True)
    assert chat.first_chunk()["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chat.text_chunk("hi")["usage"] is None
    last, final = chat.last_chunks("stop", usage)
    assert last["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert final["choices"] == [] and final["usage"] == {
        "prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
        "sled": {"node": "n1", "acceptance": 0.5},
    }  # fmt: skip
    body = chat.body("hello", "length", Usage(1, 1))
    assert body["choices"][0]["message"]["content"] == "hello"
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    plain = openai_format.CompletionReply("cmpl-1", 100, "m")
    assert plain.first_chunk() is None and "usage" not in plain.text_chunk("x")
    assert len(plain.last_chunks("stop", usage)) == 1
    assert openai_format.sse({"a": "é"}) == 'data: {"a": "é"}\n\n'.encode()


# -- Ollama requests -------------------------------------------------------------------------------


def test_ollama_chat_options_and_defaults() -> None:
    parsed = ollama_format.parse_chat_request(
        {
            "model": "m:latest",
            "messages": USER,
            "options": {
                "temperature": 0.2, "top_p": 0.5, "top_k": 7, "num_predict": 11, "seed": 4,
                "stop": ["\n"], "num_ctx": 4096, "repeat_penalty": 1.1,
            },
            "keep_alive": "5m",
        }
    )  # fmt: skip
    g = parsed.generation
    assert g is not None and g.model == "m" and parsed.model == "m:latest" and parsed.stream
    assert (g.temperature, g.top_p, g.top_k, g.max_tokens, g.seed, g.stop) == (
        0.2, 0.5, 7, 11, 4, ("\n",),
    )  # fmt: skip
    default = ollama_format.parse_chat_request({"model": "m", "messages": USER, "stream": False})
    d = default.generation
    assert d is not None and not default.stream
    assert (d.temperature, d.top_p, d.top_k) == (0.8, 0.9, 40)
    assert d.max_tokens == ollama_format.UNBOUNDED_TOKENS
    unbounded = {"model": "m", "messages": USER, "options": {"num_predict": -1}}
    assert ollama_format.parse_chat_request(unbounded).generation.max_tokens == ollama_format.UNBOUNDED_TOKENS  # type: ignore[union-attr]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"options": {"temperature": "hot"}}, "options.temperature"),
        ({"options": {"top_k": 1.5}}, "options.top_k"),
        ({"options": {"num_predict": 0}}, "options.num_predict"),
        ({"options": {"stop": [1]}}, "options.stop"),
        ({"options": []}, "options"),
        ({"stream": "no"}, "stream"),
        ({"format": "json"}, "format"),
        ({"messages": [{"role": "user", "content": "x", "images": ["..."]}]}, "messages[0].images"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content"),
        ({"model": None}, "model"),
    ],
)
def test_ollama_chat_rejects(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidFieldError) as info:
        ollama_format.parse_chat_request({"model": "m", "messages": USER, **body})
    assert info.value.param == param


def test_ollama_generate_template_rules() -> None:
    body = {"model": "m", "prompt": "hi", "system": "be brief"}
    templated = ollama_format.parse_generate_request(body, chat_template=True).generation
    assert templated is not None and templated.messages == (
        ChatMessage("system", "be brief"), ChatMessage("user", "hi"),
    )  # fmt: skip
    raw = ollama_format.parse_generate_request({**body, "raw": True}, chat_template=True)
    assert raw.generation is not None and raw.generation.prompt == "hi"
    base = ollama_format.parse_generate_request(body, chat_template=False).generation
    assert base is not None and base.prompt == "be brief\n\nhi"
    assert ollama_format.parse_generate_request({"model": "m"}, True).generation is None
    with pytest.raises(InvalidFieldError, match="context"):
        ollama_format.parse_generate_request({**body, "context": [1, 2]}, True)


def test_ollama_reply_shapes() -> None:
    d = ollama_format.Durations(total=30, prompt_eval=10, eval=20)
    reply = ollama_format.ChatReply("m:latest")
    last = reply.last("t", "", "stop", Usage(3, 4), d)
    assert last == {
        "model": "m:latest", "created_at": "t", "message": {"role": "assistant", "content": ""},
        "done": True, "done_reason": "stop", "total_duration": 30, "load_duration": 0,
        "prompt_eval_count": 3, "prompt_eval_duration": 10, "eval_count": 4, "eval_duration": 20,
    }  # fmt: skip
    assert ollama_format.timestamp(0) == "1970-01-01T00:00:00.000000Z"
    assert ollama_format.ndjson({"a": 1}) == b'{"a": 1}\n'
    assert ollama_format.GenerateReply("m").loaded("t")["done_reason"] == "load"


# -- stop strings ----------------------------------------------------------------------------------


def test_split_at_stop() -> None:
    assert split_at_stop("hello wor", ["world"]) == ("hello ", "wor", False)
    assert split_at_stop("hello world!", ["world"]) == ("hello ", "", True)
    assert split_at_stop("abc", []) == ("abc", "", False)
    assert split_at_stop("xxENDyy", ["yy", "END"]) == ("xx", "", True)  # earliest wins
    assert split_at_stop("a<", ["<|", "<<"]) == ("a", "<", False)


def _decoder(pieces: list[str]) -> StreamDecoder:
    return StreamDecoder([p.encode() for p in pieces])


@given(
    pieces=st.lists(st.text(alphabet="ab<|>é", min_size=0, max_size=3), min_size=1, max_size=12),
    stops=st.lists(st.text(alphabet="ab<|>é", min_size=1, max_size=3), max_size=3),
)
def test_reply_text_equals_cut_text(pieces: list[str], stops: list[str]) -> None:
    """Streamed pieces joined equal the whole text cut before its first stop string."""
    reply = ReplyText(_decoder(pieces), stops)
    out = []
    for i in range(len(pieces)):
        out.append(reply.push(i))
        if reply.stopped:
            break
    out.append(reply.finish())
    whole = "".join(pieces)
    cut = min((whole.find(s) for s in stops if s in whole), default=len(whole))
    assert "".join(out) == whole[:cut]
    assert reply.stopped == (cut < len(whole) or any(s in whole for s in stops))


def test_reply_text_holds_back_partial_utf8_and_stop() -> None:
    table = [b"ok ", "é".encode()[:1], "é".encode()[1:], b"<|", b"end|>", b"more"]
    reply = ReplyText(StreamDecoder(table), ["<|end|>"])
    assert [reply.push(i) for i in range(4)] == ["ok ", "", "é", ""]
    assert reply.push(4) == "" and reply.stopped
    assert reply.push(5) == "" and reply.finish() == ""


def test_bad_request_is_a_service_error() -> None:
    assert issubclass(InvalidFieldError, BadRequestError)
