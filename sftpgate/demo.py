"""`sftpgate demo`: the whole pipeline on this machine, with nothing to set up.

It starts the built-in Immich stand-in and the service on free local ports in a temporary data
folder, uploads a few sample photos over SFTP with a real client (asyncssh), waits until each one
is finished, and prints what happened to every file. The sample photos are generated here (so
they are ours to ship): camera-like JPEGs with EXIF date, offset and GPS, a PNG screenshot, the
same photo sent twice under another name, and a damaged JPEG that must end in undone/.
"""

from __future__ import annotations

import io
import secrets
import shutil
import tempfile
from pathlib import Path

import asyncssh
import yaml
from PIL import Image, ImageDraw, ImageFilter

from .config import load_config
from .immich.standin import StandinState, start_standin
from .ledger import Ledger, State
from .server import Service


def _photo(
    seed: int, size: tuple[int, int], when: str, offset: str, gps: tuple[float, float]
) -> bytes:
    """A camera-like JPEG: smooth light, some texture and sensor noise, full EXIF."""
    w, h = size
    base = Image.radial_gradient("L").resize((w, h)).convert("RGB")
    noise = Image.effect_noise((w, h), 24 + seed % 7).convert("RGB")
    img = Image.blend(base, noise, 0.35)
    draw = ImageDraw.Draw(img)
    for i in range(12):
        x, y = (seed * 97 + i * 131) % w, (seed * 53 + i * 71) % h
        colour = ((seed * 40 + i * 20) % 255, (i * 35) % 255, (200 - i * 13) % 255)
        draw.ellipse((x, y, x + w // 5, y + h // 6), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    exif = Image.Exif()
    exif[0x010F] = "sftpgate"  # Make
    exif[0x0110] = "Demo Camera"  # Model
    exif[0x0112] = 1  # Orientation
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = when  # DateTimeOriginal
    sub[0x9011] = offset  # OffsetTimeOriginal
    lat, lon = gps
    gps_ifd = exif.get_ifd(0x8825)
    gps_ifd[1] = "N" if lat >= 0 else "S"
    gps_ifd[2] = _dms(abs(lat))
    gps_ifd[3] = "E" if lon >= 0 else "W"
    gps_ifd[4] = _dms(abs(lon))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=92, exif=exif)
    return out.getvalue()


def _dms(value: float) -> tuple[float, float, float]:
    d = int(value)
    m = int((value - d) * 60)
    return (float(d), float(m), round((value - d - m / 60) * 3600, 2))


def _screenshot() -> bytes:
    img = Image.new("RGB", (540, 960), (245, 245, 247))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 540, 80), fill=(0, 122, 255))
    for i in range(14):
        y = 110 + i * 60
        draw.rounded_rectangle(
            (24, y, 516, y + 48), 10, fill=(255, 255, 255), outline=(220, 220, 225)
        )
        draw.text((40, y + 16), f"Message {i + 1}: see you at the station", fill=(30, 30, 30))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def sample_files() -> dict[str, bytes]:
    """Client path → bytes of the demo's uploads."""
    harbour = _photo(1, (1600, 1200), "2024:06:01 14:34:56", "+02:00", (43.2965, 5.3698))
    mountain = _photo(2, (1200, 1600), "2024:08:15 07:12:03", "-06:00", (39.1911, -106.8175))
    return {
        "DCIM/Camera/IMG_20240601_143456.jpg": harbour,
        "DCIM/Camera/IMG_20240815_071203.jpg": mountain,
        "DCIM/Screenshots/Screenshot_20240902.png": _screenshot(),
        "DCIM/Camera/IMG_20240601_143456 (copy).jpg": harbour,  # same bytes, another name
        "DCIM/Camera/IMG_damaged.jpg": harbour[: len(harbour) // 3],
    }


async def run_demo(keep: bool = False) -> int:
    root = Path(tempfile.mkdtemp(prefix="sftpgate-demo-"))
    password = secrets.token_urlsafe(12)
    api_key = secrets.token_hex(16)
    state = StandinState()
    state.add_user(api_key)
    try:
        async with await start_standin(state) as immich:
            config_path = root / "config.yaml"
            config_path.write_text(
                yaml.safe_dump(
                    {
                        "data_dir": "./data",
                        "immich": {"url": immich.url, "api_key": api_key},
                        "sftp": {
                            "listen": "127.0.0.1:0",
                            "host_keys_dir": "./keys",
                            "users": [{"name": "phone", "password": password}],
                        },
                        "metrics": {"listen": "127.0.0.1:0"},
                        "optimize": {"workers": 2},
                    }
                )
            )
            service = Service(load_config(config_path))
            await service.start()
            try:
                samples = sample_files()
                print(f"sftpgate demo — data in {root}")
                print(f"stand-in Immich {immich.url}, SFTP on 127.0.0.1:{service.sftp.port}\n")
                async with (
                    asyncssh.connect(
                        "127.0.0.1",
                        service.sftp.port,
                        username="phone",
                        password=password,
                        known_hosts=None,
                    ) as conn,
                    conn.start_sftp_client() as sftp,
                ):
                    for path, data in samples.items():
                        await sftp.makedirs(str(Path(path).parent), exist_ok=True)
                        async with sftp.open(path, "wb") as f:
                            await f.write(data)
                        print(f"uploaded over SFTP: {path} ({len(data):,} bytes)")
                await service.pipeline.wait_for(
                    lambda c: c.get(State.DONE, 0) + c.get(State.UNDONE, 0) >= len(samples),
                    timeout=180,
                )
                _print_report(service, samples)
            finally:
                await service.stop()
        return 0
    finally:
        if keep:
            print(f"\nkept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _print_report(service: Service, samples: dict[str, bytes]) -> None:
    ledger = Ledger(service.layout.ledger)
    try:
        rows = {r.path: r for r in ledger.iter_all()}
    finally:
        ledger.close()
    print(
        f"\n{'file':<44} {'kind':<6} {'before':>10} {'after':>10}  {'outcome':<10} asset / reason"
    )
    for path in samples:
        r = rows[path]
        after = f"{r.bytes_out:,}" if r.bytes_out and r.outcome in ("uploaded", "kept") else "-"
        detail = {"uploaded": f"{r.asset_id} as {r.upload_name}", "kept": r.asset_id}.get(
            r.outcome or "", r.reason
        )
        print(f"{path:<44} {r.kind or '-':<6} {r.size:>10,} {after:>10}  {r.outcome:<10} {detail}")
    print(
        f"\nwatch/ now holds only the undone file: {sorted(str(p.relative_to(service.layout.watch)) for p in service.layout.watch.rglob('*') if p.is_file())}"
    )
