"""`kdkit.data.csvfile`: CSV files as Excel, LibreOffice and scripts save them read the same."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from kdkit.data.csvfile import read_csv, read_rows
from kdkit.data.datasets import DataError

HEADER = ["path", "label", "attack_type"]
ROWS = [["a/0.png", "1", "live"], ["b; c/1.png", "0", "print, glossy"], ["d/2.png", "0", 'replay "hd"']]
WANT = [dict(zip(HEADER, row, strict=True)) for row in ROWS]


def _save(
    path: Path,
    delimiter: str = ",",
    newline: str = "\n",
    encoding: str = "utf-8",
    quoting: int = csv.QUOTE_MINIMAL,
    pad: str = "",
    trailing: str = "",
    first: str = "",
) -> Path:
    """HEADER and ROWS the way a spreadsheet program would save them."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator=newline, quoting=quoting)
    writer.writerow([f"{pad}{name.title() if pad else name}{pad}" for name in HEADER])
    writer.writerows(ROWS)
    path.write_bytes((first + buffer.getvalue() + trailing).encode(encoding))
    return path


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"encoding": "utf-8-sig"},  # Excel's "CSV UTF-8": a byte-order mark
        {"newline": "\r\n"},  # Windows line ends
        {"newline": "\r"},  # old Mac line ends
        {"delimiter": ";", "encoding": "utf-8-sig", "newline": "\r\n"},  # Excel in a decimal-comma locale
        {"delimiter": "\t", "encoding": "utf-16"},  # Excel's "Unicode text"
        {"quoting": csv.QUOTE_ALL},  # LibreOffice "quote all text cells"
        {"pad": "  "},  # ' Path ' etc.: spaces around (and capitals in) header names
        {"trailing": ",,\n,,\n\n"},  # the empty rows a spreadsheet leaves below the data
        {"delimiter": ";", "first": "sep=;\n"},  # Excel's delimiter hint line
    ],
)
def test_spreadsheet_variants_read_the_same_rows(tmp_path: Path, options: dict) -> None:
    table = read_csv(_save(tmp_path / "x.csv", **options), required=("path", "label"))
    assert table.columns == HEADER
    assert table.rows == WANT
    skip = 1 if options.get("first") else 0
    assert table.lines == [2 + skip, 3 + skip, 4 + skip]


def test_cells_are_stripped_and_short_rows_padded(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text(" path ; label ;\n  a.png ;1\n\n b.png;  0 ;  \n")
    table = read_csv(path)
    assert table.rows == [{"path": "a.png", "label": "1"}, {"path": "b.png", "label": "0"}]
    assert table.lines == [2, 4]  # the blank line 3 is skipped, and numbered as in an editor


def test_headerless_rows_keep_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_bytes(b'\xef\xbb\xbf"+1";"1_1_01_1"\r\n\r\n-2;1_1_01_4\r\n')
    assert read_rows(path) == [(1, ["+1", "1_1_01_1"]), (3, ["-2", "1_1_01_4"])]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            b"path,label\na.png,1\n",
            r"x\.csv, line 1: missing column\(s\) attack_type in header \['path', 'label'\]",
        ),
        (b"", r"x\.csv, line 1: missing column\(s\) path, label, attack_type"),
        (b"path,label,Path\n", r"x\.csv, line 1: column\(s\) path appear twice"),
        (b"path,label,attack_type\na,1,live,extra\n", r"x\.csv, line 2: 4 cells but the header"),
        (b"path,label,attack_type\nd\xe9j\xe0,1,live\n", r"x\.csv, line 2: not UTF-8 text .*CSV UTF-8"),
        (b'path,label,attack_type\nok,1,live\n"x,1,live\nmore\n', r"x\.csv, line 3: not a readable CSV"),
    ],
)
def test_unreadable_files_name_the_file_and_line(tmp_path: Path, data: bytes, match: str) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(data)
    with pytest.raises(DataError, match=match):
        read_csv(path, required=tuple(HEADER))


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        read_csv(tmp_path / "nope.csv")
