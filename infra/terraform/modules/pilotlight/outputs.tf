# The CloudFormation template's outputs, in snake_case (infra/tests checks the lists match).

output "bucket_name" {
  description = "Replication bucket (sender --bucket, receiver bucket)"
  value       = aws_s3_bucket.data_bucket.id
}

output "prefix" {
  description = "Replication prefix (sender --prefix)"
  value       = var.prefix
}

output "queue_url" {
  description = "Event queue (receiver queue-url)"
  value       = aws_sqs_queue.events_queue.id
}

output "dead_letter_queue_url" {
  description = "Rejected events land here"
  value       = aws_sqs_queue.events_dead_letter_queue.id
}

output "dr_function_name" {
  description = "One-click DR Lambda (pilotlight-dr --function)"
  value       = aws_lambda_function.dr_function.function_name
}

output "receiver_group_name" {
  description = "The receiver's auto scaling group (image mode)"
  value       = local.image_mode ? aws_autoscaling_group.receiver_group[0].name : null
}

output "image_volume_id" {
  description = "The receiver's image volume (image mode)"
  value       = local.image_mode ? aws_ebs_volume.image_volume[0].id : null
}

output "sender_role_arn" {
  description = "Role the sender assumes (role_arn in its AWS profile)"
  value       = aws_iam_role.sender_role.arn
}

output "sender_policy_arn" {
  description = "The sender's only permissions; attach to an IAM user instead if the sender cannot assume roles"
  value       = aws_iam_policy.sender_policy.arn
}

output "sender_config" {
  description = "Flags for the sender"
  value       = "--bucket ${aws_s3_bucket.data_bucket.id} --prefix ${var.prefix} --disk-id ${var.sender_site}/VM/DISK --region ${local.region}"
}

output "vm_import_role_name" {
  description = "VM Import service role (PILOTLIGHT_DR_VMIMPORT_ROLE)"
  value       = aws_iam_role.vm_import_role.name
}

output "alert_topic_arn" {
  description = "Alarms publish here"
  value       = aws_sns_topic.alert_topic.arn
}

output "replica_function_name" {
  description = "The replica function (snapshots mode)"
  value       = local.snapshots_mode ? aws_lambda_function.replica_function[0].function_name : null
}

output "replica_task_queue_url" {
  description = "The replica function's shard tasks (snapshots mode)"
  value       = local.snapshots_mode ? aws_sqs_queue.replica_task_queue[0].id : null
}
