//! The DR function's errors.

use pilotlight_cloud::CloudError;

#[derive(Debug, thiserror::Error)]
pub enum DrError {
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("no DR run {0:?} (runs are listed by `dr status`)")]
    NoSuchRun(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] CloudError),
    #[error("run record {key} is unreadable: {detail}")]
    BadRun { key: String, detail: String },
    #[error(
        "run {0} was changed by another caller since it was read; read it again (`dr status {0}`)"
    )]
    Conflict(String),
    #[error("{what} cannot be written as JSON ({detail}), which is a bug in the DR function; nothing was changed")]
    Encode { what: &'static str, detail: String },
}

/// `v` as JSON bytes for the bucket; a failure is [`DrError::Encode`], never a bad request.
pub(crate) fn json_bytes<T: serde::Serialize>(
    what: &'static str,
    v: &T,
) -> Result<Vec<u8>, DrError> {
    serde_json::to_vec_pretty(v).map_err(|e| DrError::Encode {
        what,
        detail: e.to_string(),
    })
}
