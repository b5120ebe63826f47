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
    /// No credentials: no source of the default chain gave any.
    NoCredentials,
    /// The credentials were refused: expired, or not valid for this account
    /// (`ExpiredToken`, `InvalidAccessKeyId`, `SignatureDoesNotMatch`, ...).
    BadCredentials,
    /// The bucket is in another region than the client's (S3 `PermanentRedirect`, 301,
    /// `AuthorizationHeaderMalformed` naming the expected region).
    WrongRegion,
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
            ErrorKind::NoCredentials => "no AWS credentials",
            ErrorKind::BadCredentials => "the credentials were refused",
            ErrorKind::WrongRegion => "the bucket is in another region",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            ErrorKind::NoSuchBucket => "; create it, or check the bucket name and region",
            // AccessDenied's advice names the action and resource: see `Display`.
            ErrorKind::Unreachable => "; check the endpoint URL, the region and the network",
            ErrorKind::NoCredentials => {
                "; none of the default chain's sources gave any: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials or ~/.aws/config (AWS_PROFILE; `aws configure`, or `aws sso login` for SSO), or run with an instance or task role"
            }
            ErrorKind::BadCredentials => {
                "; they are expired or not valid for this account: refresh them (`aws sso login`, new access keys or session token) and check this machine's clock"
            }
            ErrorKind::WrongRegion => "; set --region (AWS_REGION) to the bucket's region",
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
        if self.kind == ErrorKind::AccessDenied {
            let action = iam_action(self.service, self.op);
            return write!(
                f,
                "; the caller may not {action} on {}: the IAM policy of its role must allow it (infra/ grants each program what it calls: SenderPolicy to the sender, ReceiverRole and ReceiverPointsPolicy to the receiver, DrFunctionRole to the DR function), and the bucket or key policy must not deny it",
                if self.resource.is_empty() { "it" } else { &self.resource }
            );
        }
        f.write_str(self.kind.hint())
    }
}

/// The IAM action that authorises a call (Service Authorization Reference): mostly
/// `service:Operation`, with S3's exceptions: ListObjectsV2 "you must have permission to
/// perform the s3:ListBucket action" (its API reference), HEAD needs `s3:GetObject`, and
/// multipart parts are `s3:PutObject`.
pub fn iam_action(service: &str, op: &str) -> String {
    let prefix = match service {
        "S3" => "s3",
        "SQS" => "sqs",
        "EC2" => "ec2",
        "EBS" => "ebs",
        "SSM" => "ssm",
        "CloudWatch" => "cloudwatch",
        other => return format!("{}:{op}", other.to_ascii_lowercase()),
    };
    let op = match (prefix, op) {
        ("s3", "ListObjectsV2" | "ListObjects") => "ListBucket",
        ("s3", "HeadObject") => "GetObject",
        ("s3", "CreateMultipartUpload" | "UploadPart" | "CompleteMultipartUpload") => "PutObject",
        ("s3", "AbortMultipartUpload") => "AbortMultipartUpload",
        // DescribeSnapshots, DeleteSnapshot and tags are EC2's even when EBS asks.
        ("ebs", o @ ("DescribeSnapshots" | "DeleteSnapshot" | "CreateTags" | "DeleteTags")) => {
            return format!("ec2:{o}")
        }
        (_, o) => o,
    };
    format!("{prefix}:{op}")
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
        Some("AccessDenied" | "AccessDeniedException" | "UnauthorizedOperation") => {
            return ErrorKind::AccessDenied
        }
        // S3 User Guide, "Billing for Amazon S3 error responses" (its table of 3xx/4xx
        // codes): ExpiredToken "The provided token has expired"; PermanentRedirect (301)
        // "must be addressed using the specified endpoint"; IllegalLocationConstraint-
        // Exception: "accessing a bucket from a different Region than where the bucket
        // exists"; AuthorizationHeaderMalformed names the region S3 expected. EC2 answers
        // bad credentials with AuthFailure, STS-style services with InvalidClientTokenId
        // or UnrecognizedClientException.
        Some(
            "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "ExpiredToken"
            | "ExpiredTokenException"
            | "InvalidClientTokenId"
            | "UnrecognizedClientException"
            | "InvalidToken"
            | "AuthFailure",
        ) => return ErrorKind::BadCredentials,
        Some("PermanentRedirect" | "AuthorizationHeaderMalformed" | "IllegalLocationConstraintException") => {
            return ErrorKind::WrongRegion
        }
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
        Some(301) => ErrorKind::WrongRegion,
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
    let mut detail = causes(e);
    let (kind, code) = match e {
        // Before anything else: a client without credentials fails before it sends, and
        // the SDK reports that as a dispatch failure, which would read as the network.
        _ if is_credentials_error(e) => (ErrorKind::NoCredentials, None),
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            (ErrorKind::Unreachable, None)
        }
        SdkError::ServiceError(se) => {
            let code = se.err().code().map(String::from);
            let status = se.raw().status().as_u16();
            let kind = kind_of(code.as_deref(), Some(status));
            // S3 names the bucket's region in a header of its redirect.
            if let (ErrorKind::WrongRegion, Some(region)) =
                (kind, se.raw().headers().get("x-amz-bucket-region"))
            {
                detail = format!("the bucket is in {region}; {detail}");
            }
            (kind, code)
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

/// Whether an error or one of its sources is the credential chain failing to produce
/// credentials (`CredentialsError`, whatever wraps it).
fn is_credentials_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.downcast_ref::<aws_credential_types::provider::error::CredentialsError>()
            .is_some()
        {
            return true;
        }
        cur = c.source();
    }
    false
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

    #[test]
    fn credentials_and_region_failures_are_their_own_kinds() {
        for code in [
            "ExpiredToken",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "InvalidClientTokenId",
            "AuthFailure",
        ] {
            assert_eq!(
                kind_of(Some(code), Some(403)),
                ErrorKind::BadCredentials,
                "{code}"
            );
        }
        assert_eq!(
            kind_of(Some("PermanentRedirect"), Some(301)),
            ErrorKind::WrongRegion
        );
        assert_eq!(kind_of(None, Some(301)), ErrorKind::WrongRegion);
        assert_eq!(
            kind_of(Some("AuthorizationHeaderMalformed"), Some(400)),
            ErrorKind::WrongRegion
        );
        for k in [
            ErrorKind::NoCredentials,
            ErrorKind::BadCredentials,
            ErrorKind::WrongRegion,
        ] {
            assert!(!k.is_transient(), "{k:?}");
        }
        let e = CloudError::new(
            "S3",
            "ListObjectsV2",
            "s3://b/p/",
            ErrorKind::NoCredentials,
            "",
        );
        let s = e.to_string();
        assert!(
            s.contains("no AWS credentials") && s.contains("AWS_PROFILE"),
            "{s}"
        );
        assert!(!s.contains("network"), "{s}");
        let s = CloudError::new("S3", "GetObject", "s3://b/k", ErrorKind::BadCredentials, "")
            .to_string();
        assert!(s.contains("expired"), "{s}");
        let s =
            CloudError::new("S3", "GetObject", "s3://b/k", ErrorKind::WrongRegion, "").to_string();
        assert!(s.contains("--region"), "{s}");
    }

    #[test]
    fn access_denied_names_the_action_and_the_policies_that_grant_it() {
        let s = CloudError::new(
            "S3",
            "ListObjectsV2",
            "s3://b/dr/",
            ErrorKind::AccessDenied,
            "",
        )
        .to_string();
        assert!(s.contains("may not s3:ListBucket on s3://b/dr/"), "{s}");
        assert!(
            s.contains("SenderPolicy") && s.contains("DrFunctionRole"),
            "{s}"
        );
        assert_eq!(iam_action("S3", "HeadObject"), "s3:GetObject");
        assert_eq!(iam_action("S3", "UploadPart"), "s3:PutObject");
        assert_eq!(iam_action("EBS", "StartSnapshot"), "ebs:StartSnapshot");
        assert_eq!(
            iam_action("EBS", "DescribeSnapshots"),
            "ec2:DescribeSnapshots"
        );
        assert_eq!(iam_action("SQS", "ReceiveMessage"), "sqs:ReceiveMessage");
    }

    /// A client whose credential chain gives nothing: the SDK fails before sending, and
    /// that is "no credentials", not the network (the SDK reports it as a dispatch
    /// failure).
    #[cfg(feature = "s3")]
    #[test]
    fn a_client_without_credentials_says_so() {
        use aws_credential_types::provider::error::CredentialsError;
        use aws_credential_types::provider::{future, ProvideCredentials};
        #[derive(Debug)]
        struct Nothing;
        impl ProvideCredentials for Nothing {
            fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
            where
                Self: 'a,
            {
                future::ProvideCredentials::ready(Err(CredentialsError::not_loaded(
                    "no credentials in this test",
                )))
            }
        }
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            // Nothing listens here; the call must fail before it would connect.
            .endpoint_url("http://127.0.0.1:9")
            .force_path_style(true)
            .credentials_provider(Nothing)
            .build();
        let client = aws_sdk_s3::Client::from_conf(conf);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt
            .block_on(client.list_objects_v2().bucket("b").send())
            .unwrap_err();
        let e = from_sdk("S3", "ListObjectsV2", "s3://b/", &err);
        assert_eq!(e.kind, ErrorKind::NoCredentials, "{e}");
    }
}
