"""Put an ICC profile into a lossless JPEG XL codestream that libjxl wrote as sRGB.

Why this exists: pillow-jxl-plugin encodes pixels with the colour space hard-wired to sRGB and has
no way to pass an ICC profile (measured: `Encoder.__call__` rejects `icc_profile=`, and
`save(icc_profile=...)` silently ignores it). An iPhone screenshot is Display P3, so the colours
would shift. In a *lossless* (modular, non-XYB) codestream the pixel data does not depend on the
colour space at all: it is just samples, and the header says how to interpret them. So we rewrite
the header: the colour encoding becomes "ICC follows", and the ICC profile is appended right after
the headers, before the byte-aligned first frame (ISO/IEC 18181-1 §A: headers, ICC, zero pad to a
byte, frames). Everything after the headers is copied unchanged.

The ICC stream is written in the simplest form the format allows: the profile header as a
residual against the format's prediction, the rest as one literal "insert" command, and every byte
entropy-coded with one flat 8-bit prefix code. That costs about the profile's own size (a Display
P3 profile is ~550 bytes) instead of libjxl's compressed form, and needs no entropy-coder tuning.

Anything unexpected in the header (animation, preview, an XYB image, extensions) raises
`JxlHeaderError`: the caller then keeps the PNG. The caller also decodes the result with libjxl
and compares pixels and ICC, so a mistake here can never reach Immich.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["JxlHeaderError", "embed_icc"]

_ICC_HEADER_SIZE = 128
# Bytes 70-79 of most profiles: the D50 illuminant in the header (0.9642, 1.0, 0.8249).
_FIXED_HEADER_PREDICTIONS = {70: 246, 71: 214, 73: 1, 78: 211, 79: 45}


class JxlHeaderError(ValueError):
    """The codestream header is not one this module can rewrite."""


class _BitReader:
    """JPEG XL bit order: least significant bit first within each byte."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0  # in bits

    def bits(self, n: int) -> int:
        if self.pos + n > 8 * len(self.data):
            raise JxlHeaderError("the codestream ends inside its header")
        value = 0
        for i in range(n):
            byte = self.data[(self.pos + i) >> 3]
            value |= ((byte >> ((self.pos + i) & 7)) & 1) << i
        self.pos += n
        return value

    def bool(self) -> bool:
        return self.bits(1) == 1

    def u32(self, *distributions: tuple[int, int]) -> int:
        """U32(d0, d1, d2, d3): a 2-bit selector, then (offset, bit count) of that distribution."""
        offset, nbits = distributions[self.bits(2)]
        return offset + (self.bits(nbits) if nbits else 0)

    def u64(self) -> int:
        selector = self.bits(2)
        if selector == 0:
            return 0
        if selector == 1:
            return 1 + self.bits(4)
        if selector == 2:
            return 17 + self.bits(8)
        value, shift = self.bits(12), 12
        while self.bool():
            if shift == 60:
                return value | (self.bits(4) << 60)
            value |= self.bits(8) << shift
            shift += 8
        return value

    def enum(self) -> int:
        return self.u32((0, 0), (1, 0), (2, 4), (18, 6))


class _BitWriter:
    def __init__(self) -> None:
        self.value = 0  # all bits so far, least significant first
        self.length = 0

    def bits(self, n: int, value: int) -> None:
        self.value |= (value & ((1 << n) - 1)) << self.length
        self.length += n

    def copy(self, data: bytes, start: int, end: int) -> None:
        """Append bits [start, end) of `data`, in stream order."""
        if end > start:
            whole = int.from_bytes(data[: (end + 7) // 8], "little")
            self.bits(end - start, whole >> start)

    def u64(self, value: int) -> None:
        if value == 0:
            self.bits(2, 0)
        elif value <= 16:
            self.bits(2, 1)
            self.bits(4, value - 1)
        elif value <= 272:
            self.bits(2, 2)
            self.bits(8, value - 17)
        else:
            self.bits(2, 3)
            self.bits(12, value & 0xFFF)
            value >>= 12
            shift = 12
            while value:
                self.bits(1, 1)
                if shift == 60:
                    self.bits(4, value)
                    return
                self.bits(8, value & 0xFF)
                value >>= 8
                shift += 8
            self.bits(1, 0)

    def to_bytes(self) -> bytes:
        """The bits, zero-padded to a whole byte (what the format requires before a frame)."""
        return self.value.to_bytes((self.length + 7) // 8, "little")


@dataclass(frozen=True)
class _Header:
    colour_start: int  # bit offset of the ColourEncoding bundle
    colour_end: int
    end: int  # bit offset just past the headers (before any ICC stream)
    grey: bool


def _skip_bit_depth(r: _BitReader) -> None:
    if r.bool():  # floating point samples
        r.u32((32, 0), (16, 0), (24, 0), (1, 6))
        r.bits(4)
    else:
        r.u32((8, 0), (10, 0), (12, 0), (1, 6))


def _skip_extra_channel(r: _BitReader) -> None:
    if r.bool():  # all_default: an 8-bit alpha channel
        return
    channel_type = r.enum()
    _skip_bit_depth(r)
    r.u32((0, 0), (3, 0), (4, 0), (1, 3))  # dim_shift
    name_length = r.u32((0, 0), (0, 4), (16, 5), (48, 10))
    r.bits(8 * name_length)
    if channel_type == 0:  # alpha
        r.bool()  # alpha_associated
    elif channel_type == 2:  # spot colour: four F16
        r.bits(64)
    elif channel_type == 5:  # colour filter array
        r.u32((1, 0), (0, 2), (3, 4), (19, 8))


def _skip_colour_encoding(r: _BitReader) -> bool:
    """Skip a ColourEncoding bundle; return whether it describes a grey image."""
    if r.bool():  # all_default: sRGB
        return False
    want_icc = r.bool()
    colour_space = r.enum()
    if want_icc:
        raise JxlHeaderError("the codestream already carries an ICC profile")
    if colour_space == 2:  # XYB only happens in lossy codestreams
        raise JxlHeaderError("the codestream is XYB-encoded (lossy)")
    white_point = r.enum()
    if white_point == 2:  # custom white point: two CustomXY
        for _ in range(2):
            r.u32((0, 19), (524288, 19), (1048576, 20), (2097152, 21))
    # Primaries (not for grey); custom primaries are three CustomXY pairs.
    if colour_space != 1 and r.enum() == 2:
        for _ in range(6):
            r.u32((0, 19), (524288, 19), (1048576, 20), (2097152, 21))
    if r.bool():  # have_gamma
        r.bits(24)
    else:
        r.enum()  # transfer function
    r.enum()  # rendering intent
    return colour_space == 1


def _parse_header(codestream: bytes) -> _Header:
    """Walk SizeHeader, ImageMetadata and CustomTransformData (ISO/IEC 18181-1 Annex A)."""
    if not codestream.startswith(b"\xff\x0a"):
        raise JxlHeaderError("not a bare JPEG XL codestream")
    r = _BitReader(codestream)
    r.pos = 16
    # SizeHeader
    small = r.bool()
    if small:
        r.bits(5)
    else:
        r.u32((1, 9), (1, 13), (1, 18), (1, 30))
    if r.bits(3) == 0:  # no fixed aspect ratio: the width follows
        if small:
            r.bits(5)
        else:
            r.u32((1, 9), (1, 13), (1, 18), (1, 30))
    # ImageMetadata
    if r.bool():  # all_default would mean an XYB (lossy) sRGB image
        raise JxlHeaderError("the image metadata is all default (an XYB image)")
    extra_fields = r.bool()
    if extra_fields:
        r.bits(3)  # orientation
        if r.bool() or r.bool() or r.bool():  # intrinsic size, preview, animation
            raise JxlHeaderError("intrinsic size, preview or animation in the header")
    _skip_bit_depth(r)
    r.bool()  # modular_16bit_buffers
    for _ in range(r.u32((0, 0), (1, 0), (2, 4), (1, 12))):
        _skip_extra_channel(r)
    if r.bool():
        raise JxlHeaderError("the codestream is XYB-encoded (lossy)")
    colour_start = r.pos
    grey = _skip_colour_encoding(r)
    colour_end = r.pos
    if extra_fields and not r.bool():  # tone mapping that is not all default
        r.bits(16 + 16 + 1 + 16)
    if r.u64():
        raise JxlHeaderError("the image metadata has extensions")
    # CustomTransformData (not XYB, so no opsin matrix)
    if not r.bool() and r.bits(3):
        raise JxlHeaderError("the codestream has custom upsampling weights")
    return _Header(colour_start, colour_end, r.pos, grey)


def _predicted_header_byte(index: int, size: int, header: bytes) -> int:
    """The prediction the decoder adds to each of the first 128 encoded bytes (18181-1 §E.4.2)."""
    if index < 4:
        return size.to_bytes(4, "big")[index]
    if index == 8:
        return 4
    if 12 <= index < 24:
        return b"mntrRGB XYZ "[index - 12]
    if 36 <= index < 40:
        return b"acsp"[index - 36]
    platform = header[40:42]
    if index in (41, 42) and platform[:1] == b"A":
        return ord("P")
    if index == 43 and platform[:1] == b"A":
        return ord("L")
    if platform[:1] == b"M" and index in (41, 42, 43):
        return b"SFT"[index - 41]
    if platform == b"SG" and index in (42, 43):
        return b"I "[index - 42]
    if platform == b"SU" and index in (42, 43):
        return b"NW"[index - 42]
    if 80 <= index < 84:
        return header[4 + index - 80]  # repeats the CMM type
    return _FIXED_HEADER_PREDICTIONS.get(index, 0)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _encoded_icc(icc: bytes) -> bytes:
    """The byte stream the decoder's ICC "unpredict" step turns back into `icc`."""
    size = len(icc)
    head = icc[:_ICC_HEADER_SIZE]
    residuals = bytes(
        (byte - _predicted_header_byte(i, size, head)) & 0xFF for i, byte in enumerate(head)
    )
    # Commands: tag count 0 ("no tag list"), then one insert of everything after the header.
    commands = b"\x00" + b"\x01" + _varint(size - _ICC_HEADER_SIZE)
    return _varint(size) + _varint(len(commands)) + commands + residuals + icc[_ICC_HEADER_SIZE:]


def _write_flat_byte_code(w: _BitWriter) -> None:
    """Entropy-code header for one 256-symbol prefix code where every symbol takes 8 bits."""
    w.bits(1, 0)  # no LZ77
    w.bits(1, 1)  # simple context map...
    w.bits(2, 0)  # ...with 0 bits per entry: all 41 contexts share histogram 0
    w.bits(1, 1)  # prefix codes (not ANS)
    # HybridUint config for log_alpha_size 15: split_exponent 8 (4 bits), msb 0 (4 bits),
    # lsb 0 (0 bits, since 8 - 0 + 1 needs 4 bits: ceil(log2(9)) = 4): tokens 0-255 are literals.
    w.bits(4, 8)
    w.bits(4, 0)
    w.bits(4, 0)
    # Alphabet size 256: varint16 of 255 = flag 1, nbits 7, then 127 in 7 bits.
    w.bits(1, 1)
    w.bits(4, 7)
    w.bits(7, 127)
    # Complex prefix code (HSKIP 0). Code-length-code lengths in the fixed order
    # 1,2,3,4,0,5,17,6,16,7,8: zero for all but 16 (repeat) and 8, which get length 1 each.
    static_code = {0: (2, 0b00), 1: (4, 0b0111)}  # value -> (bits, code) of the fixed table
    w.bits(2, 0)
    for length in (0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1):
        nbits, code = static_code[length]
        w.bits(nbits, code)
    # Code lengths: "8", then repeat-previous codes (symbol 16, 2 extra bits) chaining
    # 5 -> 17 -> 65 -> 255 repeats: 256 symbols of length 8 in all.
    w.bits(1, 0)  # symbol 8 (canonical code 0)
    for extra in (2, 2, 2, 0):
        w.bits(1, 1)  # symbol 16 (canonical code 1)
        w.bits(2, extra)


def _icc_stream(icc: bytes) -> _BitWriter:
    encoded = _encoded_icc(icc)
    w = _BitWriter()
    w.u64(len(encoded))
    _write_flat_byte_code(w)
    for byte in encoded:
        # Canonical code of symbol s is s itself (all lengths 8), read most significant bit
        # first, while the stream is least significant first: store the bits reversed.
        w.bits(8, int(f"{byte:08b}"[::-1], 2))
    return w


def embed_icc(codestream: bytes, icc: bytes) -> bytes:
    """Return `codestream` (a bare lossless JPEG XL codestream) declaring `icc` as its colour space.

    Raises JxlHeaderError when the header is not a simple lossless one or when the profile does
    not match the image (an RGB profile on a grey image or the reverse).
    """
    if len(icc) <= _ICC_HEADER_SIZE or icc[36:40] != b"acsp":
        raise JxlHeaderError("the ICC profile is not a valid profile (no 'acsp' signature)")
    header = _parse_header(codestream)
    profile_space = icc[16:20]
    if profile_space != (b"GRAY" if header.grey else b"RGB "):
        raise JxlHeaderError(
            f"the ICC profile's colour space {profile_space.decode('latin-1')!r} does not match "
            f"the {'grey' if header.grey else 'RGB'} image"
        )
    w = _BitWriter()
    w.copy(codestream, 0, header.colour_start)
    w.bits(1, 0)  # ColourEncoding.all_default = false
    w.bits(1, 1)  # want_icc = true
    w.bits(2, 1 if header.grey else 0)  # colour_space: Enum value 1 (grey) or 0 (RGB)
    w.copy(codestream, header.colour_end, header.end)
    stream = _icc_stream(icc)
    w.bits(stream.length, stream.value)
    return w.to_bytes() + codestream[(header.end + 7) // 8 :]
