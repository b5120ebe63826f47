# The sender's identity: it may only write under its own site prefix.

data "aws_iam_policy_document" "sender_policy" {
  statement {
    sid       = "UploadGenerations"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.data_bucket.arn}/${var.prefix}/${var.sender_site}/*"]
  }
  # A committed generation is never overwritten: the sender lists its disks' manifests
  # before a generation, and reads back a manifest its PUT (If-None-Match) found there,
  # to tell its own interrupted commit from another's.
  statement {
    sid       = "ReadOwnManifests"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.data_bucket.arn}/${var.prefix}/${var.sender_site}/*/g/*/manifest.json"]
  }
  statement {
    sid       = "ReadOwnReturnSnapshots"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.data_bucket.arn}/${var.prefix}/${var.sender_site}/*/b/*/return.json"]
  }
  statement {
    sid       = "ListOwnSite"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data_bucket.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.prefix}/${var.sender_site}/*"]
    }
  }
  # Export requests and results ({site}/{vm}/{disk}/x/...) belong to the DR function and
  # the receiver: a sender that could write them could make the receiver export, or hand
  # the DR function an image of its choosing.
  statement {
    sid       = "NeverExports"
    effect    = "Deny"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.data_bucket.arn}/${var.prefix}/${var.sender_site}/*/*/x/*"]
  }
  # Snapshots mode's chain heads and shard records are the replica function's state.
  statement {
    sid       = "NeverChains"
    effect    = "Deny"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.data_bucket.arn}/${var.prefix}/${var.sender_site}/*/*/r/*"]
  }
  # The DR function's word on which return snapshots to fail back from.
  statement {
    sid       = "NeverReturnDocs"
    effect    = "Deny"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.data_bucket.arn}/${var.prefix}/${var.sender_site}/*/*/b/*/return.json"]
  }
  # Failback (pilotlight-sender failback) reads the recovered instance's return snapshots
  # and the points they grew from, of its own site only: the EBS direct read APIs on
  # snapshots tagged with this stack and this site (Service Authorization Reference,
  # Amazon EBS: the snapshot resource, with aws:ResourceTag).
  statement {
    sid       = "FailBackFromOwnSite"
    actions   = ["ebs:ListChangedBlocks", "ebs:ListSnapshotBlocks", "ebs:GetSnapshotBlock"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/pilotlight:stack"
      values   = [var.name]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/pilotlight:site"
      values   = [var.sender_site]
    }
  }
}

resource "aws_iam_policy" "sender_policy" {
  name_prefix = "${var.name}-sender-"
  description = "pilotlight sender - write replicated objects under its own site prefix, read its own site's snapshots to fail back, nothing else"
  policy      = data.aws_iam_policy_document.sender_policy.json
}

data "aws_iam_policy_document" "sender_role_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "AWS"
      identifiers = [var.sender_trusted_principal_arn != "" ? var.sender_trusted_principal_arn : "arn:${local.partition}:iam::${local.account}:root"]
    }
  }
}

resource "aws_iam_role" "sender_role" {
  name_prefix          = "${var.name}-sender-"
  description          = "pilotlight sender (assume it from on-premises, e.g. with IAM Roles Anywhere or an IAM user)"
  max_session_duration = 43200
  assume_role_policy   = data.aws_iam_policy_document.sender_role_trust.json
}

resource "aws_iam_role_policy_attachment" "sender_role" {
  role       = aws_iam_role.sender_role.name
  policy_arn = aws_iam_policy.sender_policy.arn
}

# ---- the customer key, when there is one ------------------------------------------------
# Policies of their own (not conditional statements) so each principal's list stays plain.

data "aws_iam_policy_document" "kms_use_policy" {
  statement {
    sid       = "UseBucketKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [local.use_kms ? var.kms_key_arn : "*"]
  }
}

resource "aws_iam_policy" "kms_use_policy" {
  count       = local.use_kms ? 1 : 0
  name_prefix = "${var.name}-kms-use-"
  description = "pilotlight - encrypt and decrypt replicated objects with the customer KMS key"
  policy      = data.aws_iam_policy_document.kms_use_policy.json
}

resource "aws_iam_role_policy_attachment" "kms_use_policy" {
  for_each = local.use_kms ? merge(local.image_mode ? {
    receiver = aws_iam_role.receiver_role[0].name
    } : {}, {
    dr        = aws_iam_role.dr_function_role.name
    vm_import = aws_iam_role.vm_import_role.name
    sender    = aws_iam_role.sender_role.name
  }) : {}
  role       = each.value
  policy_arn = aws_iam_policy.kms_use_policy[0].arn
}

data "aws_iam_policy_document" "kms_volume_policy" {
  statement {
    sid       = "AttachEncryptedVolume"
    actions   = ["kms:CreateGrant", "kms:DescribeKey"]
    resources = [local.use_kms ? var.kms_key_arn : "*"]
    condition {
      test     = "Bool"
      variable = "kms:GrantIsForAWSResource"
      values   = ["true"]
    }
  }
}

resource "aws_iam_policy" "kms_volume_policy" {
  count       = local.use_kms && local.image_mode ? 1 : 0
  name_prefix = "${var.name}-kms-volume-"
  description = "pilotlight receiver - attach the image volume encrypted with the customer KMS key"
  policy      = data.aws_iam_policy_document.kms_volume_policy.json
}

resource "aws_iam_role_policy_attachment" "kms_volume_policy" {
  count      = local.use_kms && local.image_mode ? 1 : 0
  role       = aws_iam_role.receiver_role[0].name
  policy_arn = aws_iam_policy.kms_volume_policy[0].arn
}

# VM Import writes the imported snapshots encrypted with the customer key (the vmimport
# role's KMS actions, VM Import/Export User Guide: "Required service role").
data "aws_iam_policy_document" "kms_import_policy" {
  statement {
    sid       = "EncryptImports"
    actions   = ["kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey", "kms:Encrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*"]
    resources = [local.use_kms ? var.kms_key_arn : "*"]
  }
}

resource "aws_iam_policy" "kms_import_policy" {
  count       = local.use_kms ? 1 : 0
  name_prefix = "${var.name}-kms-import-"
  description = "pilotlight VM Import - encrypt imported snapshots with the customer KMS key"
  policy      = data.aws_iam_policy_document.kms_import_policy.json
}

resource "aws_iam_role_policy_attachment" "kms_import_policy" {
  count      = local.use_kms ? 1 : 0
  role       = aws_iam_role.vm_import_role.name
  policy_arn = aws_iam_policy.kms_import_policy[0].arn
}
