"""What AWS enforces and the emulator ignores, checked on the templates and the code.

Every test here encodes one rule from the AWS documentation (cited in the test), so a
first real deployment cannot fail on it again. Each rule is a function returning its
problems; each test runs it on the real template (no problems) and on a mutated copy
that breaks the rule (a problem is reported), so a rule that stopped checking anything
fails too. Run by scripts/test with the drift tests (`unittest discover -s infra/tests`).
"""

from __future__ import annotations

import copy
import fnmatch
import re
import unittest
from pathlib import Path

from test_infra import INFRA, MODULE, USER_DATA, as_list, load_cfn

ROOT = INFRA.parent
README = INFRA / "README.md"
EC2_CODE = ROOT / "cloud" / "src" / "ec2" / "sdk.rs"
POINTS_CODE = ROOT / "protocol" / "src" / "points.rs"


# ---- a small model of the template -----------------------------------------------------


def statements(template: dict, role: str) -> list[dict]:
    """Every statement that can apply to `role`: inline policies, its managed policies,
    policies that list it; both branches of an `Fn::If` item (tagged `_if`)."""
    res = template["Resources"]
    out: list[dict] = []

    def add(document: dict):
        for st in as_list(document.get("Statement", [])):
            if isinstance(st, dict) and "Fn::If" in st:
                cond, yes, _no = st["Fn::If"]
                if isinstance(yes, dict) and "Effect" in yes:
                    out.append({**yes, "_if": cond})
            elif isinstance(st, dict):
                out.append(st)

    props = res[role]["Properties"]
    for p in props.get("Policies", []):
        add(p["PolicyDocument"])
    for arn in props.get("ManagedPolicyArns", []):
        if isinstance(arn, dict) and arn.get("Ref") in res:
            add(res[arn["Ref"]]["Properties"]["PolicyDocument"])
    for name, r in res.items():
        # A role listed in one mode only: [!If [Cond, !Ref Role, !Ref AWS::NoValue]].
        roles = [x["Fn::If"][1] if isinstance(x, dict) and "Fn::If" in x else x
                 for x in r["Properties"].get("Roles", [])] if r["Type"] == "AWS::IAM::ManagedPolicy" else []
        if {"Ref": role} in roles:
            add(r["Properties"]["PolicyDocument"])
    return out


def text(value) -> str:
    """A resource or value as written (`Fn::Sub` strings, `Ref`s as ${Name})."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "Fn::Sub" in value:
            sub = value["Fn::Sub"]
            return sub if isinstance(sub, str) else sub[0]
        if "Ref" in value:
            return "${" + value["Ref"] + "}"
        if "Fn::GetAtt" in value:
            return "${" + ".".join(as_list(value["Fn::GetAtt"])) + "}"
    return str(value)


def grants(st: dict, action: str) -> bool:
    return any(fnmatch.fnmatchcase(action, a) for a in as_list(st.get("Action", [])))


def iam_match(pattern: str, value: str) -> bool:
    """IAM's wildcard: `*` matches any run of characters, `/` included."""
    return re.fullmatch(".*".join(re.escape(p) for p in pattern.split("*")), value) is not None


def allowed(stmts: list[dict], action: str, resource: str, context: dict | None = None) -> bool:
    """IAM policy evaluation for one request (AWS IAM User Guide, "Policy evaluation
    logic"): an explicit Deny wins, else an Allow whose resource and conditions match.
    Conditions understood: StringLike/StringEquals (with ForAllValues/ForAnyValue over a
    list value, e.g. aws:TagKeys) and Null, on the context keys given."""

    def one(base: str, pats: list[str], have: str) -> bool:
        if base == "StringLike":
            return any(iam_match(p, have) for p in pats)
        if base == "StringEquals":
            return have in pats
        raise AssertionError(f"condition operator {base} is not modelled")

    def conditions_hold(st):
        for op, keys in st.get("Condition", {}).items():
            qualifier, _, base = op.rpartition(":")
            for key, want in keys.items():
                have = (context or {}).get(key)
                pats = [text(w) for w in as_list(want)]
                if base == "Null":
                    # "true": the key is absent; "false": present (IAM User Guide,
                    # "Condition operator to check existence of condition keys").
                    if (have is None) != (pats == ["true"]):
                        return False
                elif qualifier == "ForAllValues":
                    # Every value in the request matches (vacuously true without any).
                    if not all(one(base, pats, h) for h in as_list(have or [])):
                        return False
                elif qualifier == "ForAnyValue":
                    if not any(one(base, pats, h) for h in as_list(have or [])):
                        return False
                elif have is None or not one(base, pats, have):
                    return False
        return True

    def applies(st):
        return (
            grants(st, action)
            and any(iam_match(text(r), resource) for r in as_list(st.get("Resource", [])))
            and conditions_hold(st)
        )

    if any(st.get("Effect") == "Deny" and applies(st) for st in stmts):
        return False
    return any(st.get("Effect") == "Allow" and applies(st) for st in stmts)


BUCKET = "${DataBucket.Arn}"


SNAPSHOT = "arn:${AWS::Partition}:ec2:${AWS::Region}::snapshot/snap-1"
STACK = "${AWS::StackName}"


def points_unstartable_or_unreadable(template: dict) -> list[str]:
    """Service Authorization Reference, Amazon Elastic Block Store, "API operations":
    the StartSnapshot operation authorises ebs:StartSnapshot *and* ec2:CreateTags on the
    new snapshot, which has no tags yet (only aws:RequestTag can scope it). EBS User
    Guide, "Control access to EBS direct APIs using IAM": reading a snapshot's blocks
    needs ebs:ListSnapshotBlocks and ebs:GetSnapshotBlock. The receiver starts its points
    with tags, and exports a generation the image moved past from its point."""
    stmts = statements(template, "ReceiverRole")
    problems = []
    start = {"aws:RequestTag/pilotlight:stack": STACK, "aws:RequestTag/pilotlight:point": "1",
             "aws:TagKeys": ["pilotlight:stack", "pilotlight:point"]}
    for action in ("ebs:StartSnapshot", "ec2:CreateTags"):
        if not allowed(stmts, action, SNAPSHOT, start):
            problems.append(f"a tagged StartSnapshot is denied: no {action} with the request's tags")
    for action in ("ebs:ListSnapshotBlocks", "ebs:GetSnapshotBlock"):
        if not allowed(stmts, action, SNAPSHOT, {"aws:ResourceTag/pilotlight:stack": STACK}):
            problems.append(f"exports cannot read this stack's points: no {action}")
        if allowed(stmts, action, SNAPSHOT, {"aws:ResourceTag/pilotlight:stack": "other"}):
            problems.append(f"{action} reads other stacks' snapshots")
    return problems


def dr_can_remove_points(template: dict) -> list[str]:
    """IAM User Guide, "Policy evaluation logic": an explicit Deny overrides any Allow.
    The DR function deletes snapshots carrying a run tag (what its imports made) and tags
    imported snapshots with a run: without denies it could tag a recovery point with a run
    and then delete it. It may still hold this stack's points, tag and delete what an
    import made."""
    stmts = statements(template, "DrFunctionRole")
    problems = []
    point = {"aws:ResourceTag/pilotlight:stack": "any-stack", "aws:ResourceTag/pilotlight:dr-run": "r"}
    if allowed(stmts, "ec2:DeleteSnapshot", SNAPSHOT, point):
        problems.append("the DR function may delete a recovery point (carrying a run tag)")
    run_tag = {"aws:RequestTag/pilotlight:dr-run": "r", "aws:TagKeys": ["pilotlight:dr-run"]}
    if allowed(stmts, "ec2:CreateTags", SNAPSHOT, {**run_tag, "aws:ResourceTag/pilotlight:stack": "any-stack"}):
        problems.append("the DR function may put a run tag on a recovery point")
    if not allowed(stmts, "ec2:CreateTags", SNAPSHOT, run_tag):
        problems.append("the DR function can no longer tag what its import made")
    if not allowed(stmts, "ec2:DeleteSnapshot", SNAPSHOT, {"aws:ResourceTag/pilotlight:dr-run": "r"}):
        problems.append("the DR function can no longer delete what its import made")
    hold = {"aws:ResourceTag/pilotlight:stack": STACK, "aws:TagKeys": ["pilotlight:hold:r"]}
    if not allowed(stmts, "ec2:CreateTags", SNAPSHOT, hold):
        problems.append("the DR function can no longer hold this stack's points")
    return problems


def failback_permissions(template: dict) -> list[str]:
    """Failback. EC2 API reference, CreateSnapshots ("Volumes are chosen by specifying an
    instance"; Service Authorization Reference, Amazon EC2: resource types instance,
    snapshot and volume; tags on creation need ec2:CreateTags with ec2:CreateAction): the
    DR function snapshots, stops and prunes only what its runs launched and made; a
    recovery point stays beyond its reach even though return snapshots carry the stack
    tag too (the sender's read policy needs it). The sender reads the DR function's
    return document of its own site and never writes it."""
    stmts = statements(template, "DrFunctionRole")
    instance = "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:instance/i-1"
    volume = "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:volume/vol-1"
    ours = {"aws:ResourceTag/pilotlight:dr-run": "r"}
    problems = []
    for action in ("ec2:CreateSnapshots", "ec2:StopInstances"):
        if not allowed(stmts, action, instance, ours):
            problems.append(f"the DR function cannot {action} a recovered instance")
        if allowed(stmts, action, instance, {}):
            problems.append(f"the DR function may {action} any instance")
    tagged = {"aws:RequestTag/pilotlight:return": "r"}
    if not (allowed(stmts, "ec2:CreateSnapshots", volume) and allowed(stmts, "ec2:CreateSnapshots", SNAPSHOT, tagged)):
        problems.append("the DR function cannot make tagged return snapshots")
    if allowed(stmts, "ec2:CreateSnapshots", SNAPSHOT, {}):
        problems.append("the DR function may make untagged snapshots")
    if not allowed(stmts, "ec2:CreateTags", SNAPSHOT, {"ec2:CreateAction": "CreateSnapshots", "aws:TagKeys": ["pilotlight:return"]}):
        problems.append("the DR function cannot tag return snapshots on creation")
    ret = {"aws:ResourceTag/pilotlight:stack": STACK, "aws:ResourceTag/pilotlight:return": "r"}
    if not allowed(stmts, "ec2:DeleteSnapshot", SNAPSHOT, ret):
        problems.append("the DR function cannot prune return snapshots")
    point = {"aws:ResourceTag/pilotlight:stack": STACK}
    if allowed(stmts, "ec2:DeleteSnapshot", SNAPSHOT, point):
        problems.append("the DR function may delete a recovery point")
    if allowed(stmts, "ec2:CreateTags", SNAPSHOT, {**point, "aws:TagKeys": ["pilotlight:return"], "aws:RequestTag/pilotlight:dr-run": "r"}):
        problems.append("the DR function may make a recovery point look like a return snapshot")
    if not allowed(stmts, "s3:PutObject", f"{BUCKET}/${{Prefix}}/s1/vm1/disk0/b/dr-1/return.json"):
        problems.append("the DR function cannot write return documents")
    sender = template["Resources"]["SenderPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    site = "${Prefix}/${SenderSite}"
    if not allowed(sender, "s3:GetObject", f"{BUCKET}/{site}/vm1/disk0/b/dr-1/return.json"):
        problems.append("the sender cannot read its return documents")
    if allowed(sender, "s3:GetObject", f"{BUCKET}/${{Prefix}}/othersite/vm1/disk0/b/dr-1/return.json"):
        problems.append("the sender may read another site's return documents")
    if allowed(sender, "s3:PutObject", f"{BUCKET}/{site}/vm1/disk0/b/dr-1/return.json"):
        problems.append("the sender may write a return document")
    if not allowed(sender, "s3:PutObject", f"{BUCKET}/{site}/vm1/disk0/b/dr-1/round.json"):
        problems.append("the sender cannot report its rounds")
    return problems


def plan_permissions(template: dict) -> list[str]:
    """Recovery plans. Service Authorization Reference, AWS Systems Manager: SendCommand
    takes the document and the instance (ssm:resourceTag), GetCommandInvocation no
    resource; Amazon Route 53: ChangeResourceRecordSets takes the hosted zone, with
    route53:ChangeResourceRecordSetsRecordTypes and ...Actions. The DR function runs
    commands only on instances its runs launched, with AWS-RunShellScript or the
    account's own documents, and changes only A records (UPSERT, DELETE) in the zones
    the stack names."""
    stmts = statements(template, "DrFunctionRole")
    instance = "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:instance/i-1"
    problems = []
    if not allowed(stmts, "ssm:SendCommand", instance, {"ssm:resourceTag/pilotlight:dr-run": "r"}):
        problems.append("the DR function cannot run a plan's steps on a recovered instance")
    if allowed(stmts, "ssm:SendCommand", instance, {}):
        problems.append("the DR function may run commands on any instance")
    shell = "arn:${AWS::Partition}:ssm:${AWS::Region}::document/AWS-RunShellScript"
    if not allowed(stmts, "ssm:SendCommand", shell):
        problems.append("the DR function cannot use AWS-RunShellScript")
    if allowed(stmts, "ssm:SendCommand", "arn:${AWS::Partition}:ssm:${AWS::Region}::document/AWS-RunPatchBaseline"):
        problems.append("the DR function may run any AWS-owned document")
    dns = [st for st in stmts if any(grants(st, a) for a in ("route53:ChangeResourceRecordSets", "route53:ListResourceRecordSets"))]
    if len(dns) != 1:
        problems.append(f"expected one Route 53 statement, found {len(dns)}")
    for st in dns:
        cond = st.get("Condition", {}).get("ForAllValues:StringEquals", {})
        if cond.get("route53:ChangeResourceRecordSetsRecordTypes") != ["A"]:
            problems.append("plans may change records other than A")
        if sorted(cond.get("route53:ChangeResourceRecordSetsActions", [])) != ["DELETE", "UPSERT"]:
            problems.append("plans may do more than UPSERT and DELETE")
        if "PlanHostedZoneId" not in str(st.get("Resource")) or st.get("_if") != "HasPlanZones":
            problems.append("the Route 53 statement is not limited to the stack's plan zones")
    return problems


def automation_permissions(template: dict) -> list[str]:
    """Guarded automatic failover: the fence hook runs only on instances the user tagged
    pilotlight:fence=true (SendCommand with ssm:resourceTag), notifications go only to the
    stack's topic, and the witness is read, never changed."""
    stmts = statements(template, "DrFunctionRole")
    problems = []
    mi = "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:managed-instance/mi-1"
    if not allowed(stmts, "ssm:SendCommand", mi, {"ssm:resourceTag/pilotlight:fence": "true"}):
        problems.append("the fence hook cannot run on a tagged managed instance")
    if allowed(stmts, "ssm:SendCommand", mi, {}):
        problems.append("the DR function may run commands on any managed instance")
    if not any(grants(st, "sns:Publish") and st.get("Resource") == {"Ref": "AlertTopic"} for st in stmts):
        problems.append("automation cannot notify the stack's topic")
    if any(grants(st, "sns:Publish") and st.get("Resource") != {"Ref": "AlertTopic"} for st in stmts):
        problems.append("the DR function may publish to other topics")
    for action in ("cloudwatch:PutMetricAlarm", "cloudwatch:SetAlarmState", "route53:UpdateHealthCheck"):
        if any(grants(st, action) for st in stmts):
            problems.append(f"the DR function may {action}: a witness it could change is no witness")
    rule = template["Resources"].get("AutomationAlarmRule", {})
    if rule.get("Condition") != "HasAutomationAlarms":
        problems.append("the alarm rule is not limited to the named witness alarms")
    return problems


def launch_needs_points_for_kms(template: dict) -> list[str]:
    """EC2 User Guide, "Amazon EBS encryption" (KMS key permissions): launching from an
    AMI whose snapshots a customer key encrypts needs kms:CreateGrant, kms:Decrypt,
    kms:DescribeKey, kms:GenerateDataKeyWithoutPlaintext and kms:ReEncrypt* on it, else
    the instance ends in Client.InternalError. Imports are always encrypted with the stack
    key (ImportImage KmsKeyId), so the DR role needs them whenever the stack has a key."""
    problems = []
    res = template["Resources"]
    granted = False
    for name, r in res.items():
        if r["Type"] != "AWS::IAM::ManagedPolicy" or {"Ref": "DrFunctionRole"} not in r["Properties"].get("Roles", []):
            continue
        for st in as_list(r["Properties"]["PolicyDocument"]["Statement"]):
            if st.get("Effect") == "Allow" and grants(st, "kms:CreateGrant"):
                if r.get("Condition") != "UseKms":
                    problems.append(f"{name}: the DR role's key grant exists only under {r.get('Condition')}")
                granted = True
    if not granted:
        problems.append("the DR role is never granted the stack key for launches")
    return problems


def without_statement(document_of, sid: str):
    """A template mutation (for `mutated`): the statement `sid` removed from the policy
    document `document_of(resources)`."""
    def edit(res, _):
        doc = document_of(res)
        doc["Statement"] = [st for st in doc["Statement"] if not (isinstance(st, dict) and st.get("Sid") == sid)]
    return edit


# ---- the rules ---------------------------------------------------------------------------


def tracing_without_xray(template: dict) -> list[str]:
    """AWS Lambda Developer Guide, "Visualize Lambda function invocations using AWS X-Ray":
    active tracing needs `xray:PutTraceSegments` and `xray:PutTelemetryRecords` on the
    execution role; CreateFunction refuses the role otherwise."""
    problems = []
    for name, r in template["Resources"].items():
        if r["Type"] != "AWS::Lambda::Function":
            continue
        mode = r["Properties"].get("TracingConfig", {}).get("Mode", "PassThrough")
        if mode == "PassThrough":
            continue
        when = mode["Fn::If"][0] if isinstance(mode, dict) and "Fn::If" in mode else None
        role = r["Properties"]["Role"]["Fn::GetAtt"][0]
        for action in ("xray:PutTraceSegments", "xray:PutTelemetryRecords"):
            ok = [st for st in statements(template, role) if st.get("Effect") == "Allow" and grants(st, action)]
            # Granted always, or under the same condition as the tracing.
            if not any(st.get("_if") in (None, when) for st in ok):
                problems.append(f"{name}: tracing {mode} but its role lacks {action}")
    return problems


def reserved_concurrency_by_default(template: dict) -> list[str]:
    """AWS Lambda Developer Guide, "Lambda quotas" and "Configuring reserved concurrency":
    a reservation must leave at least 100 executions unreserved, and new accounts start
    with a concurrency quota as low as 10: a fixed reservation fails stack creation there."""
    problems = []
    params = template.get("Parameters", {})
    for name, r in template["Resources"].items():
        if r["Type"] != "AWS::Lambda::Function":
            continue
        rc = r["Properties"].get("ReservedConcurrentExecutions")
        if rc is None:
            continue
        if isinstance(rc, (int, str)):
            problems.append(f"{name}: ReservedConcurrentExecutions {rc} is fixed")
        elif "Fn::If" in rc:
            ref = rc["Fn::If"][1].get("Ref") if isinstance(rc["Fn::If"][1], dict) else None
            if str(params.get(ref, {}).get("Default")) != "0":
                problems.append(f"{name}: reserved concurrency parameter {ref} does not default to 0")
    return problems


KMS_LOGS_STATEMENT = ['"Service": "logs.', "kms:GenerateDataKey*", "kms:EncryptionContext:aws:logs:arn"]


def kms_log_groups_undocumented(template: dict, readme: str) -> list[str]:
    """Amazon CloudWatch Logs User Guide, "Encrypt log data in CloudWatch Logs using AWS
    KMS": the key policy must allow the service principal `logs.REGION.amazonaws.com`
    (kms:Encrypt*, Decrypt*, ReEncrypt*, GenerateDataKey*, Describe*), or CreateLogGroup
    with the key fails. A stack cannot edit the policy of a key it does not own: the
    statement must be in the deploy guide, and the parameter must point to it."""
    problems = []
    kms_groups = [n for n, r in template["Resources"].items()
                  if r["Type"] == "AWS::Logs::LogGroup" and "KmsKeyId" in r["Properties"]]
    if kms_groups:
        for needle in KMS_LOGS_STATEMENT:
            if needle not in readme:
                problems.append(f"log groups {kms_groups} use the key, but infra/README.md lacks {needle!r}")
        desc = template["Parameters"]["KmsKeyArn"]["Description"]
        if "logs." not in desc:
            problems.append("the KmsKeyArn parameter does not say its key policy must admit logs")
    return problems


# Keys each principal reads that may not exist yet, with the action it reads them by.
EXISTENCE_PROBES = {
    "DrFunctionRole": [
        "pilotlight/site1/vm1/disk0/x/run.d0/result.json",  # export not answered yet
        "pilotlight-dr/runs/dr-1.json",  # a run id that does not exist
        "pilotlight-dr/runs/dr-1.html",  # a report not written (the run still going)
        "pilotlight-dr/runs/groups/grp-1.json",  # a group id that does not exist
    ],
    "ReceiverRole": [
        "pilotlight/site1/vm1/disk0/x/run.d0/result.json",  # an export not written yet
        "pilotlight/site1/vm1/disk0/g/00000000000000000007/manifest.json",  # expired
    ],
}


def missing_keys_unknowable(template: dict) -> list[str]:
    """Amazon S3 API Reference, GetObject, "Permissions": without `s3:ListBucket` a
    missing key is answered 403 AccessDenied, not 404 NoSuchKey. pilotlight tells the two
    apart by listing the key as a prefix (`ObjectStore::get_if_exists`), so every
    principal that reads possibly-missing keys needs ListBucket for that prefix."""
    problems = []
    for role, keys in EXISTENCE_PROBES.items():
        stmts = statements(template, role)
        for key in keys:
            key = key.replace("pilotlight/", "${Prefix}/", 1) if key.startswith("pilotlight/") else key
            if not allowed(stmts, "s3:GetObject", f"{BUCKET}/{key}"):
                problems.append(f"{role} cannot read {key}")
            if not allowed(stmts, "s3:ListBucket", BUCKET, {"s3:prefix": key}):
                problems.append(f"{role} cannot list {key}: a missing key reads as 403 it cannot tell from a denial")
    return problems


def sender_writes_exports(template: dict) -> list[str]:
    """Design: the sender writes only generations under its site. IAM User Guide, "Policy
    evaluation logic": an explicit Deny overrides any Allow, so `x/` (export requests and
    results, trusted by the receiver and the DR function) is denied outright."""
    stmts = [st for st in template["Resources"]["SenderPolicy"]["Properties"]["PolicyDocument"]["Statement"]]
    site = "${Prefix}/${SenderSite}"
    problems = []
    for key in [f"{site}/vm1/disk0/x/run.d0/request.json", f"{site}/vm1/disk0/x/run.d0/result.json",
                f"{site}/vm1/disk0/x/run.d0/image.raw", f"{site}/vm1/disk0/r/head.json",
                f"{site}/vm1/disk0/r/00000000000000000003/00001-000000.json"]:
        if allowed(stmts, "s3:PutObject", f"{BUCKET}/{key}"):
            problems.append(f"the sender may write {key}")
    # ...while every generation key stays writable, whatever the VM and disk are named.
    for vm, disk in [("vm1", "disk0"), ("x", "disk0"), ("vm1", "x"), ("x", "x")]:
        for rest in ["g/00000000000000000001/d/00000000000000000000", "g/00000000000000000001/manifest.json"]:
            key = f"{site}/{vm}/{disk}/{rest}"
            if not allowed(stmts, "s3:PutObject", f"{BUCKET}/{key}"):
                problems.append(f"the sender may not write {key}")
    if allowed(stmts, "s3:PutObject", f"{BUCKET}/${{Prefix}}/othersite/vm1/disk0/g/00000000000000000001/manifest.json"):
        problems.append("the sender may write under another site")
    # It reads back only its own manifests (to never overwrite a committed generation)
    # and lists only its own site; no data, no exports, nothing of another site.
    own = f"{site}/vm1/disk0/g/00000000000000000003"
    if not allowed(stmts, "s3:GetObject", f"{BUCKET}/{own}/manifest.json"):
        problems.append("the sender cannot read back its own manifests")
    if not allowed(stmts, "s3:ListBucket", BUCKET, {"s3:prefix": f"{site}/vm1/disk0/g/"}):
        problems.append("the sender cannot list its own disks' manifests")
    for key in [f"{own}/d/00000000000000000000", f"{site}/vm1/disk0/x/run.d0/result.json",
                "${Prefix}/othersite/vm1/disk0/g/00000000000000000003/manifest.json"]:
        if allowed(stmts, "s3:GetObject", f"{BUCKET}/{key}"):
            problems.append(f"the sender may read {key}")
    if allowed(stmts, "s3:ListBucket", BUCKET, {"s3:prefix": "${Prefix}/othersite/"}):
        problems.append("the sender may list another site")
    return problems


def replica_beyond_its_own(template: dict) -> list[str]:
    """Snapshots mode's function writes points only tagged with its stack, deletes and
    reads only its stack's points, writes only its own documents and exports (never a
    generation: those are the sender's), and reads the bucket only under the prefix."""
    stmts = statements(template, "ReplicaFunctionRole")
    snap = "arn:${AWS::Partition}:ec2:${AWS::Region}::snapshot/snap-1"
    own = {"aws:ResourceTag/pilotlight:stack": "${AWS::StackName}"}
    other = {"aws:ResourceTag/pilotlight:stack": "other"}
    problems = []
    if not allowed(stmts, "ebs:StartSnapshot", snap, {"aws:RequestTag/pilotlight:stack": "${AWS::StackName}"}):
        problems.append("it cannot start its points")
    if allowed(stmts, "ebs:StartSnapshot", snap, {"aws:RequestTag/pilotlight:stack": "other"}):
        problems.append("it may start another stack's snapshots")
    # ec2:LockSnapshot: the Service Authorization Reference lists aws:ResourceTag for it
    # (snapshot resource); granted only with PointLock on (the statement's Fn::If).
    for action in ["ebs:PutSnapshotBlock", "ebs:CompleteSnapshot", "ebs:GetSnapshotBlock", "ec2:DeleteSnapshot",
                   "ec2:LockSnapshot"]:
        if not allowed(stmts, action, snap, own):
            problems.append(f"it may not {action} its own points")
        if allowed(stmts, action, snap, other):
            problems.append(f"it may {action} another stack's snapshots")
    d = "${Prefix}/site1/vm1/disk0"
    for key in [f"{d}/r/head.json", f"{d}/x/run.d0/image.raw", f"{d}/x/run.d0/result.json"]:
        if not allowed(stmts, "s3:PutObject", f"{BUCKET}/{key}"):
            problems.append(f"it cannot write {key}")
    for key in [f"{d}/g/00000000000000000001/manifest.json", f"{d}/g/00000000000000000001/d/00000000000000000000"]:
        if allowed(stmts, "s3:PutObject", f"{BUCKET}/{key}"):
            problems.append(f"it may write {key}")
    return problems


def sender_reads_other_snapshots(template: dict) -> list[str]:
    """Failback: the sender reads EBS snapshots (return snapshots and points) of its own
    site and stack only (Service Authorization Reference, Amazon EBS: the read APIs take
    the snapshot resource and aws:ResourceTag)."""
    stmts = template["Resources"]["SenderPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    snap = "arn:${AWS::Partition}:ec2:${AWS::Region}::snapshot/snap-0123"
    own = {"aws:ResourceTag/pilotlight:stack": "${AWS::StackName}", "aws:ResourceTag/pilotlight:site": "${SenderSite}"}
    problems = []
    for action in ["ebs:ListChangedBlocks", "ebs:ListSnapshotBlocks", "ebs:GetSnapshotBlock"]:
        if not allowed(stmts, action, snap, own):
            problems.append(f"the sender cannot {action} its own site's snapshots")
        for other in [{**own, "aws:ResourceTag/pilotlight:site": "othersite"},
                      {**own, "aws:ResourceTag/pilotlight:stack": "otherstack"},
                      {"aws:ResourceTag/pilotlight:stack": "${AWS::StackName}"}, {}]:
            if allowed(stmts, action, snap, other):
                problems.append(f"the sender may {action} a snapshot tagged {other}")
    for action in ["ebs:StartSnapshot", "ebs:PutSnapshotBlock", "ec2:DeleteSnapshot", "ec2:CreateTags"]:
        if allowed(stmts, action, snap, own):
            problems.append(f"the sender may {action}")
    return problems


def ec2_creates_without_token(code: str) -> list[str]:
    """Amazon EC2 API Reference, "Ensuring idempotency": RunInstances and ImportImage are
    idempotent only with a ClientToken; without one a retried or repeated call creates a
    second instance or import."""
    problems = []
    for call in ("run_instances", "import_image"):
        chains = re.findall(rf"\.{call}\(\)(.*?)\.send\(\)", code, flags=re.S)
        if not chains:
            problems.append(f"no .{call}() call found (the check would check nothing)")
        for chain in chains:
            if ".client_token(" not in chain:
                problems.append(f".{call}() is sent without .client_token(..)")
    return problems


def deletes_not_tag_scoped(template: dict) -> list[str]:
    """IAM: ec2:DeregisterImage, ec2:DeleteSnapshot and ec2:TerminateInstances support
    `aws:ResourceTag` (Service Authorization Reference, Amazon EC2): the DR function may
    remove only what a pilotlight run made (tagged `pilotlight:dr-run`) or a failback's
    return snapshots (tagged `pilotlight:return`), not any AMI, snapshot or instance of
    the account. RunInstances only with the account's own images
    (`ec2:Owner`)."""
    problems = []
    stmts = statements(template, "DrFunctionRole")
    for action in ("ec2:DeregisterImage", "ec2:DeleteSnapshot", "ec2:TerminateInstances"):
        for st in stmts:
            if st.get("Effect") == "Allow" and grants(st, action):
                cond = st.get("Condition", {})
                scoped = "aws:ResourceTag/pilotlight:dr-run" in str(cond) or (
                    action == "ec2:DeleteSnapshot" and "aws:ResourceTag/pilotlight:return" in str(cond))
                if not scoped:
                    problems.append(f"{action} ({st.get('Sid')}) is not scoped by the pilotlight:dr-run tag")
    for st in stmts:
        if st.get("Effect") == "Allow" and grants(st, "ec2:RunInstances"):
            for r in as_list(st.get("Resource", [])):
                if ":image/" in text(r) and "ec2:Owner" not in str(st.get("Condition", {})):
                    problems.append(f"RunInstances ({st.get('Sid')}) may launch any image, not only the account's")
    return problems


def dr_points_beyond_own_stack(template: dict) -> list[str]:
    """Service Authorization Reference, Amazon EC2: RegisterImage takes the snapshot
    resources of its block device mappings (with aws:ResourceTag) and the new image (with
    aws:RequestTag); DeleteTags a snapshot with aws:ResourceTag and aws:TagKeys. The DR
    function may register AMIs only from this stack's recovery points, and add or remove
    only its hold tags on them: never retag, unhold or use another stack's snapshots."""
    problems = []
    for st in statements(template, "DrFunctionRole"):
        if st.get("Effect") != "Allow":
            continue
        cond = str(st.get("Condition", {}))
        on_snapshots = any(":snapshot/" in text(r) or text(r) == "*" for r in as_list(st.get("Resource", [])))
        if grants(st, "ec2:RegisterImage") and on_snapshots and "aws:ResourceTag/pilotlight:stack" not in cond:
            problems.append(f"RegisterImage ({st.get('Sid')}) may use any snapshot, not only this stack's points")
        if grants(st, "ec2:DeleteTags") and on_snapshots:
            if "aws:ResourceTag/pilotlight:stack" not in cond or "pilotlight:hold:*" not in cond:
                problems.append(f"DeleteTags ({st.get('Sid')}) may remove any tag of any snapshot")
    return problems


def points_beyond_own_stack(template: dict, code: str) -> list[str]:
    """EBS User Guide, "Control access to EBS direct APIs using IAM", and the Service
    Authorization Reference: ebs:StartSnapshot takes aws:RequestTag, PutSnapshotBlock,
    CompleteSnapshot and ec2:DeleteSnapshot a snapshot resource with aws:ResourceTag. The
    receiver may start only snapshots tagged with its stack (the tag key the code writes)
    and write, seal or delete only those: never another stack's points or the account's
    other snapshots."""
    m = re.search(r'pub const STACK: &str = "([^"]+)"', code)
    if not m:
        return ["the code's stack tag key was not found"]
    key = m.group(1)
    stmts = statements(template, "ReceiverRole")
    snap = "arn:aws:ec2:us-east-1::snapshot/snap-1"
    problems = []
    own = {f"aws:RequestTag/{key}": "${AWS::StackName}", f"aws:ResourceTag/{key}": "${AWS::StackName}"}
    other = {f"aws:RequestTag/{key}": "other", f"aws:ResourceTag/{key}": "other"}
    for action in ("ebs:StartSnapshot", "ebs:PutSnapshotBlock", "ebs:CompleteSnapshot", "ec2:DeleteSnapshot",
                   "ec2:LockSnapshot", "ec2:CreateTags"):
        resource = snap.replace("aws", "${AWS::Partition}", 1).replace("us-east-1", "${AWS::Region}")
        if not allowed(stmts, action, resource, own):
            problems.append(f"{action}: not allowed on the stack's own points")
        if allowed(stmts, action, resource, other) or allowed(stmts, action, resource, {}):
            problems.append(f"{action}: allowed beyond snapshots tagged {key} = the stack")
    return problems


def imports_unencrypted(template: dict) -> list[str]:
    """VM Import/Export User Guide, "Required service role": importing with a customer
    key needs kms:CreateGrant, Decrypt, DescribeKey, Encrypt, GenerateDataKey*, ReEncrypt*
    for the vmimport role; the DR function passes the stack's key (PILOTLIGHT_DR_KMS_KEY)."""
    problems = []
    env = template["Resources"]["DrFunction"]["Properties"]["Environment"]["Variables"]
    if "PILOTLIGHT_DR_KMS_KEY" not in env:
        problems.append("the DR function is not given the stack's key for imports")
    stmts = statements(template, "VmImportRole")
    for action in ("kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey", "kms:Encrypt",
                   "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncryptFrom"):
        if not any(st.get("Effect") == "Allow" and grants(st, action) for st in stmts):
            problems.append(f"the vmimport role lacks {action} for the key")
    return problems


def receiver_bootstrap_fragile(template: dict, user_data: str) -> list[str]:
    """Amazon Linux 2023 User Guide (minimal and container images lack packages such as
    unzip; cloud-init runs user data once, as root): the bootstrap uses only what every
    AL2023 image has, a failed bootstrap marks the instance unhealthy (EC2 Auto Scaling
    User Guide, "Set the health status of an instance"), and the receiver is not root."""
    problems = []
    if re.search(r"^\s*unzip\b|[;&|]\s*unzip\b", user_data, flags=re.M):
        problems.append("the user data needs unzip")
    for line in user_data.splitlines():
        if re.match(r"\s*dnf install", line):
            problems.append(f"a package install outside an `if` stops the bootstrap: {line.strip()}")
    if "set-instance-health" not in user_data or "trap " not in user_data:
        problems.append("a failed bootstrap does not mark the instance unhealthy")
    # EC2 Auto Scaling API reference, SetInstanceHealth, ShouldRespectGracePeriod: "If
    # the health check grace period is in effect ... the call is ignored" by default; a
    # bootstrap fails within the grace period, so it must not be respected.
    for line in user_data.splitlines():
        if "set-instance-health" in line and "--no-should-respect-grace-period" not in line:
            problems.append("SetInstanceHealth respects the grace period: a failed bootstrap is ignored")
    stmts = statements(template, "ReceiverRole")
    if not any(grants(st, "autoscaling:SetInstanceHealth") for st in stmts):
        problems.append("the receiver role may not mark its instance unhealthy")
    if "useradd --system" not in user_data:
        problems.append("the receiver has no system user of its own")
    unit = (ROOT / "receiver" / "systemd" / "pilotlight-receiver.service").read_text()
    if "\nUser=pilotlight" not in unit:
        problems.append("the receiver's unit runs it as root")
    group = template["Resources"]["ReceiverGroup"]
    if "AutoScalingRollingUpdate" not in group.get("UpdatePolicy", {}):
        problems.append("a new launch template version never reaches the running receiver")
    if not any(r["Type"] == "AWS::Logs::LogGroup" and "receiver" in text(r["Properties"].get("LogGroupName"))
               for r in template["Resources"].values()):
        problems.append("the receiver's logs have no log group")
    return problems


def retained_bucket_blocks_recreate(template: dict) -> list[str]:
    """Amazon S3 User Guide, "Bucket naming rules": names are unique per partition, and the
    bucket is retained on stack deletion, so a fixed default name makes a second stack
    (after deleting the first) fail with BucketAlreadyOwnedByYou."""
    name = template["Resources"]["DataBucket"]["Properties"]["BucketName"]
    default = name["Fn::If"][2] if isinstance(name, dict) and "Fn::If" in name else name
    return [] if "AWS::StackId" in str(default) else [f"default bucket name {default} is fixed"]


# ---- the tests -----------------------------------------------------------------------------


class AwsRules(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.t = load_cfn()
        cls.readme = README.read_text()
        cls.user_data = USER_DATA.read_text()

    def mutated(self, edit) -> dict:
        t = copy.deepcopy(self.t)
        edit(t["Resources"], t)
        return t

    def test_active_tracing_comes_with_the_xray_permissions(self):
        self.assertEqual(tracing_without_xray(self.t), [])

        def drop_tracing_statement(res, _):
            doc = res["DrFunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"]
            doc["Statement"] = [s for s in doc["Statement"] if not (isinstance(s, dict) and "Fn::If" in s)]
        self.assertTrue(tracing_without_xray(self.mutated(drop_tracing_statement)))

        def always_active(res, _):
            res["DrFunction"]["Properties"]["TracingConfig"]["Mode"] = "Active"
        self.assertTrue(tracing_without_xray(self.mutated(always_active)), "granted only under a condition")

    def test_no_concurrency_is_reserved_by_default(self):
        self.assertEqual(reserved_concurrency_by_default(self.t), [])

        def fixed(res, _):
            res["DrFunction"]["Properties"]["ReservedConcurrentExecutions"] = 5
        self.assertTrue(reserved_concurrency_by_default(self.mutated(fixed)))

        def defaulted(_, t):
            t["Parameters"]["DrReservedConcurrency"]["Default"] = 5
        self.assertTrue(reserved_concurrency_by_default(self.mutated(defaulted)))
        tf = (MODULE / "variables.tf").read_text()
        self.assertRegex(tf, r'variable "dr_reserved_concurrency" \{[^}]*default\s*=\s*0')
        self.assertRegex(tf, r'variable "dr_tracing" \{[^}]*default\s*=\s*false')

    def test_a_kms_encrypted_log_group_names_the_key_policy_it_needs(self):
        self.assertEqual(kms_log_groups_undocumented(self.t, self.readme), [])
        readme = self.readme.replace("kms:EncryptionContext:aws:logs:arn", "")
        self.assertTrue(kms_log_groups_undocumented(self.t, readme))

    def test_every_principal_that_checks_for_missing_keys_may_list_them(self):
        self.assertEqual(missing_keys_unknowable(self.t), [])

        def narrow(res, _):
            for p in res["DrFunctionRole"]["Properties"]["Policies"]:
                for st in p["PolicyDocument"]["Statement"]:
                    if isinstance(st, dict) and st.get("Sid") == "ListManifestsAndRuns":
                        st["Condition"]["StringLike"]["s3:prefix"] = [{"Fn::Sub": "${Prefix}/*"}]
        problems = missing_keys_unknowable(self.mutated(narrow))
        self.assertTrue(any("pilotlight-dr/runs" in p for p in problems), problems)

    def test_the_sender_reads_only_its_own_sites_snapshots(self):
        self.assertEqual(sender_reads_other_snapshots(self.t), [])

        def no_site(res, _):
            for st in res["SenderPolicy"]["Properties"]["PolicyDocument"]["Statement"]:
                if st.get("Sid") == "FailBackFromOwnSite":
                    del st["Condition"]["StringEquals"]["aws:ResourceTag/pilotlight:site"]
        self.assertTrue(sender_reads_other_snapshots(self.mutated(no_site)))
        tf = (MODULE / "sender.tf").read_text()
        self.assertIn('variable = "aws:ResourceTag/pilotlight:site"', tf)

    def test_the_sender_cannot_write_under_x(self):
        self.assertEqual(sender_writes_exports(self.t), [])

        def no_deny(res, _):
            doc = res["SenderPolicy"]["Properties"]["PolicyDocument"]
            doc["Statement"] = [s for s in doc["Statement"] if s["Effect"] != "Deny"]
        self.assertTrue(sender_writes_exports(self.mutated(no_deny)))

        def deny_too_wide(res, _):
            for s in res["SenderPolicy"]["Properties"]["PolicyDocument"]["Statement"]:
                if s["Effect"] == "Deny":
                    s["Resource"] = {"Fn::Sub": "${DataBucket.Arn}/${Prefix}/${SenderSite}/*/x/*"}
        problems = sender_writes_exports(self.mutated(deny_too_wide))
        self.assertTrue(any("may not write" in p for p in problems), "a disk named x is a disk")
        tf = (MODULE / "sender.tf").read_text()
        self.assertIn('"${aws_s3_bucket.data_bucket.arn}/${var.prefix}/${var.sender_site}/*/*/x/*"', tf)
        self.assertIn('effect    = "Deny"', tf)

    def test_the_replica_function_writes_only_its_stacks_points_and_its_own_documents(self):
        self.assertEqual(replica_beyond_its_own(self.t), [])

        def any_snapshot(res, _):
            for st in res["ReplicaFunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]:
                if isinstance(st, dict) and st.get("Sid") in ("WriteOwnPoints", "DeleteFailedAndTagOwnPoints"):
                    st.pop("Condition", None)
        self.assertTrue(replica_beyond_its_own(self.mutated(any_snapshot)))

        def lock_any(res, _):
            for st in res["ReplicaFunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]:
                if isinstance(st, dict) and "Fn::If" in st and st["Fn::If"][1].get("Sid") == "LockOwnPoints":
                    st["Fn::If"][1].pop("Condition")
        problems = replica_beyond_its_own(self.mutated(lock_any))
        self.assertIn("it may ec2:LockSnapshot another stack's snapshots", problems)

        def whole_prefix(res, _):
            for st in res["ReplicaFunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]:
                if isinstance(st, dict) and st.get("Sid") == "WriteChainsAndExports":
                    st["Resource"] = {"Fn::Sub": "${DataBucket.Arn}/${Prefix}/*"}
        self.assertTrue(replica_beyond_its_own(self.mutated(whole_prefix)))

    def test_every_ec2_create_call_in_the_code_passes_a_client_token(self):
        code = EC2_CODE.read_text()
        self.assertEqual(ec2_creates_without_token(code), [])
        self.assertTrue(ec2_creates_without_token(re.sub(r"\.client_token\([^)]*\)", "", code)))

    def test_dr_removes_and_launches_only_what_it_should(self):
        self.assertEqual(deletes_not_tag_scoped(self.t), [])

        def untag(res, _):
            for st in res["DrFunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]:
                if isinstance(st, dict) and st.get("Sid") == "CleanUpImportedImages":
                    st.pop("Condition")
        self.assertTrue(deletes_not_tag_scoped(self.mutated(untag)))

        def any_image(res, _):
            for st in res["DrFunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]:
                if isinstance(st, dict) and st.get("Sid") == "LaunchOwnImages":
                    st.pop("Condition")
        self.assertTrue(deletes_not_tag_scoped(self.mutated(any_image)))

    def test_imports_are_encrypted_with_the_stack_key(self):
        self.assertEqual(imports_unencrypted(self.t), [])

        def no_grant(res, _):
            res.pop("KmsImportPolicy")
        self.assertTrue(imports_unencrypted(self.mutated(no_grant)))

    def test_the_receiver_starts_on_any_al2023_image_and_reports_failure(self):
        self.assertEqual(receiver_bootstrap_fragile(self.t, self.user_data), [])
        broken = self.user_data.replace("python3 -m zipfile -e", "unzip -q").replace(
            "if dnf install", "dnf install")
        problems = receiver_bootstrap_fragile(self.t, broken)
        self.assertTrue(any("unzip" in p for p in problems), problems)
        self.assertTrue(any("dnf install" in p for p in problems), problems)
        grace = receiver_bootstrap_fragile(
            self.t, self.user_data.replace(" --no-should-respect-grace-period", ""))
        self.assertTrue(any("grace period" in p for p in grace), grace)
        tf_user_data = (MODULE / "receiver-user-data.sh.tftpl").read_text()
        self.assertIn("--no-should-respect-grace-period", tf_user_data)

        def no_update_policy(res, _):
            res["ReceiverGroup"].pop("UpdatePolicy")
        self.assertTrue(receiver_bootstrap_fragile(self.mutated(no_update_policy), self.user_data))
        self.assertIn("instance_refresh", (MODULE / "receiver.tf").read_text())

    def test_a_deleted_stack_leaves_no_name_that_blocks_the_next(self):
        self.assertEqual(retained_bucket_blocks_recreate(self.t), [])

        def fixed(res, _):
            res["DataBucket"]["Properties"]["BucketName"] = {"Fn::Sub": "pilotlight-${AWS::AccountId}-${AWS::Region}"}
        self.assertTrue(retained_bucket_blocks_recreate(self.mutated(fixed)))
        self.assertIn("bucket_prefix", (MODULE / "main.tf").read_text())

    def test_the_receiver_writes_and_prunes_only_its_own_points(self):
        code = POINTS_CODE.read_text()
        self.assertEqual(points_beyond_own_stack(self.t, code), [])

        def unscoped(res, _):
            for st in res["ReceiverPointsPolicy"]["Properties"]["PolicyDocument"]["Statement"]:
                if st.get("Sid") == "PruneAndTagOwnPoints":
                    st.pop("Condition")
        self.assertTrue(points_beyond_own_stack(self.mutated(unscoped), code))
        # The code renaming its tag key breaks the policy's scoping: caught.
        self.assertTrue(points_beyond_own_stack(self.t, code.replace("pilotlight:stack", "pilotlight:owner")))

    def test_dr_registers_and_holds_only_its_stacks_points(self):
        self.assertEqual(dr_points_beyond_own_stack(self.t), [])

        def unscoped(sid):
            def edit(res, _):
                for st in res["DrFunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]:
                    if isinstance(st, dict) and st.get("Sid") == sid:
                        st.pop("Condition")
            return edit
        self.assertTrue(dr_points_beyond_own_stack(self.mutated(unscoped("RegisterFromOwnPoints"))))
        self.assertTrue(dr_points_beyond_own_stack(self.mutated(unscoped("HoldOwnPoints"))))
        # The code's hold tag is the policy's.
        code = (ROOT / "protocol/src/points.rs").read_text()
        self.assertIn('format!("{HOLD}:{run_id}")', code)
        self.assertIn('pub const HOLD: &str = "pilotlight:hold";', code)

    def test_the_receiver_may_publish_only_into_the_namespace_the_code_uses(self):
        code = (ROOT / "receiver/src/metrics.rs").read_text()
        m = re.search(r'namespace: "([^"]+)"\.into\(\)', code)
        self.assertIsNotNone(m, "the code's namespace")
        grants_put = [st for st in statements(self.t, "ReceiverRole")
                      if st.get("Effect") == "Allow" and grants(st, "cloudwatch:PutMetricData")]
        self.assertEqual(len(grants_put), 1)
        cond = grants_put[0]["Condition"]["StringEquals"]["cloudwatch:namespace"]
        self.assertEqual(cond, m.group(1))
        tf = (MODULE / "receiver.tf").read_text()
        self.assertIn(f'values   = ["{m.group(1)}"]', tf)

    def test_the_receiver_can_start_tagged_points_and_read_them_back(self):
        self.assertEqual(points_unstartable_or_unreadable(self.t), [])

        def drop(sid):
            return without_statement(lambda res: res["ReceiverPointsPolicy"]["Properties"]["PolicyDocument"], sid)
        self.assertTrue(points_unstartable_or_unreadable(self.mutated(drop("TagPointsAtStart"))))
        self.assertTrue(points_unstartable_or_unreadable(self.mutated(drop("ReadOwnPoints"))))
        tf = (MODULE / "points.tf").read_text()
        for sid in ("TagPointsAtStart", "ReadOwnPoints"):
            self.assertIn(f'sid       = "{sid}"', tf)

    def test_dr_can_neither_delete_nor_run_tag_a_recovery_point(self):
        self.assertEqual(dr_can_remove_points(self.t), [])

        def drop(sid):
            return without_statement(lambda res: res["DrFunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"], sid)
        self.assertTrue(dr_can_remove_points(self.mutated(drop("NeverDeletePoints"))))
        self.assertTrue(dr_can_remove_points(self.mutated(drop("NeverRunTagPoints"))))
        tf = (MODULE / "dr.tf").read_text()
        for sid in ("NeverDeletePoints", "NeverRunTagPoints"):
            self.assertIn(f'sid       = "{sid}"', tf)

    def test_failback_snapshots_stops_and_prunes_only_what_runs_made(self):
        self.assertEqual(failback_permissions(self.t), [])

        def drop(sid):
            return without_statement(lambda res: res["DrFunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"], sid)
        for sid in ("ReturnSnapshotsOfRecoveredInstances", "ReturnSnapshotsTagged", "TagReturnSnapshotsOnCreate",
                    "PruneReturnSnapshots"):
            self.assertTrue(failback_permissions(self.mutated(drop(sid))), sid)

        def no_deny(res, _):
            doc = res["SenderPolicy"]["Properties"]["PolicyDocument"]
            doc["Statement"] = [s for s in doc["Statement"] if s.get("Sid") != "NeverReturnDocs"]
        self.assertTrue(failback_permissions(self.mutated(no_deny)))
        tf = (MODULE / "dr.tf").read_text() + (MODULE / "sender.tf").read_text()
        for sid in ("ReturnSnapshotsOfRecoveredInstances", "ReturnSnapshotsOfTheirVolumes", "ReturnSnapshotsTagged",
                    "TagReturnSnapshotsOnCreate", "PruneReturnSnapshots", "NeverReturnDocs", "ReadOwnReturnSnapshots"):
            self.assertIn(f'"{sid}"', tf)

    def test_plans_run_commands_and_write_dns_only_where_they_should(self):
        self.assertEqual(plan_permissions(self.t), [])

        def drop(sid):
            return without_statement(lambda res: res["DrFunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"], sid)
        for sid in ("RunPlanStepsOnOwnInstances", "RunPlanDocuments"):
            self.assertTrue(plan_permissions(self.mutated(drop(sid))), sid)

        def any_record(res, _):
            for p in res["DrFunctionRole"]["Properties"]["Policies"]:
                for st in p["PolicyDocument"]["Statement"]:
                    if isinstance(st, dict) and "Fn::If" in st and st["Fn::If"][1].get("Sid") == "PlanRecordsInPlanZones":
                        del st["Fn::If"][1]["Condition"]["ForAllValues:StringEquals"]["route53:ChangeResourceRecordSetsRecordTypes"]
        self.assertTrue(plan_permissions(self.mutated(any_record)))
        tf = (MODULE / "dr.tf").read_text()
        for sid in ("RunPlanStepsOnOwnInstances", "RunPlanDocuments", "FollowPlanSteps", "PlanRecordsInPlanZones"):
            self.assertIn(f'"{sid}"', tf)
        self.assertIn('variable = "route53:ChangeResourceRecordSetsRecordTypes"', tf)

    def test_automation_fences_only_tagged_instances_and_notifies_only_its_topic(self):
        self.assertEqual(automation_permissions(self.t), [])

        def untagged(res, _):
            for p in res["DrFunctionRole"]["Properties"]["Policies"]:
                for st in p["PolicyDocument"]["Statement"]:
                    if isinstance(st, dict) and st.get("Sid") == "FenceTaggedInstances":
                        del st["Condition"]
        self.assertTrue(automation_permissions(self.mutated(untagged)))
        tf = (MODULE / "dr.tf").read_text()
        for sid in ("ReadWitness", "NotifyAutomation", "FenceTaggedInstances"):
            self.assertIn(f'"{sid}"', tf)
        self.assertIn('variable = "ssm:resourceTag/pilotlight:fence"', tf)

    def test_dr_may_launch_encrypted_images_whenever_the_stack_has_a_key(self):
        self.assertEqual(launch_needs_points_for_kms(self.t), [])

        def points_only(res, _):
            res["KmsLaunchPolicy"]["Condition"] = "PointsWithKms"
        self.assertTrue(launch_needs_points_for_kms(self.mutated(points_only)))
        tf = (MODULE / "points.tf").read_text()
        self.assertIn('resource "aws_iam_role_policy_attachment" "kms_launch_policy" {\n  count      = local.use_kms ? 1 : 0', tf)

    def test_the_iam_evaluator_itself(self):
        st = [{"Effect": "Allow", "Action": "s3:PutObject", "Resource": "arn:b/p/*"},
              {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "arn:b/p/*/x/*"}]
        self.assertTrue(allowed(st, "s3:PutObject", "arn:b/p/a/b"))
        self.assertFalse(allowed(st, "s3:PutObject", "arn:b/p/a/x/c"))
        self.assertFalse(allowed(st, "s3:GetObject", "arn:b/p/a"))
        cond = [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:b",
                 "Condition": {"StringLike": {"s3:prefix": ["p/*"]}}}]
        self.assertTrue(allowed(cond, "s3:ListBucket", "arn:b", {"s3:prefix": "p/k"}))
        self.assertFalse(allowed(cond, "s3:ListBucket", "arn:b", {"s3:prefix": "q/k"}))
        self.assertFalse(allowed(cond, "s3:ListBucket", "arn:b"), "no prefix, no match (a GET)")
        null = [{"Effect": "Allow", "Action": "ec2:DeleteSnapshot", "Resource": "*",
                 "Condition": {"Null": {"aws:ResourceTag/t": "false"}}}]
        self.assertTrue(allowed(null, "ec2:DeleteSnapshot", "s", {"aws:ResourceTag/t": "x"}))
        self.assertFalse(allowed(null, "ec2:DeleteSnapshot", "s"))
        keys = [{"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "*",
                 "Condition": {"ForAllValues:StringLike": {"aws:TagKeys": ["h:*"]}}},
                {"Effect": "Deny", "Action": "ec2:CreateTags", "Resource": "*",
                 "Condition": {"ForAnyValue:StringEquals": {"aws:TagKeys": ["bad"]}}}]
        self.assertTrue(allowed(keys, "ec2:CreateTags", "s", {"aws:TagKeys": ["h:1", "h:2"]}))
        self.assertFalse(allowed(keys, "ec2:CreateTags", "s", {"aws:TagKeys": ["h:1", "x"]}))
        self.assertFalse(allowed(keys, "ec2:CreateTags", "s", {"aws:TagKeys": ["h:1", "bad"]}))


if __name__ == "__main__":
    unittest.main()
