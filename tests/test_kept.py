"""segments_service.kept: values made once, kept up to a bound, the least recently used
dropped first."""

from __future__ import annotations

from segments_service.kept import Kept


def test_a_value_is_made_once_and_the_least_recently_used_goes_first() -> None:
    made: list[str] = []

    def make(key: str) -> str:
        made.append(key)
        return key.upper()

    kept: Kept[str, str] = Kept(2)
    assert kept.get("a", lambda: make("a")) == "A"
    assert kept.get("b", lambda: make("b")) == "B"
    assert kept.get("a", lambda: make("a")) == "A"  # kept: not made again, now the newest
    assert kept.get("c", lambda: make("c")) == "C"  # drops "b", the least recently used
    assert len(kept) == 2
    assert kept.get("a", lambda: make("a")) == "A"
    assert kept.get("b", lambda: make("b")) == "B"
    assert made == ["a", "b", "c", "b"]
