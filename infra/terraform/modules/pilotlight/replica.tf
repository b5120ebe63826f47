# ---- snapshots mode: the replica function ------------------------------------------
# No instance, no volume: the stack's queue (manifest events) and the function's own
# task queue (shards of large generations) feed one function; each generation becomes an
# EBS snapshot parented on the disk's previous point (docs/replica-modes.md).

resource "aws_sqs_queue" "replica_task_dead_letter_queue" {
  count                     = local.snapshots_mode ? 1 : 0
  name_prefix               = "${var.name}-replica-dlq-"
  sqs_managed_sse_enabled   = true
  message_retention_seconds = 1209600
}

resource "aws_sqs_queue" "replica_task_queue" {
  count                   = local.snapshots_mode ? 1 : 0
  name_prefix             = "${var.name}-replica-tasks-"
  sqs_managed_sse_enabled = true
  # Six times the function's timeout, as the Lambda Developer Guide advises.
  visibility_timeout_seconds = 1800
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.replica_task_dead_letter_queue[0].arn
    maxReceiveCount     = var.max_receive_count
  })
}

data "aws_iam_policy_document" "replica_function_role_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "replica_function_role" {
  count              = local.snapshots_mode ? 1 : 0
  name_prefix        = "${var.name}-replica-"
  description        = "pilotlight replica function (snapshots mode)"
  assume_role_policy = data.aws_iam_policy_document.replica_function_role_trust.json
}

locals {
  snapshot_arn = "arn:${local.partition}:ec2:${local.region}::snapshot/*"
}

data "aws_iam_policy_document" "replica_function_role" {
  statement {
    sid       = "ReadReplicatedObjects"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.data_bucket.arn}/${var.prefix}/*"]
  }
  statement {
    sid       = "ListChainsAndShards"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data_bucket.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.prefix}/*"]
    }
  }
  # Its own documents (chain heads, shard records) and exports; never a sender's generation.
  statement {
    sid     = "WriteChainsAndExports"
    actions = ["s3:PutObject", "s3:AbortMultipartUpload"]
    resources = [
      "${aws_s3_bucket.data_bucket.arn}/${var.prefix}/*/r/*",
      "${aws_s3_bucket.data_bucket.arn}/${var.prefix}/*/x/*",
    ]
  }
  statement {
    sid       = "ConsumeQueues"
    actions   = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueAttributes"]
    resources = concat([aws_sqs_queue.events_queue.arn], aws_sqs_queue.replica_task_queue[*].arn)
  }
  statement {
    sid       = "SendShardTasks"
    actions   = ["sqs:SendMessage"]
    resources = aws_sqs_queue.replica_task_queue[*].arn
  }
  statement {
    sid       = "ShipLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = [for g in aws_cloudwatch_log_group.replica_function_log_group : "${g.arn}:*"]
  }
  statement {
    sid       = "StartOwnPoints"
    actions   = ["ebs:StartSnapshot"]
    resources = [local.snapshot_arn]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/pilotlight:stack"
      values   = [var.name]
    }
  }
  statement {
    sid       = "WriteOwnPoints"
    actions   = ["ebs:PutSnapshotBlock", "ebs:CompleteSnapshot"]
    resources = [local.snapshot_arn]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/pilotlight:stack"
      values   = [var.name]
    }
  }
  # StartSnapshot with tags is also ec2:CreateTags, on the request's tags (Service
  # Authorization Reference, Amazon Elastic Block Store).
  statement {
    sid       = "TagPointsAtStart"
    actions   = ["ec2:CreateTags"]
    resources = [local.snapshot_arn]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/pilotlight:stack"
      values   = [var.name]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/pilotlight:point"
      values   = ["1"]
    }
  }
  statement {
    sid       = "ReadOwnPoints"
    actions   = ["ebs:ListSnapshotBlocks", "ebs:GetSnapshotBlock"]
    resources = [local.snapshot_arn]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/pilotlight:stack"
      values   = [var.name]
    }
  }
  statement {
    sid       = "FindPoints"
    actions   = ["ec2:DescribeSnapshots"]
    resources = ["*"]
  }
  statement {
    sid       = "DeleteFailedAndTagOwnPoints"
    actions   = ["ec2:DeleteSnapshot", "ec2:CreateTags"]
    resources = [local.snapshot_arn]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/pilotlight:stack"
      values   = [var.name]
    }
  }
  # Each day's kept point locked (point_lock; its end tagged with ec2:CreateTags above):
  # only the stack's own points.
  dynamic "statement" {
    for_each = var.point_lock != "off" ? [1] : []
    content {
      sid       = "LockOwnPoints"
      actions   = ["ec2:LockSnapshot"]
      resources = [local.snapshot_arn]
      condition {
        test     = "StringEquals"
        variable = "aws:ResourceTag/pilotlight:stack"
        values   = [var.name]
      }
    }
  }
  dynamic "statement" {
    for_each = local.use_kms ? [1] : []
    content {
      sid       = "UseStackKey"
      actions   = ["kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncrypt*"]
      resources = [var.kms_key_arn]
    }
  }
}

resource "aws_iam_role_policy" "replica_function_role" {
  count  = local.snapshots_mode ? 1 : 0
  name   = "replica"
  role   = aws_iam_role.replica_function_role[0].id
  policy = data.aws_iam_policy_document.replica_function_role.json
}

resource "aws_cloudwatch_log_group" "replica_function_log_group" {
  count             = local.snapshots_mode ? 1 : 0
  name              = "/aws/lambda/${var.name}-replica"
  retention_in_days = var.log_retention_days
  kms_key_id        = local.use_kms ? var.kms_key_arn : null
}

resource "aws_lambda_function" "replica_function" {
  #checkov:skip=CKV_AWS_117:It calls only AWS APIs; a VPC would add NAT or endpoints and no isolation.
  #checkov:skip=CKV_AWS_116:Its event sources are SQS queues with their own dead-letter queues (redrive).
  #checkov:skip=CKV_AWS_173:Its environment holds names, no secrets.
  #checkov:skip=CKV_AWS_115:Concurrency is bounded per event source (replica_max_concurrency), not reserved - a reservation fails in accounts with the new-account quota of 10.
  #checkov:skip=CKV_AWS_50:X-Ray tracing is off (it needs X-Ray permissions and costs per trace).
  #checkov:skip=CKV_AWS_272:Code signing needs an AWS Signer profile the user owns; scripts/package prints the zip's SHA-256 instead.
  count         = local.snapshots_mode ? 1 : 0
  function_name = "${var.name}-replica"
  description   = "pilotlight snapshots mode - each generation written into an EBS snapshot parented on the previous point"
  runtime       = "provided.al2023"
  handler       = "bootstrap"
  architectures = ["x86_64"]
  memory_size   = 1769
  # At most the events queue's visibility timeout (Lambda refuses the mapping otherwise).
  timeout   = 300
  role      = aws_iam_role.replica_function_role[0].arn
  s3_bucket = var.artifact_bucket
  s3_key    = var.replica_lambda_artifact_key
  logging_config {
    log_format = "Text"
    log_group  = aws_cloudwatch_log_group.replica_function_log_group[0].name
  }
  environment {
    variables = merge(
      {
        PILOTLIGHT_BUCKET           = aws_s3_bucket.data_bucket.id
        PILOTLIGHT_PREFIX           = var.prefix
        PILOTLIGHT_STACK            = var.name
        PILOTLIGHT_TASK_QUEUE_URL   = aws_sqs_queue.replica_task_queue[0].id
        PILOTLIGHT_KEEP_ALL_HOURS   = var.keep_all_hours
        PILOTLIGHT_KEEP_HOURLY_DAYS = var.keep_hourly_days
        PILOTLIGHT_KEEP_DAILY_DAYS  = var.keep_daily_days
        PILOTLIGHT_POINT_LOCK       = var.point_lock
        RUST_LOG                    = "info"
      },
      local.use_kms ? { PILOTLIGHT_POINTS_KMS_KEY = var.kms_key_arn } : {},
    )
  }
}

# The schedule sweeps every chain to its newest generation (points whose events were lost,
# or left waiting), then prunes the stack's points (the receiver does both in image mode).
resource "aws_cloudwatch_event_rule" "replica_schedule" {
  count               = local.snapshots_mode ? 1 : 0
  name_prefix         = "${var.name}-replica-"
  description         = "Write points whose events were lost, then apply retention (snapshots mode)"
  schedule_expression = "rate(10 minutes)"
  state               = "ENABLED"
}

resource "aws_cloudwatch_event_target" "replica_schedule" {
  count     = local.snapshots_mode ? 1 : 0
  rule      = aws_cloudwatch_event_rule.replica_schedule[0].name
  target_id = "replica"
  arn       = aws_lambda_function.replica_function[0].arn
}

resource "aws_lambda_permission" "replica_schedule_permission" {
  count         = local.snapshots_mode ? 1 : 0
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.replica_function[0].function_name
  principal     = "events.amazonaws.com"
  source_arn    = aws_cloudwatch_event_rule.replica_schedule[0].arn
}

resource "aws_lambda_event_source_mapping" "replica_events_mapping" {
  count                   = local.snapshots_mode ? 1 : 0
  function_name           = aws_lambda_function.replica_function[0].arn
  event_source_arn        = aws_sqs_queue.events_queue.arn
  batch_size              = 10
  function_response_types = ["ReportBatchItemFailures"]
  scaling_config {
    maximum_concurrency = var.replica_max_concurrency
  }
}

resource "aws_lambda_event_source_mapping" "replica_tasks_mapping" {
  count                   = local.snapshots_mode ? 1 : 0
  function_name           = aws_lambda_function.replica_function[0].arn
  event_source_arn        = aws_sqs_queue.replica_task_queue[0].arn
  batch_size              = 1
  function_response_types = ["ReportBatchItemFailures"]
  scaling_config {
    maximum_concurrency = var.replica_max_concurrency
  }
}

resource "aws_cloudwatch_metric_alarm" "replica_errors_alarm" {
  count               = local.snapshots_mode ? 1 : 0
  alarm_name          = "${var.name}-replica-errors"
  alarm_description   = "pilotlight replica function errors (points not written; see its log)."
  namespace           = "AWS/Lambda"
  metric_name         = "Errors"
  dimensions          = { FunctionName = aws_lambda_function.replica_function[0].function_name }
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alert_topic.arn]
}

resource "aws_cloudwatch_metric_alarm" "replica_task_dead_letter_alarm" {
  count               = local.snapshots_mode ? 1 : 0
  alarm_name          = "${var.name}-replica-dead-letters"
  alarm_description   = "pilotlight shard tasks the replica function could not finish are in their dead-letter queue (the point is retried; see the function's log)."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = aws_sqs_queue.replica_task_dead_letter_queue[0].name }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 1
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alert_topic.arn]
}

resource "aws_cloudwatch_metric_alarm" "replica_lag_alarm" {
  count               = local.snapshots_mode ? 1 : 0
  alarm_name          = "${var.name}-replica-lag"
  alarm_description   = "pilotlight snapshots mode is behind - the oldest unprocessed event is older than lag_alarm_seconds."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateAgeOfOldestMessage"
  dimensions          = { QueueName = aws_sqs_queue.events_queue.name }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 1
  threshold           = var.lag_alarm_seconds
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alert_topic.arn]
}
