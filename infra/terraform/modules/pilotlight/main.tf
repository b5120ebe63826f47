# pilotlight: the replication bucket and its event queue. The same stack as
# infra/cloudformation/pilotlight.yaml (infra/tests keeps them in step).

data "aws_caller_identity" "current" {}
data "aws_region" "current" {}
data "aws_partition" "current" {}

locals {
  account   = data.aws_caller_identity.current.account_id
  region    = data.aws_region.current.name
  partition = data.aws_partition.current.partition
  use_kms   = var.kms_key_arn != ""
  # image: the receiver instance and its image volume; snapshots: the replica function.
  image_mode     = var.replica_mode == "image"
  snapshots_mode = var.replica_mode == "snapshots"
  image_points   = var.recovery_points && var.replica_mode == "image"
}

# ---- replication bucket -------------------------------------------------------------

resource "aws_s3_bucket" "data_bucket" {
  #checkov:skip=CKV_AWS_18:Access logging needs a separate log bucket owned by the account's logging setup; enable it there (CloudTrail data events cover object-level audit).
  #checkov:skip=CKV_AWS_144:Cross-region replication is the user's choice of a second region; the receiver holds the working copy.
  bucket = var.bucket_name != "" ? var.bucket_name : null
  # Unique when unnamed: a retained bucket of a destroyed deployment never blocks a new one.
  bucket_prefix = var.bucket_name != "" ? null : "pilotlight-${local.account}-"
  lifecycle {
    prevent_destroy = true
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data_bucket" {
  bucket = aws_s3_bucket.data_bucket.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = local.use_kms ? "aws:kms" : "AES256"
      kms_master_key_id = local.use_kms ? var.kms_key_arn : null
    }
    bucket_key_enabled = local.use_kms ? true : null
  }
}

resource "aws_s3_bucket_public_access_block" "data_bucket" {
  bucket                  = aws_s3_bucket.data_bucket.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "data_bucket" {
  bucket = aws_s3_bucket.data_bucket.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "data_bucket" {
  bucket = aws_s3_bucket.data_bucket.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "data_bucket" {
  bucket = aws_s3_bucket.data_bucket.id
  rule {
    id     = "expire-generations"
    status = "Enabled"
    filter {
      prefix = "${var.prefix}/"
    }
    expiration {
      days = var.retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
  }
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

resource "aws_s3_bucket_notification" "data_bucket" {
  bucket = aws_s3_bucket.data_bucket.id
  # The trailing slash keeps DR run records (pilotlight-dr/runs/) out of the queue.
  # Snapshots mode needs only manifests and export requests (not its own documents nor
  # the data objects): two rules whose suffixes do not overlap.
  dynamic "queue" {
    for_each = local.snapshots_mode ? ["/manifest.json", "/request.json"] : [""]
    content {
      queue_arn     = aws_sqs_queue.events_queue.arn
      events        = ["s3:ObjectCreated:*"]
      filter_prefix = "${var.prefix}/"
      filter_suffix = queue.value != "" ? queue.value : null
    }
  }
  depends_on = [aws_sqs_queue_policy.events_queue_policy]
}

data "aws_iam_policy_document" "data_bucket_policy" {
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    resources = [aws_s3_bucket.data_bucket.arn, "${aws_s3_bucket.data_bucket.arn}/*"]
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "data_bucket_policy" {
  bucket = aws_s3_bucket.data_bucket.id
  policy = data.aws_iam_policy_document.data_bucket_policy.json
}

# ---- event queue ----------------------------------------------------------------------

resource "aws_sqs_queue" "events_dead_letter_queue" {
  name_prefix               = "${var.name}-events-dlq-"
  sqs_managed_sse_enabled   = true
  message_retention_seconds = 1209600
}

resource "aws_sqs_queue" "events_queue" {
  # SQS-managed SSE: S3 notifications cannot reach a queue encrypted with the AWS
  # managed KMS key, and a customer key would need a key policy for S3.
  name_prefix                = "${var.name}-events-"
  sqs_managed_sse_enabled    = true
  message_retention_seconds  = 1209600
  receive_wait_time_seconds  = 20
  visibility_timeout_seconds = var.visibility_timeout
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.events_dead_letter_queue.arn
    maxReceiveCount     = var.max_receive_count
  })
}

data "aws_iam_policy_document" "events_queue_policy" {
  statement {
    sid     = "OnlyThisBucket"
    effect  = "Allow"
    actions = ["sqs:SendMessage"]
    principals {
      type        = "Service"
      identifiers = ["s3.amazonaws.com"]
    }
    resources = [aws_sqs_queue.events_queue.arn]
    condition {
      test     = "ArnEquals"
      variable = "aws:SourceArn"
      values   = [aws_s3_bucket.data_bucket.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account]
    }
  }
}

resource "aws_sqs_queue_policy" "events_queue_policy" {
  queue_url = aws_sqs_queue.events_queue.id
  policy    = data.aws_iam_policy_document.events_queue_policy.json
}
