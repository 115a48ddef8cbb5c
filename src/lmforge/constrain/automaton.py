"""A character automaton for a grammar: a recursive transition network with interned states.

Each rule of the grammar compiles (Thompson's construction) into a graph of nodes joined by
character edges, empty edges and calls; a call pushes its return node, a rule's end pops it. A
state is the set of live stacks after following every empty edge, interned as an int, and every
(state, char) step is memoized, so the token masker (constrain/masker.py) mostly walks dicts.
Stacks deeper than MAX_DEPTH are dropped: that bounds nesting (of JSON values, say) and keeps the
state space finite.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.constrain.ir import Alt, Chars, CharSet, Lit, Members, Node, Ref, Repeat, Seq
from lmforge.errors import InputError

MAX_DEPTH = 64  # rule calls open at once (about 30 levels of JSON nesting)
MAX_NODES = 200_000  # a bigger grammar (a huge maxLength, say) is refused
DEAD = -1


class ConstraintError(InputError):
    """A constraint the server cannot compile (bad or unsupported schema, regex, choice)."""


@dataclass(frozen=True)
class Grammar:
    """Rules by name and the rule a whole answer must match."""

    rules: dict[str, Node]
    start: str


class _Graph:
    """Nodes with character edges, empty edges and call edges; rule ends are marked."""

    def __init__(self, grammar: Grammar) -> None:
        self.chars: list[list[tuple[CharSet, int]]] = []
        self.empty: list[list[int]] = []
        self.calls: list[list[tuple[str, int]]] = []
        self.rule_start: dict[str, int] = {}
        self.rule_end: set[int] = set()
        self.grammar = grammar
        for name in grammar.rules:
            self.rule_start[name] = self.node()
        for name, body in grammar.rules.items():
            end = self.node()
            self.rule_end.add(end)
            self.build(body, self.rule_start[name], end)

    def node(self) -> int:
        if len(self.chars) >= MAX_NODES:
            raise ConstraintError(
                f"the constraint is too large (over {MAX_NODES} automaton nodes); use smaller "
                "length or item bounds"
            )
        self.chars.append([])
        self.empty.append([])
        self.calls.append([])
        return len(self.chars) - 1

    def build(self, item: Node, a: int, b: int) -> None:
        """Adds `item` between nodes a and b."""
        if isinstance(item, Chars):
            self.chars[a].append((item.set, b))
        elif isinstance(item, Lit):
            for ch in item.text[:-1]:
                nxt = self.node()
                self.chars[a].append((CharSet.of(ch), nxt))
                a = nxt
            if item.text:
                self.chars[a].append((CharSet.of(item.text[-1]), b))
            else:
                self.empty[a].append(b)
        elif isinstance(item, Seq):
            for part in item.items[:-1]:
                nxt = self.node()
                self.build(part, a, nxt)
                a = nxt
            if item.items:
                self.build(item.items[-1], a, b)
            else:
                self.empty[a].append(b)
        elif isinstance(item, Alt):
            for option in item.options:
                self.build(option, a, b)
        elif isinstance(item, Repeat):
            self._repeat(item, a, b)
        elif isinstance(item, Ref):
            if item.name not in self.rule_start:
                raise ConstraintError(f"reference to an undefined rule {item.name!r}")
            self.calls[a].append((item.name, b))
        elif isinstance(item, Members):
            self._members(item, a, b)
        else:
            raise TypeError(f"not a grammar node: {item!r}")

    def _repeat(self, item: Repeat, a: int, b: int) -> None:
        for _ in range(item.min):
            nxt = self.node()
            self.build(item.item, a, nxt)
            a = nxt
        if item.max is None:  # a loop: a -item-> a, a -> b
            loop = self.node()
            self.empty[a].append(loop)
            self.build(item.item, loop, a)
            self.empty[a].append(b)
            return
        for _ in range(item.max - item.min):
            nxt = self.node()
            self.empty[a].append(b)
            self.build(item.item, a, nxt)
            a = nxt
        self.empty[a].append(b)

    def _members(self, item: Members, a: int, b: int) -> None:
        """none[i]: no member written before member i; some[i]: at least one was."""
        n = len(item.members)
        none = [a] + [self.node() for _ in range(n)]
        some = [self.node() for _ in range(n + 1)]
        for i, (member, required) in enumerate(item.members):
            body = self.node()
            self.empty[none[i]].append(body)
            self.build(item.sep, some[i], body)
            self.build(member, body, some[i + 1])
            if not required:
                self.empty[none[i]].append(none[i + 1])
                self.empty[some[i]].append(some[i + 1])
        self.empty[some[n]].append(b)  # none[n], no member written, is no way out


class Automaton:
    """Steps through a grammar one character at a time; states are small ints."""

    def __init__(self, grammar: Grammar) -> None:
        self.graph = _Graph(grammar)
        self._states: list[frozenset[tuple[int, ...]]] = []
        self._ids: dict[frozenset[tuple[int, ...]], int] = {}
        self._steps: dict[tuple[int, str], int] = {}
        self._ranges: dict[tuple[int, int, int], bool] = {}
        self._moves: dict[tuple[tuple[int, ...], ...], int] = {}  # the stacks a char moved to
        self.start = self._intern(self._closure([(self.graph.rule_start[grammar.start],)]))
        if self.start == DEAD:
            raise ConstraintError("the constraint matches nothing")

    def _closure(self, stacks: list[tuple[int, ...]]) -> frozenset[tuple[int, ...]]:
        """Every stack reachable by empty edges, calls and returns; kept: those that can read a
        character, or that have finished the whole grammar."""
        g = self.graph
        seen: set[tuple[int, ...]] = set()
        todo = list(stacks)
        live = []
        while todo:
            stack = todo.pop()
            if stack in seen or len(stack) > MAX_DEPTH:
                continue
            seen.add(stack)
            top = stack[-1]
            if g.chars[top] or (len(stack) == 1 and top in g.rule_end):
                live.append(stack)
            todo += [(*stack[:-1], nxt) for nxt in g.empty[top]]
            todo += [(*stack[:-1], ret, g.rule_start[name]) for name, ret in g.calls[top]]
            if top in g.rule_end and len(stack) > 1:
                todo.append(stack[:-1])
        return frozenset(live)

    def _intern(self, stacks: frozenset[tuple[int, ...]]) -> int:
        if not stacks:
            return DEAD
        sid = self._ids.get(stacks)
        if sid is None:
            sid = self._ids[stacks] = len(self._states)
            self._states.append(stacks)
        return sid

    @property
    def size(self) -> int:
        """States interned so far (each with its memoized steps: the automaton's memory)."""
        return len(self._states)

    def step(self, state: int, ch: str) -> int:
        """The state after reading `ch`, or DEAD."""
        key = (state, ch)
        nxt = self._steps.get(key)
        if nxt is None:
            g = self.graph
            moved = [
                (*stack[:-1], to)
                for stack in self._states[state]
                for cs, to in g.chars[stack[-1]]
                if cs.contains(ch)
            ]
            moves = tuple(moved)  # chars that take the same edges share one closure
            nxt = self._moves.get(moves)
            if nxt is None:
                nxt = self._moves[moves] = self._intern(self._closure(moved)) if moved else DEAD
            self._steps[key] = nxt
        return nxt

    def meets(self, state: int, lo: int, hi: int) -> bool:
        """Whether some character with a code point in [lo, hi] can be read in `state` (a
        partial UTF-8 character must still be able to complete)."""
        key = (state, lo, hi)
        hit = self._ranges.get(key)
        if hit is None:
            g = self.graph
            hit = self._ranges[key] = any(
                cs.meets(lo, hi) for stack in self._states[state] for cs, _ in g.chars[stack[-1]]
            )
        return hit

    def accepts(self, state: int) -> bool:
        """Whether the text read so far is a whole answer."""
        g = self.graph
        return any(len(s) == 1 and s[0] in g.rule_end for s in self._states[state])

    def matches(self, text: str) -> bool:
        """Whether `text` is in the grammar's language."""
        state = self.start
        for ch in text:
            state = self.step(state, ch)
            if state == DEAD:
                return False
        return self.accepts(state)
