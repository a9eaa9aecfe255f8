"""CSV files as spreadsheet programs and scripts write them.

`read_csv` / `read_rows` are the one CSV reader of kdkit and its plugins (manifests, meta files,
protocol lists, score files). A file saved by Excel or LibreOffice reads the same as one written
by Python's `csv` module:

- encoding: UTF-8, with or without a byte-order mark, or UTF-16 with one (Excel's "Unicode
  text"); other encodings are refused by name (save as "CSV UTF-8");
- line ends: LF, CRLF or CR;
- delimiter: `,`, `;` (spreadsheets in locales with a decimal comma) or a tab, whichever the first
  line holds most of outside quotes; a first line `sep=;` (Excel's hint) names it explicitly;
- quoted fields (with delimiters, quotes or line breaks inside), surrounding whitespace around
  header names and cells (stripped), header names in any case (lower-cased), rows whose cells are
  all empty (skipped, e.g. the trailing `;;;` rows a spreadsheet leaves), unnamed columns padded
  onto the header (ignored).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from kdkit.data.datasets import DataError

_DELIMITERS = ",;\t"


@dataclass(frozen=True)
class CsvTable:
    """The rows of a CSV file with a header: `rows[i]` maps column → cell, from line `lines[i]`."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]
    lines: list[int]


def read_rows(path: str | Path) -> list[tuple[int, list[str]]]:
    """`(line number, stripped cells)` of every row of a CSV file that has a non-empty cell."""
    path = Path(path)
    text = _decode(path)
    first, _, rest = text.partition("\n")
    hint, skip = first.rstrip("\r"), 0
    if hint.lower().startswith("sep=") and len(hint) == 5:
        delimiter, skip, text = hint[4], 1, rest  # Excel's delimiter hint line
    else:
        delimiter = _delimiter(next((line for line in text.splitlines() if line.strip()), ""))
    # strict: a stray quote is an error, not a cell that swallows the rest of the file
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows, start = [], 1
    try:
        for cells in reader:
            if any(cell.strip() for cell in cells):
                rows.append((skip + start, [cell.strip() for cell in cells]))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(
            f"{path}, line {skip + start}: not a readable CSV file ({exc}); check the quotes of that row"
        ) from None
    return rows


def read_csv(path: str | Path, required: tuple[str, ...] = ()) -> CsvTable:
    """The rows of a CSV file with a header line, checked to have the `required` columns.

    Header names are stripped and lower-cased; a row with fewer cells than the header gets empty
    ones, a row with more non-empty cells than the header has names is an error.
    """
    path = Path(path)
    rows = read_rows(path)
    header_line, header = rows[0] if rows else (1, [])
    columns = [name.lower() for name in header]
    named = [name for name in columns if name]
    duplicates = sorted({name for name in named if named.count(name) > 1})
    if duplicates:
        raise DataError(f"{path}, line {header_line}: column(s) {', '.join(duplicates)} appear twice")
    missing = [name for name in required if name not in named]
    if missing:
        raise DataError(
            f"{path}, line {header_line}: missing column(s) {', '.join(missing)} in header {named}; "
            f"expected a header line with {', '.join(required)}"
        )
    table = CsvTable(path, named, [], [])
    for line, cells in rows[1:]:
        if any(cells[len(columns) :]):
            raise DataError(
                f"{path}, line {line}: {len(cells)} cells but the header (line {header_line}) names "
                f"{len(columns)} columns; quote cells that contain the delimiter"
            )
        cells += [""] * (len(columns) - len(cells))
        table.rows.append({name: cell for name, cell in zip(columns, cells, strict=False) if name})
        table.lines.append(line)
    return table


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: not {encoding.upper().removesuffix('-SIG')} text (byte "
            f"{data[exc.start : exc.start + 1].hex()}); save it as 'CSV UTF-8'"
        ) from None


def _delimiter(line: str) -> str:
    """The delimiter a header line uses most outside quotes; ',' when it has none."""
    counts, quoted = dict.fromkeys(_DELIMITERS, 0), False
    for char in line:
        if char == '"':
            quoted = not quoted
        elif not quoted and char in counts:
            counts[char] += 1
    best = max(_DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","
