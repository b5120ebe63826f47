//! Object keys of protocol v1, built and parsed.
//!
//! ```text
//! {prefix}/{site}/{vm}/{disk}/g/{generation:020}/d/{offset:020}   data object
//! {prefix}/{site}/{vm}/{disk}/g/{generation:020}/manifest.json    commit, written last
//! {prefix}/{site}/{vm}/{disk}/x/{export-id}/request.json          export request (DR)
//! {prefix}/{site}/{vm}/{disk}/x/{export-id}/image.raw             the exported image
//! {prefix}/{site}/{vm}/{disk}/x/{export-id}/result.json           the export's outcome
//! {prefix}/{site}/{vm}/{disk}/b/{run-id}/return.json               failback: return snapshots (DR)
//! {prefix}/{site}/{vm}/{disk}/b/{run-id}/round.json                failback: the newest round (sender)
//! {prefix}/{site}/{vm}/{disk}/r/head.json                          snapshots mode: the disk's chain head
//! {prefix}/{site}/{vm}/{disk}/r/{generation:020}/{attempt:05}-{shard:06}.json
//!                                                                  snapshots mode: one shard written
//! ```

use crate::names::{DiskId, Name, NameError, Prefix};
use std::fmt;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const EXPORT_REQUEST_FILE: &str = "request.json";
pub const EXPORT_IMAGE_FILE: &str = "image.raw";
pub const EXPORT_RESULT_FILE: &str = "result.json";
/// Snapshots mode: a fanned-out export's upload plan, and its ranges' records under `p/`.
pub const EXPORT_PLAN_FILE: &str = "plan.json";
pub const EXPORT_RANGE_DIR: &str = "p";
pub const FAILBACK_RETURN_FILE: &str = "return.json";
pub const FAILBACK_ROUND_FILE: &str = "round.json";
pub const REPLICA_HEAD_FILE: &str = "head.json";
const DIGITS: usize = 20;
/// Keys longer than this are rejected before any other parsing (S3's own limit).
pub const MAX_KEY_LEN: usize = 1024;

/// Why a key is not a pilotlight key. Each variant quotes the key (shortened).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key {key:?} is not under prefix {prefix:?}")]
    OutsidePrefix { key: String, prefix: String },
    #[error("key {key:?} is longer than {MAX_KEY_LEN} bytes")]
    TooLong { key: String },
    #[error("key {key:?} does not have the shape site/vm/disk/g/<generation>/(manifest.json|d/<offset>) or site/vm/disk/x/<export-id>/(request.json|image.raw|result.json) or site/vm/disk/b/<run-id>/(return.json|round.json)")]
    WrongShape { key: String },
    #[error("key {key:?}: bad {field} name: {source}")]
    BadName {
        key: String,
        field: &'static str,
        source: NameError,
    },
    #[error("key {key:?}: {field} {text:?} must be exactly {DIGITS} decimal digits")]
    BadDigits {
        key: String,
        field: &'static str,
        text: String,
    },
    #[error("key {key:?}: {field} {text:?} does not fit in 64 bits")]
    Overflow {
        key: String,
        field: &'static str,
        text: String,
    },
    #[error("key {key:?}: generation 0 does not exist; generations start at 1")]
    GenerationZero { key: String },
}

/// A parsed pilotlight key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ObjectKey {
    Data {
        disk: DiskId,
        generation: u64,
        offset: u64,
    },
    Manifest {
        disk: DiskId,
        generation: u64,
    },
    /// A request to export the disk's image (written by the DR Lambda).
    ExportRequest {
        disk: DiskId,
        id: Name,
    },
    /// An exported image (written by the receiver).
    ExportImage {
        disk: DiskId,
        id: Name,
    },
    /// An export's outcome (written by the receiver, last).
    ExportResult {
        disk: DiskId,
        id: Name,
    },
    /// Snapshots mode: a fanned-out export's upload plan (written by the replica function).
    ExportPlan {
        disk: DiskId,
        id: Name,
    },
    /// Snapshots mode: one range of a fanned-out export (its lease, then its parts).
    ExportRange {
        disk: DiskId,
        id: Name,
        range: u32,
    },
    /// A failback's return snapshots of this disk (written by the DR function).
    FailbackReturn {
        disk: DiskId,
        run: Name,
    },
    /// A failback's newest round into this disk (written by the sender).
    FailbackRound {
        disk: DiskId,
        run: Name,
    },
    /// Snapshots mode: the disk's chain head (its newest point, the point being written).
    ReplicaHead {
        disk: DiskId,
    },
    /// Snapshots mode: one shard of a generation's point, written (attempt, shard).
    ReplicaShard {
        disk: DiskId,
        generation: u64,
        attempt: u32,
        shard: u32,
    },
}

impl ObjectKey {
    pub fn disk(&self) -> &DiskId {
        match self {
            ObjectKey::Data { disk, .. }
            | ObjectKey::Manifest { disk, .. }
            | ObjectKey::ExportRequest { disk, .. }
            | ObjectKey::ExportImage { disk, .. }
            | ObjectKey::ExportResult { disk, .. }
            | ObjectKey::ExportPlan { disk, .. }
            | ObjectKey::ExportRange { disk, .. }
            | ObjectKey::FailbackReturn { disk, .. }
            | ObjectKey::FailbackRound { disk, .. }
            | ObjectKey::ReplicaHead { disk }
            | ObjectKey::ReplicaShard { disk, .. } => disk,
        }
    }

    /// The generation of a data object or manifest.
    pub fn generation(&self) -> Option<u64> {
        match self {
            ObjectKey::Data { generation, .. } | ObjectKey::Manifest { generation, .. } => {
                Some(*generation)
            }
            _ => None,
        }
    }

    /// The full key under `prefix`.
    pub fn to_key(&self, prefix: &Prefix) -> String {
        match self {
            ObjectKey::Data {
                disk,
                generation,
                offset,
            } => format!(
                "{}{:020}/d/{:020}",
                generation_prefix(prefix, disk),
                generation,
                offset
            ),
            ObjectKey::Manifest { disk, generation } => format!(
                "{}{:020}/{MANIFEST_FILE}",
                generation_prefix(prefix, disk),
                generation
            ),
            ObjectKey::ExportRequest { disk, id } => {
                format!("{}{id}/{EXPORT_REQUEST_FILE}", export_prefix(prefix, disk))
            }
            ObjectKey::ExportImage { disk, id } => {
                format!("{}{id}/{EXPORT_IMAGE_FILE}", export_prefix(prefix, disk))
            }
            ObjectKey::ExportResult { disk, id } => {
                format!("{}{id}/{EXPORT_RESULT_FILE}", export_prefix(prefix, disk))
            }
            ObjectKey::ExportPlan { disk, id } => {
                format!("{}{id}/{EXPORT_PLAN_FILE}", export_prefix(prefix, disk))
            }
            ObjectKey::ExportRange { disk, id, range } => format!(
                "{}{id}/{EXPORT_RANGE_DIR}/{range:05}.json",
                export_prefix(prefix, disk)
            ),
            ObjectKey::FailbackReturn { disk, run } => {
                format!(
                    "{}b/{run}/{FAILBACK_RETURN_FILE}",
                    disk_prefix(prefix, disk)
                )
            }
            ObjectKey::FailbackRound { disk, run } => {
                format!("{}b/{run}/{FAILBACK_ROUND_FILE}", disk_prefix(prefix, disk))
            }
            ObjectKey::ReplicaHead { disk } => {
                format!("{}r/{REPLICA_HEAD_FILE}", disk_prefix(prefix, disk))
            }
            ObjectKey::ReplicaShard {
                disk,
                generation,
                attempt,
                shard,
            } => format!(
                "{}{generation:020}/{attempt:05}-{shard:06}.json",
                replica_prefix(prefix, disk)
            ),
        }
    }

    /// Parses a full key under `prefix`. Rejects everything that is not exactly a key this
    /// crate builds: traversal, bad names, wrong padding, non-digits, overflow.
    pub fn parse(prefix: &Prefix, key: &str) -> Result<Self, KeyError> {
        let short = || short(key);
        if key.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong { key: short() });
        }
        let rest =
            key.strip_prefix(&prefix.key_start())
                .ok_or_else(|| KeyError::OutsidePrefix {
                    key: short(),
                    prefix: prefix.to_string(),
                })?;
        let parts: Vec<&str> = rest.split('/').collect();
        let (site, vm, disk, kind, gen, tail) = match parts.as_slice() {
            [s, v, d, kind @ ("g" | "x" | "b" | "r"), g, tail @ ..] => {
                (*s, *v, *d, *kind, *g, tail)
            }
            _ => return Err(KeyError::WrongShape { key: short() }),
        };
        let name = |field: &'static str, s: &str| {
            Name::new(s).map_err(|source| KeyError::BadName {
                key: short(),
                field,
                source,
            })
        };
        let disk = DiskId {
            site: name("site", site)?,
            vm: name("vm", vm)?,
            disk: name("disk", disk)?,
        };
        if kind == "r" {
            return match tail {
                [] if gen == REPLICA_HEAD_FILE => Ok(ObjectKey::ReplicaHead { disk }),
                [file] => {
                    let generation = parse_generation(key, gen)?;
                    let (attempt, shard) = file
                        .strip_suffix(".json")
                        .and_then(|f| f.split_once('-'))
                        .filter(|(a, s)| a.len() == 5 && s.len() == 6)
                        .ok_or_else(|| KeyError::WrongShape { key: short() })?;
                    Ok(ObjectKey::ReplicaShard {
                        disk,
                        generation,
                        attempt: parse_small(key, "attempt", attempt)?,
                        shard: parse_small(key, "shard", shard)?,
                    })
                }
                _ => Err(KeyError::WrongShape { key: short() }),
            };
        }
        if kind == "b" {
            let run = name("run id", gen)?;
            return match tail {
                [FAILBACK_RETURN_FILE] => Ok(ObjectKey::FailbackReturn { disk, run }),
                [FAILBACK_ROUND_FILE] => Ok(ObjectKey::FailbackRound { disk, run }),
                _ => Err(KeyError::WrongShape { key: short() }),
            };
        }
        if kind == "x" {
            let id = name("export id", gen)?;
            return match tail {
                [EXPORT_REQUEST_FILE] => Ok(ObjectKey::ExportRequest { disk, id }),
                [EXPORT_IMAGE_FILE] => Ok(ObjectKey::ExportImage { disk, id }),
                [EXPORT_RESULT_FILE] => Ok(ObjectKey::ExportResult { disk, id }),
                [EXPORT_PLAN_FILE] => Ok(ObjectKey::ExportPlan { disk, id }),
                [EXPORT_RANGE_DIR, file] => {
                    let range = file
                        .strip_suffix(".json")
                        .filter(|r| r.len() == 5)
                        .ok_or_else(|| KeyError::WrongShape { key: short() })?;
                    Ok(ObjectKey::ExportRange {
                        disk,
                        id,
                        range: parse_small(key, "range", range)?,
                    })
                }
                _ => Err(KeyError::WrongShape { key: short() }),
            };
        }
        match tail {
            [MANIFEST_FILE] => {
                let generation = parse_generation(key, gen)?;
                Ok(ObjectKey::Manifest { disk, generation })
            }
            ["d", off] => {
                let generation = parse_generation(key, gen)?;
                let offset = parse_digits(key, "offset", off)?;
                Ok(ObjectKey::Data {
                    disk,
                    generation,
                    offset,
                })
            }
            _ => Err(KeyError::WrongShape { key: short() }),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_key(&Prefix::default()))
    }
}

/// `{prefix}/{site}/{vm}/{disk}/`: every key of one disk starts with this.
pub fn disk_prefix(prefix: &Prefix, disk: &DiskId) -> String {
    format!(
        "{}{}/{}/{}/",
        prefix.key_start(),
        disk.site,
        disk.vm,
        disk.disk
    )
}

/// `{prefix}/{site}/{vm}/{disk}/g/`: list under this to find a disk's generations.
pub fn generation_prefix(prefix: &Prefix, disk: &DiskId) -> String {
    format!("{}g/", disk_prefix(prefix, disk))
}

/// `{prefix}/{site}/{vm}/{disk}/x/`: a disk's exports.
pub fn export_prefix(prefix: &Prefix, disk: &DiskId) -> String {
    format!("{}x/", disk_prefix(prefix, disk))
}

/// `{prefix}/{site}/{vm}/{disk}/r/`: snapshots mode's documents of the disk.
pub fn replica_prefix(prefix: &Prefix, disk: &DiskId) -> String {
    format!("{}r/", disk_prefix(prefix, disk))
}

/// `.../r/{generation:020}/`: the shards written for one generation's point.
pub fn replica_generation_prefix(prefix: &Prefix, disk: &DiskId, generation: u64) -> String {
    format!("{}{generation:020}/", replica_prefix(prefix, disk))
}

/// `.../g/{generation:020}/`: list under this to find one generation's objects.
pub fn one_generation_prefix(prefix: &Prefix, disk: &DiskId, generation: u64) -> String {
    format!("{}{:020}/", generation_prefix(prefix, disk), generation)
}

fn short(key: &str) -> String {
    key.chars().take(200).collect()
}

fn parse_generation(key: &str, text: &str) -> Result<u64, KeyError> {
    let g = parse_digits(key, "generation", text)?;
    if g == 0 {
        return Err(KeyError::GenerationZero { key: short(key) });
    }
    Ok(g)
}

fn parse_digits(key: &str, field: &'static str, text: &str) -> Result<u64, KeyError> {
    if text.len() != DIGITS || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(KeyError::BadDigits {
            key: short(key),
            field,
            text: short(text),
        });
    }
    text.parse::<u64>().map_err(|_| KeyError::Overflow {
        key: short(key),
        field,
        text: text.to_string(),
    })
}

/// A fixed-width decimal of a replica shard's name (5 or 6 digits: fits a u32).
fn parse_small(key: &str, field: &'static str, text: &str) -> Result<u32, KeyError> {
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(KeyError::BadDigits {
            key: short(key),
            field,
            text: short(text),
        });
    }
    text.parse::<u32>().map_err(|_| KeyError::Overflow {
        key: short(key),
        field,
        text: text.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Prefix {
        Prefix::new(s).unwrap()
    }

    fn disk() -> DiskId {
        DiskId::new("site1", "vm-a", "disk0").unwrap()
    }

    #[test]
    fn failback_keys_round_trip_and_reject_bad_run_ids() {
        let run = Name::new("dr-20261204t230000-ab12cd34").unwrap();
        for k in [
            ObjectKey::FailbackReturn {
                disk: disk(),
                run: run.clone(),
            },
            ObjectKey::FailbackRound {
                disk: disk(),
                run: run.clone(),
            },
        ] {
            let s = k.to_key(&p("dr"));
            assert!(
                s.starts_with("dr/site1/vm-a/disk0/b/dr-20261204t230000-ab12cd34/"),
                "{s}"
            );
            assert_eq!(ObjectKey::parse(&p("dr"), &s).unwrap(), k);
            assert_eq!(k.generation(), None);
        }
        for bad in [
            "dr/site1/vm-a/disk0/b/../return.json",
            "dr/site1/vm-a/disk0/b/run/other.json",
            "dr/site1/vm-a/disk0/b/return.json",
            "dr/site1/vm-a/disk0/b/run/round.json/x",
        ] {
            assert!(ObjectKey::parse(&p("dr"), bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn export_keys_round_trip_and_reject_bad_ids() {
        let id = Name::new("run-1.disk0").unwrap();
        for k in [
            ObjectKey::ExportRequest {
                disk: disk(),
                id: id.clone(),
            },
            ObjectKey::ExportImage {
                disk: disk(),
                id: id.clone(),
            },
            ObjectKey::ExportResult {
                disk: disk(),
                id: id.clone(),
            },
            ObjectKey::ExportPlan {
                disk: disk(),
                id: id.clone(),
            },
            ObjectKey::ExportRange {
                disk: disk(),
                id: id.clone(),
                range: 12,
            },
        ] {
            let s = k.to_key(&p("dr"));
            assert!(s.starts_with("dr/site1/vm-a/disk0/x/run-1.disk0/"), "{s}");
            assert_eq!(ObjectKey::parse(&p("dr"), &s).unwrap(), k);
            assert_eq!(k.generation(), None);
        }
        for bad in [
            "dr/site1/vm-a/disk0/x/../request.json",
            "dr/site1/vm-a/disk0/x/a b/request.json",
            "dr/site1/vm-a/disk0/x/id/other.json",
            "dr/site1/vm-a/disk0/x/id/d/00000000000000000000",
            "dr/site1/vm-a/disk0/x/request.json",
            "dr/site1/vm-a/disk0/x/id/p/12.json",
            "dr/site1/vm-a/disk0/x/id/p/0001x.json",
            "dr/site1/vm-a/disk0/x/id/p/00001",
            "dr/site1/vm-a/disk0/x/id/p/99999.json/x",
        ] {
            assert!(ObjectKey::parse(&p("dr"), bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn builds_the_documented_layout() {
        let k = ObjectKey::Data {
            disk: disk(),
            generation: 3,
            offset: 1048576,
        };
        assert_eq!(
            k.to_key(&p("dr")),
            "dr/site1/vm-a/disk0/g/00000000000000000003/d/00000000000001048576"
        );
        let m = ObjectKey::Manifest {
            disk: disk(),
            generation: 3,
        };
        assert_eq!(
            m.to_key(&p("")),
            "site1/vm-a/disk0/g/00000000000000000003/manifest.json"
        );
    }

    #[test]
    fn rejects_everything_else() {
        let pre = p("dr");
        let good = "dr/site1/vm-a/disk0/g/00000000000000000003/d/00000000000001048576";
        assert!(ObjectKey::parse(&pre, good).is_ok());
        let bad = [
            (
                "other/site1/vm-a/disk0/g/00000000000000000003/manifest.json",
                "prefix",
            ),
            (
                "drx/site1/vm-a/disk0/g/00000000000000000003/manifest.json",
                "prefix",
            ),
            (
                "dr/site1/../disk0/g/00000000000000000003/manifest.json",
                "traversal",
            ),
            (
                "dr/site1/vm-a/./g/00000000000000000003/manifest.json",
                "dot",
            ),
            (
                "dr/site1//disk0/g/00000000000000000003/manifest.json",
                "empty",
            ),
            ("dr/site1/vm-a/disk0/g/3/manifest.json", "padding"),
            (
                "dr/site1/vm-a/disk0/g/000000000000000000003/manifest.json",
                "padding",
            ),
            (
                "dr/site1/vm-a/disk0/g/0000000000000000000x/manifest.json",
                "digits",
            ),
            (
                "dr/site1/vm-a/disk0/g/+0000000000000000003/manifest.json",
                "sign",
            ),
            (
                "dr/site1/vm-a/disk0/g/99999999999999999999/manifest.json",
                "overflow",
            ),
            (
                "dr/site1/vm-a/disk0/g/00000000000000000000/manifest.json",
                "gen0",
            ),
            (
                "dr/site1/vm-a/disk0/g/00000000000000000003/manifest.json/",
                "trailing",
            ),
            ("dr/site1/vm-a/disk0/g/00000000000000000003/d/", "no offset"),
            (
                "dr/site1/vm-a/disk0/g/00000000000000000003/d/1",
                "offset padding",
            ),
            (
                "dr/site1/vm-a/disk0/g/00000000000000000003/x/00000000000001048576",
                "kind",
            ),
            (
                "dr/site1/vm-a/disk0/g/00000000000000000003/manifest.JSON",
                "case",
            ),
            (
                "dr/site1/vm-a/disk0/h/00000000000000000003/manifest.json",
                "g",
            ),
            ("dr/site1/vm-a/disk0", "short"),
            ("", "empty"),
        ];
        for (key, why) in bad {
            assert!(ObjectKey::parse(&pre, key).is_err(), "{why}: {key}");
        }
        let long = format!("dr/{}", "a/".repeat(600));
        assert!(matches!(
            ObjectKey::parse(&pre, &long),
            Err(KeyError::TooLong { .. })
        ));
    }

    #[test]
    fn replica_keys_round_trip_and_reject_near_misses() {
        let pre = p("dr");
        let head = ObjectKey::ReplicaHead { disk: disk() };
        assert_eq!(head.to_key(&pre), "dr/site1/vm-a/disk0/r/head.json");
        assert_eq!(ObjectKey::parse(&pre, &head.to_key(&pre)).unwrap(), head);
        let shard = ObjectKey::ReplicaShard {
            disk: disk(),
            generation: 7,
            attempt: 2,
            shard: 31,
        };
        let k = shard.to_key(&pre);
        assert_eq!(
            k,
            "dr/site1/vm-a/disk0/r/00000000000000000007/00002-000031.json"
        );
        assert_eq!(ObjectKey::parse(&pre, &k).unwrap(), shard);
        for bad in [
            "dr/site1/vm-a/disk0/r/head.json/x",
            "dr/site1/vm-a/disk0/r/heads.json",
            "dr/site1/vm-a/disk0/r/00000000000000000007/2-31.json",
            "dr/site1/vm-a/disk0/r/00000000000000000007/00002-000031",
            "dr/site1/vm-a/disk0/r/00000000000000000007/0000a-000031.json",
            "dr/site1/vm-a/disk0/r/00000000000000000000/00002-000031.json",
            "dr/site1/vm-a/disk0/r/7/00002-000031.json",
        ] {
            assert!(ObjectKey::parse(&pre, bad).is_err(), "{bad}");
        }
    }

    fn name_strategy() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,40}".prop_filter("not dots", |s| s != "." && s != "..")
    }

    proptest! {
        #[test]
        fn round_trip(site in name_strategy(), vm in name_strategy(), d in name_strategy(),
                      pre in proptest::collection::vec(name_strategy(), 0..3),
                      generation in 1u64.., offset: u64, manifest: bool) {
            let prefix = Prefix::new(&pre.join("/")).unwrap();
            let disk = DiskId::new(&site, &vm, &d).unwrap();
            let k = if manifest {
                ObjectKey::Manifest { disk, generation }
            } else {
                ObjectKey::Data { disk, generation, offset }
            };
            let s = k.to_key(&prefix);
            prop_assert_eq!(ObjectKey::parse(&prefix, &s).unwrap(), k);
        }

        #[test]
        fn arbitrary_keys_never_panic(s in ".{0,300}") {
            let _ = ObjectKey::parse(&Prefix::default(), &s);
            let _ = ObjectKey::parse(&Prefix::new("dr").unwrap(), &s);
        }

        #[test]
        fn mutated_keys_reparse_to_the_same_text(key in "[a-z0-9/._-]{0,120}") {
            // Whatever parses must print back to exactly the input: one key, one meaning.
            let prefix = Prefix::default();
            if let Ok(k) = ObjectKey::parse(&prefix, &key) {
                prop_assert_eq!(k.to_key(&prefix), key);
            }
        }
    }
}
