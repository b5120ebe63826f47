# Recovery points: EBS snapshots the receiver starts tagged with this stack, and then may
# write, seal and prune only while they carry that tag (EBS User Guide, "Control access
# to EBS direct APIs using IAM"; Service Authorization Reference: StartSnapshot takes
# aws:RequestTag, PutSnapshotBlock/CompleteSnapshot/DeleteSnapshot a snapshot resource
# with aws:ResourceTag).
data "aws_iam_policy_document" "receiver_points_policy" {
  statement {
    sid       = "StartOwnPoints"
    actions   = ["ebs:StartSnapshot"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/pilotlight:stack"
      values   = [var.name]
    }
  }
  statement {
    sid       = "WriteOwnPoints"
    actions   = ["ebs:PutSnapshotBlock", "ebs:CompleteSnapshot"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/pilotlight:stack"
      values   = [var.name]
    }
  }
  # StartSnapshot with tags is authorised as ec2:CreateTags too (Service Authorization
  # Reference, Amazon Elastic Block Store, API operations: StartSnapshot maps to
  # ebs:StartSnapshot and ec2:CreateTags). The snapshot has no tags yet: the condition is
  # on the request's tags.
  statement {
    sid       = "TagPointsAtStart"
    actions   = ["ec2:CreateTags"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
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
  # Exports of a generation the image has moved past are read from its point (EBS User
  # Guide, "Control access to EBS direct APIs using IAM").
  statement {
    sid       = "ReadOwnPoints"
    actions   = ["ebs:ListSnapshotBlocks", "ebs:GetSnapshotBlock"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/pilotlight:stack"
      values   = [var.name]
    }
  }
  statement {
    sid       = "FindPoints"
    actions   = ["ec2:DescribeSnapshots"] # no resource-level permissions
    resources = ["*"]
  }
  statement {
    sid       = "PruneAndTagOwnPoints"
    actions   = ["ec2:DeleteSnapshot", "ec2:CreateTags"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/pilotlight:stack"
      values   = [var.name]
    }
  }
}

resource "aws_iam_policy" "receiver_points_policy" {
  count       = local.image_points ? 1 : 0
  name_prefix = "${var.name}-receiver-points-"
  description = "pilotlight receiver - write and prune this stack's recovery points (EBS snapshots)"
  policy      = data.aws_iam_policy_document.receiver_points_policy.json
}

resource "aws_iam_role_policy_attachment" "receiver_points_policy" {
  count      = local.image_points ? 1 : 0
  role       = aws_iam_role.receiver_role[0].name
  policy_arn = aws_iam_policy.receiver_points_policy[0].arn
}

# Locking the daily points (their tag with the lock's end, so pruning never offers a
# locked point for deletion, is ec2:CreateTags above): only the stack's own points.
data "aws_iam_policy_document" "receiver_point_lock_policy" {
  statement {
    sid       = "LockOwnPoints"
    actions   = ["ec2:LockSnapshot"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/pilotlight:stack"
      values   = [var.name]
    }
  }
}

resource "aws_iam_policy" "receiver_point_lock_policy" {
  count       = local.image_points && var.point_lock != "off" ? 1 : 0
  name_prefix = "${var.name}-receiver-point-lock-"
  description = "pilotlight receiver - lock this stack's daily recovery points (EBS Snapshot Lock)"
  policy      = data.aws_iam_policy_document.receiver_point_lock_policy.json
}

resource "aws_iam_role_policy_attachment" "receiver_point_lock_policy" {
  count      = local.image_points && var.point_lock != "off" ? 1 : 0
  role       = aws_iam_role.receiver_role[0].name
  policy_arn = aws_iam_policy.receiver_point_lock_policy[0].arn
}

# Points encrypted with the customer key (EBS User Guide, EBS direct APIs, "Use
# encryption": the KMS actions the caller needs).
data "aws_iam_policy_document" "kms_points_policy" {
  statement {
    sid       = "EncryptPoints"
    actions   = ["kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncrypt*"]
    resources = [local.use_kms ? var.kms_key_arn : "*"]
  }
}

resource "aws_iam_policy" "kms_points_policy" {
  count       = local.image_points && local.use_kms ? 1 : 0
  name_prefix = "${var.name}-kms-points-"
  description = "pilotlight receiver - write recovery points with the customer KMS key"
  policy      = data.aws_iam_policy_document.kms_points_policy.json
}

resource "aws_iam_role_policy_attachment" "kms_points_policy" {
  count      = local.image_points && local.use_kms ? 1 : 0
  role       = aws_iam_role.receiver_role[0].name
  policy_arn = aws_iam_policy.kms_points_policy[0].arn
}

# Launching from an AMI whose snapshots the key encrypts: imports always are (ImportImage
# with the stack key), points when they are on. Whenever the stack has a key (EC2 User
# Guide, "Amazon EBS encryption"; without it RunInstances ends in Client.InternalError).
data "aws_iam_policy_document" "kms_launch_policy" {
  statement {
    sid       = "LaunchEncrypted"
    actions   = ["kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncrypt*"]
    resources = [local.use_kms ? var.kms_key_arn : "*"]
  }
}

resource "aws_iam_policy" "kms_launch_policy" {
  count       = local.use_kms ? 1 : 0
  name_prefix = "${var.name}-kms-launch-"
  description = "pilotlight DR - launch from images encrypted with the customer KMS key"
  policy      = data.aws_iam_policy_document.kms_launch_policy.json
}

resource "aws_iam_role_policy_attachment" "kms_launch_policy" {
  count      = local.use_kms ? 1 : 0
  role       = aws_iam_role.dr_function_role.name
  policy_arn = aws_iam_policy.kms_launch_policy[0].arn
}

# The receiver logs "recovery point failed" when it gives a point up (no EBS permission,
# an unreadable image, EBS failing for long): replication goes on, points do not, so it
# pages.
resource "aws_cloudwatch_log_metric_filter" "points_failing_metric_filter" {
  count          = local.image_points ? 1 : 0
  name           = "${var.name}-points-failed"
  log_group_name = aws_cloudwatch_log_group.receiver_log_group[0].name
  pattern        = "\"recovery point failed\""
  metric_transformation {
    namespace     = "pilotlight"
    name          = "${var.name}-points-failed"
    value         = "1"
    default_value = "0"
  }
}

resource "aws_cloudwatch_metric_alarm" "points_failing_alarm" {
  count               = local.image_points ? 1 : 0
  alarm_name          = "${var.name}-points-failing"
  alarm_description   = "pilotlight recovery points are failing (replication continues; see the receiver's log and `pilotlight-receiver status`)."
  namespace           = "pilotlight"
  metric_name         = "${var.name}-points-failed"
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alert_topic.arn]
}
