"""The one place that assembles RAG prompts, always from token ids.

A prompt is: the root (the chat template up to the user's content, with the system
prompt), then each chunk's own token ids followed by the separator ids, then the
question and the template's closing (end of the user turn and the assistant header).
With a conversation (the caller's system messages and earlier turns), the query part
closes the documents' user turn and renders the conversation through the chat template,
ending with the question as the last user turn; the root and the chunks do not change,
so their caches still apply.
Chunks are tokenized alone, so a chunk's tokens are the same in every prompt and its
cached KV can be reused anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using the documents given. Answer briefly."
)
_CONTENT_MARK = "\u0000RAGCACHE-CONTENT\u0000"


@dataclass(slots=True)
class PromptLayout:
    """Token ids of one RAG prompt, split into its root, chunks and query."""

    root_ids: list[int]
    chunk_ids: list[list[int]]
    query_ids: list[int]
    chunk_starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        offset = len(self.root_ids)
        self.chunk_starts = []
        for ids in self.chunk_ids:
            self.chunk_starts.append(offset)
            offset += len(ids)

    @property
    def context_end(self) -> int:
        """Index of the first query token: everything before it may come from caches."""
        return len(self.root_ids) + sum(len(c) for c in self.chunk_ids)

    @property
    def prompt_ids(self) -> list[int]:
        ids = list(self.root_ids)
        for chunk in self.chunk_ids:
            ids.extend(chunk)
        ids.extend(self.query_ids)
        return ids

    def __len__(self) -> int:
        return self.context_end + len(self.query_ids)


class PromptBuilder:
    def __init__(
        self,
        tokenizer: Any,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        separator: str = "\n\n",
        question_prefix: str = "Question: ",
    ) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        head, tail = self._template_parts(system_prompt)
        self.root_ids = self.encode(head)
        self.closing_ids = self.encode(tail)
        self.separator_ids = self.encode(separator)
        self.question_prefix = question_prefix

    def _template_parts(self, system_prompt: str) -> tuple[str, str]:
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            return f"{system_prompt}\n\n", "\n\nAnswer:"
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": _CONTENT_MARK},
        ]
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        head, _, tail = text.partition(_CONTENT_MARK)
        return head, tail

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def chunk_ids(self, text: str) -> list[int]:
        """A chunk's cached unit: its own tokens, then the separator."""
        return self.encode(text) + self.separator_ids

    def query_ids(self, question: str) -> list[int]:
        return self.encode(self.question_prefix + question) + self.closing_ids

    def conversation_query_ids(
        self, conversation: Sequence[tuple[str, str]], question: str
    ) -> list[int]:
        """The query part after the chunks when the caller sent (role, content) turns
        before the question: the documents' turn ends, the turns follow through the chat
        template, and the question is the last user turn."""
        asked = self.question_prefix + question
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            turns = [f"{role.capitalize()}: {content}" for role, content in conversation]
            return self.encode("".join(f"{turn}\n\n" for turn in turns) + asked) + self.closing_ids
        messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": _CONTENT_MARK},
            *({"role": role, "content": content} for role, content in conversation),
            {"role": "user", "content": asked},
        ]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception:  # a template that refuses two user turns in a row
            text = ""
        head, mark, tail = text.partition(_CONTENT_MARK)
        if not mark or self.encode(head) != self.root_ids:
            turns = [f"{role.capitalize()}: {content}" for role, content in conversation]
            return self.encode("\n\n".join([*turns, asked])) + self.closing_ids
        return self.encode(tail)

    def layout(
        self,
        chunks: list[list[int]],
        question: str,
        conversation: Sequence[tuple[str, str]] = (),
    ) -> PromptLayout:
        query = (
            self.conversation_query_ids(conversation, question)
            if conversation
            else self.query_ids(question)
        )
        return PromptLayout(list(self.root_ids), [list(c) for c in chunks], query)
