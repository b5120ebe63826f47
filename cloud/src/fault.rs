//! Fault injection for the in-memory twins: fail the Nth matching call, fail the next
//! N calls with a transient error, throttle. Every twin counts its calls per operation,
//! so tests can also assert how often something was asked.

use crate::error::{CloudError, ErrorKind};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// One rule: which calls it matches, which of them fail, and how.
#[derive(Debug, Clone)]
pub struct Fault {
    op: Option<&'static str>,
    resource_contains: Option<String>,
    /// Matching calls to let through before failing.
    skip: u64,
    /// Matching calls to fail after that (`u64::MAX`: all).
    times: u64,
    kind: ErrorKind,
    code: Option<String>,
    detail: Option<String>,
}

impl Fault {
    /// Matches calls of operation `op` (`GetObject`, `PutObject`, `ReceiveMessage`, ...).
    pub fn on(op: &'static str) -> Self {
        Fault {
            op: Some(op),
            resource_contains: None,
            skip: 0,
            times: 1,
            kind: ErrorKind::ServerError,
            code: Some("InternalError".into()),
            detail: None,
        }
    }

    /// Matches every call.
    pub fn any() -> Self {
        Fault {
            op: None,
            ..Fault::on("")
        }
    }

    /// Only calls whose resource (key, receipt, id) contains `s`.
    pub fn resource_contains(mut self, s: impl Into<String>) -> Self {
        self.resource_contains = Some(s.into());
        self
    }

    /// Fails only the `n`th matching call (from 1).
    pub fn nth(mut self, n: u64) -> Self {
        self.skip = n.saturating_sub(1);
        self.times = 1;
        self
    }

    /// Fails `n` matching calls (after any `nth`/`after`).
    pub fn times(mut self, n: u64) -> Self {
        self.times = n;
        self
    }

    /// Lets `n` matching calls through first.
    pub fn after(mut self, n: u64) -> Self {
        self.skip = n;
        self
    }

    /// Fails every matching call from now on.
    pub fn always(mut self) -> Self {
        self.times = u64::MAX;
        self
    }

    /// A 500 `InternalError` (the default).
    pub fn transient(mut self) -> Self {
        self.kind = ErrorKind::ServerError;
        self.code = Some("InternalError".into());
        self
    }

    /// A 503 `SlowDown` / `ThrottlingException`.
    pub fn throttle(mut self) -> Self {
        self.kind = ErrorKind::Throttled;
        self.code = Some("ThrottlingException".into());
        self
    }

    /// No answer at all (connection refused).
    pub fn unreachable(mut self) -> Self {
        self.kind = ErrorKind::Unreachable;
        self.code = None;
        self
    }

    /// Any kind, with the service's code.
    pub fn kind(mut self, kind: ErrorKind, code: Option<&str>) -> Self {
        self.kind = kind;
        self.code = code.map(String::from);
        self
    }

    /// The service's message (default: "injected fault").
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The EBS direct APIs' answer for a snapshot not visible yet: `ValidationException`,
    /// reason `INVALID_SNAPSHOT_ID`, "The snapshot '...' does not exist."
    pub fn snapshot_not_visible(self) -> Self {
        self.kind(ErrorKind::Invalid, Some("ValidationException"))
            .detail("INVALID_SNAPSHOT_ID: The snapshot does not exist.")
    }
}

/// The rules of one twin and its call counts.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<Fault>>,
    calls: Mutex<BTreeMap<&'static str, u64>>,
}

impl Faults {
    pub fn add(&self, f: Fault) {
        lock(&self.rules).push(f);
    }

    pub fn clear(&self) {
        lock(&self.rules).clear();
    }

    /// How many calls of `op` the twin has seen (failed ones included).
    pub fn calls(&self, op: &str) -> u64 {
        lock(&self.calls).get(op).copied().unwrap_or(0)
    }

    /// Counts the call, then fails it if a rule says so.
    pub fn check(
        &self,
        service: &'static str,
        op: &'static str,
        resource: &str,
    ) -> Result<(), CloudError> {
        *lock(&self.calls).entry(op).or_default() += 1;
        let mut rules = lock(&self.rules);
        for r in rules.iter_mut() {
            if r.op.is_some_and(|o| o != op)
                || r.resource_contains
                    .as_deref()
                    .is_some_and(|s| !resource.contains(s))
            {
                continue;
            }
            if r.skip > 0 {
                r.skip -= 1;
                continue;
            }
            if r.times == 0 {
                continue;
            }
            if r.times != u64::MAX {
                r.times -= 1;
            }
            let detail = r.detail.as_deref().unwrap_or("injected fault");
            let mut e = CloudError::new(service, op, resource, r.kind, detail);
            e.code = r.code.clone();
            return Err(e);
        }
        Ok(())
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nth_times_and_matching() {
        let f = Faults::default();
        f.add(
            Fault::on("GetObject")
                .resource_contains("manifest")
                .nth(2)
                .throttle(),
        );
        assert!(f.check("S3", "GetObject", "a/manifest.json").is_ok());
        assert!(f.check("S3", "GetObject", "a/d/0").is_ok());
        let e = f.check("S3", "GetObject", "b/manifest.json").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Throttled);
        assert!(e.is_transient());
        assert!(f.check("S3", "GetObject", "c/manifest.json").is_ok());
        assert!(f.check("S3", "PutObject", "c/manifest.json").is_ok());
        assert_eq!(f.calls("GetObject"), 4);
        f.add(Fault::any().times(2).unreachable());
        assert!(f.check("S3", "PutObject", "x").is_err());
        assert!(f.check("SQS", "ReceiveMessage", "q").is_err());
        assert!(f.check("SQS", "ReceiveMessage", "q").is_ok());
    }
}
