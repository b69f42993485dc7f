"""A RAW and the JPEG of the same shot become one Immich stack, the JPEG on top, and so do the
frames of a burst: through the whole service with the stand-in, asked for once (a restart asks
nothing), and not at all with `immich.stacks: false`. A SIGKILL around the ledger's record is in
tests/test_crash_table.py."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from sftpgate.optimize.bursts import Burst, burst_of
from sftpgate.stacks import stack_group

from .conftest import finished, started_gate
from .readers import exiftool, exiftool_write
from .test_immich_settings import upload

APPLE_BURST = "E905E6C6-C747-4805-942F-9904A0281F02"


def apple_burst_frame(
    corpus: Path, dst: Path, frame: int, src: str = "jpeg/apple-iphone6s-livephoto.jpg"
) -> Path:
    """A real iPhone JPEG made a burst frame: exiftool cannot add a maker-note tag, so the
    entry of its MediaGroupUUID (tag 0x0011, a 36-character UUID) is renumbered 0x000B,
    BurstUUID; exiftool then reads the burst id back. `frame` goes into the XMP description so
    that frames are different files."""
    data = bytearray((corpus / src).read_bytes())
    start = data.index(b"Apple iOS\x00")
    (count,) = struct.unpack_from(">H", data, start + 14)
    entries = [start + 16 + 12 * i for i in range(count)]
    entry = next(e for e in entries if struct.unpack_from(">H", data, e)[0] == 0x0011)
    struct.pack_into(">H", data, entry, 0x000B)
    dst.write_bytes(bytes(data))
    return exiftool_write(dst, dst, [f"-XMP-dc:Description=frame {frame}"])


def google_burst_frame(corpus: Path, dst: Path, frame: int, primary: bool = False) -> Path:
    tags = ["-XMP-GCamera:BurstID=pixel-burst-20240601", f"-Comment=frame {frame}"]
    if primary:
        tags.append("-XMP-GCamera:BurstPrimary=1")
    return exiftool_write(corpus / "jpeg/htc-desire-gps.jpg", dst, tags)


def test_the_burst_a_camera_wrote_is_read_from_the_file(corpus, tmp_path):
    apple = apple_burst_frame(corpus, tmp_path / "apple.jpg", 1)
    assert exiftool(apple, ["BurstUUID"])["BurstUUID"] == APPLE_BURST  # an independent reader
    assert burst_of(apple, "jpeg") == Burst(APPLE_BURST, primary=False)
    heic = apple_burst_frame(corpus, tmp_path / "apple.heic", 1, "heic/apple-iphone8-tiny.heic")
    heic_burst = "76C3E45A-2CCC-498B-9C1A-29C3ADD99D39"
    assert exiftool(heic, ["BurstUUID"])["BurstUUID"] == heic_burst
    assert burst_of(heic, "heic") == Burst(heic_burst, primary=False)
    google = google_burst_frame(corpus, tmp_path / "google.jpg", 1, primary=True)
    assert burst_of(google, "jpeg") == Burst("pixel-burst-20240601", primary=True)
    assert burst_of(google_burst_frame(corpus, tmp_path / "g2.jpg", 2), "jpeg") == Burst(
        "pixel-burst-20240601", primary=False
    )
    creation = exiftool_write(
        corpus / "jpeg/htc-desire-gps.jpg",
        tmp_path / "creation.jpg",
        ["-XMP-GCreations:CameraBurstID=creations-7"],
    )
    assert burst_of(creation, "jpeg") == Burst("creations-7", primary=False)
    # An Apple maker note without a burst, other cameras, and a HEIC: no burst.
    assert burst_of(corpus / "jpeg/apple-iphone6s-livephoto.jpg", "jpeg") is None
    assert burst_of(corpus / "jpeg/nikon-d5000-gps-xmp.jpeg", "jpeg") is None
    assert burst_of(corpus / "heic/apple-iphone8-gps.heic", "heic") is None
    assert burst_of(corpus / "video/apple-iphone6s-livephoto.mov", "video") is None


def test_a_damaged_maker_note_is_no_burst(corpus, tmp_path):
    frame = apple_burst_frame(corpus, tmp_path / "frame.jpg", 1)
    data = bytearray(frame.read_bytes())
    start = data.index(b"Apple iOS\x00")
    (count,) = struct.unpack_from(">H", data, start + 14)
    entries = [start + 16 + 12 * i for i in range(count)]
    entry = next(e for e in entries if struct.unpack_from(">H", data, e)[0] == 0x000B)
    struct.pack_into(">I", data, entry + 8, 0x7FFFFFF0)  # the id's offset: past the note's end
    frame.write_bytes(bytes(data))
    assert burst_of(frame, "jpeg") is None
    struct.pack_into(">H", data, start + 14, 0xFFFF)  # 65535 entries, the note ends long before
    frame.write_bytes(bytes(data))
    assert burst_of(frame, "jpeg") is None
    for file in (corpus / "bad").iterdir():
        assert burst_of(file, "jpeg") is None, file.name


@pytest.mark.parametrize(
    ("path", "group"),
    [
        ("DCIM/Camera/IMG_1234.JPG", ("DCIM/Camera/", "img_1234")),
        ("DCIM/Camera/IMG_1234.CR3", ("DCIM/Camera/", "img_1234")),
        ("PXL_20240601_101112345.RAW-01.COVER.jpg", ("", "pxl_20240601_101112345")),
        ("PXL_20240601_101112345.RAW-02.ORIGINAL.dng", ("", "pxl_20240601_101112345")),
        ("DCIM/IMG_1234.edited.jpg", ("DCIM/", "img_1234.edited")),  # another photo
    ],
)
def test_members_of_a_shot_share_their_folder_and_name(path, group):
    assert stack_group(path) == group


@pytest.mark.parametrize("stacks", [True, False])
async def test_a_raw_and_its_jpeg_become_one_stack_once(
    tmp_path, standin, host_keys_dir, client_key, corpus, stacks
):
    files = {
        "DCIM/IMG_1234.CR3": (corpus / "raw/canon-m50-stub.cr3").read_bytes(),
        "DCIM/IMG_1234.JPG": (corpus / "jpeg/htc-desire-gps.jpg").read_bytes(),
        "DCIM/IMG_9999.JPG": (corpus / "jpeg/apple-iphone6s-livephoto.jpg").read_bytes(),
    }
    sections = {"immich": {"stacks": stacks}}
    async with started_gate(tmp_path, standin, host_keys_dir, client_key, **sections) as gate:
        await upload(gate.sftp.port, files)
        await gate.pipeline.wait_for(finished(3), timeout=120)
    by_name = {a.original_file_name: a.id for a in standin.state.assets.values()}
    assert sorted(by_name) == ["IMG_1234.CR3", "IMG_1234.jxl", "IMG_9999.jxl"]
    if not stacks:
        assert standin.state.stacks == {}
        return
    made = dict(standin.state.stacks)
    assert list(made.values()) == [[by_name["IMG_1234.jxl"], by_name["IMG_1234.CR3"]]]
    # Started again on the same data: the ledger knows the stack, Immich is not asked again.
    async with started_gate(tmp_path, standin, host_keys_dir, client_key, **sections) as again:
        await again.pipeline.stacker.catch_up()
    assert standin.state.stacks == made


async def test_the_frames_of_a_burst_become_one_stack_the_cameras_pick_on_top(
    tmp_path, standin, host_keys_dir, client_key, corpus
):
    """Two bursts in different folders: Google's names its pick, Apple's does not (the first
    frame goes on top). A frame delivered after the stack was made joins it."""
    frames = tmp_path / "frames"
    frames.mkdir()
    first = {
        "DCIM/Camera/PXL_1.jpg": google_burst_frame(corpus, frames / "g1.jpg", 1),
        "DCIM/Camera/PXL_2.jpg": google_burst_frame(corpus, frames / "g2.jpg", 2, primary=True),
        "Burst/PXL_3.jpg": google_burst_frame(corpus, frames / "g3.jpg", 3),
        "DCIM/IMG_0001.JPG": apple_burst_frame(corpus, frames / "a1.jpg", 1),
        "DCIM/IMG_0002.JPG": apple_burst_frame(corpus, frames / "a2.jpg", 2),
        "DCIM/IMG_9999.JPG": corpus / "jpeg/canon-t2i-adobergb-gps-small.jpg",  # no burst
    }
    async with started_gate(tmp_path, standin, host_keys_dir, client_key) as gate:
        await upload(gate.sftp.port, {name: src.read_bytes() for name, src in first.items()})
        await gate.pipeline.wait_for(finished(len(first)), timeout=120)
    by_name = {a.original_file_name: a.id for a in standin.state.assets.values()}
    google = [by_name["PXL_2.jxl"], by_name["PXL_1.jxl"], by_name["PXL_3.jxl"]]
    apple = [by_name["IMG_0001.jxl"], by_name["IMG_0002.jxl"]]
    assert sorted(standin.state.stacks.values()) == sorted([google, apple])

    late = {"DCIM/IMG_0003.JPG": apple_burst_frame(corpus, frames / "a3.jpg", 3)}
    async with started_gate(tmp_path, standin, host_keys_dir, client_key) as gate:
        await upload(gate.sftp.port, {name: src.read_bytes() for name, src in late.items()})
        await gate.pipeline.wait_for(finished(len(first) + 1), timeout=120)
    by_name = {a.original_file_name: a.id for a in standin.state.assets.values()}
    apple.append(by_name["IMG_0003.jxl"])
    assert sorted(standin.state.stacks.values()) == sorted([google, apple])
    made = dict(standin.state.stacks)
    async with started_gate(tmp_path, standin, host_keys_dir, client_key) as again:
        await again.pipeline.stacker.catch_up()
    assert standin.state.stacks == made  # nothing asked again
