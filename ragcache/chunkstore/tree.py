"""The knowledge tree: a prefix tree of chunk caches under one system prompt.

A child of the root is a chunk cached on its own (position-independent, reused
anywhere through fusion); a deeper node is a chunk cached after the exact chunks on
its path. The tree guards the store: locked nodes are never evicted, a node leaves a
tier only after its children have (leaf-first), and a node is only placed in a tier
where its parent already is, so a parent never sits in a slower tier than a child.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ragcache.chunkstore.entry import ChunkEntry, LayerKV
from ragcache.chunkstore.keys import KeyContext, chunk_key
from ragcache.chunkstore.store import ChunkStore, LayerStream


@dataclass(slots=True, eq=False)
class TreeNode:
    key: str
    token_ids: tuple[int, ...]
    parent: TreeNode | None
    children: dict[str, TreeNode] = field(default_factory=dict)
    lock_count: int = 0

    def path(self) -> list[TreeNode]:
        """Nodes from the first chunk below the root down to this one."""
        nodes = []
        node: TreeNode | None = self
        while node is not None and node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


class KnowledgeTree:
    def __init__(
        self, store: ChunkStore, context: KeyContext, system_prompt_ids: Sequence[int]
    ) -> None:
        self.store = store
        self.context = context
        ids = tuple(int(t) for t in system_prompt_ids)
        self.root = TreeNode(chunk_key(context, [], ids), ids, None)
        self._nodes: dict[str, TreeNode] = {}
        store.add_guard(self)

    def close(self) -> None:
        self.store.remove_guard(self)

    def __len__(self) -> int:
        return len(self._nodes)

    def node(self, key: str) -> TreeNode | None:
        return self._nodes.get(key)

    def parent_keys(self, parent: TreeNode) -> list[str]:
        """Keys a child of ``parent`` is hashed after: the root (the system prompt's ids as
        the chat template renders them), then every chunk on the path."""
        if parent is self.root:
            return [self.root.key]
        return [self.root.key, *(node.key for node in parent.path())]

    def key_for(self, parent: TreeNode, token_ids: Sequence[int]) -> str:
        return chunk_key(self.context, self.parent_keys(parent), token_ids)

    # ---- lookup and insertion ----------------------------------------------------------

    def match_path(self, chunks: Sequence[Sequence[int]]) -> list[TreeNode]:
        """The longest prefix of ``chunks`` cached as an exact path below the root."""
        matched: list[TreeNode] = []
        node = self.root
        for token_ids in chunks:
            child = node.children.get(self.key_for(node, token_ids))
            if child is None or child.token_ids != tuple(token_ids):
                break
            if not self.store.contains(child.key):
                break
            matched.append(child)
            node = child
        return matched

    def insert(
        self,
        path: Sequence[Sequence[int]],
        layers: Sequence[LayerKV],
        positions: Sequence[int],
        cost: float | None = None,
    ) -> TreeNode | None:
        """Caches the last chunk of ``path`` after the chunks before it, which must be
        cached already. Returns its node, or None when no tier could take it."""
        if not path:
            raise ValueError("insert needs a path of at least one chunk of token ids")
        ancestors = self.match_path(path[:-1])
        if len(ancestors) != len(path) - 1:
            raise ValueError(
                f"insert: chunk {len(ancestors)} of the path is not cached; "
                "insert a path root-first"
            )
        parent = ancestors[-1] if ancestors else self.root
        token_ids = tuple(int(t) for t in path[-1])
        key = self.key_for(parent, token_ids)
        existing = parent.children.get(key)
        if existing is not None and self.store.contains(key):
            return existing
        node = TreeNode(key, token_ids, parent)
        parent.children[key] = node
        self._nodes[key] = node
        entry = ChunkEntry(
            key,
            list(token_ids),
            list(positions),
            list(layers),
            self.parent_keys(parent),
            self.context,
        )
        self.lock(parent)
        try:
            for ancestor in ancestors:
                self.store.promote(ancestor.key)
            stored = self.store.put(entry, cost)
        finally:
            self.unlock(parent)
        if not stored:
            self._detach(node)
            return None
        return node

    def lock(self, node: TreeNode) -> None:
        """Pins ``node`` and its ancestors while a request uses them."""
        current: TreeNode | None = node
        while current is not None:
            current.lock_count += 1
            current = current.parent

    def unlock(self, node: TreeNode) -> None:
        current: TreeNode | None = node
        while current is not None:
            if current.lock_count <= 0:
                raise RuntimeError(f"unlock of node {current.key}, which is not locked")
            current.lock_count -= 1
            current = current.parent

    def fetch(self, nodes: Iterable[TreeNode]) -> list[ChunkEntry | None]:
        """Entries of a matched path, root-first so parents are promoted before children."""
        return [self.store.get(node.key, node.token_ids) for node in nodes]

    def get_layers(self, node: TreeNode, layers: Iterable[int] | None = None) -> LayerStream | None:
        return self.store.get_layers(node.key, node.token_ids, layers)

    def tier_of(self, node: TreeNode) -> str | None:
        return self.store.tier_of(node.key)

    def invariant_violations(self) -> list[tuple[str, str]]:
        """(parent, child) pairs where the parent sits in a slower tier than the child."""
        missing = len(self.store.tiers)
        violations = []
        for node in self._nodes.values():
            if node.parent is None or node.parent is self.root:
                continue
            parent_tier = self.store.fastest_tier_index(node.parent.key)
            child_tier = self.store.fastest_tier_index(node.key)
            parent_rank = missing if parent_tier is None else parent_tier
            if child_tier is not None and parent_rank > child_tier:
                violations.append((node.parent.key, node.key))
        return violations

    # ---- store guard ---------------------------------------------------------------

    def can_evict(self, key: str, tier_index: int) -> bool:
        node = self._nodes.get(key)
        if node is None:
            return True
        if node.lock_count > 0:
            return False
        if any(index < tier_index for index in self.store.tier_indices(key)):
            return True
        for child in node.children.values():
            child_tier = self.store.fastest_tier_index(child.key)
            if child_tier is not None and child_tier <= tier_index:
                return False
        return True

    def can_place(self, key: str, tier_index: int) -> bool:
        node = self._nodes.get(key)
        if node is None or node.parent is None or node.parent is self.root:
            return True
        parent_tier = self.store.fastest_tier_index(node.parent.key)
        return parent_tier is not None and parent_tier <= tier_index

    def on_dropped(self, key: str) -> None:
        node = self._nodes.get(key)
        if node is not None:
            self._detach(node)

    def _detach(self, node: TreeNode) -> None:
        """Removes a node; its subtree is unreachable without it, so it goes too."""
        if node.parent is not None:
            node.parent.children.pop(node.key, None)
        self._nodes.pop(node.key, None)
        for child in list(node.children.values()):
            self._detach(child)
            self.store.delete(child.key)

    # ---- restart -------------------------------------------------------------------

    @classmethod
    def rebuild(
        cls, store: ChunkStore, context: KeyContext, system_prompt_ids: Sequence[int]
    ) -> KnowledgeTree:
        """The tree of this context and system prompt, from the headers on disk."""
        tree = cls(store, context, system_prompt_ids)
        headers = [h for h in store.headers() if h.context == context]
        headers.sort(key=lambda header: len(header.parent_keys))
        for header in headers:
            if not header.parent_keys or header.parent_keys[0] != tree.root.key:
                continue  # cached after another system prompt or template
            if len(header.parent_keys) == 1:
                parent = tree.root
            else:
                parent = tree._nodes.get(header.parent_keys[-1])
                if parent is None:
                    continue
            if tree.key_for(parent, header.token_ids) != header.key:
                continue
            node = TreeNode(header.key, tuple(header.token_ids), parent)
            parent.children[node.key] = node
            tree._nodes[node.key] = node
        return tree
