//! S3 event notifications as delivered to SQS, parsed tolerantly.
//!
//! Accepts real S3 events and the emulator's: missing `sequencer`, `userIdentity` and
//! `requestParameters`, `eventTime` with or without a time zone, keys URL-encoded with
//! `+` for space and `%2F` for `/`. Recognises `s3:TestEvent`. Everything else is a typed
//! [`EventError`]; nothing here panics on any input.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;

/// SQS bodies are at most 256 KiB; anything far larger is not an S3 event.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// A parsed notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum S3Notification {
    /// Sent by S3 when a notification configuration is set: nothing to do.
    Test { bucket: Option<String> },
    /// One or more object events.
    Records(Vec<S3Record>),
}

/// One object event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Record {
    /// e.g. `ObjectCreated:Put`, `ObjectCreated:CompleteMultipartUpload`.
    pub event_name: String,
    pub bucket: String,
    /// The object key, URL-decoded.
    pub key: String,
    pub size: Option<u64>,
    pub etag: Option<String>,
    pub sequencer: Option<String>,
    pub event_time: Option<DateTime<Utc>>,
}

impl S3Record {
    pub fn is_object_created(&self) -> bool {
        self.event_name.starts_with("ObjectCreated:")
    }
}

/// Why a message is not a usable S3 notification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("event is {0} bytes, more than {MAX_EVENT_BYTES}: not an S3 notification")]
    TooLarge(usize),
    #[error("event is not JSON: {0}")]
    NotJson(String),
    #[error("event JSON is neither S3 records nor an s3:TestEvent: {0}")]
    NotS3(String),
    #[error("event record {index} comes from {source_name:?}, not aws:s3")]
    WrongSource { index: usize, source_name: String },
    #[error("event has an empty Records list")]
    NoRecords,
    #[error("event record {index}: key {key:?} is not valid URL encoding of UTF-8")]
    BadKeyEncoding { index: usize, key: String },
    #[error("event record {index}: eventTime {time:?} is not an ISO 8601 time")]
    BadTime { index: usize, time: String },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Wire {
    Records {
        #[serde(rename = "Records")]
        records: Vec<WireRecord>,
    },
    Test {
        #[serde(rename = "Event")]
        event: String,
        #[serde(rename = "Bucket")]
        bucket: Option<String>,
    },
}

#[derive(Deserialize)]
struct WireRecord {
    #[serde(rename = "eventSource")]
    event_source: Option<String>,
    #[serde(rename = "eventName")]
    event_name: String,
    #[serde(rename = "eventTime")]
    event_time: Option<String>,
    s3: WireS3,
}

#[derive(Deserialize)]
struct WireS3 {
    bucket: WireBucket,
    object: WireObject,
}

#[derive(Deserialize)]
struct WireBucket {
    name: String,
}

#[derive(Deserialize)]
struct WireObject {
    key: String,
    size: Option<u64>,
    #[serde(rename = "eTag")]
    etag: Option<String>,
    sequencer: Option<String>,
}

/// Parses an SQS message body carrying an S3 notification.
pub fn parse_notification(body: &[u8]) -> Result<S3Notification, EventError> {
    if body.len() > MAX_EVENT_BYTES {
        return Err(EventError::TooLarge(body.len()));
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| EventError::NotJson(e.to_string()))?;
    let wire: Wire = serde_json::from_value(value).map_err(|e| EventError::NotS3(e.to_string()))?;
    match wire {
        Wire::Test { event, bucket } if event == "s3:TestEvent" => {
            Ok(S3Notification::Test { bucket })
        }
        Wire::Test { event, .. } => Err(EventError::NotS3(format!(
            "unknown Event {:?}",
            event.chars().take(80).collect::<String>()
        ))),
        Wire::Records { records } => {
            if records.is_empty() {
                return Err(EventError::NoRecords);
            }
            records
                .into_iter()
                .enumerate()
                .map(|(index, r)| record(index, r))
                .collect::<Result<Vec<_>, _>>()
                .map(S3Notification::Records)
        }
    }
}

fn record(index: usize, r: WireRecord) -> Result<S3Record, EventError> {
    if let Some(src) = &r.event_source {
        if src != "aws:s3" {
            return Err(EventError::WrongSource {
                index,
                source_name: src.chars().take(80).collect(),
            });
        }
    }
    let key = decode_key(&r.s3.object.key).ok_or_else(|| EventError::BadKeyEncoding {
        index,
        key: r.s3.object.key.chars().take(200).collect(),
    })?;
    let event_time = match r.event_time {
        None => None,
        Some(t) => Some(parse_time(&t).ok_or(EventError::BadTime {
            index,
            time: t.chars().take(80).collect(),
        })?),
    };
    Ok(S3Record {
        event_name: r.event_name,
        bucket: r.s3.bucket.name,
        key,
        size: r.s3.object.size,
        etag: r.s3.object.etag,
        sequencer: r.s3.object.sequencer,
        event_time,
    })
}

/// Decodes an S3 event key: `+` is a space, `%XX` a byte; the result must be UTF-8.
pub fn decode_key(encoded: &str) -> Option<String> {
    let spaced = encoded.replace('+', " ");
    // A '%' must be followed by two hex digits: percent_decode would pass it through.
    let b = spaced.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b'%'
            && !(i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit())
        {
            return None;
        }
    }
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// RFC 3339, or the emulator's form without a time zone (taken as UTC).
fn parse_time(t: &str) -> Option<DateTime<Utc>> {
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Some(dt.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|n| n.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Shaped after the S3 documentation's example event.
    const REAL: &str = r#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3","awsRegion":"us-west-2",
      "eventTime":"1970-01-01T00:00:00.000Z","eventName":"ObjectCreated:Put",
      "userIdentity":{"principalId":"AIDAJDPLRKLG7UEXAMPLE"},
      "requestParameters":{"sourceIPAddress":"127.0.0.1"},
      "responseElements":{"x-amz-request-id":"C3D13FE58DE4C810","x-amz-id-2":"FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"},
      "s3":{"s3SchemaVersion":"1.0","configurationId":"testRule",
        "bucket":{"name":"amzn-s3-demo-bucket","ownerIdentity":{"principalId":"A3NL1KOZZKExample"},"arn":"arn:aws:s3:::amzn-s3-demo-bucket"},
        "object":{"key":"dr/s/v/d/g/00000000000000000001/manifest.json","size":1024,"eTag":"d41d8cd98f00b204e9800998ecf8427e","versionId":"096fKKXTRTtl3on89fVO.nfljtsv6qko","sequencer":"0055AED6DCD90281E5"}}}]}"#;

    // As the emulator (moto 5.2) sends it: no sequencer/userIdentity, no time zone,
    // '/' as %2F and space as '+'.
    const EMULATOR: &str = r#"{"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventTime": "2026-11-23T11:31:26.746", "eventName": "ObjectCreated:Put", "s3": {"s3SchemaVersion": "1.0", "configurationId": "pilotlight", "bucket": {"name": "pilotlight-demo", "arn": "arn:aws:s3:::pilotlight-demo"}, "object": {"key": "dr%2Fa+b%2Bc%2Fx+y%2Fg%2F0001%2Fmanifest.json", "size": 3, "eTag": "764efa883dda1e11db47671c4a3bbd9e"}}}]}"#;

    const TEST_EVENT: &str = r#"{"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-11-23T11:31:25.981Z", "Bucket": "pilotlight-demo"}"#;

    #[test]
    fn real_s3_event() {
        let S3Notification::Records(r) = parse_notification(REAL.as_bytes()).unwrap() else {
            panic!("expected records")
        };
        assert_eq!(r[0].key, "dr/s/v/d/g/00000000000000000001/manifest.json");
        assert_eq!(r[0].bucket, "amzn-s3-demo-bucket");
        assert_eq!(r[0].sequencer.as_deref(), Some("0055AED6DCD90281E5"));
        assert!(r[0].is_object_created());
        assert_eq!(r[0].event_time.unwrap().timestamp(), 0);
    }

    #[test]
    fn emulator_event() {
        let S3Notification::Records(r) = parse_notification(EMULATOR.as_bytes()).unwrap() else {
            panic!("expected records")
        };
        assert_eq!(r[0].key, "dr/a b+c/x y/g/0001/manifest.json");
        assert_eq!(r[0].size, Some(3));
        assert_eq!(r[0].sequencer, None);
        assert!(r[0].event_time.is_some());
    }

    #[test]
    fn test_event() {
        assert_eq!(
            parse_notification(TEST_EVENT.as_bytes()).unwrap(),
            S3Notification::Test {
                bucket: Some("pilotlight-demo".into())
            }
        );
    }

    #[test]
    fn rejections() {
        type Check = fn(&EventError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, EventError::NotJson(_))),
            ("{not json", |e| matches!(e, EventError::NotJson(_))),
            ("[]", |e| matches!(e, EventError::NotS3(_))),
            (r#"{"hello":1}"#, |e| matches!(e, EventError::NotS3(_))),
            (r#"{"Records":[]}"#, |e| matches!(e, EventError::NoRecords)),
            (r#"{"Event":"s3:Other"}"#, |e| {
                matches!(e, EventError::NotS3(_))
            }),
            (r#"{"Records":[{"eventName":"x"}]}"#, |e| {
                matches!(e, EventError::NotS3(_))
            }),
            (
                r#"{"Records":[{"eventSource":"aws:sqs","eventName":"x","s3":{"bucket":{"name":"b"},"object":{"key":"k"}}}]}"#,
                |e| matches!(e, EventError::WrongSource { .. }),
            ),
            (
                r#"{"Records":[{"eventName":"x","s3":{"bucket":{"name":"b"},"object":{"key":"%ZZ"}}}]}"#,
                |e| matches!(e, EventError::BadKeyEncoding { .. }),
            ),
            (
                r#"{"Records":[{"eventName":"x","s3":{"bucket":{"name":"b"},"object":{"key":"%FF"}}}]}"#,
                |e| matches!(e, EventError::BadKeyEncoding { .. }),
            ),
            (
                r#"{"Records":[{"eventName":"x","s3":{"bucket":{"name":"b"},"object":{"key":"a%"}}}]}"#,
                |e| matches!(e, EventError::BadKeyEncoding { .. }),
            ),
            (
                r#"{"Records":[{"eventName":"x","eventTime":"yesterday","s3":{"bucket":{"name":"b"},"object":{"key":"k"}}}]}"#,
                |e| matches!(e, EventError::BadTime { .. }),
            ),
        ];
        for (body, ok) in cases {
            let err = parse_notification(body.as_bytes()).expect_err(body);
            assert!(ok(&err), "{body}: {err}");
        }
        let huge = vec![b' '; MAX_EVENT_BYTES + 1];
        assert!(matches!(
            parse_notification(&huge),
            Err(EventError::TooLarge(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_notification(&bytes);
        }

        #[test]
        fn arbitrary_keys_never_panic(key in ".{0,80}") {
            let _ = decode_key(&key);
        }

        #[test]
        fn encoded_keys_round_trip(key in "[A-Za-z0-9._/ +-]{0,80}") {
            let enc = percent_encoding::utf8_percent_encode(&key, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
            prop_assert_eq!(decode_key(&enc), Some(key));
        }
    }
}
