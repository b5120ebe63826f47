"""The CloudFormation template and the Terraform module declare the same stack.

Run by scripts/test (`.venv/tools/bin/python -m unittest discover -s infra/tests`):
parses every .tf file (python-hcl2; `terraform validate` needs providers, which cannot
be downloaded here) and compares, CloudFormation against Terraform:
resources (by name and kind), each principal's IAM actions, trust and managed policies,
resource policies, parameters/variables, outputs, and the receiver's user data.
A CloudFormation logical ID `ReceiverRole` is the Terraform resource `receiver_role`.
"""

from __future__ import annotations

import copy
import json
import re
import unittest
from pathlib import Path

import hcl2
from cfnlint.decode import decode

INFRA = Path(__file__).resolve().parent.parent
TEMPLATE = INFRA / "cloudformation" / "pilotlight.yaml"
MODULE = INFRA / "terraform" / "modules" / "pilotlight"
USER_DATA = MODULE / "receiver-user-data.sh.tftpl"

# CloudFormation type -> the Terraform type of the same resource.
PRIMARY = {
    "AWS::S3::Bucket": "aws_s3_bucket",
    "AWS::S3::BucketPolicy": "aws_s3_bucket_policy",
    "AWS::SQS::Queue": "aws_sqs_queue",
    "AWS::SQS::QueuePolicy": "aws_sqs_queue_policy",
    "AWS::IAM::Role": "aws_iam_role",
    "AWS::IAM::InstanceProfile": "aws_iam_instance_profile",
    "AWS::IAM::ManagedPolicy": "aws_iam_policy",
    "AWS::EC2::SecurityGroup": "aws_security_group",
    "AWS::EC2::Volume": "aws_ebs_volume",
    "AWS::EC2::LaunchTemplate": "aws_launch_template",
    "AWS::AutoScaling::AutoScalingGroup": "aws_autoscaling_group",
    "AWS::Logs::LogGroup": "aws_cloudwatch_log_group",
    "AWS::Lambda::Function": "aws_lambda_function",
    "AWS::Events::Rule": "aws_cloudwatch_event_rule",
    "AWS::Lambda::Permission": "aws_lambda_permission",
    "AWS::SNS::Topic": "aws_sns_topic",
    "AWS::SNS::Subscription": "aws_sns_topic_subscription",
    "AWS::CloudWatch::Alarm": "aws_cloudwatch_metric_alarm",
    "AWS::CloudWatch::Dashboard": "aws_cloudwatch_dashboard",
    "AWS::Logs::MetricFilter": "aws_cloudwatch_log_metric_filter",
    "AWS::Lambda::EventSourceMapping": "aws_lambda_event_source_mapping",
}
# Terraform types that are properties (or inline policies) of a primary resource in
# CloudFormation. Each must be named after the primary it belongs to.
SECONDARY = {
    "aws_s3_bucket_server_side_encryption_configuration": "aws_s3_bucket",
    "aws_s3_bucket_public_access_block": "aws_s3_bucket",
    "aws_s3_bucket_ownership_controls": "aws_s3_bucket",
    "aws_s3_bucket_versioning": "aws_s3_bucket",
    "aws_s3_bucket_lifecycle_configuration": "aws_s3_bucket",
    "aws_s3_bucket_notification": "aws_s3_bucket",
    "aws_iam_role_policy": "aws_iam_role",
    "aws_iam_role_policy_attachment": None,  # an attachment, checked with the IAM model
    "aws_cloudwatch_event_target": "aws_cloudwatch_event_rule",
}
# Declared on one side only, on purpose.
CFN_ONLY_PARAMETERS = {"ReceiverAvailabilityZone"}  # Terraform reads it from the subnet
TF_ONLY_VARIABLES = {"name"}  # CloudFormation uses the stack name
# CloudFormation ${Name} in the user data -> the Terraform template's variable.
USER_DATA_VARS = {
    "AWS::Region": "region",
    "ImageVolume": "volume",
    "ArtifactBucket": "artifact_bucket",
    "ReceiverArtifactKey": "receiver_artifact_key",
    "EventsQueue": "queue_url",
    "DataBucket": "bucket",
    "Prefix": "prefix",
    "VisibilityTimeout": "visibility_timeout",
    "ReceiverLogGroup": "log_group",
    "RecoveryPoints": "recovery_points",
    "AWS::StackName": "name",
    "KmsKeyArn": "kms_key_arn",
    "KeepAllHours": "keep_all_hours",
    "KeepHourlyDays": "keep_hourly_days",
    "KeepDailyDays": "keep_daily_days",
    "PointLock": "point_lock",
    "RpoTargetSeconds": "rpo_target_seconds",
}


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def unq(value):
    """python-hcl2 keeps the quotes of string literals."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


# ---- CloudFormation ------------------------------------------------------------------


def load_cfn() -> dict:
    template, matches = decode(str(TEMPLATE))
    if template is None:
        raise AssertionError(f"{TEMPLATE}: does not parse: {matches}")
    return template


def cfn_statement_actions(document: dict) -> dict[str, set[str]]:
    """Effect -> actions of a policy document (both branches of any Fn::If)."""
    out: dict[str, set[str]] = {}

    def walk(node):
        if isinstance(node, dict):
            if "Fn::If" in node:
                for branch in node["Fn::If"][1:]:
                    walk(branch)
            elif "Action" in node:
                out.setdefault(node.get("Effect", "Allow"), set()).update(as_list(node["Action"]))
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document.get("Statement", []))
    return out


def aws_managed(arn) -> str | None:
    text = arn if isinstance(arn, str) else str(arn.get("Fn::Sub", "")) if isinstance(arn, dict) else ""
    m = re.search(r"iam::aws:policy/([A-Za-z0-9_+=,.@-]+)", text)
    return f"aws:{m.group(1)}" if m else None


def cfn_model(template: dict) -> dict:
    resources = template["Resources"]
    model = {
        "resources": {(PRIMARY.get(r["Type"], r["Type"]), snake(n)) for n, r in resources.items()},
        "principals": {},
        "resource_policies": {},
        "parameters": {snake(p) for p in template.get("Parameters", {}) if p not in CFN_ONLY_PARAMETERS},
        "outputs": {snake(o) for o in template.get("Outputs", {})},
    }
    managed_policies = {
        n: cfn_statement_actions(r["Properties"]["PolicyDocument"])
        for n, r in resources.items()
        if r["Type"] == "AWS::IAM::ManagedPolicy"
    }
    for name, res in resources.items():
        if res["Type"] != "AWS::IAM::Role":
            continue
        props = res["Properties"]
        actions: set[str] = set()
        for policy in props.get("Policies", []):
            actions |= cfn_statement_actions(policy["PolicyDocument"]).get("Allow", set())
        managed: set[str] = set()
        for arn in props.get("ManagedPolicyArns", []):
            if isinstance(arn, dict) and arn.get("Ref") in managed_policies:
                managed.add(snake(arn["Ref"]))
                actions |= managed_policies[arn["Ref"]].get("Allow", set())
            elif aws_managed(arn):
                managed.add(aws_managed(arn))
        trust = set()
        for st in as_list(props["AssumeRolePolicyDocument"]["Statement"]):
            for kind, who in st["Principal"].items():
                trust |= {f"{kind}:{w}" if kind == "Service" else kind for w in as_list(who)}
        model["principals"][snake(name)] = {"actions": actions, "managed": managed, "trust": trust}
    # Managed policies that list their roles (the conditional KMS ones).
    for name, res in resources.items():
        if res["Type"] != "AWS::IAM::ManagedPolicy":
            continue
        for role in res["Properties"].get("Roles", []):
            # A role present in one mode only: [!If [Cond, !Ref Role, !Ref AWS::NoValue]].
            if "Fn::If" in role:
                role = role["Fn::If"][1]
            p = model["principals"][snake(role["Ref"])]
            p["managed"].add(snake(name))
            p["actions"] |= managed_policies[name].get("Allow", set())
    for name, res in resources.items():
        if res["Type"] in ("AWS::S3::BucketPolicy", "AWS::SQS::QueuePolicy"):
            doc = res["Properties"]["PolicyDocument"]
            model["resource_policies"][snake(name)] = cfn_statement_actions(doc)
    return model


def cfn_user_data(template: dict) -> str:
    data = template["Resources"]["ReceiverLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    script = data["UserData"]["Fn::Base64"]["Fn::Sub"]

    def sub(m):
        if m.group(1) not in USER_DATA_VARS:
            raise AssertionError(f"user data uses ${{{m.group(1)}}}: add it to USER_DATA_VARS")
        return "${" + USER_DATA_VARS[m.group(1)] + "}"

    return re.sub(r"\$\{([A-Za-z:]+)\}", sub, script)


# ---- Terraform -------------------------------------------------------------------------


def load_tf(directory: Path) -> dict[str, list]:
    """All top-level blocks of a module's .tf files, merged by kind."""
    merged: dict[str, list] = {}
    for path in sorted(directory.glob("*.tf")):
        with path.open() as f:
            try:
                parsed = hcl2.load(f)
            except Exception as e:  # the parser raises several types
                raise AssertionError(f"{path}: does not parse: {e}") from e
        for kind, blocks in parsed.items():
            merged.setdefault(kind, []).extend(blocks)
    return merged


def tf_blocks(parsed: dict, kind: str):
    """(type, name, body) of every `kind` block (resource, data)."""
    for block in parsed.get(kind, []):
        for rtype, named in block.items():
            for name, body in named.items():
                yield unq(rtype), unq(name), body


def tf_document_actions(body: dict) -> dict[str, set[str]]:
    """Effect -> actions of an aws_iam_policy_document (dynamic statements included)."""
    out: dict[str, set[str]] = {}

    def walk(node, effect="Allow"):
        if isinstance(node, dict):
            if "actions" in node:
                eff = unq(node.get("effect", '"Allow"'))
                out.setdefault(eff, set()).update(unq(a) for a in node["actions"])
            for key, value in node.items():
                if key != "actions":
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(body.get("statement", []))
    walk(body.get("dynamic", []))
    return out


def refs(text, kind: str) -> list[str]:
    return re.findall(rf"{re.escape(kind)}\.([a-z0-9_]+)", str(text))


def tf_model(parsed: dict) -> dict:
    resources = list(tf_blocks(parsed, "resource"))
    documents = {n: b for t, n, b in tf_blocks(parsed, "data") if t == "aws_iam_policy_document"}
    unknown = {t for t, _, _ in resources if t not in PRIMARY.values() and t not in SECONDARY}
    if unknown:
        raise AssertionError(f"Terraform resource types without a mapping: {sorted(unknown)}")
    primaries = {(t, n) for t, n, _ in resources if t in PRIMARY.values()}
    for t, n, _ in resources:
        owner = SECONDARY.get(t)
        if owner and (owner, n) not in primaries:
            raise AssertionError(f"{t}.{n} belongs to no {owner}.{n}")

    def doc_of(body, key="policy"):
        names = refs(body.get(key, ""), "data.aws_iam_policy_document")
        if len(names) != 1:
            raise AssertionError(f"expected one policy document in {key} = {body.get(key)}")
        return documents[names[0]]

    model = {
        "resources": primaries,
        "principals": {},
        "resource_policies": {},
        "parameters": {unq(n) for b in parsed.get("variable", []) for n in b} - TF_ONLY_VARIABLES,
        "outputs": {unq(n) for b in parsed.get("output", []) for n in b},
    }
    managed_policies = {n: tf_document_actions(doc_of(b)) for t, n, b in resources if t == "aws_iam_policy"}
    for t, name, body in resources:
        if t != "aws_iam_role":
            continue
        trust = set()
        for st in doc_of(body, "assume_role_policy").get("statement", []):
            for principal in st.get("principals", []):
                kind = unq(principal["type"])
                trust |= {f"{kind}:{unq(w)}" if kind == "Service" else kind for w in principal["identifiers"]}
        model["principals"][name] = {"actions": set(), "managed": set(), "trust": trust}
    for t, name, body in resources:
        if t == "aws_iam_role_policy":
            for role in refs(body["role"], "aws_iam_role"):
                model["principals"][role]["actions"] |= tf_document_actions(doc_of(body)).get("Allow", set())
        elif t == "aws_iam_role_policy_attachment":
            roles = refs(body.get("for_each", ""), "aws_iam_role") + refs(body.get("role", ""), "aws_iam_role")
            for role in roles:
                p = model["principals"][role]
                for policy in refs(body["policy_arn"], "aws_iam_policy"):
                    p["managed"].add(policy)
                    p["actions"] |= managed_policies[policy].get("Allow", set())
                if aws_managed(body["policy_arn"]):
                    p["managed"].add(aws_managed(body["policy_arn"]))
        elif t in ("aws_s3_bucket_policy", "aws_sqs_queue_policy"):
            model["resource_policies"][name] = tf_document_actions(doc_of(body))
    return model


def compare(cfn: dict, tf: dict) -> list[str]:
    """Every difference, as a sentence; empty when the two declare the same stack."""
    problems = []
    for what in ("resources", "parameters", "outputs"):
        for item in sorted(cfn[what] - tf[what], key=str):
            problems.append(f"{what}: {item} is in CloudFormation only")
        for item in sorted(tf[what] - cfn[what], key=str):
            problems.append(f"{what}: {item} is in Terraform only")
    for name in sorted(set(cfn["principals"]) | set(tf["principals"])):
        a, b = cfn["principals"].get(name), tf["principals"].get(name)
        if a is None or b is None:
            problems.append(f"principal {name} is in {'Terraform' if a is None else 'CloudFormation'} only")
            continue
        for key in ("actions", "managed", "trust"):
            if a[key] != b[key]:
                problems.append(
                    f"principal {name} {key}: CloudFormation only {sorted(a[key] - b[key])}, "
                    f"Terraform only {sorted(b[key] - a[key])}"
                )
    for name in sorted(set(cfn["resource_policies"]) | set(tf["resource_policies"])):
        a, b = cfn["resource_policies"].get(name), tf["resource_policies"].get(name)
        if a != b:
            problems.append(f"resource policy {name}: CloudFormation {a}, Terraform {b}")
    return problems


# The IAM actions each principal gets: the least-privilege contract, written out once
# so a change to it is a reviewed change here too.
EXPECTED_ACTIONS = {
    "receiver_role": {
        "s3:GetObject", "s3:ListBucket", "s3:PutObject", "s3:AbortMultipartUpload",
        "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
        "ec2:AttachVolume", "ec2:DescribeVolumes",
        "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams",
        "autoscaling:SetInstanceHealth",
        "kms:Decrypt", "kms:GenerateDataKey", "kms:CreateGrant", "kms:DescribeKey",
        # recovery points
        "ebs:StartSnapshot", "ebs:PutSnapshotBlock", "ebs:CompleteSnapshot",
        "ebs:ListSnapshotBlocks", "ebs:GetSnapshotBlock",
        "ec2:DescribeSnapshots", "ec2:DeleteSnapshot", "ec2:LockSnapshot", "ec2:CreateTags",
        "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncrypt*",
        # metrics
        "cloudwatch:PutMetricData",
    },
    "dr_function_role": {
        "logs:CreateLogStream", "logs:PutLogEvents",
        "s3:GetObject", "s3:ListBucket", "s3:PutObject", "s3:DeleteObject",
        "ec2:ImportImage", "ec2:DescribeImportImageTasks", "iam:PassRole",
        "ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances",
        "ec2:DeregisterImage", "ec2:DeleteSnapshot",
        "xray:PutTraceSegments", "xray:PutTelemetryRecords",
        "kms:Decrypt", "kms:GenerateDataKey",
        # the snapshot method: register from points, hold them, verify
        "ec2:RegisterImage", "ec2:DeleteTags", "ec2:DescribeSnapshots", "ec2:DescribeImages",
        "ec2:DescribeInstanceStatus", "ec2:GetConsoleOutput", "ec2:DescribeInstances",
        "ssm:DescribeInstanceInformation",
        "kms:CreateGrant", "kms:DescribeKey", "kms:GenerateDataKeyWithoutPlaintext",
        "kms:ReEncrypt*",
        # failback: return snapshots of recovered instances, cutover
        "ec2:CreateSnapshots", "ec2:StopInstances",
        # recovery plans: steps and probes, DNS
        "ssm:SendCommand", "ssm:GetCommandInvocation",
        "route53:ChangeResourceRecordSets", "route53:ListResourceRecordSets",
        # guarded automatic failover: the witness, the notification
        "cloudwatch:DescribeAlarms", "route53:GetHealthCheckStatus", "sns:Publish",
    },
    "vm_import_role": {
        "s3:GetBucketLocation", "s3:ListBucket", "s3:GetObject",
        "ec2:ModifySnapshotAttribute", "ec2:CopySnapshot", "ec2:RegisterImage", "ec2:Describe*",
        "kms:Decrypt", "kms:GenerateDataKey",
        "kms:CreateGrant", "kms:DescribeKey", "kms:Encrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*",
    },
    # snapshots mode: points written straight from the bucket, shard tasks, exports
    "replica_function_role": {
        "s3:GetObject", "s3:ListBucket", "s3:PutObject", "s3:AbortMultipartUpload",
        "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes", "sqs:SendMessage",
        "logs:CreateLogStream", "logs:PutLogEvents",
        "ebs:StartSnapshot", "ebs:PutSnapshotBlock", "ebs:CompleteSnapshot",
        "ebs:ListSnapshotBlocks", "ebs:GetSnapshotBlock",
        "ec2:DescribeSnapshots", "ec2:DeleteSnapshot", "ec2:CreateTags", "ec2:LockSnapshot",
        "kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey",
        "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncrypt*",
    },
    "sender_role": {
        "s3:PutObject", "s3:GetObject", "s3:ListBucket", "kms:Decrypt", "kms:GenerateDataKey",
        # failback: its own site's snapshots, read
        "ebs:ListChangedBlocks", "ebs:ListSnapshotBlocks", "ebs:GetSnapshotBlock",
    },
}


class SameStack(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.template = load_cfn()
        cls.cfn = cfn_model(cls.template)
        cls.tf = tf_model(load_tf(MODULE))

    def test_every_tf_file_parses(self):
        files = sorted((INFRA / "terraform").rglob("*.tf"))
        self.assertGreaterEqual(len(files), 8, files)
        for path in files:
            with self.subTest(path=str(path.relative_to(INFRA))), path.open() as f:
                self.assertTrue(hcl2.load(f), f"{path} parsed empty")

    def test_cloudformation_and_terraform_declare_the_same_stack(self):
        self.assertEqual(compare(self.cfn, self.tf), [])
        # and the comparison saw the whole stack
        self.assertGreaterEqual(len(self.cfn["resources"]), 25)
        self.assertEqual(set(self.cfn["principals"]), set(EXPECTED_ACTIONS))

    def test_the_dashboards_are_json_and_name_only_metrics_the_receiver_publishes(self):
        code = (INFRA.parent / "receiver/src/metrics.rs").read_text()
        published = set(re.findall(r'pub const [A-Z_]+: &str = "([A-Za-z]+)";', code))
        self.assertIn("ReplicationLagSeconds", published)
        body = self.template["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
        body = body.replace("${RpoTargetSeconds}", "1800")
        doc = json.loads(re.sub(r"\$\{[^}]+\}", "X", body))
        cfn_names = set()
        for w in doc["widgets"]:
            for m in w["properties"]["metrics"]:
                if m and m[0] == "Pilotlight":
                    cfn_names.add(m[1])
                for part in m:
                    if isinstance(part, dict) and "expression" in part:
                        self.assertIn("{Pilotlight,", part["expression"])
                        cfn_names.update(re.findall(r'MetricName="(\w+)"', part["expression"]))
        self.assertTrue(cfn_names, "the dashboard shows pilotlight's metrics")
        self.assertLessEqual(cfn_names, published, cfn_names - published)
        self.assertIn("ReplicationLagSeconds", cfn_names)
        tf = (MODULE / "alarms.tf").read_text()
        dash = tf[tf.index('resource "aws_cloudwatch_dashboard"'):]
        per_disk = re.search(r"for m in \[([^\]]+)\]", tf).group(1)
        tf_names = set(re.findall(r'"(\w+)"', per_disk)) | set(re.findall(r'"Pilotlight", "(\w+)"', dash))
        self.assertEqual(tf_names, cfn_names)
        # The alarms watch published metrics too, breaching when they go missing. (moto's
        # CloudFormation creates no AWS::CloudWatch::Alarm, so this is checked here.)
        for name in ("RpoAlarm", "ReceiverHeartbeatAlarm"):
            p = self.template["Resources"][name]["Properties"]
            self.assertIn(p["MetricName"], published)
            self.assertEqual(p["Namespace"], "Pilotlight")
            self.assertEqual(p["TreatMissingData"], "breaching")
            self.assertEqual(p["Dimensions"], [{"Name": "Stack", "Value": {"Ref": "AWS::StackName"}}])
        rpo = self.template["Resources"]["RpoAlarm"]["Properties"]
        self.assertEqual(rpo["MetricName"], "MaxReplicationLagSeconds")
        self.assertEqual(rpo["Threshold"], {"Ref": "RpoTargetSeconds"})
        self.assertEqual(rpo["ComparisonOperator"], "GreaterThanThreshold")
        self.assertEqual(self.template["Parameters"]["RpoTargetSeconds"]["Default"], 1800)
        # Both modes: in snapshots mode the replica function's schedule (every 10 minutes)
        # publishes the lag, so each 15-minute period holds a run.
        self.assertNotIn("Condition", self.template["Resources"]["RpoAlarm"])
        self.assertEqual(rpo["Period"], {"Fn::If": ["SnapshotsMode", 900, 300]})
        self.assertIn("period              = local.snapshots_mode ? 900 : 300", tf)
        emf = (INFRA.parent / "lambdas/replica/src/emf.rs").read_text()
        for metric in ("ReplicationLagSeconds", "MaxReplicationLagSeconds", "Heartbeat"):
            self.assertIn(f'"{metric}"', emf)
        schedule = self.template["Resources"]["ReplicaSchedule"]["Properties"]["ScheduleExpression"]
        self.assertEqual(schedule, "rate(10 minutes)")
        self.assertIn('treat_missing_data  = "breaching"', tf)
        self.assertIn("threshold           = var.rpo_target_seconds", tf)

    def test_each_principal_gets_exactly_its_documented_actions(self):
        for name, expected in EXPECTED_ACTIONS.items():
            with self.subTest(principal=name):
                self.assertEqual(self.cfn["principals"][name]["actions"], expected)
                self.assertEqual(self.tf["principals"][name]["actions"], expected)

    def test_sender_can_only_put_under_its_site(self):
        sender = self.template["Resources"]["SenderPolicy"]["Properties"]["PolicyDocument"]
        (allow,) = [st for st in sender["Statement"] if st["Effect"] == "Allow" and st["Action"] == "s3:PutObject"]
        self.assertEqual(allow["Action"], "s3:PutObject")
        self.assertEqual(allow["Resource"], {"Fn::Sub": "${DataBucket.Arn}/${Prefix}/${SenderSite}/*"})
        # (what it may not write under its site: test_aws_rules)

    def test_receiver_user_data_is_the_same_script(self):
        self.assertEqual(cfn_user_data(self.template), USER_DATA.read_text())

    def test_notification_prefix_keeps_dr_run_records_out_of_the_queue(self):
        bucket = self.template["Resources"]["DataBucket"]["Properties"]
        cond, snapshots, image = bucket["NotificationConfiguration"]["QueueConfigurations"]["Fn::If"]
        self.assertEqual(cond, "SnapshotsMode")
        (qc,) = image
        self.assertEqual(qc["Filter"]["S3Key"]["Rules"], [{"Name": "prefix", "Value": {"Fn::Sub": "${Prefix}/"}}])
        # Snapshots mode: manifests and export requests only, under the same prefix.
        rules = [q["Filter"]["S3Key"]["Rules"] for q in snapshots]
        self.assertEqual([r[0]["Value"] for r in rules], [{"Fn::Sub": "${Prefix}/"}] * 2)
        self.assertEqual(sorted(r[1]["Value"] for r in rules), ["/manifest.json", "/request.json"])
        tf = (MODULE / "main.tf").read_text()
        self.assertIn('filter_prefix = "${var.prefix}/"', tf)
        self.assertIn('["/manifest.json", "/request.json"]', tf)


class ComparisonCatchesDrift(unittest.TestCase):
    """The comparison itself: each kind of drift is reported."""

    @classmethod
    def setUpClass(cls):
        cls.cfn = cfn_model(load_cfn())
        cls.tf = tf_model(load_tf(MODULE))

    def test_an_extra_action(self):
        tf = copy.deepcopy(self.tf)
        tf["principals"]["receiver_role"]["actions"].add("s3:DeleteObject")
        self.assertIn("principal receiver_role actions", " ".join(compare(self.cfn, tf)))

    def test_a_missing_resource(self):
        tf = copy.deepcopy(self.tf)
        tf["resources"].discard(("aws_cloudwatch_metric_alarm", "lag_alarm"))
        self.assertIn("lag_alarm", " ".join(compare(self.cfn, tf)))

    def test_a_changed_trust(self):
        cfn = copy.deepcopy(self.cfn)
        cfn["principals"]["vm_import_role"]["trust"] = {"Service:ec2.amazonaws.com"}
        self.assertIn("vm_import_role trust", " ".join(compare(cfn, self.tf)))

    def test_a_renamed_parameter_and_output(self):
        tf = copy.deepcopy(self.tf)
        tf["parameters"].discard("retention_days")
        tf["outputs"].add("extra")
        problems = " ".join(compare(self.cfn, tf))
        self.assertIn("retention_days", problems)
        self.assertIn("extra", problems)

    def test_a_resource_policy_change(self):
        tf = copy.deepcopy(self.tf)
        tf["resource_policies"]["events_queue_policy"] = {"Allow": {"sqs:*"}}
        self.assertIn("events_queue_policy", " ".join(compare(self.cfn, tf)))


if __name__ == "__main__":
    unittest.main()
