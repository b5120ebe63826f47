# The CloudFormation template's parameters, in snake_case (infra/tests checks the two
# lists match). Terraform-only: `name` (CloudFormation uses the stack name).
# CloudFormation-only: ReceiverAvailabilityZone (read here from the subnet).

variable "name" {
  description = "Name of this deployment; prefixes resource names (the CloudFormation stack name)."
  type        = string
  default     = "pilotlight"
  validation {
    condition     = can(regex("^[A-Za-z][A-Za-z0-9-]{0,39}$", var.name))
    error_message = "name: letters, digits and dashes, at most 40, starting with a letter."
  }
}

variable "prefix" {
  description = "Key prefix of the replicated disks (one path segment, no slashes)."
  type        = string
  default     = "pilotlight"
  validation {
    condition     = can(regex("^[A-Za-z0-9._-]{1,128}$", var.prefix))
    error_message = "prefix: 1-128 of A-Z a-z 0-9 . _ - (no slashes)."
  }
}

variable "bucket_name" {
  description = "Replication bucket name; empty means a unique pilotlight-ACCOUNT-... name (bucket_prefix), so a retained bucket of a destroyed deployment never blocks creating it again."
  type        = string
  default     = ""
}

variable "kms_key_arn" {
  description = "Customer managed KMS key for the bucket, the image volume and the alert topic (SSE-KMS); empty means SSE-S3 and AWS managed EBS encryption."
  type        = string
  default     = ""
}

variable "retention_days" {
  description = "Replicated objects older than this expire. Must exceed the sender's longest interval between runs: DR reads the newest manifest from the bucket."
  type        = number
  default     = 30
}

variable "noncurrent_version_days" {
  description = "Overwritten or deleted object versions are kept this long (versioning guards against a compromised sender)."
  type        = number
  default     = 7
}

variable "max_receive_count" {
  description = "Receives before an event message moves to the dead-letter queue."
  type        = number
  default     = 5
}

variable "visibility_timeout" {
  description = "Seconds an event stays invisible while the receiver applies (it extends this for long applies)."
  type        = number
  default     = 300
}

variable "artifact_bucket" {
  description = "Bucket holding the packaged receiver and Lambda (scripts/package)."
  type        = string
}

variable "receiver_artifact_key" {
  description = "Key of the receiver zip (binary and systemd unit)."
  type        = string
  default     = "pilotlight/pilotlight-receiver-x86_64.zip"
}

variable "dr_lambda_artifact_key" {
  description = "Key of the DR Lambda zip (bootstrap)."
  type        = string
  default     = "pilotlight/pilotlight-dr-lambda-x86_64.zip"
}

variable "replica_mode" {
  description = "image - a receiver instance keeps a raw image per disk and writes a point after each generation; snapshots - no instance and no volume: the replica function writes each generation into an EBS snapshot parented on the previous point (docs/replica-modes.md)."
  type        = string
  default     = "image"
  validation {
    condition     = contains(["image", "snapshots"], var.replica_mode)
    error_message = "replica_mode is image or snapshots."
  }
}

variable "replica_lambda_artifact_key" {
  description = "Key of the replica function's zip (bootstrap), snapshots mode."
  type        = string
  default     = "pilotlight/pilotlight-replica-lambda-x86_64.zip"
}

variable "replica_max_concurrency" {
  description = "Snapshots mode - the most replica function invocations each queue feeds at once (2 to 1 000); pilotlight-replica plan-capacity sizes it."
  type        = number
  default     = 10
  validation {
    condition     = var.replica_max_concurrency >= 2 && var.replica_max_concurrency <= 1000
    error_message = "replica_max_concurrency is 2 to 1 000 (the event source mapping's maximum concurrency)."
  }
}

variable "receiver_vpc_id" {
  description = "VPC of the receiver."
  type        = string
}

variable "receiver_subnet_id" {
  description = "Subnet of the receiver: private, with a route to S3 and SQS (gateway endpoint for S3, NAT or interface endpoints for SQS, SSM and EC2)."
  type        = string
}

variable "receiver_instance_type" {
  description = "Receiver instance type (decode and SHA-256 are CPU-bound; EBS throughput matters)."
  type        = string
  default     = "m6i.large"
}

variable "receiver_ami" {
  description = "SSM parameter holding the Amazon Linux 2023 AMI."
  type        = string
  default     = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
}

variable "image_volume_size" {
  description = "GiB of the gp3 volume that holds the sparse images (at least the protected disks' allocated bytes)."
  type        = number
  default     = 500
}

variable "sender_site" {
  description = "The sender's site; it may write only under prefix/sender_site/."
  type        = string
  default     = "site1"
  validation {
    condition     = can(regex("^[A-Za-z0-9._-]{1,128}$", var.sender_site))
    error_message = "sender_site: 1-128 of A-Z a-z 0-9 . _ -."
  }
}

variable "sender_trusted_principal_arn" {
  description = "Who may assume the sender role (an IAM user or role ARN); empty means principals of this account that are granted sts:AssumeRole on it."
  type        = string
  default     = ""
}

variable "drill_subnet_id" {
  description = "Subnet that DR drills launch into (isolated from production); empty means the request's."
  type        = string
  default     = ""
}

variable "drill_security_group_ids" {
  description = "Comma-separated security groups for drills; empty means the request's."
  type        = string
  default     = ""
}

variable "recovered_instance_role_arn" {
  description = "The role of the instance profile recovered instances may get (--instance-profile, e.g. with SSM access, so verification can ping the SSM agent); the DR function may pass only this role, only to EC2. Empty means none."
  type        = string
  default     = ""
}

variable "plan_hosted_zone_id" {
  description = "The Route 53 hosted zone id (Z...) recovery plans write A records into; the DR function may change only A records, only there (and in plan_drill_hosted_zone_id). Empty means plans write no DNS."
  type        = string
  default     = ""
}

variable "plan_drill_hosted_zone_id" {
  description = "The Route 53 hosted zone id plan drills write their A records into. Empty means drills write no DNS."
  type        = string
  default     = ""
}

variable "automation_alarm_names" {
  description = "CloudWatch alarms that are witnesses of plans' guarded automatic failover: their state changes make the DR function evaluate at once (it also does every minute). Empty means no such rule."
  type        = list(string)
  default     = []
}

variable "alert_email" {
  description = "Email subscribed to the alert topic (confirm the subscription mail); empty means none."
  type        = string
  default     = ""
}

variable "dr_reserved_concurrency" {
  description = "Concurrency reserved for the DR function; 0 reserves none. A reservation must leave 100 executions unreserved in the account, and new accounts start with a quota of 10."
  type        = number
  default     = 0
}

variable "dr_tracing" {
  description = "Active X-Ray tracing of the DR function (the module then grants its role the X-Ray write actions)."
  type        = bool
  default     = false
}

variable "log_retention_days" {
  description = "Days the DR function's and the receiver's CloudWatch Logs are kept."
  type        = number
  default     = 365
}

variable "rpo_target_seconds" {
  description = "The recovery point objective in seconds (1800 = 30 min): the RPO alarm fires when a disk's replication lag exceeds it, or when the receiver publishes nothing; the receiver's status marks such a disk STALLED."
  type        = number
  default     = 1800
  validation {
    condition     = var.rpo_target_seconds >= 60
    error_message = "rpo_target_seconds must be at least 60."
  }
}

variable "lag_alarm_seconds" {
  description = "Alarm when the oldest unprocessed event is older than this (replication lag)."
  type        = number
  default     = 3600
}

variable "recovery_points" {
  description = "After each applied generation the receiver writes a recovery point: an EBS snapshot of the blocks it changed (EBS direct APIs), parented on the previous point. false keeps the raw images only (and grants no EBS actions)."
  type        = bool
  default     = true
}

variable "keep_all_hours" {
  description = "Keep every recovery point this many hours."
  type        = number
  default     = 24
}

variable "keep_hourly_days" {
  description = "Then keep the first point of each hour up to this many days old."
  type        = number
  default     = 7
}

variable "point_lock" {
  description = "EBS Snapshot Lock for each day's kept point, until it leaves the daily tier: governance (deletable only after an ec2:UnlockSnapshot by an allowed principal) or compliance (nobody, root included, can delete it before it expires). infra/README.md."
  type        = string
  default     = "off"
  validation {
    condition     = contains(["off", "governance", "compliance"], var.point_lock)
    error_message = "point_lock must be off, governance or compliance."
  }
}

variable "keep_daily_days" {
  description = "Then the first point of each day up to this many days old; older points are deleted (the newest and those a DR run holds stay)."
  type        = number
  default     = 30
}
