//! [`SdkRoute53`]: Route 53 through the AWS SDK.

use super::*;
use crate::error::from_sdk;
use aws_sdk_route53::types::{
    Change, ChangeAction, ChangeBatch, ResourceRecord, ResourceRecordSet, RrType,
};

#[derive(Debug, Clone)]
pub struct SdkRoute53 {
    pub client: aws_sdk_route53::Client,
}

fn record_set(r: &ARecord) -> Result<ResourceRecordSet, CloudError> {
    let mut b = ResourceRecordSet::builder()
        .name(r.fqdn())
        .r#type(RrType::A)
        .ttl(i64::from(r.ttl));
    for a in &r.addresses {
        b = b.resource_records(ResourceRecord::builder().value(a).build().map_err(|e| {
            dns_error(
                "ChangeResourceRecordSets",
                ErrorKind::Invalid,
                "Build",
                e.to_string(),
            )
        })?);
    }
    b.build().map_err(|e| {
        dns_error(
            "ChangeResourceRecordSets",
            ErrorKind::Invalid,
            "Build",
            e.to_string(),
        )
    })
}

impl SdkRoute53 {
    async fn change(
        &self,
        zone_id: &str,
        action: ChangeAction,
        r: &ARecord,
    ) -> Result<String, CloudError> {
        let change = Change::builder()
            .action(action)
            .resource_record_set(record_set(r)?)
            .build()
            .map_err(|e| {
                dns_error(
                    "ChangeResourceRecordSets",
                    ErrorKind::Invalid,
                    "Build",
                    e.to_string(),
                )
            })?;
        let batch = ChangeBatch::builder()
            .comment("pilotlight recovery plan")
            .changes(change)
            .build()
            .map_err(|e| {
                dns_error(
                    "ChangeResourceRecordSets",
                    ErrorKind::Invalid,
                    "Build",
                    e.to_string(),
                )
            })?;
        let out = self
            .client
            .change_resource_record_sets()
            .hosted_zone_id(zone_id)
            .change_batch(batch)
            .send()
            .await
            .map_err(|e| from_sdk("Route53", "ChangeResourceRecordSets", zone_id, &e))?;
        Ok(out
            .change_info()
            .map(|c| c.id().to_string())
            .unwrap_or_default())
    }
}

impl DnsApi for SdkRoute53 {
    async fn upsert_a(&self, zone_id: &str, record: &ARecord) -> Result<String, CloudError> {
        self.change(zone_id, ChangeAction::Upsert, record).await
    }

    async fn delete_a(&self, zone_id: &str, record: &ARecord) -> Result<(), CloudError> {
        // Gone already (a cleanup run twice): nothing to do.
        if self.a_record(zone_id, &record.name).await?.is_none() {
            return Ok(());
        }
        self.change(zone_id, ChangeAction::Delete, record)
            .await
            .map(|_| ())
    }

    async fn a_record(&self, zone_id: &str, name: &str) -> Result<Option<ARecord>, CloudError> {
        let fqdn = format!("{}.", name.trim_end_matches('.').to_ascii_lowercase());
        let out = self
            .client
            .list_resource_record_sets()
            .hosted_zone_id(zone_id)
            .start_record_name(&fqdn)
            .start_record_type(RrType::A)
            .max_items(1)
            .send()
            .await
            .map_err(|e| from_sdk("Route53", "ListResourceRecordSets", zone_id, &e))?;
        Ok(out
            .resource_record_sets()
            .iter()
            .find(|s| s.name().to_ascii_lowercase() == fqdn && *s.r#type() == RrType::A)
            .map(|s| ARecord {
                name: fqdn.trim_end_matches('.').to_string(),
                ttl: s.ttl().unwrap_or(0).max(0) as u32,
                addresses: s
                    .resource_records()
                    .iter()
                    .map(|r| r.value().to_string())
                    .collect(),
            }))
    }
}
