"""A RAW and the JPEG or HEIC of the same shot become one Immich stack, the JPEG on top; so do
the frames of a burst, the camera's pick (or else the first frame) on top.

Immich stacks nothing on upload (it reads burst ids but leaves stacking to the uploader), so a
phone that shoots RAW+JPEG would show every photo twice, and a burst every frame. RAW+JPEG
members are delivered originals in the same folder whose names agree once the extension (and a
Pixel's `.RAW-01.COVER` / `.RAW-02.ORIGINAL` suffix) is removed; their kind, not their
extension, says which is the RAW. Burst members share the burst id the camera wrote (see
optimize/bursts.py), in any folder of the user.
The stack is asked for once two members have asset ids, and recorded in the ledger, so a
restart never asks again; a crash between Immich's answer and that record asks again with the
same assets, and a frame delivered later asks with all of them: Immich merges both into the
stack it made (its primary is among them).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from .config import Config
from .immich.client import ImmichClient, PermanentImmichError, TransientImmichError
from .ledger import LedgerThread, Original, Outcome
from .logs import file_event

PRIMARY_KINDS = ("jpeg", "heic")  # what Immich shows on top of the stack
RAW_KIND = "raw"
_PIXEL_RAW_SUFFIX = re.compile(r"\.RAW-\d+\.[A-Z]+$", re.I)


def stack_group(path: str) -> tuple[str, str]:
    """(folder, shared name) of a client path: "DCIM/IMG_1234.JPG" → ("DCIM/", "img_1234")."""
    p = PurePosixPath(path)
    folder = f"{p.parent}/" if str(p.parent) != "." else ""
    return folder, _PIXEL_RAW_SUFFIX.sub("", p.stem).lower()


class Stacker:
    def __init__(self, config: Config, db: LedgerThread, immich: ImmichClient) -> None:
        self.config = config
        self.db = db
        self.immich = immich

    async def after_delivery(self, row: Original) -> None:
        """Stack `row` with the rest of its shot or burst, if they are in Immich now."""
        if not self.config.immich.stacks:
            return
        if row.burst_id:
            group, members = await self._burst(row, row.burst_id)
        elif row.kind in (RAW_KIND, *PRIMARY_KINDS):
            group, members = await self._raw_pair(row)
        else:
            return
        if len(members) < 2:
            return
        asset_ids = list(dict.fromkeys(str(r.asset_id) for r in members))
        recorded = await self.db(lambda db: db.stack_assets(row.user, *group))
        if recorded == asset_ids or len(asset_ids) < 2:
            return
        await self._stack(row.user, group, members[0], asset_ids)

    async def _burst(self, row: Original, burst_id: str) -> tuple[tuple[str, str], list[Original]]:
        """Every delivered frame of the burst, the camera's pick (else the first frame) on top.
        A frame delivered later joins the stack: Immich merges it into the one it made."""
        members = [
            r
            for r in await self.db(lambda db: db.delivered_in_burst(row.user, burst_id))
            if r.outcome != Outcome.DUPLICATE
        ]
        members.sort(
            key=lambda r: (not r.burst_primary, r.captured_at or "", PurePosixPath(r.path).name)
        )
        return ("", f"burst {burst_id}"), members

    async def _raw_pair(self, row: Original) -> tuple[tuple[str, str], list[Original]]:
        """The RAW and the JPEG or HEIC of one shot, the JPEG on top; none unless both are
        there. A frame of a burst goes to its burst's stack instead (one stack per asset)."""
        folder, name = stack_group(row.path)
        delivered = await self.db(lambda db: db.delivered_in_folder(row.user, folder))
        members = [
            r
            for r in delivered
            if stack_group(r.path)[1] == name
            and r.kind in (RAW_KIND, *PRIMARY_KINDS)
            and r.outcome != Outcome.DUPLICATE
            and not r.burst_id
        ]
        if not any(r.kind == RAW_KIND for r in members) or not any(
            r.kind in PRIMARY_KINDS for r in members
        ):
            return (folder, name), []
        # The JPEG (or HEIC) first: Immich makes the first asset the stack's primary.
        members.sort(key=lambda r: (r.kind not in PRIMARY_KINDS, r.path))
        return (folder, name), members

    async def _stack(
        self, user: str, group: tuple[str, str], primary: Original, asset_ids: list[str]
    ) -> None:
        try:
            stack_id = await self.immich.create_stack(self.config.api_key_for(user), asset_ids)
        except (TransientImmichError, PermanentImmichError) as exc:
            # The photos are in Immich; the next start tries the stack again.
            file_event(
                "stack failed",
                level=30,
                user=user,
                path=primary.path,
                stage="upload",
                outcome="not stacked",
                error=str(exc),
            )
            return
        await self.db(lambda db: db.record_stack(user, *group, stack_id, asset_ids))
        file_event(
            "stacked",
            user=user,
            path=primary.path,
            stage="upload",
            outcome="stacked",
            members=len(asset_ids),
            stack=stack_id,
        )

    async def catch_up(self) -> None:
        """At start: the stacks a crash or a failed request left unmade."""
        if not self.config.immich.stacks:
            return
        for row in await self.db(lambda db: db.delivered_of_kind(RAW_KIND)):
            await self.after_delivery(row)
        for row in await self.db(lambda db: db.delivered_bursts()):
            await self.after_delivery(row)
