use super::*;
use crate::error::from_sdk;
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, Status};

/// The EBS direct APIs and EC2's snapshot calls through the AWS SDK.
#[derive(Debug, Clone)]
pub struct SdkEbs {
    pub ebs: aws_sdk_ebs::Client,
    pub ec2: aws_sdk_ec2::Client,
}

fn status(s: Option<&Status>) -> SnapshotStatus {
    SnapshotStatus::parse(s.map_or("error", |s| s.as_str()))
}

fn ec2_tags(tags: &[(String, String)]) -> Vec<aws_sdk_ec2::types::Tag> {
    tags.iter()
        .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build())
        .collect()
}

/// Blocks per listing page: the most the service allows (MaxResults 100 to 10 000).
const PAGE: i32 = 10_000;

fn block_index(op: &'static str, id: &str, i: u64) -> Result<i32, CloudError> {
    i32::try_from(i).map_err(|_| invalid(op, id, "block index too large"))
}

fn broken(op: &'static str, id: &str, detail: &str) -> CloudError {
    CloudError::new("EBS", op, id, ErrorKind::Unreachable, detail)
}

impl EbsApi for SdkEbs {
    async fn start_snapshot(&self, req: &StartSnapshot) -> Result<String, CloudError> {
        let tags = req
            .tags
            .iter()
            .map(|(k, v)| aws_sdk_ebs::types::Tag::builder().key(k).value(v).build())
            .collect();
        let out = self
            .ebs
            .start_snapshot()
            .volume_size(req.volume_size_gib as i64)
            .set_parent_snapshot_id(req.parent.clone())
            .description(&req.description)
            .set_tags(Some(tags))
            .client_token(&req.client_token)
            .set_encrypted(req.encrypted)
            .set_kms_key_arn(req.kms_key_arn.clone())
            .timeout(req.timeout_minutes as i32)
            .send()
            .await
            .map_err(|e| from_sdk("EBS", "StartSnapshot", "", &e))?;
        out.snapshot_id()
            .map(String::from)
            .ok_or_else(|| broken("StartSnapshot", "", "no SnapshotId in the response"))
    }

    async fn put_snapshot_block(
        &self,
        id: &str,
        index: u64,
        data: Bytes,
        checksum: &str,
    ) -> Result<(), CloudError> {
        let index = i32::try_from(index)
            .map_err(|_| invalid("PutSnapshotBlock", id, "BlockIndex too large"))?;
        let len = data.len() as i32;
        self.ebs
            .put_snapshot_block()
            .snapshot_id(id)
            .block_index(index)
            .block_data(data.into())
            .data_length(len)
            .checksum(checksum)
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .send()
            .await
            .map_err(|e| from_sdk("EBS", "PutSnapshotBlock", format!("{id} block {index}"), &e))?;
        Ok(())
    }

    async fn complete_snapshot(
        &self,
        id: &str,
        changed_blocks: u64,
        checksum: &str,
    ) -> Result<SnapshotStatus, CloudError> {
        let n = i32::try_from(changed_blocks)
            .map_err(|_| invalid("CompleteSnapshot", id, "ChangedBlocksCount too large"))?;
        let out = self
            .ebs
            .complete_snapshot()
            .snapshot_id(id)
            .changed_blocks_count(n)
            .checksum(checksum)
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
            .send()
            .await
            .map_err(|e| from_sdk("EBS", "CompleteSnapshot", id, &e))?;
        Ok(status(out.status()))
    }

    async fn list_snapshot_blocks_page(
        &self,
        id: &str,
        start: PageStart<'_>,
    ) -> Result<BlockPage<BlockRef>, CloudError> {
        const OP: &str = "ListSnapshotBlocks";
        let mut req = self
            .ebs
            .list_snapshot_blocks()
            .snapshot_id(id)
            .max_results(PAGE);
        req = match start {
            PageStart::Index(i) => req.starting_block_index(block_index(OP, id, i)?),
            PageStart::Token(t) => req.next_token(t),
        };
        let page = req.send().await.map_err(|e| from_sdk("EBS", OP, id, &e))?;
        Ok(BlockPage {
            blocks: page
                .blocks()
                .iter()
                .filter_map(|b| {
                    Some(BlockRef {
                        index: u64::try_from(b.block_index()?).ok()?,
                        token: b.block_token()?.to_string(),
                    })
                })
                .collect(),
            next_token: page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(String::from),
        })
    }

    async fn list_changed_blocks_page(
        &self,
        first: &str,
        second: &str,
        start: PageStart<'_>,
    ) -> Result<BlockPage<ChangedBlock>, CloudError> {
        use aws_sdk_ebs::operation::list_changed_blocks::ListChangedBlocksError;
        use aws_sdk_ebs::types::ValidationExceptionReason;
        const OP: &str = "ListChangedBlocks";
        let mut req = self
            .ebs
            .list_changed_blocks()
            .first_snapshot_id(first)
            .second_snapshot_id(second)
            .max_results(PAGE);
        req = match start {
            PageStart::Index(i) => req.starting_block_index(block_index(OP, second, i)?),
            PageStart::Token(t) => req.next_token(t),
        };
        let page = req.send().await.map_err(|e| {
            let err = from_sdk("EBS", OP, second, &e);
            // The reason, not only the code: two snapshots of different lineages are an
            // answer (compare another way), not a failure.
            match e.as_service_error() {
                Some(ListChangedBlocksError::ValidationException(v))
                    if v.reason() == Some(&ValidationExceptionReason::UnrelatedSnapshots) =>
                {
                    err.with_code(UNRELATED_SNAPSHOTS)
                }
                _ => err,
            }
        })?;
        Ok(BlockPage {
            blocks: page
                .changed_blocks()
                .iter()
                .filter_map(|b| {
                    Some(ChangedBlock {
                        index: u64::try_from(b.block_index()?).ok()?,
                        first: b.first_block_token().map(String::from),
                        second: b.second_block_token().map(String::from),
                    })
                })
                .collect(),
            next_token: page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(String::from),
        })
    }

    async fn get_snapshot_block_checked(
        &self,
        id: &str,
        b: &BlockRef,
    ) -> Result<(Bytes, [u8; 32]), CloudError> {
        const OP: &str = "GetSnapshotBlock";
        let index = i32::try_from(b.index).map_err(|_| invalid(OP, id, "BlockIndex too large"))?;
        let out = self
            .ebs
            .get_snapshot_block()
            .snapshot_id(id)
            .block_index(index)
            .block_token(&b.token)
            .send()
            .await
            .map_err(|e| from_sdk("EBS", OP, id, &e))?;
        let sent = out.checksum.clone();
        let data = out
            .block_data
            .collect()
            .await
            .map_err(|e| broken(OP, id, &crate::error::causes(&e)))?
            .into_bytes();
        let digest: [u8; 32] = Sha256::digest(&data).into();
        if sent.is_some_and(|c| c != block_checksum(&digest)) {
            return Err(broken(
                OP,
                id,
                "the block's bytes do not match its checksum",
            ));
        }
        Ok((data, digest))
    }

    async fn describe_snapshots(
        &self,
        f: &SnapshotFilter,
    ) -> Result<Vec<SnapshotInfo>, CloudError> {
        // Only our own snapshots: without OwnerIds, DescribeSnapshots also pages
        // through every public snapshot in the region.
        let mut req = self.ec2.describe_snapshots().owner_ids("self");
        for id in &f.ids {
            req = req.snapshot_ids(id);
        }
        if !f.any_id.is_empty() {
            req = req.filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("snapshot-id")
                    .set_values(Some(f.any_id.clone()))
                    .build(),
            );
        }
        for (k, v) in &f.tags {
            req = req.filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name(format!("tag:{k}"))
                    .values(v)
                    .build(),
            );
        }
        let mut pages = req.into_paginator().send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| from_sdk("EC2", "DescribeSnapshots", "", &e))?;
            for s in page.snapshots() {
                let Some(id) = s.snapshot_id() else { continue };
                out.push(SnapshotInfo {
                    id: id.to_string(),
                    status: SnapshotStatus::parse(s.state().map_or("error", |s| s.as_str())),
                    volume_size_gib: s.volume_size().unwrap_or(0).max(0) as u64,
                    description: s.description().unwrap_or_default().to_string(),
                    tags: s
                        .tags()
                        .iter()
                        .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                        .collect(),
                });
            }
        }
        Ok(out)
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), CloudError> {
        self.ec2
            .delete_snapshot()
            .snapshot_id(id)
            .send()
            .await
            .map_err(|e| from_sdk("EC2", "DeleteSnapshot", id, &e))?;
        Ok(())
    }

    async fn create_tags(&self, id: &str, tags: &[(String, String)]) -> Result<(), CloudError> {
        self.ec2
            .create_tags()
            .resources(id)
            .set_tags(Some(ec2_tags(tags)))
            .send()
            .await
            .map_err(|e| from_sdk("EC2", "CreateTags", id, &e))?;
        Ok(())
    }

    async fn delete_tags(&self, id: &str, keys: &[String]) -> Result<(), CloudError> {
        let tags = keys
            .iter()
            .map(|k| aws_sdk_ec2::types::Tag::builder().key(k).build())
            .collect();
        self.ec2
            .delete_tags()
            .resources(id)
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| from_sdk("EC2", "DeleteTags", id, &e))?;
        Ok(())
    }

    async fn lock_snapshot(&self, id: &str, mode: LockMode, days: u32) -> Result<(), CloudError> {
        let mode = match mode {
            LockMode::Governance => aws_sdk_ec2::types::LockMode::Governance,
            LockMode::Compliance => aws_sdk_ec2::types::LockMode::Compliance,
        };
        self.ec2
            .lock_snapshot()
            .snapshot_id(id)
            .lock_mode(mode)
            .lock_duration(days as i32)
            .send()
            .await
            .map_err(|e| from_sdk("EC2", "LockSnapshot", id, &e))?;
        Ok(())
    }
}
