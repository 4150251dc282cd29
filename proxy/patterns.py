"""Which normalized project names an fnmatch pattern can match.

witness() finds a name that every given pattern matches, exactly: so check-config
can refuse a pattern that matches nothing and two `owns` that share a name. Pure.
"""

from __future__ import annotations

import fnmatch
from collections import deque
from collections.abc import Iterable, Mapping


def first_match(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern the normalized name matches (fnmatch, case-sensitive)."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-"
_ANY = frozenset(_ALPHABET)
# One step of a glob: a set of characters, or None for '*'.
_Step = frozenset[str] | None
# Where the walk is: a position in each pattern, and the name automaton's state.
_State = tuple[tuple[int, ...], int]


def _steps(pattern: str) -> tuple[_Step, ...]:
    """A glob as fnmatch reads it: '*', '?', [classes] (their members asked of
    fnmatch itself, so ranges and '!' mean what they mean there), literals."""
    steps: list[_Step] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        end = class_end(pattern, i) if char == "[" else -1
        if char == "*":
            steps.append(None)
        elif char == "?":
            steps.append(_ANY)
        elif end > 0:
            cls = pattern[i:end + 1]
            steps.append(frozenset(c for c in _ALPHABET if fnmatch.fnmatchcase(c, cls)))
            i = end
        else:  # a literal; an unclosed '[' is one too, as in fnmatch
            steps.append(frozenset(char) & _ANY)
        i += 1
    return tuple(steps)


def class_end(pattern: str, start: int) -> int:
    """Index of the ']' closing the class opened at start, as fnmatch reads it; -1 if none."""
    j = start + 1
    if j < len(pattern) and pattern[j] == "!":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    return pattern.find("]", j)


def _name_state(state: int, char: str) -> int:
    """PEP 503 normalized names as an automaton: 0 start, 1 after a letter or
    digit (accepting), 2 after '-'; -1: no name continues this way."""
    if char != "-":
        return 1
    return 2 if state == 1 else -1


def witness(*patterns: str) -> str | None:
    """A normalized project name that every pattern matches, or None if there is none.

    Exact, not a heuristic: a breadth-first walk over the product of the
    patterns (as automata) and the shape of a normalized name (letters, digits,
    single '-' between them). Polynomial in the patterns' lengths.
    """
    programs = [_steps(p) for p in patterns]
    ends = tuple(len(p) for p in programs)
    start: _State = (tuple(0 for _ in programs), 0)
    came_from: dict[_State, tuple[_State, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        positions, shape = state
        if shape == 1 and positions == ends:
            return _spell(state, came_from)
        successors: list[tuple[_State, str]] = []
        for k, pos in enumerate(positions):  # a '*' may match nothing
            if pos < ends[k] and programs[k][pos] is None:
                successors.append((((*positions[:k], pos + 1, *positions[k + 1:]), shape), ""))
        for char in _ALPHABET:
            moved = _consume(programs, positions, char)
            next_shape = _name_state(shape, char)
            if moved is not None and next_shape >= 0:
                successors.append(((moved, next_shape), char))
        for successor, char in successors:
            if successor not in came_from:
                came_from[successor] = (state, char)
                queue.append(successor)
    return None


def _consume(
    programs: list[tuple[_Step, ...]], positions: tuple[int, ...], char: str,
) -> tuple[int, ...] | None:
    moved = []
    for program, pos in zip(programs, positions, strict=True):
        if pos == len(program):
            return None
        step = program[pos]
        if step is None:
            moved.append(pos)  # '*' takes the character and stays
        elif char in step:
            moved.append(pos + 1)
        else:
            return None
    return tuple(moved)


def _spell(state: _State, came_from: Mapping[_State, tuple[_State, str] | None]) -> str:
    chars = []
    link = came_from[state]
    while link is not None:
        state, char = link
        chars.append(char)
        link = came_from[state]
    return "".join(reversed(chars))
