"""Chat for base models: the transcript template, history trimming, stopping at the next speaker, sessions."""

from __future__ import annotations

import pytest
from helpers_generate import (
    ScriptedLM,
    need_tokenizer,
    one_thread,  # noqa: F401 (a fixture, used through pytestmark)
)
from hypothesis import given, settings
from hypothesis import strategies as st

import optlm
from optlm.chat import ChatTemplate, fit_history, strip_pieces

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERSATION = [
    {"role": "system", "content": "A chat about the sea."},
    {"role": "user", "content": "Hi there."},
    {"role": "assistant", "content": " Hello! "},
    {"role": "user", "content": "What is a wave?"},
]


def test_template_renders_a_plain_transcript_ending_with_the_assistant_cue():
    t = ChatTemplate()
    assert t.render(CONVERSATION) == (
        "A chat about the sea.\n\nHuman: Hi there.\nAI: Hello!\nHuman: What is a wave?\nAI:")
    assert t.render(CONVERSATION, add_generation_prompt=False).endswith("Human: What is a wave?")
    assert t.render(CONVERSATION[1:2]) == f"{t.system}\n\nHuman: Hi there.\nAI:"  # default system text
    assert t.render([{"role": "system", "content": ""}, CONVERSATION[1]]) == "Human: Hi there.\nAI:"
    statue = ChatTemplate(user="Human", assistant="Statue", system="")
    assert statue.render(CONVERSATION[1:2]) == "Human: Hi there.\nStatue:"
    assert statue.stop_strings == ["\nHuman:", "\nStatue:"]


@pytest.mark.parametrize("messages,match", [
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "first"),
])
def test_bad_messages_are_rejected(messages, match):
    with pytest.raises(ValueError, match=match):
        ChatTemplate().render(messages)


def words(text: str) -> int:
    return len(text.split())


def turns(n: int) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i}"} for i in range(n)]


def test_history_keeps_everything_that_fits():
    msgs = [{"role": "system", "content": "sys"}, *turns(5)]
    assert fit_history(msgs, words, 1000, ChatTemplate()) == (msgs, 0)


def test_history_drops_oldest_turns_keeps_system_and_last_message():
    template = ChatTemplate(system="")
    msgs = [{"role": "system", "content": "be kind"}, *turns(7)]
    full = words(template.render(msgs))
    kept, dropped = fit_history(msgs, words, full - 1, template)
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1]
    assert dropped == 2 and kept[1:] == msgs[3:]  # a user turn goes with the reply that followed it
    assert kept[1]["role"] == "user"
    kept, dropped = fit_history(msgs, words, 0 + words(template.render([msgs[0], msgs[-1]])), template)
    assert kept == [msgs[0], msgs[-1]] and dropped == 6
    with pytest.raises(ValueError, match="last message"):
        fit_history(msgs, words, 3, template)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["", " ", "\n", "a", "b c", " d ", "é\n", "  \n "]), max_size=12))
def test_stripped_stream_equals_stripped_text(pieces):
    out = list(strip_pieces(iter(pieces)))
    assert "".join(out) == "".join(pieces).strip()
    assert all(out)


@pytest.fixture(scope="module")
def tokenizer():
    return optlm.Tokenizer.from_pretrained(need_tokenizer())


def scripted_lm(tokenizer, reply: str, context: int = 256) -> optlm.LM:
    return optlm.LM(ScriptedLM(tokenizer.encode(reply, add_special_tokens=False), context=context), tokenizer)


def test_reply_stops_at_the_next_speaker_marker(tokenizer):
    lm = scripted_lm(tokenizer, " The sea moves.\nHuman: and then the model goes on")
    assert lm.chat(CONVERSATION, max_new_tokens=30) == "The sea moves."
    assert "".join(lm.chat_stream(CONVERSATION, max_new_tokens=30)) == "The sea moves."
    prompt = tokenizer.decode(lm.model.prompts[-1][0], skip_special_tokens=True)
    assert prompt == ChatTemplate().render(CONVERSATION)
    lm = scripted_lm(tokenizer, " Waves.\nAI: I also think")  # the model starts a second reply of its own
    assert lm.chat(CONVERSATION, max_new_tokens=30) == "Waves."


def test_session_keeps_history_and_tells_when_it_drops_turns(tokenizer):
    lm = scripted_lm(tokenizer, " Fine, thanks.\nHuman:", context=90)
    notices = []
    session = lm.chat_session(system="Short answers.", on_trim=notices.append, max_new_tokens=12)
    assert session.send("How are you?") == "Fine, thanks."
    assert list(session.stream("And today?")) and session.history[-1] == {"role": "assistant",
                                                                           "content": "Fine, thanks."}
    second = tokenizer.decode(lm.model.prompts[-1][0], skip_special_tokens=True)
    assert second.startswith("Short answers.\n\nHuman: How are you?\nAI: Fine, thanks.\nHuman: And today?")
    assert not notices
    for i in range(6):
        session.send(f"Tell me about topic number {i} in some detail please.")
    assert notices and "dropped" in notices[0] and "90-token context" in notices[0]
    last = tokenizer.decode(lm.model.prompts[-1][0], skip_special_tokens=True)
    assert last.startswith("Short answers.\n\nHuman:")  # the system text survives every trim
    assert len(tokenizer.encode(last)) <= 90 - 12
    assert "How are you?" not in last and "topic number 5" in last
    session.reset()
    assert session.history == []


def test_chat_without_callback_warns_about_dropped_turns(tokenizer):
    lm = scripted_lm(tokenizer, " Ok.\nHuman:", context=70)
    msgs = [*turns(9)]
    with pytest.warns(UserWarning, match="dropped the .* oldest messages"):
        assert lm.chat(msgs, max_new_tokens=8) == "Ok."
