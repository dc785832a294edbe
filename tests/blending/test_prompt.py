"""The query part of a RAG prompt carries the caller's conversation through the chat
template, after the chunks; the root and the chunks stay as they were."""

from __future__ import annotations

import copy

from ragcache.blending.prompt import PromptBuilder
from tests.service_helpers import tiny_loaded

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [("system", "Answer in French."), ("user", "Hi"), ("assistant", "Bonjour")]


def test_conversation_follows_the_chunks_through_the_template() -> None:
    tokenizer = copy.deepcopy(tiny_loaded().tokenizer)
    tokenizer.chat_template = CHATML
    builder = PromptBuilder(tokenizer)
    chunks = [builder.chunk_ids("Paris is in France.")]
    plain = builder.layout(chunks, "Where is Paris?")
    chat = builder.layout(chunks, "Where is Paris?", CONVERSATION)
    assert chat.root_ids == plain.root_ids and chat.chunk_ids == plain.chunk_ids
    query = tokenizer.decode(chat.query_ids)
    assert query == (
        "<|im_end|>\n<|im_start|>system\nAnswer in French.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nBonjour<|im_end|>\n"
        "<|im_start|>user\nQuestion: Where is Paris?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_conversation_without_a_template_is_laid_out_as_turns() -> None:
    builder = PromptBuilder(tiny_loaded().tokenizer)
    query = builder.tokenizer.decode(builder.conversation_query_ids(CONVERSATION, "Where?"))
    turns = "System: Answer in French.\n\nUser: Hi\n\nAssistant: Bonjour\n\n"
    assert query == turns + "Question: Where?\n\nAnswer:"
