//! Validated names: the parts of a disk id and of a key prefix.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// Longest allowed name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Longest allowed key prefix, in bytes.
pub const MAX_PREFIX_LEN: usize = 512;

/// Why a name or prefix was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name {0:?} is longer than {MAX_NAME_LEN} bytes")]
    TooLong(String),
    #[error("name {0:?} is '.' or '..', which could escape a directory")]
    Dots(String),
    #[error("name {name:?} has character {ch:?}; allowed: A-Z a-z 0-9 . _ -")]
    BadChar { name: String, ch: char },
    #[error("prefix {0:?} is longer than {MAX_PREFIX_LEN} bytes")]
    PrefixTooLong(String),
    #[error("prefix {prefix:?}: {source}")]
    BadPrefixPart {
        prefix: String,
        source: Box<NameError>,
    },
}

/// One name: `[A-Za-z0-9._-]{1,128}`, never `.` or `..`. Safe as a key segment and as a
/// file name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    pub fn new(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(truncate(s)));
        }
        if s == "." || s == ".." {
            return Err(NameError::Dots(s.to_string()));
        }
        if let Some(ch) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::BadChar {
                name: truncate(s),
                ch,
            });
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn truncate(s: &str) -> String {
    // Error messages quote untrusted input: keep them short.
    s.chars().take(160).collect()
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::new(s)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::new(&s).map_err(serde::de::Error::custom)
    }
}

/// One protected disk: `site/vm/disk`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskId {
    pub site: Name,
    pub vm: Name,
    pub disk: Name,
}

impl DiskId {
    pub fn new(site: &str, vm: &str, disk: &str) -> Result<Self, NameError> {
        Ok(Self {
            site: Name::new(site)?,
            vm: Name::new(vm)?,
            disk: Name::new(disk)?,
        })
    }

    /// Parses `site/vm/disk`.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let mut parts = s.split('/');
        let (Some(site), Some(vm), Some(disk), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(NameError::BadChar {
                name: truncate(s),
                ch: '/',
            });
        };
        Self::new(site, vm, disk)
    }
}

impl fmt::Display for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.site, self.vm, self.disk)
    }
}

/// A key prefix: zero or more names joined by `/`, no leading or trailing slash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(transparent)]
pub struct Prefix(String);

impl Prefix {
    /// Accepts `a/b/c`, tolerating one leading and trailing slash (`/a/b/`).
    pub fn new(s: &str) -> Result<Self, NameError> {
        let trimmed = s.strip_prefix('/').unwrap_or(s);
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        if trimmed.len() > MAX_PREFIX_LEN {
            return Err(NameError::PrefixTooLong(truncate(s)));
        }
        if !trimmed.is_empty() {
            for part in trimmed.split('/') {
                Name::new(part).map_err(|e| NameError::BadPrefixPart {
                    prefix: truncate(s),
                    source: Box::new(e),
                })?;
            }
        }
        Ok(Self(trimmed.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `prefix/` or the empty string: what every key under this prefix starts with.
    pub fn key_start(&self) -> String {
        if self.0.is_empty() {
            String::new()
        } else {
            format!("{}/", self.0)
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Prefix::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_and_reject() {
        assert!(Name::new("vm-01.prod_a").is_ok());
        assert_eq!(Name::new(""), Err(NameError::Empty));
        assert!(matches!(Name::new(".."), Err(NameError::Dots(_))));
        assert!(matches!(Name::new("."), Err(NameError::Dots(_))));
        assert!(matches!(Name::new("a/b"), Err(NameError::BadChar { .. })));
        assert!(matches!(Name::new("a b"), Err(NameError::BadChar { .. })));
        assert!(matches!(Name::new("é"), Err(NameError::BadChar { .. })));
        assert!(Name::new(&"a".repeat(128)).is_ok());
        assert!(matches!(
            Name::new(&"a".repeat(129)),
            Err(NameError::TooLong(_))
        ));
        assert!("...".parse::<Name>().is_ok(), "three dots is a plain name");
    }

    #[test]
    fn prefixes() {
        assert_eq!(Prefix::new("").unwrap().key_start(), "");
        assert_eq!(Prefix::new("/dr/x/").unwrap().as_str(), "dr/x");
        assert_eq!(Prefix::new("dr").unwrap().key_start(), "dr/");
        assert!(Prefix::new("dr//x").is_err());
        assert!(Prefix::new("dr/../x").is_err());
        assert!(Prefix::new(&"a/".repeat(300)).is_err());
    }

    #[test]
    fn disk_id_parse() {
        let d = DiskId::parse("site1/vm1/disk0").unwrap();
        assert_eq!(d.to_string(), "site1/vm1/disk0");
        assert!(DiskId::parse("site1/vm1").is_err());
        assert!(DiskId::parse("site1/vm1/disk0/x").is_err());
        assert!(DiskId::parse("site1/../disk0").is_err());
    }

    #[test]
    fn deserialize_validates() {
        assert!(serde_json::from_str::<Name>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<Name>("\"..\"").is_err());
        assert!(serde_json::from_str::<DiskId>(r#"{"site":"a","vm":"b","disk":"c/d"}"#).is_err());
    }
}
