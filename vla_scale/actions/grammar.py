"""The decoding grammar: a deterministic finite-state machine over token ids.

Constrained decoding masks every token the grammar does not allow, so every
action the policy decodes parses. An action tokenizer describes its language
once, as a `TokenLanguage` (a start state, a step function over its action
token ids, and which states end an action); `ActionGrammar` explores it
breadth-first at construction and freezes it into small integer tables:
state 0 is the start, the last state is "done" (after EOS).

What a grammar guarantees (and the tests check): every state it reaches can
still reach "done", so masked decoding can never paint itself into a corner;
every id sequence it accepts decodes; every sequence the tokenizer encodes is
accepted. It must never be built lazily per decoding step: the tables are
what the decoding kernel gathers rows from.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Mapping, Sequence

from vla_scale.errors import ActionParseError, TokenizerError


@dataclass(frozen=True)
class TokenLanguage:
    """What a grammar needs to know about an action tokenizer's output, for a given chunk length."""

    start: Hashable
    # The state after `token_id`, or None where the id may not come next.
    step: Callable[[Hashable, int], Hashable | None]
    # Whether a complete action (all fields) ends at this state, i.e. EOS may come next.
    is_final: Callable[[Hashable], bool]
    token_ids: Sequence[int]
    # Human-readable name of each action token, for error messages.
    names: Mapping[int, str]


class ActionGrammar:
    """Allowed next tokens, state by state, for one action tokenizer and chunk length.

    `ActionGrammar(action_tokenizer, eos_token_id=None, chunk=None)`; the EOS id
    defaults to the tokenizer's. `chunk=None` means one action step.
    The "done" state allows only EOS again (a self-loop), so a batch of
    sequences can keep stepping its finished rows without special cases.
    """

    def __init__(self, action_tokenizer, eos_token_id: int | None = None, chunk: int | None = None):
        eos = action_tokenizer.eos_token_id if eos_token_id is None else int(eos_token_id)
        if eos is None:
            raise TokenizerError("the tokenizer has no EOS token; pass eos_token_id to build an action grammar")
        language: TokenLanguage = action_tokenizer.token_language(chunk)
        if eos in set(language.token_ids):
            raise TokenizerError(f"EOS id {eos} is also an action token; actions could not end unambiguously")
        self.eos_token_id = eos
        self.chunk = chunk
        self._names = {**language.names, eos: "EOS"}
        self._rows = _build_rows(language, eos)
        self.start = 0
        self.done = len(self._rows) - 1
        self._allowed = [tuple(sorted(row)) for row in self._rows]
        self._next = [tuple(row[t] for t in allowed) for row, allowed in zip(self._rows, self._allowed)]
        self._has_choice = [len(allowed) > 1 for allowed in self._allowed]
        self._tables = None

    # -- stepping ---------------------------------------------------------

    @property
    def num_states(self) -> int:
        return len(self._rows)

    def allowed(self, state: int) -> list[int]:
        """Token ids allowed next in `state`, sorted."""
        return list(self._allowed[state])

    def advance(self, state: int, token_id: int) -> int:
        """The state after `token_id`; ActionParseError when the grammar does not allow it here."""
        try:
            return self._rows[state][int(token_id)]
        except KeyError:
            raise ActionParseError(
                f"token id {int(token_id)} ({self.describe(token_id)}) is not allowed here; "
                f"expected {self.describe_allowed(state)}"
            ) from None

    def walk(self, ids: Iterable[int], state: int | None = None) -> int:
        """Advance through `ids` from `state` (default: start); errors name the token index."""
        state = self.start if state is None else state
        for index, token_id in enumerate(ids):
            try:
                state = self.advance(state, token_id)
            except ActionParseError as err:
                raise ActionParseError(f"action token {index}: {err}") from None
        return state

    def is_done(self, state: int) -> bool:
        return state == self.done

    def forced(self, state: int) -> int | None:
        """The one allowed id when there is no choice (jump-forward emits it without a model step)."""
        allowed = self._allowed[state]
        return allowed[0] if len(allowed) == 1 else None

    def choice_positions(self, ids: Iterable[int]) -> list[bool]:
        """For each token of `ids` (an action, from the start): whether the grammar left a choice there.

        Forced tokens (the point, separators, fixed digits, EOS) carry no information about what the
        model learned; token accuracy is measured on the others.
        """
        rows, has_choice = self._rows, self._has_choice  # runs per training sample: no per-token method calls
        state, out = self.start, []
        for token_id in ids:
            out.append(has_choice[state])
            nxt = rows[state].get(token_id)
            state = nxt if nxt is not None else self.advance(state, token_id)  # advance raises the named error
        return out

    def allowed_ids(self, prefix_ids: Iterable[int]) -> list[int]:
        """Allowed next ids after `prefix_ids` (the action ids emitted so far, from the start)."""
        return self.allowed(self.walk(prefix_ids))

    def accepts(self, ids: Iterable[int]) -> bool:
        """Whether `ids` (ending in EOS) is a complete action."""
        try:
            return self.is_done(self.walk(ids))
        except ActionParseError:
            return False

    # -- tables for the decoding kernel -------------------------------------

    @property
    def width(self) -> int:
        """K, the largest allowed set: the row width of `allowed_table`."""
        return max(len(allowed) for allowed in self._allowed)

    def allowed_table(self):
        """LongTensor (num_states, K): each state's allowed ids, ascending, padded with -1."""
        return self._kernel_tables()[0]

    def transition_table(self):
        """LongTensor (num_states, K): the next state for each entry of `allowed_table`, -1 in padding."""
        return self._kernel_tables()[1]

    def _kernel_tables(self):
        if self._tables is None:
            import torch

            allowed = torch.full((self.num_states, self.width), -1, dtype=torch.long)
            nxt = torch.full_like(allowed, -1)
            for state, (ids, states) in enumerate(zip(self._allowed, self._next)):
                allowed[state, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                nxt[state, : len(states)] = torch.tensor(states, dtype=torch.long)
            self._tables = (allowed, nxt)
        return self._tables

    @property
    def max_tokens(self) -> int:
        """The longest accepted sequence, EOS included (a bound for max_new_tokens)."""
        longest = [0] * self.num_states
        # Apart from done's self-loop the grammar is acyclic (every field is
        # finite), so a longest path exists; children are visited first.
        for state in reversed(_topological_order(self._rows, self.done)):
            longest[state] = max(
                (1 + (0 if nxt == self.done else longest[nxt]) for nxt in self._next[state]), default=0
            )
        return longest[self.start]

    # -- messages -----------------------------------------------------------

    def describe(self, token_id: int) -> str:
        name = self._names.get(int(token_id))
        if name is None:
            return "not an action token"
        return name if int(token_id) == self.eos_token_id else repr(name)

    def describe_allowed(self, state: int) -> str:
        names = [self.describe(t) for t in self._allowed[state]]
        if len(names) > 12:
            return f"one of {len(names)} action tokens ({', '.join(names[:3])}, ...)"
        return names[0] if len(names) == 1 else "one of " + ", ".join(names)


def _build_rows(language: TokenLanguage, eos: int) -> list[dict[int, int]]:
    """Breadth-first exploration of the language, dead ends pruned; the last row is "done"."""
    keys = [language.start]
    edges: list[dict[int, Hashable]] = []
    seen = {language.start}
    queue = deque([language.start])
    done = object()
    while queue:
        key = queue.popleft()
        row = {}
        for token_id in language.token_ids:
            nxt = language.step(key, token_id)
            if nxt is None:
                continue
            row[token_id] = nxt
            if nxt not in seen:
                seen.add(nxt)
                keys.append(nxt)
                queue.append(nxt)
        if language.is_final(key):
            row[eos] = done
        edges.append(row)
    edge_of = dict(zip(keys, edges))

    # A state that cannot reach "done" would let masked decoding get stuck.
    predecessors: dict[Hashable, set] = {}
    for key, row in edge_of.items():
        for nxt in row.values():
            predecessors.setdefault(nxt, set()).add(key)
    live, frontier = {done}, [done]
    while frontier:
        for key in predecessors.get(frontier.pop(), ()):
            if key not in live:
                live.add(key)
                frontier.append(key)
    if language.start not in live:
        raise TokenizerError("the action grammar accepts nothing: the tokenizer lacks pieces every action needs")

    order = [key for key in keys if key in live]
    number = {key: i for i, key in enumerate(order)}
    number[done] = len(order)
    rows = [{t: number[nxt] for t, nxt in edge_of[key].items() if nxt in live} for key in order]
    rows.append({eos: number[done]})
    return rows


def _topological_order(rows: list[dict[int, int]], done: int) -> list[int]:
    order, visited = [], set()
    for root in range(len(rows)):
        if root in visited:
            continue
        visited.add(root)
        stack = [(root, iter(rows[root].values()))]
        while stack:
            state, children = stack[-1]
            for child in children:
                if child != done and child not in visited:
                    visited.add(child)
                    stack.append((child, iter(rows[child].values())))
                    break
            else:
                stack.pop()
                order.append(state)
    return order[::-1]


class CachedGrammars:
    """`grammar(eos, chunk)` for an action tokenizer: built once per (eos, chunk), then reused."""

    def grammar(self, eos_token_id: int | None = None, chunk: int | None = None) -> "ActionGrammar":
        cache = self.__dict__.setdefault("_grammars", {})
        key = (eos_token_id, chunk)
        if key not in cache:
            cache[key] = ActionGrammar(self, eos_token_id, chunk)
        return cache[key]
