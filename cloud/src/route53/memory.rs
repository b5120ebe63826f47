//! [`MemoryRoute53`]: hosted zones in memory, following the ChangeResourceRecordSets
//! rules the plans depend on, with faults on demand.

use super::*;
use crate::fault::{lock, Faults};
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Debug, Default, Clone)]
pub struct MemoryRoute53State {
    /// Zone id → (zone name without the dot, records by FQDN).
    pub zones: BTreeMap<String, (String, BTreeMap<String, ARecord>)>,
    /// Every change made: (zone id, `UPSERT`/`DELETE`, record).
    pub changes: Vec<(String, String, ARecord)>,
}

#[derive(Debug, Default)]
pub struct MemoryRoute53 {
    pub state: Mutex<MemoryRoute53State>,
    pub faults: Faults,
}

impl MemoryRoute53 {
    /// A hosted zone for `name` with the id `id`.
    pub fn with_zone(self, id: &str, name: &str) -> Self {
        lock(&self.state).zones.insert(
            id.into(),
            (
                name.trim_end_matches('.').to_ascii_lowercase(),
                BTreeMap::new(),
            ),
        );
        self
    }
    pub fn snapshot(&self) -> MemoryRoute53State {
        lock(&self.state).clone()
    }
}

fn no_zone(op: &'static str, zone_id: &str) -> CloudError {
    dns_error(
        op,
        ErrorKind::NotFound,
        "NoSuchHostedZone",
        format!("No hosted zone found with ID: {zone_id}"),
    )
}

fn check_in_zone(op: &'static str, zone: &str, r: &ARecord) -> Result<(), CloudError> {
    // ChangeResourceRecordSets: a name outside the hosted zone is InvalidChangeBatch
    // ("RRSet with DNS name ... is not permitted in zone ...").
    let n = r.fqdn();
    if !(n == format!("{zone}.") || n.ends_with(&format!(".{zone}."))) {
        return Err(dns_error(
            op,
            ErrorKind::Invalid,
            "InvalidChangeBatch",
            format!("RRSet with DNS name {n} is not permitted in zone {zone}."),
        ));
    }
    if r.addresses.is_empty() {
        return Err(dns_error(
            op,
            ErrorKind::Invalid,
            "InvalidChangeBatch",
            "an A record needs at least one value",
        ));
    }
    Ok(())
}

impl DnsApi for MemoryRoute53 {
    async fn upsert_a(&self, zone_id: &str, record: &ARecord) -> Result<String, CloudError> {
        const OP: &str = "ChangeResourceRecordSets";
        self.faults.check("Route53", OP, zone_id)?;
        let mut s = lock(&self.state);
        let n = s.changes.len();
        let (zone, records) = s
            .zones
            .get_mut(zone_id)
            .ok_or_else(|| no_zone(OP, zone_id))?;
        check_in_zone(OP, zone, record)?;
        records.insert(record.fqdn(), record.clone());
        s.changes
            .push((zone_id.into(), "UPSERT".into(), record.clone()));
        Ok(format!("C{n:012}"))
    }

    async fn delete_a(&self, zone_id: &str, record: &ARecord) -> Result<(), CloudError> {
        const OP: &str = "ChangeResourceRecordSets";
        self.faults.check("Route53", OP, zone_id)?;
        let mut s = lock(&self.state);
        let (zone, records) = s
            .zones
            .get_mut(zone_id)
            .ok_or_else(|| no_zone(OP, zone_id))?;
        check_in_zone(OP, zone, record)?;
        match records.get(&record.fqdn()) {
            None => return Ok(()),
            // "To delete a resource record set, you must specify all the same values that
            // you specified when you created it" (ChangeResourceRecordSets): someone else's
            // record under the name is not ours to delete.
            Some(have) if have != record => {
                return Err(dns_error(
                    OP,
                    ErrorKind::Invalid,
                    "InvalidChangeBatch",
                    format!("Tried to delete resource record set [name='{}', type='A'] but the values provided do not match the current values", record.fqdn()),
                ))
            }
            Some(_) => {}
        }
        records.remove(&record.fqdn());
        s.changes
            .push((zone_id.into(), "DELETE".into(), record.clone()));
        Ok(())
    }

    async fn a_record(&self, zone_id: &str, name: &str) -> Result<Option<ARecord>, CloudError> {
        self.faults
            .check("Route53", "ListResourceRecordSets", zone_id)?;
        let s = lock(&self.state);
        let (_, records) = s
            .zones
            .get(zone_id)
            .ok_or_else(|| no_zone("ListResourceRecordSets", zone_id))?;
        let fqdn = format!("{}.", name.trim_end_matches('.').to_ascii_lowercase());
        Ok(records.get(&fqdn).cloned())
    }
}
