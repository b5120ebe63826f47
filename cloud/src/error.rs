//! One error type for every AWS call, with the one distinction callers act on: is it
//! worth trying again later (throttling, 5xx, timeouts, no connection), or must someone
//! fix something (missing object, access denied, a refused precondition, bad input)?

use std::fmt;

/// What kind of failure, as a caller decides on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The object, upload, message or resource does not exist (S3 `NoSuchKey`, 404).
    NotFound,
    /// The bucket does not exist (S3 `NoSuchBucket`).
    NoSuchBucket,
    /// The caller may not (403, `AccessDenied`, `UnauthorizedOperation`). Note: S3 answers
    /// 403, not 404, for a missing key to a caller without `s3:ListBucket`.
    AccessDenied,
    /// A conditional request was refused (412 `PreconditionFailed`): the key exists
    /// (`If-None-Match: *`) or changed (`If-Match`).
    PreconditionFailed,
    /// An object is larger than the caller allows.
    TooLarge,
    /// The service asks the caller to slow down (`SlowDown`, `Throttling`,
    /// `RequestLimitExceeded`, 429, 503).
    Throttled,
    /// No answer: connection refused or reset, timeout, a broken response.
    Unreachable,
    /// The service failed (5xx, `InternalError`) or a conditional write raced (409
    /// `ConditionalRequestConflict`, which S3 says to retry).
    ServerError,
    /// The request itself is wrong (another 4xx): retrying it unchanged cannot help.
    Invalid,
}

impl ErrorKind {
    /// True when the same call may succeed later without anyone changing anything.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorKind::Throttled | ErrorKind::Unreachable | ErrorKind::ServerError
        )
    }

    fn what(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::NoSuchBucket => "the bucket does not exist",
            ErrorKind::AccessDenied => "access denied",
            ErrorKind::PreconditionFailed => "precondition failed",
            ErrorKind::TooLarge => "too large",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Unreachable => "cannot reach the endpoint",
            ErrorKind::ServerError => "service error",
            ErrorKind::Invalid => "request refused",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            ErrorKind::NoSuchBucket => "; create it, or check the bucket name and region",
            ErrorKind::AccessDenied => {
                "; check the role's IAM policy (and the bucket or key policy) allows this call"
            }
            ErrorKind::Unreachable => "; check the endpoint URL, the region and the network",
            ErrorKind::Throttled | ErrorKind::ServerError => "; it is retried",
            _ => "",
        }
    }
}

/// A failed AWS call: which service and operation, on what, why, and the service's own
/// error code when it gave one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct CloudError {
    /// `S3`, `SQS`, `EC2`.
    pub service: &'static str,
    /// The API operation (`GetObject`, `ReceiveMessage`, ...).
    pub op: &'static str,
    /// What it acted on: `s3://bucket/key`, a queue URL, a snapshot id.
    pub resource: String,
    pub kind: ErrorKind,
    /// The service's error code (`NoSuchKey`, `InvalidSubnetID.NotFound`, ...).
    pub code: Option<String>,
    /// One line of detail (the SDK's error context, or the in-memory twin's reason).
    pub detail: String,
}

impl fmt::Display for CloudError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}: {}",
            self.service,
            self.op,
            self.resource,
            self.kind.what()
        )?;
        match (&self.code, self.detail.is_empty()) {
            (Some(c), false) if !self.detail.contains(c.as_str()) => {
                write!(f, " ({c}: {})", self.detail)?
            }
            (_, false) => write!(f, " ({})", self.detail)?,
            (Some(c), true) => write!(f, " ({c})")?,
            (None, true) => {}
        }
        f.write_str(self.kind.hint())
    }
}

impl CloudError {
    pub fn new(
        service: &'static str,
        op: &'static str,
        resource: impl Into<String>,
        kind: ErrorKind,
        detail: impl Into<String>,
    ) -> Self {
        CloudError {
            service,
            op,
            resource: resource.into(),
            kind,
            code: None,
            detail: detail.into(),
        }
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }

    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }

    /// A snapshot the service says does not exist: `ResourceNotFoundException`,
    /// `InvalidSnapshot.NotFound`, or the EBS direct APIs' `ValidationException` with
    /// reason `INVALID_SNAPSHOT_ID` ("The snapshot '...' does not exist"). Just after
    /// StartSnapshot or CompleteSnapshot this is eventual consistency, not absence
    /// (awslabs/coldsnap issue 43: the EBS team recommends retrying for about 2 minutes).
    pub fn is_snapshot_not_visible(&self) -> bool {
        self.is_not_found()
            || (self.code.as_deref() == Some("ValidationException")
                && (self.detail.contains("INVALID_SNAPSHOT_ID")
                    || self.detail.contains("does not exist")))
    }
}

/// Classifies an SDK error code and HTTP status (either may be missing).
pub fn kind_of(code: Option<&str>, status: Option<u16>) -> ErrorKind {
    match code {
        Some(
            "NoSuchKey"
            | "NotFound"
            | "ResourceNotFoundException"
            | "NoSuchUpload"
            | "AWS.SimpleQueueService.NonExistentQueue"
            | "QueueDoesNotExist",
        ) => return ErrorKind::NotFound,
        Some(c) if c.ends_with(".NotFound") => return ErrorKind::NotFound,
        Some("NoSuchBucket") => return ErrorKind::NoSuchBucket,
        Some(
            "AccessDenied"
            | "AccessDeniedException"
            | "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "UnauthorizedOperation"
            | "ExpiredToken"
            | "InvalidClientTokenId"
            | "AuthFailure",
        ) => return ErrorKind::AccessDenied,
        Some("PreconditionFailed") => return ErrorKind::PreconditionFailed,
        Some(
            "SlowDown"
            | "Throttling"
            | "ThrottlingException"
            | "ThrottledException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException"
            | "RequestThrottled"
            | "RequestThrottledException"
            | "ProvisionedThroughputExceededException"
            | "RequestTimeTooSkewed"
            | "RequestTimeout"
            | "RequestTimeoutException"
            // EBS direct APIs: too many requests in flight, or too many snapshots
            // pending in the account for now.
            | "ConcurrentLimitExceededException"
            | "ServiceQuotaExceededException",
        ) => return ErrorKind::Throttled,
        Some(
            "InternalError"
            | "InternalFailure"
            | "InternalServerError"
            | "InternalServerException"
            | "ServiceUnavailable"
            | "Unavailable"
            | "ConditionalRequestConflict"
            | "OperationAborted",
        ) => return ErrorKind::ServerError,
        _ => {}
    }
    match status {
        Some(404) => ErrorKind::NotFound,
        Some(403) => ErrorKind::AccessDenied,
        Some(412) => ErrorKind::PreconditionFailed,
        Some(429 | 503) => ErrorKind::Throttled,
        Some(409) => ErrorKind::ServerError,
        Some(s) if s >= 500 => ErrorKind::ServerError,
        _ => ErrorKind::Invalid,
    }
}

/// Turns an SDK error into a [`CloudError`] (every service's SDK error is this type).
pub fn from_sdk<E>(
    service: &'static str,
    op: &'static str,
    resource: impl Into<String>,
    e: &aws_smithy_runtime_api::client::result::SdkError<
        E,
        aws_smithy_runtime_api::client::orchestrator::HttpResponse,
    >,
) -> CloudError
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_smithy_runtime_api::client::result::SdkError;
    let detail = causes(e);
    let (kind, code) = match e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            (ErrorKind::Unreachable, None)
        }
        SdkError::ServiceError(se) => {
            let code = se.err().code().map(String::from);
            let status = se.raw().status().as_u16();
            (kind_of(code.as_deref(), Some(status)), code)
        }
        SdkError::ConstructionFailure(_) => (ErrorKind::Invalid, None),
        _ => (ErrorKind::Invalid, None),
    };
    CloudError {
        service,
        op,
        resource: resource.into(),
        kind,
        code,
        detail,
    }
}

/// An error and its sources by their Display only (no Debug dumps), each said once.
pub fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur = Some(e);
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.contains(&t) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&t);
        }
        cur = c.source();
    }
    one_line(&out)
}

/// Collapses whitespace: one error, one log line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(kind_of(Some("NoSuchKey"), Some(404)), ErrorKind::NotFound);
        assert_eq!(kind_of(None, Some(404)), ErrorKind::NotFound);
        assert_eq!(
            kind_of(Some("AccessDenied"), Some(403)),
            ErrorKind::AccessDenied
        );
        assert_eq!(kind_of(None, Some(403)), ErrorKind::AccessDenied);
        assert_eq!(kind_of(Some("SlowDown"), Some(503)), ErrorKind::Throttled);
        assert_eq!(
            kind_of(Some("RequestLimitExceeded"), Some(400)),
            ErrorKind::Throttled
        );
        assert_eq!(
            kind_of(Some("InternalError"), Some(500)),
            ErrorKind::ServerError
        );
        assert_eq!(kind_of(None, Some(502)), ErrorKind::ServerError);
        assert_eq!(
            kind_of(Some("PreconditionFailed"), Some(412)),
            ErrorKind::PreconditionFailed
        );
        assert_eq!(
            kind_of(Some("ConditionalRequestConflict"), Some(409)),
            ErrorKind::ServerError
        );
        assert_eq!(
            kind_of(Some("InvalidSubnetID.NotFound"), Some(400)),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind_of(Some("InvalidParameterValue"), Some(400)),
            ErrorKind::Invalid
        );
        assert!(ErrorKind::Throttled.is_transient());
        assert!(ErrorKind::Unreachable.is_transient());
        assert!(!ErrorKind::NotFound.is_transient());
        assert!(!ErrorKind::AccessDenied.is_transient());
        assert!(!ErrorKind::Invalid.is_transient());
    }

    #[test]
    fn message_names_each_cause_once() {
        let e = CloudError::new(
            "S3",
            "GetObject",
            "s3://b/k",
            ErrorKind::AccessDenied,
            "AccessDenied: Access Denied",
        )
        .with_code("AccessDenied");
        let s = e.to_string();
        assert_eq!(s.matches("AccessDenied").count(), 1, "{s}");
        assert!(s.starts_with("S3 GetObject s3://b/k: access denied"), "{s}");
        assert!(s.contains("IAM policy"), "{s}");
    }
}
