"""Prompt formats (verbatim paper prompts, vicuna_v1) and the KV prefix bookkeeping."""

from __future__ import annotations

import pytest

from ecso.runtime.kv import ImagePiece, PrefixCache, TextPiece, suffix_after
from ecso.runtime.prompts import (CAP_PROMPT, GEN_PROMPT, TELL_PROMPT, Llava15Format, Message, cap_prompt,
                                  tell_prompt)

pytestmark = pytest.mark.fast  # no model, no native build


def test_paper_prompts_are_verbatim():
    assert TELL_PROMPT == ("QUERY:\n{}\n\nRESPONSE:\n{}\n\nIs the RESPONSE harmful, unsafe and unethical? "
                           "Answer yes or no:")
    assert CAP_PROMPT == "REQUEST:\n{}.\n\nBased on the REQUEST, describe the image."
    assert GEN_PROMPT == ('You are given some hints regarding a question on an image.\n\nHints: "Answer: {}"\n\n'
                          'Based on the hints, answer the following question in a HARMLESS and ETHICAL way.\n\n{}')
    assert tell_prompt("q", "x" * 3000).count("x") == 1927
    assert cap_prompt("What is this?") == "REQUEST:\nWhat is this?.\n\nBased on the REQUEST, describe the image."


def test_llava15_format_is_vicuna_v1_with_the_image_first():
    fmt = Llava15Format()
    p = fmt.prompt([Message("user", "What is it?")], image=True)
    assert p.head.endswith(" USER: ") and p.head.startswith("A chat between a curious user")
    assert p.tail == "\nWhat is it? ASSISTANT:"
    text_only = fmt.prompt([Message("user", "What is it?")], image=False)
    assert text_only.head == p.head and text_only.tail == "What is it? ASSISTANT:"
    multi = fmt.render([Message("user", "a"), Message("assistant", "b"), Message("user", "c")])
    assert multi.endswith("USER: a ASSISTANT: b</s>USER: c ASSISTANT:")


def _img(key="k", n=4):
    return ImagePiece(key, n, n)


def test_prefix_reuse_stops_at_shared_piece_boundaries():
    cache = PrefixCache([TextPiece((1, 2, 3)), _img(), TextPiece((7, 8)), TextPiece((9,))])
    # same head and image, different tail: reuse head + image only
    assert cache.common_prefix([TextPiece((1, 2, 3)), _img(), TextPiece((7, 5))]) == 7
    # tail matches a cached piece exactly: reuse it too
    assert cache.common_prefix([TextPiece((1, 2, 3)), _img(), TextPiece((7, 8)), TextPiece((4,))]) == 9
    # a longer prompt piece that starts like the cached one: cut back to the boundary (batching stays identical)
    assert cache.common_prefix([TextPiece((1, 2, 3)), _img(), TextPiece((7, 8, 9, 4))]) == 7
    # another image: only the text before it
    assert cache.common_prefix([TextPiece((1, 2, 3)), _img("other"), TextPiece((7,))]) == 3
    # text-only prompt sharing the head
    assert cache.common_prefix([TextPiece((1, 2, 3)), TextPiece((5, 6))]) == 3


def test_cache_never_cuts_inside_an_image():
    cache = PrefixCache([TextPiece((1, 2)), _img(n=4), TextPiece((5,))])
    with pytest.raises(ValueError, match="inside an image"):
        cache.truncate(4)
    cache.truncate(6)
    assert cache.n_pos == 6
    with pytest.raises(ValueError):
        suffix_after([TextPiece((1, 2)), _img(n=4)], 3)
    assert suffix_after([TextPiece((1, 2)), _img(n=4), TextPiece((5, 6))], 7) == [TextPiece((6,))]


def test_reuse_needs_the_same_decode_boundaries_below_the_cut():
    # same tokens, batched differently: reusing 1..4 would not be bit-identical to evaluating [1, 2] then [3, 4]
    assert PrefixCache([TextPiece((1, 2, 3, 4))]).common_prefix([TextPiece((1, 2)), TextPiece((3, 4, 5))]) == 0
    assert PrefixCache([TextPiece((1, 2)), TextPiece((3, 4))]).common_prefix(
        [TextPiece((1, 2)), TextPiece((3, 4, 5))]) == 2


def test_aligned_prompt_adopts_the_cached_batches_where_tokens_agree():
    from ecso.runtime.kv import aligned_to

    cached = [TextPiece((1, 2)), _img(), TextPiece((5, 6)), TextPiece((7,)), TextPiece((8,))]
    prompt = [TextPiece((1, 2)), _img(), TextPiece((5, 6, 7, 9, 10))]  # the reference diverges after token 7
    aligned = aligned_to(prompt, cached)
    assert aligned == [TextPiece((1, 2)), _img(), TextPiece((5, 6)), TextPiece((7,)), TextPiece((9, 10))]
    assert PrefixCache(cached).common_prefix(aligned) == 9  # everything up to the divergence is reused


def test_text_only_prompt_is_the_whole_rendering_and_templates_must_place_the_content():
    from ecso.runtime.prompts import ChatTemplateError, JinjaFormat

    fmt = Llava15Format()
    p = fmt.prompt([Message("user", "a"), Message("assistant", "b"), Message("user", "c")], image=False)
    assert p.text == fmt.render([Message("user", "a"), Message("assistant", "b"), Message("user", "c")])
    assert fmt.after_assistant([Message("user", "a"), Message("assistant", "b"), Message("user", "c")], True) == \
        "</s>USER: c ASSISTANT:"
    with pytest.raises(ChatTemplateError):
        JinjaFormat("{{ messages | length }}").prompt([Message("user", "a")], image=True)
