"""The decompression-bomb bound (pacs.imaging.limits), without a server: what each bomb and each lying
header gets, the memory model, and the shared budget. The live attack is tests/test_decompression_bombs.py."""

from __future__ import annotations

import io
import threading

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from pacs.imaging import limits
from pacs.imaging.render import RenderTooLarge, render_frame, thumbnail
from pacs.transcode import TooLargeToConvert, check_decodable, to_uncompressed
from tests.support.bombs import KINDS, j2k_codestream, jls_codestream, jpeg_codestream, make_bomb, rle_frame
from tests.support.datasets import make_dataset

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def _default_limits() -> None:
    limits.configure(limits.DEFAULT_MAX_DECODED_MIB, limits.DEFAULT_BUDGET_MIB)


def _read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


@pytest.mark.parametrize("side", [16000, 20000])
@pytest.mark.parametrize("kind", KINDS)
def test_every_bomb_is_refused_before_any_decoder_runs(kind: str, side: int) -> None:
    """Rendering gets RenderTooLarge (the thumbnail worker then stores a placeholder); transcoding gets
    TooLargeToConvert (WADO: 406, C-GET: that sub-operation fails); nothing is allocated for the claim."""
    ds = _read(make_bomb(kind, side).data)
    with pytest.raises(RenderTooLarge, match=r"PACS_MAX_DECODED_MIB|rendering limit"):
        render_frame(ds)
    with pytest.raises(RenderTooLarge):
        thumbnail(ds)
    with pytest.raises(TooLargeToConvert, match="PACS_MAX_DECODED_MIB"):
        to_uncompressed(ds, pydicom.uid.ExplicitVRLittleEndian)
    assert ds.file_meta.TransferSyntaxUID.is_compressed  # refused before anything was changed


@pytest.mark.parametrize(("kind", "make"), [("j2k", lambda: j2k_codestream(16000)),
                                            ("jls", lambda: jls_codestream(16000)),
                                            ("jpeg", lambda: jpeg_codestream(16000))])
def test_a_codestream_claiming_more_than_a_small_dataset_is_refused(kind: str, make: object) -> None:
    """An honest-looking 64x64 dataset around a codestream claiming 16000x16000: the codec would allocate
    for its own header, so the mismatch itself is refused (whatever the bound)."""
    bits = 8 if kind == "jpeg" else 16
    pixels = limits.PixelGeometry(64, 64, 1, bits, 1)
    syntax = {"j2k": "1.2.840.10008.1.2.4.90", "jls": "1.2.840.10008.1.2.4.80", "jpeg": "1.2.840.10008.1.2.4.50"}
    with pytest.raises(limits.DecodeTooLarge, match="claims 16000x16000 pixels but the dataset says 64x64"):
        limits.check_codestream(make(), pixels, syntax[kind])  # type: ignore[operator]


def test_unreadable_frame_headers_are_refused_not_guessed() -> None:
    pixels = limits.PixelGeometry(64, 64, 1, 8, 1)
    with pytest.raises(limits.DecodeTooLarge, match="cannot be found"):
        limits.check_codestream(b"\x00" * 100, pixels, "1.2.840.10008.1.2.4.50")
    with pytest.raises(limits.DecodeTooLarge, match="cannot be found"):
        limits.check_codestream(b"\xff\xd8\xff\xda\x00\x08", pixels, "1.2.840.10008.1.2.4.50")  # scan before SOF


def test_rle_segment_table_must_match_the_dataset() -> None:
    pixels = limits.PixelGeometry(16, 16, 1, 16, 1)
    limits.check_codestream(rle_frame(2), pixels, "1.2.840.10008.1.2.5")  # 2 segments for 16-bit: fine
    with pytest.raises(limits.DecodeTooLarge, match="has 15 segments"):
        limits.check_codestream(rle_frame(15), pixels, "1.2.840.10008.1.2.5")
    broken = bytearray(rle_frame(2))
    broken[8:12] = (10_000).to_bytes(4, "little")  # second segment past the end
    with pytest.raises(limits.DecodeTooLarge, match="inconsistent segment table"):
        limits.check_codestream(bytes(broken), pixels, "1.2.840.10008.1.2.5")
    with pytest.raises(limits.DecodeTooLarge, match="shorter than its 64-byte header"):
        limits.check_codestream(b"\x01\x00", pixels, "1.2.840.10008.1.2.5")


def test_a_million_tile_j2k_codestream_is_refused() -> None:
    stream = bytearray(j2k_codestream(4000))
    stream[24:32] = (1).to_bytes(4, "big") * 2  # XTsiz = YTsiz = 1: 16 million tiles
    with pytest.raises(limits.DecodeTooLarge, match="tiles"):
        limits.check_codestream(bytes(stream), limits.PixelGeometry(4000, 4000, 1, 16, 1), "1.2.840.10008.1.2.4.90")


def test_the_memory_model_counts_codec_copies_and_every_frame_for_transcoding() -> None:
    g = limits.PixelGeometry(rows=1000, columns=1000, samples=1, bits_allocated=16, frames=10)
    assert g.frame_bytes == 2_000_000
    assert limits.decode_cost(g, "1.2.840.10008.1.2.1") == 2_000_000  # native: the frame itself
    assert limits.decode_cost(g, "1.2.840.10008.1.2.5") == 6_000_000  # RLE: output, array, one copy
    assert limits.decode_cost(g, "1.2.840.10008.1.2.4.90") == 10_000_000  # + OpenJPEG's 32-bit samples
    assert limits.decode_cost(g, "1.2.840.10008.1.2.4.90", frames=10) == 100_000_000
    with pytest.raises(limits.DecodeTooLarge, match="whole object"):
        limits.check_frames(limits.PixelGeometry(4000, 4000, 1, 16, 100), "1.2.840.10008.1.2.5", 100)


@pytest.mark.parametrize(("keyword", "value", "reason"), [("Rows", 0, "absurd image size"),
                                                         ("Columns", 70_000, "absurd image size"),
                                                         ("SamplesPerPixel", 9, "Samples per Pixel"),
                                                         ("BitsAllocated", 0, "Bits Allocated"),
                                                         ("NumberOfFrames", 10**8, "Number of Frames")])
def test_absurd_attributes_are_refused(keyword: str, value: int, reason: str) -> None:
    with pytest.raises(limits.DecodeTooLarge, match=reason):
        limits.geometry_of(make_dataset(**{keyword: value}))


def test_the_bound_is_configurable() -> None:
    ds = _read(make_bomb("rle", 4000).data)  # 4000x4000 16-bit RLE: 92 MiB by the model
    assert check_decodable(ds) == 3 * 4000 * 4000 * 2
    limits.configure(64, 64)
    with pytest.raises(TooLargeToConvert, match="over the 64 MiB limit"):
        check_decodable(ds)


def test_a_large_legal_image_is_rendered_reduced() -> None:
    """6000x6000 16-bit native: 36 Mpx, rendered at 1500x1500 (3000x3000 is still over RENDER_MAX_PIXELS), and to a
    thumbnail; the float work is done on the reduced array only."""
    ramp = np.tile(np.arange(6000, dtype=np.uint16), (6000, 1))
    ds = make_dataset(Rows=6000, Columns=6000, BitsAllocated=16, BitsStored=16, HighBit=15,
                      PixelData=ramp.tobytes())
    image = render_frame(ds, window=(3000, 6000))
    assert image.size == (1500, 1500)
    px = np.asarray(image)
    assert px[0, 0] < 5 and px[0, -1] > 250  # the ramp is still a ramp, left to right
    assert thumbnail(ds, size=64)[:2] == b"\xff\xd8"


def test_a_reduced_j2k_decode_matches_the_full_one() -> None:
    """JPEG 2000 at a lower resolution level (Pillow/OpenJPEG) shows the same picture as decoding in full."""
    import openjpeg

    ramp = (np.add.outer(np.arange(4200), np.arange(2100)) % 4096).astype(np.uint16)
    ds = make_dataset(Rows=4200, Columns=2100, BitsAllocated=16, BitsStored=12, HighBit=11,
                      PixelData=encapsulate([openjpeg.encode(ramp, bits_stored=12)]))
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"
    reduced = np.asarray(render_frame(ds, window=(2048, 4096))).astype(int)
    assert reduced.shape == (2100, 1050)
    full = np.clip(np.rint((ramp[::2, ::2].astype(float) - 2047.5) / 4095 * 255 + 127.5), 0, 255)
    assert np.abs(reduced - full).mean() < 3


def test_concurrent_decodes_wait_for_the_shared_budget() -> None:
    budget = limits.DecodeBudget(100 * MIB)
    entered = threading.Event()
    release = threading.Event()

    def second() -> None:
        with budget.reserve(60 * MIB):
            entered.set()

    with budget.reserve(60 * MIB):
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.5), "the second decode must wait while the first holds the budget"
        assert budget.used == 60 * MIB
        release.set()
    assert entered.wait(10), "it runs once the first is done"
    thread.join(10)
    assert budget.used == 0
    with budget.reserve(500 * MIB):  # bigger than the whole budget: runs alone, never deadlocks
        assert budget.used == 100 * MIB
    with pytest.raises(limits.DecodeBusy), budget.reserve(100 * MIB), budget.reserve(1, timeout=0.1):
        pass
