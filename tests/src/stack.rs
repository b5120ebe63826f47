//! The local AWS stack for tests: a moto server on a free loopback port, with the
//! pilotlight bucket, queue, dead-letter queue and bucket notification. Each test starts
//! its own and it stops when dropped.

use aws_sdk_s3::types::{
    Event, FilterRule, FilterRuleName, NotificationConfiguration, NotificationConfigurationFilter,
    QueueConfiguration, S3KeyFilter,
};
use aws_sdk_sqs::types::QueueAttributeName;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running moto server with the pilotlight resources.
#[derive(Debug)]
pub struct LocalStack {
    child: Option<Child>,
    pub endpoint: String,
    pub bucket: String,
    pub prefix: String,
    pub queue_url: String,
    pub dlq_url: String,
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
}

/// A loopback port nothing listens on (for "unreachable endpoint" tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

/// Dummy credentials for the emulator, as environment pairs for child processes.
pub const EMULATOR_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
];

impl LocalStack {
    /// Starts moto from the project virtualenv (`scripts/setup` makes it) and creates
    /// the resources. Panics with a clear message when it cannot.
    pub async fn start() -> Self {
        let (child, endpoint) = Self::start_server().await;
        Self::provision(child, endpoint).await
    }

    /// Starts moto with nothing in it: the bucket, prefix and queue fields are empty
    /// until [`LocalStack::use_deployed`] fills them (the infrastructure test deploys
    /// its own with CloudFormation).
    pub async fn start_empty() -> Self {
        let (child, endpoint) = Self::start_server().await;
        let (s3, sqs) = clients(&endpoint).await;
        Self {
            child: Some(child),
            endpoint,
            bucket: String::new(),
            prefix: String::new(),
            queue_url: String::new(),
            dlq_url: String::new(),
            s3,
            sqs,
        }
    }

    /// Points the helpers at resources made some other way.
    pub fn use_deployed(&mut self, bucket: &str, prefix: &str, queue_url: &str, dlq_url: &str) {
        self.bucket = bucket.to_string();
        self.prefix = prefix.to_string();
        self.queue_url = queue_url.to_string();
        self.dlq_url = dlq_url.to_string();
    }

    async fn start_server() -> (Child, String) {
        // The launcher runs the venv's moto server without its per-request access log.
        let launcher = crate::repo_root().join("scripts/moto-server");
        let moto = crate::repo_root().join(".venv/tools/bin/moto_server");
        assert!(
            moto.exists(),
            "{} is missing: run scripts/setup first",
            moto.display()
        );
        // A free port can be taken between our check and moto's bind: try a few.
        for attempt in 0..5 {
            let port = free_port();
            let mut child = Command::new(&launcher)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn moto_server");
            let endpoint = format!("http://127.0.0.1:{port}");
            if wait_ready(&endpoint, &mut child).await {
                return (child, endpoint);
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("moto_server did not come up on port {port} (attempt {attempt})");
        }
        panic!("moto_server did not start after 5 attempts");
    }

    async fn provision(child: Child, endpoint: String) -> Self {
        let (s3, sqs) = clients(&endpoint).await;
        let bucket = "pilotlight-test".to_string();
        let prefix = "dr".to_string();
        s3.create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .expect("create bucket");
        let dlq_url = sqs
            .create_queue()
            .queue_name("pilotlight-events-dlq")
            .send()
            .await
            .expect("create dlq")
            .queue_url
            .unwrap_or_default();
        let dlq_arn = queue_arn(&sqs, &dlq_url).await;
        let redrive = format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"5"}}"#);
        let queue_url = sqs
            .create_queue()
            .queue_name("pilotlight-events")
            .attributes(QueueAttributeName::RedrivePolicy, redrive)
            .attributes(QueueAttributeName::VisibilityTimeout, "300")
            .send()
            .await
            .expect("create queue")
            .queue_url
            .unwrap_or_default();
        let arn = queue_arn(&sqs, &queue_url).await;
        notify_queue(&s3, &bucket, &prefix, &arn).await;
        Self {
            child: Some(child),
            endpoint,
            bucket,
            prefix,
            queue_url,
            dlq_url,
            s3,
            sqs,
        }
    }

    /// Environment for a child process pointed at this stack.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = EMULATOR_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        v.push(("PILOTLIGHT_ENDPOINT_URL".into(), self.endpoint.clone()));
        v.push(("PILOTLIGHT_BUCKET".into(), self.bucket.clone()));
        v.push(("PILOTLIGHT_PREFIX".into(), self.prefix.clone()));
        v
    }

    /// An EC2 client on the emulator.
    pub async fn ec2(&self) -> aws_sdk_ec2::Client {
        emulator(&self.endpoint).await.ec2_client()
    }

    /// The bucket through pilotlight's S3 access layer.
    pub fn bucket(&self) -> pilotlight_cloud::s3::SdkS3 {
        pilotlight_cloud::s3::SdkS3::new(self.s3.clone(), self.bucket.clone())
    }

    /// Every key under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        self.list(prefix, |_| true).await
    }

    /// The manifest keys under `prefix`.
    pub async fn manifests(&self, prefix: &str) -> Vec<String> {
        self.list(prefix, |k| k.ends_with("/manifest.json")).await
    }

    /// The keys under `prefix` that `keep` accepts, through the receiver's S3 listing.
    async fn list(&self, prefix: &str, keep: fn(&str) -> bool) -> Vec<String> {
        use pilotlight_cloud::ObjectStore;
        self.bucket()
            .list(prefix, keep)
            .await
            .expect("list objects")
    }

    pub async fn get(&self, key: &str) -> Vec<u8> {
        self.s3
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("get {key}: {e}"))
            .body
            .collect()
            .await
            .expect("read body")
            .to_vec()
    }
}

impl LocalStack {
    /// A second queue (with its own dead-letter queue after `max_receives`) that tests
    /// feed by hand, to control order and duplication of events. Returns (url, dlq url).
    pub async fn extra_queue(
        &self,
        name: &str,
        visibility: u32,
        max_receives: u32,
    ) -> (String, String) {
        let dlq = self
            .sqs
            .create_queue()
            .queue_name(format!("{name}-dlq"))
            .send()
            .await
            .expect("create dlq")
            .queue_url
            .unwrap_or_default();
        let dlq_arn = queue_arn(&self.sqs, &dlq).await;
        let redrive =
            format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"{max_receives}"}}"#);
        let url = self
            .sqs
            .create_queue()
            .queue_name(name)
            .attributes(QueueAttributeName::RedrivePolicy, redrive)
            .attributes(
                QueueAttributeName::VisibilityTimeout,
                visibility.to_string(),
            )
            .send()
            .await
            .expect("create queue")
            .queue_url
            .unwrap_or_default();
        (url, dlq)
    }

    /// Receives and deletes every message now in `queue`; returns their bodies in order.
    pub async fn drain(&self, queue: &str) -> Vec<String> {
        self.drain_up_to(queue, usize::MAX).await
    }

    /// Receives and deletes the messages now in `queue`, stopping after `max` of them
    /// (one receive more at most): a pump that forwards while senders still produce
    /// must not wait for the queue to run dry. Returns their bodies in order.
    pub async fn drain_up_to(&self, queue: &str, max: usize) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < max {
            let r = self
                .sqs
                .receive_message()
                .queue_url(queue)
                .max_number_of_messages(10)
                .send()
                .await
                .expect("receive");
            let msgs = r.messages();
            if msgs.is_empty() {
                break;
            }
            let mut delete = self.sqs.delete_message_batch().queue_url(queue);
            for (i, m) in msgs.iter().enumerate() {
                out.push(m.body().unwrap_or_default().to_string());
                delete = delete.entries(
                    aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(m.receipt_handle().unwrap_or_default())
                        .build()
                        .expect("delete entry"),
                );
            }
            let d = delete.send().await.expect("delete batch");
            assert!(d.failed().is_empty(), "delete batch: {:?}", d.failed());
        }
        out
    }

    /// Sends every body, ten per SendMessageBatch request.
    pub async fn send_all(&self, queue: &str, bodies: &[String]) {
        for chunk in bodies.chunks(10) {
            let mut req = self.sqs.send_message_batch().queue_url(queue);
            for (i, b) in chunk.iter().enumerate() {
                req = req.entries(
                    aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(b)
                        .build()
                        .expect("send entry"),
                );
            }
            let r = req.send().await.expect("send batch");
            assert!(r.failed().is_empty(), "send batch: {:?}", r.failed());
        }
    }

    pub async fn send(&self, queue: &str, body: &str) {
        self.sqs
            .send_message()
            .queue_url(queue)
            .message_body(body)
            .send()
            .await
            .expect("send message");
    }

    /// (visible, in flight) messages of a queue.
    pub async fn depth(&self, queue: &str) -> (u64, u64) {
        let a = self
            .sqs
            .get_queue_attributes()
            .queue_url(queue)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .expect("queue attributes");
        let get = |n: &QueueAttributeName| {
            a.attributes()
                .and_then(|m| m.get(n))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (
            get(&QueueAttributeName::ApproximateNumberOfMessages),
            get(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        )
    }

    /// The AWS CLI from the project virtualenv against this emulator, `--output json`,
    /// for services the test kit has no SDK client for (CloudFormation, IAM, SSM,
    /// Lambda). Panics with its stderr when it fails; `null` for empty output.
    pub fn aws_cli(&self, args: &[&str]) -> serde_json::Value {
        let aws = crate::repo_root().join(".venv/tools/bin/aws");
        let out = Command::new(&aws)
            .args(["--endpoint-url", &self.endpoint, "--output", "json"])
            .args(args)
            .envs(EMULATOR_ENV)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e} (run scripts/setup first)", aws.display()));
        assert!(
            out.status.success(),
            "aws {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return serde_json::Value::Null;
        }
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("aws {args:?}: output is not JSON: {e}"))
    }

    pub async fn put(&self, key: &str, body: Vec<u8>) {
        use pilotlight_cloud::{ObjectStore, PutOptions};
        self.bucket()
            .put(key, body.into(), PutOptions::default())
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }
}

impl Drop for LocalStack {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_ready(endpoint: &str, child: &mut Child) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let addr = endpoint.trim_start_matches("http://").to_string();
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The SDK configured for an emulator endpoint with dummy credentials, through the same
/// builder the binaries use.
pub async fn emulator(endpoint: &str) -> pilotlight_cloud::Aws {
    let mut settings =
        pilotlight_cloud::AwsSettings::new(Some("us-east-1".into()), Some(endpoint.into()));
    settings.static_credentials = Some(("testing".into(), "testing".into()));
    settings.load().await
}

/// SDK clients for an emulator endpoint, with dummy credentials.
pub async fn clients(endpoint: &str) -> (aws_sdk_s3::Client, aws_sdk_sqs::Client) {
    let aws = emulator(endpoint).await;
    (aws.s3_client(), aws.sqs_client())
}

/// The bucket's ObjectCreated notification under `{prefix}/` to the queue `queue_arn`.
pub async fn notify_queue(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str, queue_arn: &str) {
    let filter = NotificationConfigurationFilter::builder()
        .key(
            S3KeyFilter::builder()
                .filter_rules(
                    FilterRule::builder()
                        .name(FilterRuleName::Prefix)
                        .value(format!("{prefix}/"))
                        .build(),
                )
                .build(),
        )
        .build();
    let qc = QueueConfiguration::builder()
        .id("pilotlight")
        .queue_arn(queue_arn)
        .events(Event::from("s3:ObjectCreated:*"))
        .filter(filter)
        .build()
        .expect("queue configuration");
    s3.put_bucket_notification_configuration()
        .bucket(bucket)
        .notification_configuration(
            NotificationConfiguration::builder()
                .queue_configurations(qc)
                .build(),
        )
        .send()
        .await
        .expect("put bucket notification");
}

/// The ARN of the queue at `url`.
pub async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> String {
    sqs.get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("get queue attributes")
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .unwrap_or_default()
}
