# The receiver: an auto scaling group of one on Amazon Linux 2023 with a persistent
# encrypted image volume it attaches at boot.

data "aws_ssm_parameter" "receiver_ami" {
  name = var.receiver_ami
}

data "aws_subnet" "receiver" {
  id = var.receiver_subnet_id
}

data "aws_iam_policy_document" "receiver_role_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "receiver_role" {
  count              = local.image_mode ? 1 : 0
  name_prefix        = "${var.name}-receiver-"
  description        = "pilotlight receiver on EC2"
  assume_role_policy = data.aws_iam_policy_document.receiver_role_trust.json
}

# Session Manager instead of SSH.
resource "aws_iam_role_policy_attachment" "receiver_role_ssm" {
  count      = local.image_mode ? 1 : 0
  role       = aws_iam_role.receiver_role[0].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

data "aws_iam_policy_document" "receiver_role" {
  statement {
    sid       = "ReadReplicatedObjects"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.data_bucket.arn}/${var.prefix}/*"]
  }
  statement {
    sid       = "ListForReconcile"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data_bucket.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.prefix}/*"]
    }
  }
  statement {
    sid       = "WriteExports"
    actions   = ["s3:PutObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.data_bucket.arn}/${var.prefix}/*/x/*"]
  }
  statement {
    sid       = "ConsumeEvents"
    actions   = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"]
    resources = [aws_sqs_queue.events_queue.arn]
  }
  statement {
    sid       = "InstallReceiver"
    actions   = ["s3:GetObject"]
    resources = ["arn:${local.partition}:s3:::${var.artifact_bucket}/${var.receiver_artifact_key}"]
  }
  statement {
    sid       = "AttachImageVolume"
    actions   = ["ec2:AttachVolume"]
    resources = [aws_ebs_volume.image_volume[0].arn]
  }
  statement {
    sid       = "AttachToOwnInstances"
    actions   = ["ec2:AttachVolume"]
    resources = ["arn:${local.partition}:ec2:${local.region}:${local.account}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/pilotlight:receiver"
      values   = [var.name]
    }
  }
  statement {
    sid       = "WaitForImageVolume"
    actions   = ["ec2:DescribeVolumes"] # no resource-level permissions
    resources = ["*"]
  }
  statement {
    sid       = "ShipLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = ["${aws_cloudwatch_log_group.receiver_log_group[0].arn}:*"]
  }
  statement {
    sid = "ReportUnhealthy"
    # A receiver that cannot start marks its instance unhealthy: the group replaces it
    # (EC2 status checks alone would call it healthy).
    actions   = ["autoscaling:SetInstanceHealth"]
    resources = ["arn:${local.partition}:autoscaling:${local.region}:${local.account}:autoScalingGroup:*:autoScalingGroupName/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/pilotlight:receiver"
      values   = [var.name]
    }
  }
  statement {
    sid = "PublishMetrics"
    # No resource-level permissions; only pilotlight's namespace.
    actions   = ["cloudwatch:PutMetricData"]
    resources = ["*"]
    condition {
      test     = "StringEquals"
      variable = "cloudwatch:namespace"
      values   = ["Pilotlight"]
    }
  }
}

# The receiver's journal, shipped by the CloudWatch agent: it outlives the instance the
# alarms point at.
resource "aws_cloudwatch_log_group" "receiver_log_group" {
  count             = local.image_mode ? 1 : 0
  name              = "/pilotlight/${var.name}/receiver"
  retention_in_days = var.log_retention_days
  # With kms_key_arn, the key policy must admit logs.REGION.amazonaws.com
  # (infra/README.md, "Customer managed KMS key").
  kms_key_id = local.use_kms ? var.kms_key_arn : null
}

resource "aws_iam_role_policy" "receiver_role" {
  count  = local.image_mode ? 1 : 0
  name   = "receiver"
  role   = aws_iam_role.receiver_role[0].id
  policy = data.aws_iam_policy_document.receiver_role.json
}

resource "aws_iam_instance_profile" "receiver_instance_profile" {
  count       = local.image_mode ? 1 : 0
  name_prefix = "${var.name}-receiver-"
  role        = aws_iam_role.receiver_role[0].name
}

resource "aws_security_group" "receiver_security_group" {
  count       = local.image_mode ? 1 : 0
  name_prefix = "${var.name}-receiver-"
  description = "pilotlight receiver - no inbound (Session Manager), HTTPS out to AWS APIs"
  vpc_id      = var.receiver_vpc_id
  egress {
    description = "HTTPS to S3, SQS, EC2 and SSM endpoints"
    protocol    = "tcp"
    from_port   = 443
    to_port     = 443
    cidr_blocks = ["0.0.0.0/0"]
  }
}

# The images outlive any one instance: a replaced receiver attaches this volume again.
resource "aws_ebs_volume" "image_volume" {
  count             = local.image_mode ? 1 : 0
  availability_zone = data.aws_subnet.receiver.availability_zone
  size              = var.image_volume_size
  type              = "gp3"
  encrypted         = true
  kms_key_id        = local.use_kms ? var.kms_key_arn : null
  final_snapshot    = true
  tags = {
    Name                  = "${var.name}-images"
    "pilotlight:receiver" = var.name
  }
}

resource "aws_launch_template" "receiver_launch_template" {
  count         = local.image_mode ? 1 : 0
  name_prefix   = "${var.name}-receiver-"
  image_id      = data.aws_ssm_parameter.receiver_ami.value
  instance_type = var.receiver_instance_type
  iam_instance_profile {
    arn = aws_iam_instance_profile.receiver_instance_profile[0].arn
  }
  vpc_security_group_ids = [aws_security_group.receiver_security_group[0].id]
  ebs_optimized          = true
  monitoring {
    enabled = true
  }
  metadata_options {
    http_tokens                 = "required"
    http_endpoint               = "enabled"
    http_put_response_hop_limit = 1
  }
  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_type           = "gp3"
      volume_size           = 30
      encrypted             = true
      delete_on_termination = true
    }
  }
  tag_specifications {
    resource_type = "instance"
    tags = {
      Name                  = "${var.name}-receiver"
      "pilotlight:receiver" = var.name
    }
  }
  # Keep in step with the CloudFormation template's UserData (infra/tests compares them).
  user_data = base64encode(templatefile("${path.module}/receiver-user-data.sh.tftpl", {
    region                = local.region
    volume                = aws_ebs_volume.image_volume[0].id
    artifact_bucket       = var.artifact_bucket
    receiver_artifact_key = var.receiver_artifact_key
    queue_url             = aws_sqs_queue.events_queue.id
    bucket                = aws_s3_bucket.data_bucket.id
    prefix                = var.prefix
    visibility_timeout    = var.visibility_timeout
    log_group             = aws_cloudwatch_log_group.receiver_log_group[0].name
    recovery_points       = var.recovery_points
    name                  = var.name
    kms_key_arn           = var.kms_key_arn
    keep_all_hours        = var.keep_all_hours
    keep_hourly_days      = var.keep_hourly_days
    keep_daily_days       = var.keep_daily_days
    point_lock            = var.point_lock
    rpo_target_seconds    = var.rpo_target_seconds
  }))
}

resource "aws_autoscaling_group" "receiver_group" {
  count = local.image_mode ? 1 : 0
  # A group of one: a dead or impaired receiver is replaced and re-attaches image_volume.
  name_prefix               = "${var.name}-receiver-"
  min_size                  = 1
  max_size                  = 1
  desired_capacity          = 1
  health_check_type         = "EC2"
  health_check_grace_period = 300
  vpc_zone_identifier       = [var.receiver_subnet_id]
  launch_template {
    id      = aws_launch_template.receiver_launch_template[0].id
    version = aws_launch_template.receiver_launch_template[0].latest_version
  }
  tag {
    key                 = "pilotlight:receiver"
    value               = var.name
    propagate_at_launch = true
  }
  # A new launch template version (receiver build, AMI, settings) rolls out: the one
  # instance is replaced (none kept in service: the image volume attaches to one
  # instance at a time).
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 0
    }
  }
}
