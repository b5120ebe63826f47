# Alerts: rejected events, replication lag, DR Lambda errors.

# No SSE without a customer key: CloudWatch alarms cannot publish to a topic encrypted
# with the AWS managed key (with kms_key_arn, its key policy must admit
# cloudwatch.amazonaws.com).
resource "aws_sns_topic" "alert_topic" {
  name_prefix       = "${var.name}-alerts-"
  display_name      = "pilotlight alerts"
  kms_master_key_id = local.use_kms ? var.kms_key_arn : null
}

resource "aws_sns_topic_subscription" "alert_email_subscription" {
  count     = var.alert_email != "" ? 1 : 0
  topic_arn = aws_sns_topic.alert_topic.arn
  protocol  = "email"
  endpoint  = var.alert_email
}

resource "aws_cloudwatch_metric_alarm" "dead_letter_alarm" {
  alarm_name          = "${var.name}-dead-letters"
  alarm_description   = "pilotlight events the receiver rejected are in the dead-letter queue (see the receiver's log for why)."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = aws_sqs_queue.events_dead_letter_queue.name }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 1
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alert_topic.arn]
}

resource "aws_cloudwatch_metric_alarm" "lag_alarm" {
  count               = local.image_mode ? 1 : 0
  alarm_name          = "${var.name}-replication-lag"
  alarm_description   = "pilotlight replication lag - the oldest unprocessed event is older than lag_alarm_seconds (receiver down or stuck)."
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

resource "aws_cloudwatch_metric_alarm" "dr_errors_alarm" {
  alarm_name          = "${var.name}-dr-errors"
  alarm_description   = "pilotlight DR Lambda errors (run records in s3://BUCKET/pilotlight-dr/runs/ say why)."
  namespace           = "AWS/Lambda"
  metric_name         = "Errors"
  dimensions          = { FunctionName = aws_lambda_function.dr_function.function_name }
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alert_topic.arn]
}

# Each disk's lag and, per stack, the largest are published by the receiver every minute
# (image mode) or by the replica function's 10-minute schedule (snapshots mode); per-VM
# alarms cannot be declared before the VMs are known. A silent site makes the lag grow; a
# silent receiver or schedule publishes nothing: missing data breaches. In snapshots mode
# a period of 15 minutes always holds one schedule run.
resource "aws_cloudwatch_metric_alarm" "rpo_alarm" {
  alarm_name          = "${var.name}-rpo"
  alarm_description   = "pilotlight RPO breach - a disk's replication lag is over rpo_target_seconds, or no lag is published (site, receiver or replica schedule silent)."
  namespace           = "Pilotlight"
  metric_name         = "MaxReplicationLagSeconds"
  dimensions          = { Stack = var.name }
  statistic           = "Maximum"
  period              = local.snapshots_mode ? 900 : 300
  evaluation_periods  = 1
  threshold           = var.rpo_target_seconds
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "breaching"
  alarm_actions       = [aws_sns_topic.alert_topic.arn]
}

resource "aws_cloudwatch_metric_alarm" "receiver_heartbeat_alarm" {
  count               = local.image_mode ? 1 : 0
  alarm_name          = "${var.name}-receiver-heartbeat"
  alarm_description   = "pilotlight receiver heartbeat missing - no metrics from the receiver for 10 minutes (stopped, crashed, or cut off from CloudWatch)."
  namespace           = "Pilotlight"
  metric_name         = "Heartbeat"
  dimensions          = { Stack = var.name }
  statistic           = "Sum"
  period              = 600
  evaluation_periods  = 1
  threshold           = 1
  comparison_operator = "LessThanThreshold"
  treat_missing_data  = "breaching"
  alarm_actions       = [aws_sns_topic.alert_topic.arn]
}

locals {
  # CloudWatch SEARCH finds every disk the receiver publishes.
  per_disk = { for m in ["ReplicationLagSeconds", "PendingGenerations", "BytesApplied", "ApplySeconds", "PointLagSeconds"] :
    m => "SEARCH('{Pilotlight,Stack,Site,VM,Disk} MetricName=\"${m}\" Stack=\"${var.name}\"', '${contains(["BytesApplied", "ApplySeconds"], m) ? "Sum" : "Maximum"}', ${contains(["BytesApplied", "ApplySeconds"], m) ? 300 : 60})"
  }
}

# What an operator opens first: lag per disk, pending generations, bytes applied, apply
# time, the receiver's heartbeat and largest lag, the dead-letter queue, DR runs and errors.
resource "aws_cloudwatch_dashboard" "dashboard" {
  dashboard_name = "${var.name}-pilotlight"
  dashboard_body = jsonencode({
    widgets = [
      { type = "metric", x = 0, y = 0, width = 12, height = 6, properties = {
        title       = "Replication lag per disk (s)", region = local.region, view = "timeSeries", stat = "Maximum", period = 60,
        metrics     = [[{ expression = local.per_disk["ReplicationLagSeconds"], id = "lag" }]],
        annotations = { horizontal = [{ label = "RPO target", value = var.rpo_target_seconds }] }
      } },
      { type = "metric", x = 12, y = 0, width = 12, height = 6, properties = {
        title   = "Largest lag and heartbeat", region = local.region, view = "timeSeries", period = 60,
        metrics = [["Pilotlight", "MaxReplicationLagSeconds", "Stack", var.name, { stat = "Maximum" }], ["Pilotlight", "Heartbeat", "Stack", var.name, { stat = "Sum", yAxis = "right" }]]
      } },
      { type = "metric", x = 0, y = 6, width = 8, height = 6, properties = {
        title   = "Pending generations per disk", region = local.region, view = "timeSeries", period = 60,
        metrics = [[{ expression = local.per_disk["PendingGenerations"], id = "pending" }]]
      } },
      { type = "metric", x = 8, y = 6, width = 8, height = 6, properties = {
        title   = "Bytes applied per disk", region = local.region, view = "timeSeries", period = 300,
        metrics = [[{ expression = local.per_disk["BytesApplied"], id = "bytes" }]]
      } },
      { type = "metric", x = 16, y = 6, width = 8, height = 6, properties = {
        title   = "Apply time per disk (s)", region = local.region, view = "timeSeries", period = 300,
        metrics = [[{ expression = local.per_disk["ApplySeconds"], id = "apply" }]]
      } },
      { type = "metric", x = 0, y = 12, width = 8, height = 6, properties = {
        title   = "Recovery point lag per disk (s)", region = local.region, view = "timeSeries", period = 60,
        metrics = [[{ expression = local.per_disk["PointLagSeconds"], id = "points" }]]
      } },
      { type = "metric", x = 8, y = 12, width = 8, height = 6, properties = {
        title   = "Dead-letter queue depth", region = local.region, view = "timeSeries", stat = "Maximum", period = 300,
        metrics = [["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", aws_sqs_queue.events_dead_letter_queue.name]]
      } },
      { type = "metric", x = 16, y = 12, width = 8, height = 6, properties = {
        title   = "DR runs and errors", region = local.region, view = "timeSeries", stat = "Sum", period = 300,
        metrics = [["AWS/Lambda", "Invocations", "FunctionName", aws_lambda_function.dr_function.function_name], ["AWS/Lambda", "Errors", "FunctionName", aws_lambda_function.dr_function.function_name]]
      } },
    ]
  })
}
