//! Narrow traits over what the DR flow calls in AWS, implemented for the SDK clients.
//! The handler only sees these, so its logic is tested with in-memory fakes and the
//! end-to-end tests still go through the SDK to the emulator.

use crate::model::{BootMode, LicenseType};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use bytes::Bytes;
use std::future::Future;

#[derive(Debug, thiserror::Error)]
#[error("s3://{bucket}/{key}: {op} failed: {detail}")]
pub struct StoreError {
    pub bucket: String,
    pub key: String,
    pub op: &'static str,
    pub detail: String,
}

/// The bucket, as the DR flow uses it.
pub trait ObjectStore: Send + Sync {
    fn bucket(&self) -> &str;
    /// The object, or `None` if there is none.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Bytes>, StoreError>> + Send;
    /// The object's size, or `None` if there is none.
    fn size(&self, key: &str) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;
    fn put(&self, key: &str, body: Bytes) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
}

#[derive(Debug, thiserror::Error)]
#[error("EC2 {op} failed{}: {detail}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
pub struct Ec2Error {
    pub op: &'static str,
    /// The service's error code, if it gave one (`InvalidSubnetID.NotFound`, ...).
    pub code: Option<String>,
    pub detail: String,
}

/// An `ec2:ImportImage` call: the disks as S3 objects, boot disk first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRequest {
    pub disks: Vec<(String, String)>,
    pub role_name: String,
    pub boot_mode: Option<BootMode>,
    pub license_type: Option<LicenseType>,
    pub description: String,
    pub tags: Vec<(String, String)>,
}

/// An import task as `DescribeImportImageTasks` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImportTask {
    pub task_id: String,
    /// `active`, `completed`, `deleting`, `deleted`.
    pub status: String,
    pub status_message: Option<String>,
    pub progress: Option<u32>,
    pub image_id: Option<String>,
    pub snapshot_ids: Vec<String>,
}

/// One instance to launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    pub image_id: String,
    pub instance_type: String,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    pub private_ip: Option<String>,
    pub tags: Vec<(String, String)>,
}

/// The EC2 calls of the DR flow.
pub trait Ec2Api: Send + Sync {
    fn import_image(
        &self,
        req: &ImportRequest,
    ) -> impl Future<Output = Result<String, Ec2Error>> + Send;
    fn describe_import_image_task(
        &self,
        task_id: &str,
    ) -> impl Future<Output = Result<ImportTask, Ec2Error>> + Send;
    /// Launches one instance; returns its id.
    fn run_instance(
        &self,
        req: &LaunchRequest,
    ) -> impl Future<Output = Result<String, Ec2Error>> + Send;
    fn terminate_instances(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;
    fn deregister_image(&self, id: &str) -> impl Future<Output = Result<(), Ec2Error>> + Send;
    fn delete_snapshot(&self, id: &str) -> impl Future<Output = Result<(), Ec2Error>> + Send;
}

fn one_line<E: std::error::Error + 'static, R: std::fmt::Debug>(e: &SdkError<E, R>) -> String {
    DisplayErrorContext(e)
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The bucket through the AWS SDK.
#[derive(Debug, Clone)]
pub struct S3Store {
    pub client: aws_sdk_s3::Client,
    pub bucket: String,
}

impl S3Store {
    fn err<E: std::error::Error + 'static, R: std::fmt::Debug>(
        &self,
        key: &str,
        op: &'static str,
        e: &SdkError<E, R>,
    ) -> StoreError {
        StoreError {
            bucket: self.bucket.clone(),
            key: key.into(),
            op,
            detail: one_line(e),
        }
    }
}

impl ObjectStore for S3Store {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await;
        let out = match out {
            Ok(o) => o,
            Err(e) if e.as_service_error().and_then(|s| s.code()) == Some("NoSuchKey") => {
                return Ok(None)
            }
            Err(e) => return Err(self.err(key, "get", &e)),
        };
        let body = out.body.collect().await.map_err(|e| StoreError {
            bucket: self.bucket.clone(),
            key: key.into(),
            op: "get",
            detail: e.to_string(),
        })?;
        Ok(Some(body.into_bytes()))
    }

    async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(o) => Ok(Some(o.content_length.unwrap_or(0).max(0) as u64)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(e) => Err(self.err(key, "head", &e)),
        }
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .body(body.into())
            .send()
            .await
            .map_err(|e| self.err(key, "put", &e))?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.err(prefix, "list", &e))?;
            out.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(String::from)),
            );
        }
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.err(key, "delete", &e))?;
        Ok(())
    }
}

/// EC2 through the AWS SDK.
#[derive(Debug, Clone)]
pub struct SdkEc2 {
    pub client: aws_sdk_ec2::Client,
}

fn ec2_err<E: std::error::Error + ProvideErrorMetadata + 'static, R: std::fmt::Debug>(
    op: &'static str,
    e: &SdkError<E, R>,
) -> Ec2Error {
    Ec2Error {
        op,
        code: e
            .as_service_error()
            .and_then(|s| s.code())
            .map(String::from),
        detail: one_line(e),
    }
}

fn ec2_tags(tags: &[(String, String)]) -> Vec<aws_sdk_ec2::types::Tag> {
    tags.iter()
        .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build())
        .collect()
}

fn tag_spec(
    kind: aws_sdk_ec2::types::ResourceType,
    tags: &[(String, String)],
) -> aws_sdk_ec2::types::TagSpecification {
    aws_sdk_ec2::types::TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(ec2_tags(tags)))
        .build()
}

impl Ec2Api for SdkEc2 {
    async fn import_image(&self, req: &ImportRequest) -> Result<String, Ec2Error> {
        use aws_sdk_ec2::types::{BootModeValues, ImageDiskContainer, ResourceType, UserBucket};
        let containers = req
            .disks
            .iter()
            .map(|(bucket, key)| {
                ImageDiskContainer::builder()
                    .format("RAW")
                    .user_bucket(UserBucket::builder().s3_bucket(bucket).s3_key(key).build())
                    .build()
            })
            .collect();
        let out = self
            .client
            .import_image()
            .set_disk_containers(Some(containers))
            .role_name(&req.role_name)
            .description(&req.description)
            .set_boot_mode(req.boot_mode.map(|b| BootModeValues::from(b.as_str())))
            .set_license_type(req.license_type.map(|l| l.as_str().to_string()))
            .tag_specifications(tag_spec(ResourceType::ImportImageTask, &req.tags))
            .send()
            .await
            .map_err(|e| ec2_err("ImportImage", &e))?;
        out.import_task_id.ok_or_else(|| Ec2Error {
            op: "ImportImage",
            code: None,
            detail: "no ImportTaskId in the answer".into(),
        })
    }

    async fn describe_import_image_task(&self, task_id: &str) -> Result<ImportTask, Ec2Error> {
        let out = self
            .client
            .describe_import_image_tasks()
            .import_task_ids(task_id)
            .send()
            .await
            .map_err(|e| ec2_err("DescribeImportImageTasks", &e))?;
        let t = out.import_image_tasks().first().ok_or_else(|| Ec2Error {
            op: "DescribeImportImageTasks",
            code: None,
            detail: format!("import task {task_id} not found"),
        })?;
        Ok(ImportTask {
            task_id: task_id.into(),
            status: t.status().unwrap_or("unknown").into(),
            status_message: t.status_message().map(String::from),
            progress: t.progress().and_then(|p| p.parse().ok()),
            image_id: t.image_id().map(String::from),
            snapshot_ids: t
                .snapshot_details()
                .iter()
                .filter_map(|s| s.snapshot_id().map(String::from))
                .collect(),
        })
    }

    async fn run_instance(&self, req: &LaunchRequest) -> Result<String, Ec2Error> {
        use aws_sdk_ec2::types::{InstanceType, ResourceType};
        let out = self
            .client
            .run_instances()
            .image_id(&req.image_id)
            .instance_type(InstanceType::from(req.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .set_subnet_id(req.subnet_id.clone())
            .set_security_group_ids(
                (!req.security_group_ids.is_empty()).then(|| req.security_group_ids.clone()),
            )
            .set_private_ip_address(req.private_ip.clone())
            .tag_specifications(tag_spec(ResourceType::Instance, &req.tags))
            .tag_specifications(tag_spec(ResourceType::Volume, &req.tags))
            .send()
            .await
            .map_err(|e| ec2_err("RunInstances", &e))?;
        out.instances()
            .first()
            .and_then(|i| i.instance_id().map(String::from))
            .ok_or_else(|| Ec2Error {
                op: "RunInstances",
                code: None,
                detail: "no instance in the answer".into(),
            })
    }

    async fn terminate_instances(&self, ids: &[String]) -> Result<(), Ec2Error> {
        if ids.is_empty() {
            return Ok(());
        }
        self.client
            .terminate_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .map_err(|e| ec2_err("TerminateInstances", &e))?;
        Ok(())
    }

    async fn deregister_image(&self, id: &str) -> Result<(), Ec2Error> {
        self.client
            .deregister_image()
            .image_id(id)
            .send()
            .await
            .map_err(|e| ec2_err("DeregisterImage", &e))?;
        Ok(())
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), Ec2Error> {
        self.client
            .delete_snapshot()
            .snapshot_id(id)
            .send()
            .await
            .map_err(|e| ec2_err("DeleteSnapshot", &e))?;
        Ok(())
    }
}
