//! Route 53 as recovery plans use it: A records pointed at recovered instances, and
//! removed again after a drill. One trait ([`DnsApi`]), implemented for the AWS SDK
//! ([`SdkRoute53`], feature `route53`) and in memory ([`MemoryRoute53`]).

use crate::error::{CloudError, ErrorKind};
use std::future::Future;

mod memory;
pub use memory::{MemoryRoute53, MemoryRoute53State};

/// An A record set: a name, its TTL and addresses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ARecord {
    /// Without the final dot, lower case.
    pub name: String,
    pub ttl: u32,
    pub addresses: Vec<String>,
}

impl ARecord {
    /// The name as Route 53 keeps it: fully qualified, lower case, with the final dot.
    pub fn fqdn(&self) -> String {
        format!("{}.", self.name.trim_end_matches('.').to_ascii_lowercase())
    }
}

/// The Route 53 calls of a recovery plan.
pub trait DnsApi: Send + Sync {
    /// `ChangeResourceRecordSets` UPSERT: "If a resource record set doesn't already
    /// exist, Route 53 creates it. If a resource record set does exist, Route 53 updates
    /// it with the values in the request." Returns the change id.
    fn upsert_a(
        &self,
        zone_id: &str,
        record: &ARecord,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
    /// `ChangeResourceRecordSets` DELETE of exactly this record ("you must specify all the
    /// same values that you specified when you created it"); a record that is already
    /// gone is no error here.
    fn delete_a(
        &self,
        zone_id: &str,
        record: &ARecord,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// The A record of `name` in the zone, if any (`ListResourceRecordSets` from it).
    fn a_record(
        &self,
        zone_id: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<ARecord>, CloudError>> + Send;
}

fn dns_error(
    op: &'static str,
    kind: ErrorKind,
    code: &str,
    detail: impl Into<String>,
) -> CloudError {
    let mut e = CloudError::new("Route53", op, "", kind, detail);
    e.code = Some(code.to_string());
    e
}

#[cfg(feature = "route53")]
mod sdk;
#[cfg(feature = "route53")]
pub use sdk::SdkRoute53;
