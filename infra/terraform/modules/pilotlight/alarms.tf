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
