"""What the engine accepts from the vision encoder: Pixtral break rows llama.cpp left NaN are restored exactly, any
other non-finite embedding is refused (it would decode into a silently wrong answer), and the mmproj's break
embedding is read from the GGUF as the gguf package reads it."""

import numpy as np
import pytest

from ecso.runtime.errors import EngineError
from ecso.runtime.media import ImageChunk, MediaBlock, encode_block, repair_break_rows

pytestmark = pytest.mark.fast  # no model, no native build

WIDTH = 8


def pixtral_rows(p_x: int, p_y: int, brk: np.ndarray) -> np.ndarray:
    """p_y rows of p_x patches, a break row after each but the last, as llama.cpp's Pixtral graph lays them out."""
    rng = np.random.default_rng(0)
    rows = []
    for y in range(p_y):
        rows.extend(rng.standard_normal((p_x, WIDTH)).astype(np.float32))
        if y < p_y - 1:
            rows.append(brk.copy())
    return np.array(rows, dtype=np.float32)


@pytest.fixture
def brk():
    return np.linspace(-1, 1, WIDTH).astype(np.float32)


def test_nan_break_rows_are_restored_to_the_break_embedding(brk):
    good = pixtral_rows(6, 3, brk)
    broken = good.copy()
    broken[6] = np.nan
    broken[13, 2] = np.inf
    repair_break_rows(broken, brk)
    assert np.array_equal(broken, good)


def test_every_break_row_nan_is_restored_too(brk):
    good = pixtral_rows(4, 5, brk)
    broken = good.copy()
    broken[[4, 9, 14, 19]] = np.nan
    repair_break_rows(broken, brk)
    assert np.array_equal(broken, good)


def test_nan_in_a_patch_row_is_left_for_the_caller_to_refuse(brk):
    rows = pixtral_rows(6, 3, brk)
    rows[2, 0] = np.nan
    rows[6] = np.nan
    repair_break_rows(rows, brk)
    assert np.isnan(rows[2, 0]) and np.isnan(rows[6]).all()


def test_rows_of_another_width_are_left_alone(brk):
    rows = np.full((5, WIDTH * 2), np.nan, dtype=np.float32)
    repair_break_rows(rows, brk)
    assert np.isnan(rows).all()


class _EncoderOutput:
    """Stands in for mtmd's two calls encode_block makes, handing back a fixed buffer as what the vision encoder
    wrote: these tests are about ecso's checks on that buffer. The real encoder runs in the family tests."""

    def __init__(self, rows: np.ndarray):
        self.rows = np.ascontiguousarray(rows, dtype=np.float32)

    def mtmd_encode_chunk(self, mctx, ptr):
        return 0

    def mtmd_get_output_embd(self, mctx):
        import ctypes

        return self.rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def _block(n_tokens: int) -> MediaBlock:
    return MediaBlock([ImageChunk(None, None, n_tokens, n_tokens)])


def test_encode_block_restores_break_rows_and_refuses_other_non_finite_values(brk):
    good = pixtral_rows(6, 3, brk)
    (out,) = encode_block(_EncoderOutput(good), None, _block(len(good)), WIDTH, lambda: pytest.fail("read needlessly"))
    assert np.array_equal(out.reshape(good.shape), good)  # finite output: the break embedding is never read
    broken = good.copy()
    broken[13] = np.nan
    (out,) = encode_block(_EncoderOutput(broken), None, _block(len(good)), WIDTH, lambda: brk)
    assert np.array_equal(out.reshape(good.shape), good)
    broken[0, 0] = np.nan
    with pytest.raises(EngineError, match="non-finite image embeddings"):
        encode_block(_EncoderOutput(broken), None, _block(len(good)), WIDTH, lambda: brk)
    with pytest.raises(EngineError, match="non-finite image embeddings"):  # no break embedding: nothing restored
        encode_block(_EncoderOutput(good * np.float32(np.inf)), None, _block(len(good)), WIDTH, None)
    with pytest.raises(EngineError, match="non-finite image embeddings"):  # a projector without one
        encode_block(_EncoderOutput(broken), None, _block(len(good)), WIDTH, lambda: None)


def test_gguf_tensor_reader_matches_the_gguf_package(tmp_path):
    gguf = pytest.importorskip("gguf")
    from ecso.runtime.gguf_info import read_gguf_tensor

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "clip")
    a32 = np.arange(12, dtype=np.float32) / 7
    a16 = (np.arange(6, dtype=np.float32) / 3).astype(np.float16)
    w.add_tensor("v.token_embd.img_break", a32)
    w.add_tensor("half", a16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert np.array_equal(read_gguf_tensor(path, "v.token_embd.img_break"), a32)
    assert np.array_equal(read_gguf_tensor(path, "half"), a16.astype(np.float32))
    assert read_gguf_tensor(path, "absent") is None
