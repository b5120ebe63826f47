//! Changed-extent lists: the text PowerCLI writes, and JSON.
//!
//! Text: `$changes.ChangedArea | Format-Table -HideTableHeaders` writes one
//! right-aligned "offset length" pair (bytes) per line, with trailing spaces and blank
//! lines. JSON: `[{"offset": N, "length": N}, ...]`, or PowerCLI's `ConvertTo-Json` of a
//! `DiskChangeInfo` (`{"StartOffset": .., "Length": .., "ChangedArea": [{"Start": ..,
//! "Length": ..}]}`).

use pilotlight_protocol::{Extent, SECTOR_SIZE};
use serde::Deserialize;
use std::path::Path;

/// Why an extent list was rejected. Each variant names the line (1-based) or entry.
#[derive(Debug, thiserror::Error)]
pub enum ExtentListError {
    #[error("cannot read extent list {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("extent list {path} line {line}: expected \"offset length\" in bytes, found {text:?}")]
    Garbage {
        path: String,
        line: usize,
        text: String,
    },
    #[error("extent list {path} line {line}: negative number {text:?}")]
    Negative {
        path: String,
        line: usize,
        text: String,
    },
    #[error("extent list {path} is not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("extent list {path} entry {line}: extent {extent} is not aligned to {SECTOR_SIZE}-byte sectors")]
    Unaligned {
        path: String,
        line: usize,
        extent: Extent,
    },
    #[error("extent list {path} entry {line}: extent {extent} is empty")]
    Empty {
        path: String,
        line: usize,
        extent: Extent,
    },
    #[error("extent list {path} entry {line}: extent {extent} starts before the previous extent {previous} (the list must be sorted by offset)")]
    Unsorted {
        path: String,
        line: usize,
        extent: Extent,
        previous: Extent,
    },
    #[error(
        "extent list {path} entry {line}: extent {extent} overlaps the previous extent {previous}"
    )]
    Overlapping {
        path: String,
        line: usize,
        extent: Extent,
        previous: Extent,
    },
    #[error("extent list {path} entry {line}: extent {extent} ends past the end of the disk ({disk_size} bytes)")]
    PastEnd {
        path: String,
        line: usize,
        extent: Extent,
        disk_size: u64,
    },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonList {
    Plain(Vec<JsonExtent>),
    ChangeInfo {
        #[serde(rename = "ChangedArea", alias = "changedArea")]
        changed_area: Vec<JsonExtent>,
    },
}

#[derive(Deserialize)]
struct JsonExtent {
    #[serde(alias = "Start", alias = "start", alias = "Offset")]
    offset: u64,
    #[serde(alias = "Length")]
    length: u64,
}

/// Reads and validates an extent list against a disk of `disk_size` bytes.
/// Returns the extents in order; adjacent ones are not merged here.
pub fn read_extent_list(path: &Path, disk_size: u64) -> Result<Vec<Extent>, ExtentListError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ExtentListError::Read {
        path: p.clone(),
        source,
    })?;
    let numbered = parse_extent_list(&p, &text)?;
    validate(&p, &numbered, disk_size)?;
    Ok(numbered.into_iter().map(|(_, e)| e).collect())
}

/// Parses text or JSON into (line or entry number, extent) pairs.
pub fn parse_extent_list(path: &str, text: &str) -> Result<Vec<(usize, Extent)>, ExtentListError> {
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        let list: JsonList =
            serde_json::from_str(trimmed).map_err(|source| ExtentListError::Json {
                path: path.into(),
                source,
            })?;
        let items = match list {
            JsonList::Plain(v) | JsonList::ChangeInfo { changed_area: v } => v,
        };
        return Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, e)| (i + 1, Extent::new(e.offset, e.length)))
            .collect());
    }
    let mut out = Vec::new();
    // PowerShell may write UTF-8 with a BOM and CRLF line ends.
    for (i, line) in text.trim_start_matches('\u{feff}').lines().enumerate() {
        let line_no = i + 1;
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let garbage = || ExtentListError::Garbage {
            path: path.into(),
            line: line_no,
            text: line.trim().chars().take(80).collect(),
        };
        if fields.len() != 2 {
            return Err(garbage());
        }
        let mut nums = [0u64; 2];
        for (slot, f) in nums.iter_mut().zip(&fields) {
            if f.starts_with('-') && f[1..].bytes().all(|b| b.is_ascii_digit()) && f.len() > 1 {
                return Err(ExtentListError::Negative {
                    path: path.into(),
                    line: line_no,
                    text: (*f).into(),
                });
            }
            if !f.bytes().all(|b| b.is_ascii_digit()) {
                return Err(garbage());
            }
            *slot = f.parse().map_err(|_| garbage())?;
        }
        out.push((line_no, Extent::new(nums[0], nums[1])));
    }
    Ok(out)
}

fn validate(path: &str, list: &[(usize, Extent)], disk_size: u64) -> Result<(), ExtentListError> {
    let mut prev: Option<Extent> = None;
    for &(line, extent) in list {
        let path = path.to_string();
        if extent.length == 0 {
            return Err(ExtentListError::Empty { path, line, extent });
        }
        if !extent.is_sector_aligned() {
            return Err(ExtentListError::Unaligned { path, line, extent });
        }
        match extent.checked_end() {
            Some(end) if end <= disk_size => {}
            _ => {
                return Err(ExtentListError::PastEnd {
                    path,
                    line,
                    extent,
                    disk_size,
                })
            }
        }
        if let Some(previous) = prev {
            if extent.offset < previous.offset {
                return Err(ExtentListError::Unsorted {
                    path,
                    line,
                    extent,
                    previous,
                });
            }
            if extent.offset < previous.end() {
                return Err(ExtentListError::Overlapping {
                    path,
                    line,
                    extent,
                    previous,
                });
            }
        }
        prev = Some(extent);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../../tests/fixtures/powercli-changed-areas.txt");
    const FIXTURE_DISK: u64 = 42_949_672_960;

    fn check(text: &str, disk: u64) -> Result<Vec<Extent>, ExtentListError> {
        let list = parse_extent_list("t", text)?;
        validate("t", &list, disk)?;
        Ok(list.into_iter().map(|(_, e)| e).collect())
    }

    #[test]
    fn accepts_the_powercli_fixture_as_is() {
        let v = check(FIXTURE, FIXTURE_DISK).unwrap();
        assert_eq!(v.len(), 27);
        assert_eq!(v.iter().map(|e| e.length).max(), Some(2_985_295_872));
        assert_eq!(v.last().unwrap().end(), FIXTURE_DISK - 1024 * 1024);
        let total: u64 = v.iter().map(|e| e.length).sum();
        assert!((7_800_000_000..8_500_000_000).contains(&total), "{total}");
    }

    #[test]
    fn accepts_crlf_bom_and_json() {
        let v = check("\u{feff}  0  512 \r\n\r\n  1024 512\r\n", 4096).unwrap();
        assert_eq!(v, vec![Extent::new(0, 512), Extent::new(1024, 512)]);
        let v = check(
            r#"[{"offset":0,"length":512},{"offset":1024,"length":512}]"#,
            4096,
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        let v = check(
            r#"{"StartOffset":0,"Length":4096,"ChangedArea":[{"Start":512,"Length":1024}]}"#,
            4096,
        )
        .unwrap();
        assert_eq!(v, vec![Extent::new(512, 1024)]);
    }

    #[test]
    fn rejects_bad_lists_naming_the_line() {
        let cases: &[(&str, &str)] = &[
            ("0 1024\n512 512\n", "overlaps"),
            ("2048 512\n0 512\n", "sorted"),
            ("100 512\n", "aligned"),
            ("0 100\n", "aligned"),
            ("-512 512\n", "negative"),
            ("0 -512\n", "negative"),
            ("0 512\n8192 512\n", "past the end"),
            ("hello world\n", "expected"),
            ("0 512 7\n", "expected"),
            ("0\n", "expected"),
            ("0x200 512\n", "expected"),
            ("99999999999999999999999 512\n", "expected"),
            ("18446744073709551104 1024\n", "past the end"),
            ("0 0\n", "empty"),
            ("[{\"offset\":0}]", "JSON"),
        ];
        for (text, want) in cases {
            let err = check(text, 4096).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        let err = check("\n\n0 512\nbad\n", 4096).unwrap_err().to_string();
        assert!(err.contains("line 4"), "{err}");
    }
}
