# One-click DR: the Lambda, its schedule, and the VM Import service role.

data "aws_iam_policy_document" "vm_import_role_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["vmie.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "sts:Externalid"
      values   = ["vmimport"]
    }
  }
}

resource "aws_iam_role" "vm_import_role" {
  name_prefix        = "${var.name}-vmimport-"
  description        = "VM Import service role (EC2 ImportImage reads the exported disk)"
  assume_role_policy = data.aws_iam_policy_document.vm_import_role_trust.json
}

data "aws_iam_policy_document" "vm_import_role" {
  #checkov:skip=CKV_AWS_356:ec2:Describe* on "*" is the documented vmimport policy; VM Import's Describe calls are not listed, and Describe calls only read.
  statement {
    sid       = "ReadExports"
    actions   = ["s3:GetBucketLocation", "s3:ListBucket"]
    resources = [aws_s3_bucket.data_bucket.arn]
  }
  statement {
    sid       = "ReadExportObjects"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.data_bucket.arn}/${var.prefix}/*/x/*"]
  }
  # The documented vmimport policy, scoped to this region's snapshots and images.
  statement {
    sid       = "ImportedSnapshots"
    actions   = ["ec2:ModifySnapshotAttribute", "ec2:CopySnapshot"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
  }
  statement {
    sid     = "RegisterImportedImage"
    actions = ["ec2:RegisterImage"]
    resources = [
      "arn:${local.partition}:ec2:${local.region}::image/*",
      "arn:${local.partition}:ec2:${local.region}::snapshot/*",
    ]
  }
  statement {
    sid       = "DescribeForImport"
    actions   = ["ec2:Describe*"] # no resource-level permissions
    resources = ["*"]
  }
}

resource "aws_iam_role_policy" "vm_import_role" {
  name   = "vmimport"
  role   = aws_iam_role.vm_import_role.id
  policy = data.aws_iam_policy_document.vm_import_role.json
}

data "aws_iam_policy_document" "dr_function_role_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "dr_function_role" {
  name_prefix        = "${var.name}-dr-"
  description        = "pilotlight one-click DR Lambda"
  assume_role_policy = data.aws_iam_policy_document.dr_function_role_trust.json
}

data "aws_iam_policy_document" "dr_function_role" {
  #checkov:skip=CKV_AWS_111:ec2:ImportImage on "*" - its outputs (AMI, snapshots) do not exist before the call to be named; every other write is scoped by ARN or tag.
  #checkov:skip=CKV_AWS_356:ec2:ImportImage and ec2:DescribeImportImageTasks on "*" - the latter has no resource-level permissions, the former creates resources that cannot be named in advance.
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.dr_function_log_group.arn}:*"]
  }
  statement {
    sid     = "ReadManifestsAndRuns"
    actions = ["s3:GetObject"]
    resources = [
      "${aws_s3_bucket.data_bucket.arn}/${var.prefix}/*",
      "${aws_s3_bucket.data_bucket.arn}/pilotlight-dr/*",
    ]
  }
  statement {
    sid       = "ListManifestsAndRuns"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data_bucket.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.prefix}/*", "pilotlight-dr/*"]
    }
  }
  statement {
    sid     = "RequestExportsAndRecordRuns"
    actions = ["s3:PutObject"]
    resources = [
      "${aws_s3_bucket.data_bucket.arn}/${var.prefix}/*/x/*",
      "${aws_s3_bucket.data_bucket.arn}/${var.prefix}/*/b/*/return.json",
      "${aws_s3_bucket.data_bucket.arn}/pilotlight-dr/*",
    ]
  }
  statement {
    sid     = "CleanUpExportsAndReadyMarks"
    actions = ["s3:DeleteObject"]
    resources = [
      "${aws_s3_bucket.data_bucket.arn}/${var.prefix}/*/x/*",
      "${aws_s3_bucket.data_bucket.arn}/pilotlight-dr/ready/*",
    ]
  }
  statement {
    sid = "ImportImages"
    # Neither call supports resource-level permissions.
    actions   = ["ec2:ImportImage", "ec2:DescribeImportImageTasks"]
    resources = ["*"]
  }
  statement {
    sid       = "PassVmImportRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.vm_import_role.arn]
  }
  statement {
    sid       = "LaunchTaggedInstances"
    actions   = ["ec2:RunInstances"]
    resources = ["arn:${local.partition}:ec2:${local.region}:${local.account}:instance/*"]
    condition {
      test     = "Null"
      variable = "aws:RequestTag/pilotlight:dr-run"
      values   = ["false"]
    }
  }
  statement {
    sid       = "LaunchOwnImages"
    actions   = ["ec2:RunInstances"]
    resources = ["arn:${local.partition}:ec2:${local.region}::image/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:Owner"
      values   = [local.account]
    }
  }
  statement {
    sid     = "LaunchWithResources"
    actions = ["ec2:RunInstances"]
    resources = [
      "arn:${local.partition}:ec2:${local.region}:${local.account}:subnet/*",
      "arn:${local.partition}:ec2:${local.region}:${local.account}:network-interface/*",
      "arn:${local.partition}:ec2:${local.region}:${local.account}:security-group/*",
      "arn:${local.partition}:ec2:${local.region}:${local.account}:volume/*",
      "arn:${local.partition}:ec2:${local.region}::snapshot/*",
      "arn:${local.partition}:ec2:${local.region}:${local.account}:launch-template/*",
    ]
  }
  statement {
    sid     = "TagOnCreate"
    actions = ["ec2:CreateTags"]
    resources = [
      "arn:${local.partition}:ec2:${local.region}:${local.account}:instance/*",
      "arn:${local.partition}:ec2:${local.region}:${local.account}:volume/*",
      "arn:${local.partition}:ec2:${local.region}:${local.account}:import-image-task/*",
      "arn:${local.partition}:ec2:${local.region}::image/*",
    ]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances", "ImportImage", "RegisterImage"]
    }
  }
  # The snapshot method: an AMI from this stack's recovery points only, tagged with the
  # run on creation.
  statement {
    sid       = "RegisterFromOwnPoints"
    actions   = ["ec2:RegisterImage"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/pilotlight:stack"
      values   = [var.name]
    }
  }
  statement {
    sid       = "RegisterTaggedImages"
    actions   = ["ec2:RegisterImage"]
    resources = ["arn:${local.partition}:ec2:${local.region}::image/*"]
    condition {
      test     = "Null"
      variable = "aws:RequestTag/pilotlight:dr-run"
      values   = ["false"]
    }
  }
  # A run holds its point (tag pilotlight:hold:RUN) so retention keeps it.
  statement {
    sid       = "HoldOwnPoints"
    actions   = ["ec2:CreateTags", "ec2:DeleteTags"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/pilotlight:stack"
      values   = [var.name]
    }
    condition {
      test     = "ForAllValues:StringLike"
      variable = "aws:TagKeys"
      values   = ["pilotlight:hold:*"]
    }
  }
  statement {
    sid = "FindPointsImagesAndStatus"
    # No resource-level permissions for these.
    actions   = ["ec2:DescribeSnapshots", "ec2:DescribeImages", "ec2:DescribeInstanceStatus", "ec2:DescribeInstances", "ssm:DescribeInstanceInformation"]
    resources = ["*"]
  }
  dynamic "statement" {
    for_each = var.recovered_instance_role_arn != "" ? [1] : []
    content {
      sid       = "PassRecoveredInstanceRole"
      actions   = ["iam:PassRole"]
      resources = [var.recovered_instance_role_arn]
      condition {
        test     = "StringEquals"
        variable = "iam:PassedToService"
        values   = ["ec2.amazonaws.com"]
      }
    }
  }
  # Recovery plans: post-launch steps and health probes through SSM Run Command on the
  # instances runs launched (SendCommand takes the document and the instance, with
  # ssm:resourceTag; GetCommandInvocation has no resource-level permissions: Service
  # Authorization Reference, AWS Systems Manager), and A records in the plans' zones only.
  statement {
    sid       = "RunPlanStepsOnOwnInstances"
    actions   = ["ssm:SendCommand"]
    resources = ["arn:${local.partition}:ec2:${local.region}:${local.account}:instance/*"]
    condition {
      test     = "Null"
      variable = "ssm:resourceTag/pilotlight:dr-run"
      values   = ["false"]
    }
  }
  statement {
    sid     = "RunPlanDocuments"
    actions = ["ssm:SendCommand"]
    resources = [
      "arn:${local.partition}:ssm:${local.region}::document/AWS-RunShellScript",
      "arn:${local.partition}:ssm:${local.region}:${local.account}:document/*",
    ]
  }
  statement {
    sid       = "FollowPlanSteps"
    actions   = ["ssm:GetCommandInvocation"]
    resources = ["*"]
  }
  dynamic "statement" {
    for_each = var.plan_hosted_zone_id != "" ? [1] : []
    content {
      sid       = "PlanRecordsInPlanZones"
      actions   = ["route53:ChangeResourceRecordSets", "route53:ListResourceRecordSets"]
      resources = [for z in compact([var.plan_hosted_zone_id, var.plan_drill_hosted_zone_id]) : "arn:${local.partition}:route53:::hostedzone/${z}"]
      condition {
        test     = "ForAllValues:StringEquals"
        variable = "route53:ChangeResourceRecordSetsRecordTypes"
        values   = ["A"]
      }
      condition {
        test     = "ForAllValues:StringEquals"
        variable = "route53:ChangeResourceRecordSetsActions"
        values   = ["UPSERT", "DELETE"]
      }
    }
  }
  # Guarded automatic failover: the witness (the user's alarm or Route 53 health check),
  # the countdown's notification on the stack's topic, and the fence hook on instances
  # the user tagged pilotlight:fence=true.
  statement {
    sid     = "ReadWitness"
    actions = ["cloudwatch:DescribeAlarms", "route53:GetHealthCheckStatus"]
    resources = [
      "arn:${local.partition}:cloudwatch:${local.region}:${local.account}:alarm:*",
      "arn:${local.partition}:route53:::healthcheck/*",
    ]
  }
  statement {
    sid       = "NotifyAutomation"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alert_topic.arn]
  }
  statement {
    sid     = "FenceTaggedInstances"
    actions = ["ssm:SendCommand"]
    resources = [
      "arn:${local.partition}:ssm:${local.region}:${local.account}:managed-instance/*",
      "arn:${local.partition}:ec2:${local.region}:${local.account}:instance/*",
    ]
    condition {
      test     = "StringEquals"
      variable = "ssm:resourceTag/pilotlight:fence"
      values   = ["true"]
    }
  }
  statement {
    sid       = "ConsoleOfOwnInstances"
    actions   = ["ec2:GetConsoleOutput"]
    resources = ["arn:${local.partition}:ec2:${local.region}:${local.account}:instance/*"]
    condition {
      test     = "Null"
      variable = "aws:ResourceTag/pilotlight:dr-run"
      values   = ["false"]
    }
  }
  statement {
    sid       = "CleanUpOwnInstances"
    actions   = ["ec2:TerminateInstances"]
    resources = ["arn:${local.partition}:ec2:${local.region}:${local.account}:instance/*"]
    condition {
      test     = "Null"
      variable = "aws:ResourceTag/pilotlight:dr-run"
      values   = ["false"]
    }
  }
  # Failback: return snapshots of a recovered instance (CreateSnapshots: Service
  # Authorization Reference, Amazon EC2, resource types instance, snapshot and volume),
  # tagged pilotlight:return on creation, stopped for cutover, pruned; only this stack's
  # recovered instances.
  statement {
    sid       = "ReturnSnapshotsOfRecoveredInstances"
    actions   = ["ec2:CreateSnapshots", "ec2:StopInstances"]
    resources = ["arn:${local.partition}:ec2:${local.region}:${local.account}:instance/*"]
    condition {
      test     = "Null"
      variable = "aws:ResourceTag/pilotlight:dr-run"
      values   = ["false"]
    }
  }
  statement {
    sid       = "ReturnSnapshotsOfTheirVolumes"
    actions   = ["ec2:CreateSnapshots"]
    resources = ["arn:${local.partition}:ec2:${local.region}:${local.account}:volume/*"]
  }
  statement {
    sid       = "ReturnSnapshotsTagged"
    actions   = ["ec2:CreateSnapshots"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
    condition {
      test     = "Null"
      variable = "aws:RequestTag/pilotlight:return"
      values   = ["false"]
    }
  }
  statement {
    sid       = "TagReturnSnapshotsOnCreate"
    actions   = ["ec2:CreateTags"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["CreateSnapshots"]
    }
  }
  statement {
    sid       = "PruneReturnSnapshots"
    actions   = ["ec2:DeleteSnapshot"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
    condition {
      test     = "Null"
      variable = "aws:ResourceTag/pilotlight:return"
      values   = ["false"]
    }
  }
  statement {
    sid = "TagImportedImages"
    # ImportImage tags only its task: the Lambda tags the AMI and snapshots the task
    # made, with the run's tags and nothing else.
    actions = ["ec2:CreateTags"]
    resources = [
      "arn:${local.partition}:ec2:${local.region}::image/*",
      "arn:${local.partition}:ec2:${local.region}::snapshot/*",
    ]
    condition {
      test     = "Null"
      variable = "aws:RequestTag/pilotlight:dr-run"
      values   = ["false"]
    }
    condition {
      test     = "ForAllValues:StringEquals"
      variable = "aws:TagKeys"
      values   = ["pilotlight:dr-run", "pilotlight:drill"]
    }
  }
  statement {
    sid     = "CleanUpImportedImages"
    actions = ["ec2:DeregisterImage", "ec2:DeleteSnapshot"]
    resources = [
      "arn:${local.partition}:ec2:${local.region}::image/*",
      "arn:${local.partition}:ec2:${local.region}::snapshot/*",
    ]
    condition {
      test     = "Null"
      variable = "aws:ResourceTag/pilotlight:dr-run"
      values   = ["false"]
    }
  }
  # Recovery points (any stack's: they carry pilotlight:stack) are never the DR
  # function's to delete, nor to mark with a run tag that would make them deletable
  # above. Explicit denies win (IAM User Guide, "Policy evaluation logic").
  statement {
    sid       = "NeverDeletePoints"
    effect    = "Deny"
    actions   = ["ec2:DeleteSnapshot"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
    condition {
      test     = "Null"
      variable = "aws:ResourceTag/pilotlight:stack"
      values   = ["false"]
    }
    # Return snapshots carry pilotlight:stack too (the sender's read policy): told apart
    # by pilotlight:return, which no statement lets the function put on a snapshot.
    condition {
      test     = "Null"
      variable = "aws:ResourceTag/pilotlight:return"
      values   = ["true"]
    }
  }
  statement {
    sid       = "NeverRunTagPoints"
    effect    = "Deny"
    actions   = ["ec2:CreateTags"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
    condition {
      test     = "Null"
      variable = "aws:ResourceTag/pilotlight:stack"
      values   = ["false"]
    }
    condition {
      test     = "ForAnyValue:StringEquals"
      variable = "aws:TagKeys"
      values   = ["pilotlight:dr-run", "pilotlight:drill", "pilotlight:return"]
    }
  }
  dynamic "statement" {
    for_each = var.dr_tracing ? [1] : []
    content {
      sid       = "Tracing"
      actions   = ["xray:PutTraceSegments", "xray:PutTelemetryRecords"] # no resource-level permissions
      resources = ["*"]
    }
  }
}

resource "aws_iam_role_policy" "dr_function_role" {
  name   = "dr"
  role   = aws_iam_role.dr_function_role.id
  policy = data.aws_iam_policy_document.dr_function_role.json
}

resource "aws_cloudwatch_log_group" "dr_function_log_group" {
  name              = "/aws/lambda/${var.name}-dr"
  retention_in_days = var.log_retention_days
  # With kms_key_arn, the key policy must admit logs.REGION.amazonaws.com, or this log
  # group cannot be created (infra/README.md, "Customer managed KMS key").
  kms_key_id = local.use_kms ? var.kms_key_arn : null
}

resource "aws_lambda_function" "dr_function" {
  #checkov:skip=CKV_AWS_117:It calls only AWS APIs; a VPC would add NAT or endpoints and no isolation.
  #checkov:skip=CKV_AWS_116:The schedule retries every minute and runs are recorded in S3; a DLQ of schedule events holds nothing to redo.
  #checkov:skip=CKV_AWS_173:Its environment holds names and durations, no secrets.
  #checkov:skip=CKV_AWS_115:Reserved concurrency is var.dr_reserved_concurrency, none by default - a reservation fails in accounts with the new-account quota of 10.
  #checkov:skip=CKV_AWS_50:X-Ray tracing is var.dr_tracing, off by default (it needs X-Ray write permissions, granted with it, and costs per trace).
  #checkov:skip=CKV_AWS_272:Code signing needs an AWS Signer profile the user owns; scripts/package prints the zip's SHA-256 instead.
  function_name                  = "${var.name}-dr"
  description                    = "pilotlight one-click DR (start, status, cleanup; the schedule advances runs)"
  runtime                        = "provided.al2023"
  handler                        = "bootstrap"
  architectures                  = ["x86_64"]
  memory_size                    = 256
  timeout                        = 60
  reserved_concurrent_executions = var.dr_reserved_concurrency > 0 ? var.dr_reserved_concurrency : -1
  role                           = aws_iam_role.dr_function_role.arn
  s3_bucket                      = var.artifact_bucket
  s3_key                         = var.dr_lambda_artifact_key
  logging_config {
    log_format = "Text"
    log_group  = aws_cloudwatch_log_group.dr_function_log_group.name
  }
  # Active tracing needs xray:PutTraceSegments and xray:PutTelemetryRecords on the role
  # (CreateFunction refuses it otherwise): granted by the Tracing statement.
  tracing_config {
    mode = var.dr_tracing ? "Active" : "PassThrough"
  }
  environment {
    variables = merge(
      {
        PILOTLIGHT_BUCKET           = aws_s3_bucket.data_bucket.id
        PILOTLIGHT_PREFIX           = var.prefix
        PILOTLIGHT_DR_VMIMPORT_ROLE = aws_iam_role.vm_import_role.name
        PILOTLIGHT_DR_STACK         = var.name
        PILOTLIGHT_DR_ALERT_TOPIC   = aws_sns_topic.alert_topic.arn
        RUST_LOG                    = "info"
      },
      local.use_kms ? { PILOTLIGHT_DR_KMS_KEY = var.kms_key_arn } : {},
      var.drill_subnet_id != "" ? { PILOTLIGHT_DR_DRILL_SUBNET = var.drill_subnet_id } : {},
      var.drill_security_group_ids != "" ? { PILOTLIGHT_DR_DRILL_SECURITY_GROUPS = var.drill_security_group_ids } : {},
    )
  }
}

resource "aws_cloudwatch_event_rule" "dr_schedule" {
  name_prefix         = "${var.name}-dr-"
  description         = "Advance unfinished pilotlight DR runs (export, import, launch)"
  schedule_expression = "rate(1 minute)"
  state               = "ENABLED"
}

resource "aws_cloudwatch_event_target" "dr_schedule" {
  rule      = aws_cloudwatch_event_rule.dr_schedule.name
  target_id = "dr"
  arn       = aws_lambda_function.dr_function.arn
}

resource "aws_lambda_permission" "dr_schedule_permission" {
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.dr_function.function_name
  principal     = "events.amazonaws.com"
  source_arn    = aws_cloudwatch_event_rule.dr_schedule.arn
}

# Guarded automatic failover: a witness alarm changing state evaluates at once.
resource "aws_cloudwatch_event_rule" "automation_alarm_rule" {
  count       = length(var.automation_alarm_names) > 0 ? 1 : 0
  name_prefix = "${var.name}-automation-"
  description = "Evaluate pilotlight plans' automatic failover when a witness alarm changes state"
  event_pattern = jsonencode({
    source        = ["aws.cloudwatch"]
    "detail-type" = ["CloudWatch Alarm State Change"]
    detail        = { alarmName = var.automation_alarm_names }
  })
  state = "ENABLED"
}

resource "aws_cloudwatch_event_target" "automation_alarm_rule" {
  count     = length(var.automation_alarm_names) > 0 ? 1 : 0
  rule      = aws_cloudwatch_event_rule.automation_alarm_rule[0].name
  target_id = "dr"
  arn       = aws_lambda_function.dr_function.arn
}

resource "aws_lambda_permission" "automation_alarm_permission" {
  count         = length(var.automation_alarm_names) > 0 ? 1 : 0
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.dr_function.function_name
  principal     = "events.amazonaws.com"
  source_arn    = aws_cloudwatch_event_rule.automation_alarm_rule[0].arn
}
