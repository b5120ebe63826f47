use super::*;
use crate::error::from_sdk;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::SdkError;

fn ec2_err<E: std::error::Error + aws_sdk_ec2::error::ProvideErrorMetadata + 'static>(
    op: &'static str,
    e: &SdkError<E, HttpResponse>,
) -> CloudError {
    from_sdk("EC2", op, "", e)
}

/// EC2 through the AWS SDK (and, with the feature `ssm`, Systems Manager's view of
/// its instances).
#[derive(Debug, Clone)]
pub struct SdkEc2 {
    pub client: aws_sdk_ec2::Client,
    #[cfg(feature = "ssm")]
    pub ssm: Option<aws_sdk_ssm::Client>,
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
    async fn import_image(&self, req: &ImportRequest) -> Result<String, CloudError> {
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
            .set_boot_mode(req.boot_mode.as_deref().map(BootModeValues::from))
            .set_license_type(req.license_type.clone())
            .tag_specifications(tag_spec(ResourceType::ImportImageTask, &req.tags))
            .encrypted(req.encrypted)
            .set_kms_key_id(req.kms_key_id.clone())
            .client_token(&req.client_token)
            .send()
            .await
            .map_err(|e| ec2_err("ImportImage", &e))?;
        out.import_task_id.ok_or_else(|| {
            ec2_error(
                "ImportImage",
                ErrorKind::Invalid,
                None,
                "no ImportTaskId in the answer",
            )
        })
    }

    async fn describe_import_image_task(&self, task_id: &str) -> Result<ImportTask, CloudError> {
        let out = self
            .client
            .describe_import_image_tasks()
            .import_task_ids(task_id)
            .send()
            .await
            .map_err(|e| ec2_err("DescribeImportImageTasks", &e))?;
        let t = out.import_image_tasks().first().ok_or_else(|| {
            ec2_error(
                "DescribeImportImageTasks",
                ErrorKind::Invalid,
                None,
                format!("import task {task_id} not found"),
            )
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

    async fn run_instance(&self, req: &LaunchRequest) -> Result<String, CloudError> {
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
            .client_token(&req.client_token)
            .tag_specifications(tag_spec(ResourceType::Instance, &req.tags))
            .tag_specifications(tag_spec(ResourceType::Volume, &req.tags))
            .set_launch_template(req.launch_template.as_ref().map(|(id, version)| {
                aws_sdk_ec2::types::LaunchTemplateSpecification::builder()
                    .launch_template_id(id)
                    .version(version)
                    .build()
            }))
            .set_iam_instance_profile(req.instance_profile.as_ref().map(|p| {
                let b = aws_sdk_ec2::types::IamInstanceProfileSpecification::builder();
                if p.starts_with("arn:") {
                    b.arn(p).build()
                } else {
                    b.name(p).build()
                }
            }))
            .set_metadata_options(req.imds_v2.then(|| {
                aws_sdk_ec2::types::InstanceMetadataOptionsRequest::builder()
                    .http_tokens(aws_sdk_ec2::types::HttpTokensState::Required)
                    .http_endpoint(aws_sdk_ec2::types::InstanceMetadataEndpointState::Enabled)
                    .build()
            }))
            .send()
            .await
            .map_err(|e| ec2_err("RunInstances", &e))?;
        out.instances()
            .first()
            .and_then(|i| i.instance_id().map(String::from))
            .ok_or_else(|| {
                ec2_error(
                    "RunInstances",
                    ErrorKind::Invalid,
                    None,
                    "no instance in the answer",
                )
            })
    }

    async fn terminate_instances(&self, ids: &[String]) -> Result<(), CloudError> {
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

    async fn deregister_image(&self, id: &str) -> Result<(), CloudError> {
        self.client
            .deregister_image()
            .image_id(id)
            .send()
            .await
            .map_err(|e| ec2_err("DeregisterImage", &e))?;
        Ok(())
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), CloudError> {
        self.client
            .delete_snapshot()
            .snapshot_id(id)
            .send()
            .await
            .map_err(|e| ec2_err("DeleteSnapshot", &e))?;
        Ok(())
    }

    async fn create_tags(
        &self,
        ids: &[String],
        tags: &[(String, String)],
    ) -> Result<(), CloudError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.client
            .create_tags()
            .set_resources(Some(ids.to_vec()))
            .set_tags(Some(ec2_tags(tags)))
            .send()
            .await
            .map_err(|e| ec2_err("CreateTags", &e))?;
        Ok(())
    }

    async fn register_image(&self, req: &RegisterRequest) -> Result<String, CloudError> {
        use aws_sdk_ec2::types::{
            ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice,
            ImdsSupportValues, ResourceType, VolumeType,
        };
        req.check()?;
        let mappings = req
            .mappings
            .iter()
            .map(|m| {
                BlockDeviceMapping::builder()
                    .device_name(&m.device_name)
                    .ebs(
                        EbsBlockDevice::builder()
                            .snapshot_id(&m.snapshot_id)
                            .volume_type(VolumeType::from(m.volume_type.as_str()))
                            .delete_on_termination(m.delete_on_termination)
                            .build(),
                    )
                    .build()
            })
            .collect();
        let out = self
            .client
            .register_image()
            .name(&req.name)
            .description(&req.description)
            .root_device_name(&req.root_device_name)
            .set_block_device_mappings(Some(mappings))
            .architecture(ArchitectureValues::from(req.architecture.as_str()))
            .virtualization_type("hvm")
            .set_boot_mode(req.boot_mode.as_deref().map(BootModeValues::from))
            .ena_support(req.ena_support)
            .set_imds_support(req.imds_v2.then_some(ImdsSupportValues::V20))
            .tag_specifications(tag_spec(ResourceType::Image, &req.tags))
            .send()
            .await
            .map_err(|e| ec2_err("RegisterImage", &e))?;
        out.image_id.ok_or_else(|| {
            ec2_error(
                "RegisterImage",
                ErrorKind::Invalid,
                None,
                "no ImageId in the answer",
            )
        })
    }

    async fn find_image(&self, name: &str) -> Result<Option<String>, CloudError> {
        let out = self
            .client
            .describe_images()
            .owners("self")
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("name")
                    .values(name)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| ec2_err("DescribeImages", &e))?;
        Ok(out
            .images()
            .iter()
            .find(|i| i.name() == Some(name))
            .and_then(|i| i.image_id().map(String::from)))
    }

    async fn instance_health(&self, id: &str) -> Result<Option<InstanceHealth>, CloudError> {
        let out = match self
            .client
            .describe_instance_status()
            .instance_ids(id)
            .include_all_instances(true)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let e = ec2_err("DescribeInstanceStatus", &e);
                // Right after RunInstances EC2 may not know the id yet.
                if e.code.as_deref() == Some("InvalidInstanceID.NotFound") {
                    return Ok(None);
                }
                return Err(e);
            }
        };
        Ok(out.instance_statuses().first().map(|s| InstanceHealth {
            state: s
                .instance_state()
                .and_then(|st| st.name())
                .map_or("unknown".into(), |n| n.as_str().to_string()),
            instance_status: s
                .instance_status()
                .and_then(|x| x.status())
                .map_or("insufficient-data".into(), |n| n.as_str().to_string()),
            system_status: s
                .system_status()
                .and_then(|x| x.status())
                .map_or("insufficient-data".into(), |n| n.as_str().to_string()),
        }))
    }

    async fn instance_profile(&self, id: &str) -> Result<Option<String>, CloudError> {
        let out = self
            .client
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(|e| ec2_err("DescribeInstances", &e))?;
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(id))
            .and_then(|i| i.iam_instance_profile())
            .and_then(|p| p.arn().map(String::from)))
    }

    async fn ssm_ping(&self, id: &str) -> Result<Option<String>, CloudError> {
        #[cfg(feature = "ssm")]
        if let Some(ssm) = &self.ssm {
            let out = ssm
                .describe_instance_information()
                .filters(
                    aws_sdk_ssm::types::InstanceInformationStringFilter::builder()
                        .key("InstanceIds")
                        .values(id)
                        .build()
                        .map_err(|e| {
                            ec2_error(
                                "DescribeInstanceInformation",
                                ErrorKind::Invalid,
                                None,
                                e.to_string(),
                            )
                        })?,
                )
                .send()
                .await
                .map_err(|e| from_sdk("SSM", "DescribeInstanceInformation", "", &e))?;
            return Ok(out
                .instance_information_list()
                .iter()
                .find(|i| i.instance_id() == Some(id))
                .and_then(|i| i.ping_status())
                .map(|p| p.as_str().to_string()));
        }
        let _ = id;
        Err(ec2_error(
            "DescribeInstanceInformation",
            ErrorKind::Invalid,
            None,
            "built without SSM (feature `ssm`)",
        ))
    }

    async fn console_output(&self, id: &str) -> Result<Option<String>, CloudError> {
        use base64::Engine;
        // GetConsoleOutput API reference, Latest: "When enabled, retrieves the latest
        // console output for the instance" (default: the last buffered one, which on
        // Nitro can be stale or empty). Instance types that do not support it refuse
        // the parameter: ask again without it.
        let ask = |latest: bool| {
            self.client
                .get_console_output()
                .instance_id(id)
                .latest(latest)
                .send()
        };
        let out = match ask(true).await {
            Ok(out) => out,
            Err(e) if ec2_err("GetConsoleOutput", &e).kind == ErrorKind::Invalid => ask(false)
                .await
                .map_err(|e| ec2_err("GetConsoleOutput", &e))?,
            Err(e) => return Err(ec2_err("GetConsoleOutput", &e)),
        };
        Ok(out.output().map(|b64| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .unwrap_or_else(|_| b64.as_bytes().to_vec());
            String::from_utf8_lossy(&bytes).into_owned()
        }))
    }

    async fn instance_volumes(&self, id: &str) -> Result<Option<InstanceVolumes>, CloudError> {
        Ok(self.describe_instance(id).await?.map(|i| InstanceVolumes {
            state: i
                .state()
                .and_then(|s| s.name())
                .map_or("pending", |n| n.as_str())
                .to_string(),
            volumes: i
                .block_device_mappings()
                .iter()
                .filter_map(|m| {
                    Some((
                        m.device_name()?.to_string(),
                        m.ebs()?.volume_id()?.to_string(),
                    ))
                })
                .collect(),
        }))
    }

    async fn create_snapshots(
        &self,
        req: &SnapshotsRequest,
    ) -> Result<Vec<VolumeSnapshot>, CloudError> {
        use aws_sdk_ec2::types::{InstanceSpecification, ResourceType, Tag, TagSpecification};
        let mut spec = TagSpecification::builder().resource_type(ResourceType::Snapshot);
        for (k, v) in &req.tags {
            spec = spec.tags(Tag::builder().key(k).value(v).build());
        }
        let out = self
            .client
            .create_snapshots()
            .instance_specification(
                InstanceSpecification::builder()
                    .instance_id(&req.instance_id)
                    .exclude_boot_volume(false)
                    .build(),
            )
            .description(&req.description)
            .tag_specifications(spec.build())
            .send()
            .await
            .map_err(|e| ec2_err("CreateSnapshots", &e))?;
        Ok(out
            .snapshots()
            .iter()
            .filter_map(|s| {
                Some(VolumeSnapshot {
                    snapshot_id: s.snapshot_id()?.to_string(),
                    volume_id: s.volume_id().unwrap_or_default().to_string(),
                    state: s.state().map_or("pending", |x| x.as_str()).to_string(),
                    start_time: s.start_time().and_then(to_chrono),
                })
            })
            .collect())
    }

    async fn snapshots_tagged(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<VolumeSnapshot>, CloudError> {
        // Only our own snapshots: without OwnerIds, DescribeSnapshots pages through
        // every public snapshot in the region too.
        let mut pages = self
            .client
            .describe_snapshots()
            .owner_ids("self")
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name(format!("tag:{key}"))
                    .values(value)
                    .build(),
            )
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| ec2_err("DescribeSnapshots", &e))?;
            for s in page.snapshots() {
                let Some(id) = s.snapshot_id() else { continue };
                out.push(VolumeSnapshot {
                    snapshot_id: id.to_string(),
                    volume_id: s.volume_id().unwrap_or_default().to_string(),
                    state: s.state().map_or("pending", |x| x.as_str()).to_string(),
                    start_time: s.start_time().and_then(to_chrono),
                });
            }
        }
        Ok(out)
    }

    async fn instance_address(&self, id: &str) -> Result<Option<String>, CloudError> {
        Ok(self
            .describe_instance(id)
            .await?
            .and_then(|i| i.private_ip_address().map(String::from)))
    }

    async fn stop_instances(&self, ids: &[String]) -> Result<(), CloudError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.client
            .stop_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .map_err(|e| ec2_err("StopInstances", &e))?;
        Ok(())
    }
}

fn to_chrono(t: &aws_smithy_types::DateTime) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

impl SdkEc2 {
    /// One instance as DescribeInstances reports it (`None`: not found, or not yet:
    /// EC2 is eventually consistent right after a launch).
    async fn describe_instance(
        &self,
        id: &str,
    ) -> Result<Option<aws_sdk_ec2::types::Instance>, CloudError> {
        let out = match self
            .client
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) => {
                let e = ec2_err("DescribeInstances", &e);
                return if e.is_not_found() { Ok(None) } else { Err(e) };
            }
        };
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(id))
            .cloned())
    }
}
