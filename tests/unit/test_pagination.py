"""Pages of a listing: bounds, opaque tamper-proof tokens, and pages that fit a message."""

from __future__ import annotations

import base64

import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.limits import MAX_MESSAGE_BYTES, MAX_PAGE_BYTES, MAX_PAGE_SIZE, MAX_PAGE_TOKEN_CHARS
from tapestry.wire.pagination import (
    DEFAULT_PAGE_SIZE,
    InvalidPageRequest,
    PageTokens,
    page_size,
    take_page,
)

NOT_ISSUED = (
    "page_token is not one this server issued (garbled, forged, or from before a restart); "
    "pass next_page_token back unchanged, or leave page_token empty to start from the first page"
)


def rounds(count: int, metrics_per_round: int = 0) -> list[tuple[int, pb.ConsortiumRoundResult]]:
    return [
        (
            n,
            pb.ConsortiumRoundResult(
                round_num=n,
                contributions=[
                    pb.SovereignContribution(
                        node_id="vn",
                        metrics={
                            f"metric-{i:05d}-{'x' * 40}": i / 7 for i in range(metrics_per_round)
                        },
                    )
                ],
            ),
        )
        for n in range(1, count + 1)
    ]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def every_page(entries, tokens, size=0, max_bytes=MAX_PAGE_BYTES):
    pages, token = [], ""
    while True:
        page, token = take_page(entries, "rounds", size, token, tokens, max_bytes)
        pages.append(page)
        if not token:
            return pages


def test_the_bounds_are_those_of_the_contract() -> None:
    assert (DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MAX_PAGE_TOKEN_CHARS) == (50, 1000, 256)
    assert MAX_PAGE_BYTES == 4 * 1024 * 1024 < MAX_MESSAGE_BYTES


@pytest.mark.parametrize(
    ("requested", "granted"),
    [(0, 50), (1, 1), (50, 50), (999, 999), (1000, 1000), (1001, 1000), (2**31 - 1, 1000)],
)
def test_page_size_defaults_and_is_capped(requested: int, granted: int) -> None:
    assert page_size(requested) == granted


def test_a_negative_page_size_is_refused_naming_the_bounds() -> None:
    with pytest.raises(InvalidPageRequest) as refused:
        page_size(-1)
    assert str(refused.value) == (
        "page_size must be >= 0 (0 means the default of 50; at most 1000 are returned per page), "
        "got -1"
    )
    assert isinstance(refused.value, ValueError)  # -> INVALID_ARGUMENT (wire/status.py)


def test_pages_cover_the_listing_in_order_without_repeats() -> None:
    entries = rounds(7)
    pages = every_page(entries, PageTokens(), size=3)
    assert [[r.round_num for r in page] for page in pages] == [[1, 2, 3], [4, 5, 6], [7]]


def test_the_default_page_size_applies_and_an_exact_fit_ends_without_a_token() -> None:
    tokens = PageTokens()
    page, token = take_page(rounds(120), "rounds", 0, "", tokens)
    assert len(page) == 50 and token
    page, token = take_page(rounds(50), "rounds", 0, "", tokens)
    assert len(page) == 50 and token == ""
    assert take_page([], "rounds", 0, "", tokens) == ([], "")


def test_more_than_the_maximum_is_capped() -> None:
    page, token = take_page(rounds(1200), "rounds", 5000, "", PageTokens())
    assert len(page) == 1000 and token


def test_a_page_stops_before_its_byte_budget_whatever_members_put_in_metrics() -> None:
    entries = rounds(100, metrics_per_round=2000)  # ~130 KB per round, ~13 MB in all
    per_round = entries[0][1].ByteSize()
    assert per_round > 100_000

    pages = every_page(entries, PageTokens(), size=1000)

    assert [r.round_num for page in pages for r in page] == list(range(1, 101))
    assert len(pages) >= 4
    for page in pages:
        size = pb.ListRoundsResponse(rounds=page, next_page_token="t" * 256).ByteSize()
        assert size <= MAX_PAGE_BYTES
    # Pages are as full as the budget allows: one more round would not have fitted.
    first = pb.ListRoundsResponse(rounds=pages[0]).ByteSize()
    assert first + per_round > MAX_PAGE_BYTES - 300


def test_a_single_item_larger_than_the_budget_still_makes_progress() -> None:
    entries = rounds(3, metrics_per_round=50)
    pages = every_page(entries, PageTokens(), max_bytes=1000)
    assert [[r.round_num for r in page] for page in pages] == [[1], [2], [3]]


def test_a_listing_that_grows_between_pages_neither_skips_nor_repeats() -> None:
    tokens = PageTokens()
    entries = rounds(3)
    first, token = take_page(entries, "rounds", 2, "", tokens)
    entries = rounds(5)  # two rounds committed meanwhile
    second, token = take_page(entries, "rounds", 2, token, tokens)
    third, token = take_page(entries, "rounds", 2, token, tokens)
    assert [[r.round_num for r in p] for p in (first, second, third)] == [[1, 2], [3, 4], [5]]
    assert token == ""


def test_entries_past_the_page_are_not_produced() -> None:
    produced = []

    def lazily():
        for position, item in rounds(100):
            produced.append(position)
            yield position, item

    take_page(lazily(), "rounds", 10, "", PageTokens())
    assert produced == list(range(1, 12))  # the 11th only tells that there is more


def test_tokens_are_opaque_and_short() -> None:
    token = PageTokens().issue("rounds", 123456)
    assert "rounds" not in token and "123456" not in token
    assert len(token) <= MAX_PAGE_TOKEN_CHARS
    assert token.replace("-", "").replace("_", "").isalnum()


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"), id="one-char-changed"),
        pytest.param(lambda t: t[: len(t) // 2], id="truncated"),
        pytest.param(lambda t: t + "AAAA", id="extended"),
        pytest.param(lambda t: "not a token!", id="not-base64"),
        pytest.param(lambda t: "%%%%", id="garbage"),
        pytest.param(lambda t: _b64(b"rounds:999"), id="unsigned-payload"),
        pytest.param(lambda t: _b64(b"rounds:999" + bytes(16)), id="forged-mac"),
        pytest.param(lambda t: PageTokens(b"k" * 32).issue("rounds", 2), id="other-server"),
    ],
)
def test_a_token_this_server_did_not_issue_is_refused(forge) -> None:
    tokens = PageTokens(b"s" * 32)
    token = forge(tokens.issue("rounds", 2))
    with pytest.raises(InvalidPageRequest) as refused:
        tokens.position("rounds", token)
    assert str(refused.value) == NOT_ISSUED


def test_an_overlong_token_is_refused_without_echoing_it() -> None:
    token = "A" * 10_000
    with pytest.raises(InvalidPageRequest) as refused:
        PageTokens().position("rounds", token)
    assert str(refused.value) == (
        "page_token is longer than 256 characters, so it is not one this server issued; "
        "pass next_page_token back unchanged"
    )


def test_a_token_of_another_listing_is_refused() -> None:
    tokens = PageTokens()
    with pytest.raises(InvalidPageRequest) as refused:
        tokens.position("artifacts", tokens.issue("rounds", 3))
    assert str(refused.value) == (
        "page_token belongs to the rounds listing, not to artifacts; "
        "pass each listing its own next_page_token"
    )


def test_a_token_resumes_after_its_position() -> None:
    tokens = PageTokens()
    assert tokens.position("rounds", "") == 0
    assert tokens.position("rounds", tokens.issue("rounds", 41)) == 41
