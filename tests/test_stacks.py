"""A RAW and the JPEG of the same shot become one Immich stack, the JPEG on top: through the
whole service with the stand-in, asked for once (a restart asks nothing), and not at all with
`immich.stacks: false`. A SIGKILL around the ledger's record is in tests/test_crash_table.py."""

from __future__ import annotations

import pytest

from sftpgate.stacks import stack_group

from .conftest import finished, started_gate
from .test_immich_settings import upload


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
