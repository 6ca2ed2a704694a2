"""Vectorized parser for chunks of raw Criteo TSV: label, 13 integer and 26 hex fields per line.

Why numpy over the raw bytes rather than csv or pandas: per-field Python calls cap a reader near
100k rows/s, and pandas cannot tell a missing field from an empty one or report which line was
bad. Working on the byte buffer with array operations parses a whole chunk at once and still pins
every malformed line, with its reason, without a per-line loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
# Why a line is skipped, in the order they are checked (a line counts under its first reason).
REASONS = ("field_count", "bad_label", "bad_dense", "bad_sparse")
MAX_HEX_DIGITS = 16  # ids must fit 64 bits before hashing (Criteo's are 8 hex digits)
MAX_DENSE_DIGITS = 19  # the most a uint64 holds exactly; longer "integers" are garbage

_TAB, _NL, _CR, _MINUS = 9, 10, 13, ord("-")
_HEX_NIBBLE = np.full(256, 0x80, np.uint8)  # character -> nibble; 0x80 marks a non-hex character
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_NIBBLE[_c] = 10 + _i
_ONE, _FOUR, _EIGHT, _ALL_ONES = np.uint64(1), np.uint64(4), np.uint64(8), np.uint64(2**64 - 1)
_ASCII_ZEROS, _HIGH_BITS = np.uint64(0x3030303030303030), np.uint64(0x8080808080808080)
_HEX_PACK_STEPS = [
    (np.uint64(4), np.uint64(0x00FF00FF00FF00FF)),
    (np.uint64(8), np.uint64(0x0000FFFF0000FFFF)),
    (np.uint64(16), np.uint64(0x00000000FFFFFFFF)),
]
# Decimal: every byte is a digit iff its high nibble is 3 and adding 6 keeps it 3 (simdjson's check);
# then three multiply-shift steps combine digit pairs, quads and octets (simdjson's parse_eight_digits).
_HIGH_NIBBLES, _SIXES = np.uint64(0xF0F0F0F0F0F0F0F0), np.uint64(0x0606060606060606)
_ALL_THREES = np.uint64(0x3333333333333333)
_DECIMAL_PACK_STEPS = [
    (np.uint64(0x0F0F0F0F0F0F0F0F), np.uint64(2561), np.uint64(8)),
    (np.uint64(0x00FF00FF00FF00FF), np.uint64(6553601), np.uint64(16)),
    (np.uint64(0x0000FFFF0000FFFF), np.uint64(42949672960001), np.uint64(32)),
]
_POW10 = np.array([10**i for i in range(9)], dtype=np.uint64)

@dataclass
class ParsedChunk:
    """The good rows of a chunk, and where (0-based line within the chunk) and why the others failed."""

    dense: np.ndarray  # float32 (G, 13), log(1 + max(x, 0))
    sparse: np.ndarray  # int64 (G, 26), int(hex, 16) % table_size; empty field -> 0
    labels: np.ndarray  # float32 (G,)
    num_lines: int
    bad_lines: np.ndarray  # int64, ascending
    bad_reasons: np.ndarray  # index into REASONS, one per bad line
    first_bad: str | None  # what is wrong with the first bad line, for strict mode


# Both parsers work SWAR-style on 8-byte words: a field's characters are loaded 8 at a time as one
# little-endian integer (first character in the low byte), bytes past the field become '0', and a
# few whole-word operations validate and convert all 8 characters at once. Each word's value is
# right-aligned by the digits it lacks and appended to the field's value so far.


def _field_word(words: np.ndarray, starts: np.ndarray, lengths: np.ndarray, k: int):
    """Characters k..k+7 of each field with the bytes past its end set to '0', and how many are inside."""
    inside = np.clip(lengths - k, 0, 8).astype(np.uint64)
    keep = np.where(inside == 8, _ALL_ONES, (_ONE << (_EIGHT * inside)) - _ONE)
    return (words[starts + k] & keep) | (_ASCII_ZEROS & ~keep), inside


def _parse_hex(words, starts, lengths, table_sizes):
    """Hashed ids (value % table size) and a per-field error mask."""
    width = 8 if lengths.max(initial=0) <= 8 else MAX_HEX_DIGITS
    values = np.zeros(starts.shape, np.uint64)
    bad = lengths > MAX_HEX_DIGITS
    for k in range(0, width, 8):
        word, inside = _field_word(words, starts, lengths, k)
        nibbles = np.take(_HEX_NIBBLE, word.view(np.uint8)).view(np.uint64).reshape(word.shape)
        bad |= (nibbles & _HIGH_BITS) != 0
        x = nibbles.byteswap()  # first character in the most significant byte: pack nibbles pairwise
        for shift, mask in _HEX_PACK_STEPS:
            x = ((x >> shift) | x) & mask
        values = (values << (_FOUR * inside)) | (x >> (_FOUR * (_EIGHT - inside)))
    return (values % table_sizes).astype(np.int64), bad


def _parse_dense(words, starts, lengths, first_chars):
    """log(1 + max(x, 0)) of optionally signed decimal integers (empty -> 0), and an error mask."""
    negative = (lengths > 0) & (first_chars == _MINUS)
    starts, lengths = starts + negative, lengths - negative
    bad = (lengths > MAX_DENSE_DIGITS) | (negative & (lengths == 0))
    width = int(np.clip(lengths.max(initial=0), 1, MAX_DENSE_DIGITS))
    values = np.zeros(starts.shape, np.uint64)
    for k in range(0, width, 8):
        word, inside = _field_word(words, starts, lengths, k)
        bad |= ((word & _HIGH_NIBBLES) | (((word + _SIXES) & _HIGH_NIBBLES) >> _FOUR)) != _ALL_THREES
        for mask, multiplier, shift in _DECIMAL_PACK_STEPS:  # 8 digits -> their value, left-aligned
            word = ((word & mask) * multiplier) >> shift
        values = values * _POW10[inside] + word // _POW10[_EIGHT - inside]
    values[negative] = 0
    return np.log1p(values.astype(np.float64)).astype(np.float32), bad


@dataclass
class _Fields:
    """Where every field of a chunk starts and how long it is, and which lines hold exactly 40."""

    starts: np.ndarray  # (R, 40) for the R complete lines
    lengths: np.ndarray
    rows: np.ndarray  # line index of each complete line
    num_lines: int
    fields_per_line: np.ndarray
    blank: np.ndarray  # per line: nothing on it (ignored, but counted for line numbers)


def _split_fields(buf: np.ndarray) -> _Fields:
    seps = np.flatnonzero((buf == _TAB) | (buf == _NL))
    ends_line = buf[seps] == _NL
    starts = np.concatenate(([0], seps[:-1] + 1))
    ends = seps.copy()
    ends[ends_line & (ends > starts) & (buf[ends - 1] == _CR)] -= 1
    lengths = ends - starts
    line_of_field = np.cumsum(ends_line) - ends_line
    num_lines = int(ends_line.sum())
    fields_per_line = np.bincount(line_of_field, minlength=num_lines)
    complete = fields_per_line == NUM_FIELDS
    in_row = complete[line_of_field]
    return _Fields(
        starts=starts[in_row].reshape(-1, NUM_FIELDS),
        lengths=lengths[in_row].reshape(-1, NUM_FIELDS),
        rows=np.flatnonzero(complete),
        num_lines=num_lines,
        fields_per_line=fields_per_line,
        blank=(fields_per_line == 1) & (lengths[ends_line] == 0),
    )


def parse_chunk(data: bytes, table_sizes: np.ndarray) -> ParsedChunk:
    """Parse whole lines (`data` ends with a newline). Blank lines are ignored; a CR before LF is stripped.

    `table_sizes` is a uint64 array of the 26 table sizes.
    """
    padded = np.frombuffer(data + bytes(32), np.uint8)  # every field start has 3 whole words after it
    buf = padded[: len(data)]
    words = np.ndarray((len(data) + 25,), "<u8", padded, strides=(1,))  # the 8 bytes from every offset
    f = _split_fields(buf)
    dense_starts, dense_lengths = f.starts[:, 1 : 1 + NUM_DENSE], f.lengths[:, 1 : 1 + NUM_DENSE]
    labels = buf[f.starts[:, 0]]
    bad_label = (f.lengths[:, 0] != 1) | ((labels != ord("0")) & (labels != ord("1")))
    dense, bad_dense = _parse_dense(words, dense_starts, dense_lengths, buf[dense_starts])
    sparse, bad_sparse = _parse_hex(words, f.starts[:, 1 + NUM_DENSE :], f.lengths[:, 1 + NUM_DENSE :], table_sizes)

    bad_fields = np.concatenate([bad_label[:, None], bad_dense, bad_sparse], axis=1)
    bad_row = bad_fields.any(1)
    first_bad_field = bad_fields.argmax(1)
    reason = np.full(f.num_lines, -1)
    reason[(f.fields_per_line != NUM_FIELDS) & ~f.blank] = REASONS.index("field_count")
    reason[f.rows[bad_row]] = 1 + np.searchsorted([1, 1 + NUM_DENSE], first_bad_field[bad_row], side="right")
    bad_lines = np.flatnonzero(reason >= 0)

    first_bad = None
    if len(bad_lines) and reason[bad_lines[0]] == 0:
        first_bad = f"field_count: {f.fields_per_line[bad_lines[0]]} tab-separated fields, expected {NUM_FIELDS}"
    elif len(bad_lines):
        row = np.searchsorted(f.rows, bad_lines[0])
        field = first_bad_field[row]
        start = f.starts[row, field]
        text = data[start : start + min(f.lengths[row, field], 40)].decode("utf-8", "replace")
        first_bad = f"{REASONS[reason[bad_lines[0]]]}: {_field_name(field)} = {text!r}, expected {_expected(field)}"
    good = ~bad_row
    return ParsedChunk(
        dense=dense[good],
        sparse=sparse[good],
        labels=(labels[good] - ord("0")).astype(np.float32),
        num_lines=f.num_lines,
        bad_lines=bad_lines,
        bad_reasons=reason[bad_lines],
        first_bad=first_bad,
    )


def _field_name(field: int) -> str:
    if field == 0:
        return "label"
    if field <= NUM_DENSE:
        return f"int_{field - 1}"
    return f"cat_{field - 1 - NUM_DENSE}"


def _expected(field: int) -> str:
    if field == 0:
        return "0 or 1"
    if field <= NUM_DENSE:
        return "an integer or nothing"
    return f"a hex id of at most {MAX_HEX_DIGITS} digits or nothing"
