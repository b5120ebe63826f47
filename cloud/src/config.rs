//! The one way every pilotlight binary (and the test kit) configures the AWS SDK:
//! region, endpoint URL (the local emulator or an S3-compatible server, with path-style
//! addressing), standard retries with a maximum number of attempts, connect/read/attempt
//! timeouts, and credentials from the AWS default chain only (environment, profile,
//! container or instance role): never from pilotlight's own flags or files.

use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use std::time::Duration;

/// Where no region is configured anywhere.
pub const FALLBACK_REGION: &str = "us-east-1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSettings {
    /// Explicit region; else `AWS_REGION`/`AWS_DEFAULT_REGION`, the profile, and (against
    /// AWS only) the instance metadata; else [`FALLBACK_REGION`].
    pub region: Option<String>,
    /// One endpoint for every service (the local emulator); `None` is AWS.
    pub endpoint_url: Option<String>,
    /// Attempts per call, the first included (standard retry mode: exponential back-off
    /// with jitter on throttling, 5xx, timeouts and connection errors).
    pub max_attempts: u32,
    pub connect_timeout: Duration,
    /// Longest silence while reading an answer (above SQS's 20 s long poll).
    pub read_timeout: Duration,
    /// Longest single attempt (an 8 MiB PUT on a slow link fits).
    pub attempt_timeout: Duration,
    /// Fixed (access key id, secret) instead of the default chain: for the test kit
    /// against the emulator only; no binary sets it.
    pub static_credentials: Option<(String, String)>,
}

impl Default for AwsSettings {
    fn default() -> Self {
        AwsSettings {
            region: None,
            endpoint_url: None,
            max_attempts: 6,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(300),
            static_credentials: None,
        }
    }
}

impl AwsSettings {
    pub fn new(region: Option<String>, endpoint_url: Option<String>) -> Self {
        AwsSettings {
            region,
            endpoint_url,
            ..Default::default()
        }
    }

    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Loads the SDK's shared configuration. Call it where a client is first needed, so
    /// a command that fails on its own input never resolves a region or credentials.
    pub async fn load(&self) -> Aws {
        let explicit = self.region.clone().map(Region::new);
        // Against an endpoint (the emulator, MinIO) the instance metadata service is never
        // asked: it is not there, and asking costs a timeout and a warning.
        let region = if self.endpoint_url.is_some() {
            RegionProviderChain::first_try(explicit)
                .or_else(aws_config::environment::region::EnvironmentVariableRegionProvider::new())
                .or_else(aws_config::profile::ProfileFileRegionProvider::new())
                .region()
                .await
        } else {
            RegionProviderChain::first_try(explicit)
                .or_default_provider()
                .region()
                .await
        };
        let region = match region {
            Some(r) => r,
            None => {
                if self.endpoint_url.is_none() {
                    tracing::warn!(
                        "no AWS region set (--region, AWS_REGION, a profile, or instance metadata on EC2): using {FALLBACK_REGION}"
                    );
                }
                Region::new(FALLBACK_REGION)
            }
        };
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .retry_config(RetryConfig::standard().with_max_attempts(self.max_attempts))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(self.connect_timeout)
                    .read_timeout(self.read_timeout)
                    .operation_attempt_timeout(self.attempt_timeout)
                    .build(),
            );
        if let Some(ep) = &self.endpoint_url {
            loader = loader.endpoint_url(ep);
        }
        if let Some((id, secret)) = &self.static_credentials {
            loader = loader.credentials_provider(aws_credential_types::Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "pilotlight-static",
            ));
        }
        Aws {
            sdk: loader.load().await,
            settings: self.clone(),
        }
    }
}

/// The loaded configuration; makes every service's client the same way.
#[derive(Debug, Clone)]
pub struct Aws {
    pub sdk: SdkConfig,
    pub settings: AwsSettings,
}

impl Aws {
    pub fn region(&self) -> &str {
        self.sdk.region().map_or(FALLBACK_REGION, |r| r.as_ref())
    }

    /// Where S3 requests go, for messages.
    pub fn endpoint_name(&self) -> String {
        self.settings
            .endpoint_url
            .clone()
            .unwrap_or_else(|| format!("AWS ({})", self.region()))
    }

    #[cfg(feature = "s3")]
    pub fn s3_client(&self) -> aws_sdk_s3::Client {
        // No response checksum validation: the receiver checks every data object's decoded
        // SHA-256 against its manifest, a stronger check than S3's checksum of the stored
        // bytes, and paying for both hashed every byte twice (a fifth of the apply's CPU).
        // The transport is TLS; requests still carry the sender's SHA-256 on PUT.
        let mut conf = aws_sdk_s3::config::Builder::from(&self.sdk).response_checksum_validation(
            aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
        );
        if self.settings.endpoint_url.is_some() {
            // S3-compatible endpoints and the emulator need path-style addressing.
            conf = conf.force_path_style(true);
        }
        aws_sdk_s3::Client::from_conf(conf.build())
    }

    /// The bucket, through the SDK.
    #[cfg(feature = "s3")]
    pub fn s3(&self, bucket: impl Into<String>) -> crate::s3::SdkS3 {
        crate::s3::SdkS3::new(self.s3_client(), bucket).with_endpoint(self.endpoint_name())
    }

    #[cfg(feature = "sqs")]
    pub fn sqs_client(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.sdk)
    }

    /// The queue, through the SDK.
    #[cfg(feature = "sqs")]
    pub fn sqs(&self, url: impl Into<String>) -> crate::sqs::SdkSqs {
        crate::sqs::SdkSqs {
            client: self.sqs_client(),
            url: url.into(),
        }
    }

    #[cfg(feature = "ec2")]
    pub fn ec2_client(&self) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&self.sdk)
    }

    #[cfg(feature = "ec2")]
    pub fn ec2(&self) -> crate::ec2::SdkEc2 {
        crate::ec2::SdkEc2 {
            client: self.ec2_client(),
            #[cfg(feature = "ssm")]
            ssm: Some(aws_sdk_ssm::Client::new(&self.sdk)),
        }
    }

    /// CloudWatch metrics, through the SDK; at `endpoint` instead of the configuration's
    /// when given (a VPC endpoint, say).
    #[cfg(feature = "metrics")]
    pub fn metrics(&self, endpoint: Option<&str>) -> crate::metrics::SdkMetrics {
        let mut b = aws_sdk_cloudwatch::config::Builder::from(&self.sdk);
        if let Some(url) = endpoint {
            b = b.endpoint_url(url);
        }
        crate::metrics::SdkMetrics {
            client: aws_sdk_cloudwatch::Client::from_conf(b.build()),
        }
    }

    /// Systems Manager Run Command, through the SDK.
    #[cfg(feature = "ssm")]
    pub fn ssm(&self) -> crate::ssm::SdkSsm {
        crate::ssm::SdkSsm {
            client: aws_sdk_ssm::Client::new(&self.sdk),
        }
    }

    /// Route 53, through the SDK.
    #[cfg(feature = "route53")]
    pub fn route53(&self) -> crate::route53::SdkRoute53 {
        crate::route53::SdkRoute53 {
            client: aws_sdk_route53::Client::new(&self.sdk),
        }
    }

    /// The witness and notifications of guarded automatic failover, through the SDK.
    #[cfg(feature = "witness")]
    pub fn witness(&self) -> crate::witness::SdkWitness {
        crate::witness::SdkWitness {
            cloudwatch: aws_sdk_cloudwatch::Client::new(&self.sdk),
            route53: aws_sdk_route53::Client::new(&self.sdk),
            sns: aws_sdk_sns::Client::new(&self.sdk),
        }
    }

    #[cfg(feature = "ebs")]
    pub fn ebs(&self) -> crate::ebs::SdkEbs {
        crate::ebs::SdkEbs {
            ebs: aws_sdk_ebs::Client::new(&self.sdk),
            ec2: self.ec2_client(),
        }
    }
}

#[cfg(feature = "s3")]
pub use lazy::LazyS3;

#[cfg(feature = "s3")]
mod lazy {
    use super::AwsSettings;
    use crate::error::CloudError;
    use crate::s3::{ObjectStore, PutOptions, SdkS3, Versioned};
    use bytes::Bytes;

    /// [`SdkS3`], configured on first use: a command that fails on its own input (a
    /// missing file, a bad flag) never resolves a region or credentials first.
    #[derive(Debug)]
    pub struct LazyS3 {
        settings: AwsSettings,
        bucket: String,
        cell: tokio::sync::OnceCell<SdkS3>,
    }

    impl LazyS3 {
        pub fn new(settings: AwsSettings, bucket: impl Into<String>) -> Self {
            LazyS3 {
                settings,
                bucket: bucket.into(),
                cell: tokio::sync::OnceCell::new(),
            }
        }

        pub async fn get(&self) -> &SdkS3 {
            self.cell
                .get_or_init(|| async { self.settings.load().await.s3(self.bucket.clone()) })
                .await
        }
    }

    impl ObjectStore for LazyS3 {
        fn bucket(&self) -> &str {
            &self.bucket
        }
        async fn get(&self, key: &str, max_len: u64) -> Result<Bytes, CloudError> {
            ObjectStore::get(self.get().await, key, max_len).await
        }
        async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes, CloudError> {
            self.get().await.get_range(key, start, len).await
        }
        async fn get_chunks<E: Send, F: FnMut(&[u8]) -> Result<(), E> + Send>(
            &self,
            key: &str,
            max_len: u64,
            sink: F,
        ) -> Result<u64, crate::ChunksError<E>> {
            self.get().await.get_chunks(key, max_len, sink).await
        }
        async fn head(&self, key: &str) -> Result<Option<u64>, CloudError> {
            self.get().await.head(key).await
        }
        async fn list(
            &self,
            prefix: &str,
            keep: fn(&str) -> bool,
        ) -> Result<Vec<String>, CloudError> {
            self.get().await.list(prefix, keep).await
        }
        async fn put(
            &self,
            key: &str,
            body: Bytes,
            opts: PutOptions,
        ) -> Result<Option<String>, CloudError> {
            self.get().await.put(key, body, opts).await
        }
        async fn get_versioned(
            &self,
            key: &str,
            max_len: u64,
        ) -> Result<Option<Versioned>, CloudError> {
            self.get().await.get_versioned(key, max_len).await
        }
        async fn delete(&self, key: &str) -> Result<(), CloudError> {
            self.get().await.delete(key).await
        }
        async fn create_multipart(&self, key: &str) -> Result<String, CloudError> {
            self.get().await.create_multipart(key).await
        }
        async fn upload_part(
            &self,
            key: &str,
            upload_id: &str,
            number: i32,
            body: Bytes,
        ) -> Result<String, CloudError> {
            self.get()
                .await
                .upload_part(key, upload_id, number, body)
                .await
        }
        async fn complete_multipart(
            &self,
            key: &str,
            upload_id: &str,
            parts: Vec<(i32, String)>,
        ) -> Result<(), CloudError> {
            self.get()
                .await
                .complete_multipart(key, upload_id, parts)
                .await
        }
        async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), CloudError> {
            self.get().await.abort_multipart(key, upload_id).await
        }
    }
}
