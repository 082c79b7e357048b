"""The tokenizer of a loaded model: llama.cpp's, with the reference's rules where they differ.

The reference is LLaVA's `tokenizer_image_token` over Hugging Face's tokenizer. For SentencePiece vocabularies HF's
non-legacy LlamaTokenizer (legacy=False) puts one space prefix at the start of a tokenized text and none after a
control token inside it; llama.cpp adds one after every control token (`</s>USER` becomes `</s> ▁USER`). So the
model is loaded with llama.cpp's `add_space_prefix` off (`space_prefix_override`) and `Vocab.tokenize` adds the
prefix itself. The Engine owns the model; a Vocab must not be used after the engine closes (the Engine's public
methods check that).
"""

from __future__ import annotations

import ctypes
from typing import Sequence

from ecso.runtime.gguf_info import GGUFInfo
from ecso.runtime.prompts import MEDIA_MARKER, neutralize_specials

_PROBES = ("x", "A", "\n")  # texts a head is followed by, to find which of its tokens can still change


def wants_space_prefix(info: GGUFInfo) -> bool:
    """True for SentencePiece vocabularies that prefix a space (then `tokenize` adds it, llama.cpp's is off)."""
    return info.get("tokenizer.ggml.model") == "llama" and info.get("tokenizer.ggml.add_space_prefix", True) is not False


def space_prefix_override(L):
    """llama.cpp model kv overrides turning its own space prefix off (zero-terminated; keep it alive while loading)."""
    kvo = (L.llama_model_kv_override * 2)()
    kvo[0].key = b"tokenizer.ggml.add_space_prefix"
    kvo[0].tag = L.LLAMA_KV_OVERRIDE_TYPE_BOOL
    kvo[0].value.val_bool = False
    return kvo


def _common_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


class Vocab:
    """Tokenize / detokenize / neutralise for one loaded model (`vocab` is its llama_vocab pointer)."""

    def __init__(self, L, vocab, space_prefix: bool):
        self._L, self.ptr, self.space_prefix = L, vocab, space_prefix
        self.n_vocab = L.llama_vocab_n_tokens(vocab)
        mask = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_USER_DEFINED
        # control and user-defined tokens (`<|im_end|>`, `</s>`, `<image>`): inserted text must never forge them
        self.special_ids = frozenset(t for t in range(self.n_vocab) if L.llama_vocab_get_attr(vocab, t) & mask)
        texts = {self.token_text(t) for t in self.special_ids}
        self._specials = sorted({s for s in texts if len(s) > 1 and not s.isalnum()} | {MEDIA_MARKER},
                                key=len, reverse=True)
        space = self._llama_tokenize(" ", False, False) if space_prefix else []
        self._space_token = space[0] if len(space) == 1 else None
        self.bos = L.llama_vocab_bos(vocab)
        self.eos = L.llama_vocab_eos(vocab)
        self.adds_bos = bool(L.llama_vocab_get_add_bos(vocab))
        self._single_ids: dict[tuple[str, ...], list[int]] = {}
        self._head_cuts: dict[str, int] = {}

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = self._L.llama_vocab_get_text(self.ptr, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def _llama_tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        L = self._L
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.ptr, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            buf = (L.llama_token * -n)()
            n = L.llama_tokenize(self.ptr, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def tokenize(self, text: str, add_special: bool, parse_special: bool = True) -> list[int]:
        """Token ids of `text` as one tokenizer call (BOS first when add_special and the model wants one)."""
        if not self.space_prefix or not text:
            return self._llama_tokenize(text, add_special, parse_special)
        ids = self._llama_tokenize(" " + text, add_special, parse_special)
        # as HF: a text that starts with a control token gets no space before it
        i = 1 if add_special and len(ids) > 1 and ids[0] == self.bos else 0
        if len(ids) > i + 1 and ids[i] == self._space_token and ids[i + 1] in self.special_ids:
            del ids[i]
        return ids

    def stable_head(self, head: str) -> int:
        """How many tokens of `head` (tokenized with BOS) stay the same whatever text follows it: where every prompt
        with this head is cut into two decodes, so prompts with and without an image share that prefix. The last
        token is left out (SentencePiece merges a trailing space into the next word: `USER: ` + `You` is
        `▁U SER : ▁Y ou`), and any token the probes show merging with what follows."""
        if head not in self._head_cuts:
            ids = self.tokenize(head, add_special=True)
            cuts = [len(ids) - 1] + [_common_len(ids, self.tokenize(head + p, add_special=True)) for p in _PROBES]
            self._head_cuts[head] = max(min(cuts), 0)
        return self._head_cuts[head]

    def single_token_ids(self, words: Sequence[str]) -> list[int]:
        """Ids of the words that are one token in this vocabulary (memoised: used on every logit judgement)."""
        key = tuple(words)
        if key not in self._single_ids:
            out: list[int] = []
            for w in words:
                t = self.tokenize(w, add_special=False, parse_special=False)
                if len(t) == 1 and t[0] not in out:
                    out.append(t[0])
            self._single_ids[key] = out
        return self._single_ids[key]

    def token_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._L.llama_token_to_piece(self.ptr, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._L.llama_token_to_piece(self.ptr, token, buf, -n, 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def neutralize(self, text: str) -> str:
        """`text` with every control-token spelling broken, so it stays text inside a prompt."""
        return neutralize_specials(text, self._specials)

    def ends_generation(self, token: int) -> bool:
        return bool(self._L.llama_vocab_is_eog(self.ptr, token) or self._L.llama_vocab_is_control(self.ptr, token))
