"""Each rule the moto extension enforces, alone, through boto3 against moto in-process
(`mock_aws`) with the extension installed. Run by scripts/check-infra."""

from __future__ import annotations

import base64
import hashlib
import unittest

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from moto import mock_aws

import pilotlight_moto

pilotlight_moto.install()

BLOCK = 512 * 1024
KEY = "arn:aws:kms:us-east-1:123456789012:key/k"


def block(byte: int) -> tuple[bytes, str, bytes]:
    data = bytes([byte]) * BLOCK
    d = hashlib.sha256(data).digest()
    return data, base64.b64encode(d).decode(), d


def linear(digests: list[bytes]) -> str:
    return base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()


class Mocked(unittest.TestCase):
    """moto in-process, with the extension installed, and EBS and EC2 clients."""

    def setUp(self):
        self.mock = mock_aws()
        self.mock.start()
        self.ebs = boto3.client("ebs", region_name="us-east-1")
        self.ec2 = boto3.client("ec2", region_name="us-east-1")

    def tearDown(self):
        self.mock.stop()


class Ebs(Mocked):

    def start(self, **kw) -> str:
        kw.setdefault("VolumeSize", 1)
        return self.ebs.start_snapshot(**kw)["SnapshotId"]

    def write(self, blocks: dict[int, int], **kw) -> str:
        sid = self.start(**kw)
        digests = []
        for i in sorted(blocks):
            data, sum_, d = block(blocks[i])
            self.ebs.put_snapshot_block(SnapshotId=sid, BlockIndex=i, BlockData=data, DataLength=BLOCK,
                                        Checksum=sum_, ChecksumAlgorithm="SHA256")
            digests.append(d)
        st = self.ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=len(digests), Checksum=linear(digests),
                                        ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR")
        self.assertEqual(st["Status"], "completed")
        return sid

    def status(self, sid: str) -> str:
        return self.ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]["State"]

    def read(self, sid: str) -> dict[int, int]:
        out, token = {}, None
        while True:
            kw = {"SnapshotId": sid, "MaxResults": 100}
            if token:
                kw["NextToken"] = token
            page = self.ebs.list_snapshot_blocks(**kw)
            self.assertEqual(page["BlockSize"], BLOCK)
            for b in page["Blocks"]:
                got = self.ebs.get_snapshot_block(SnapshotId=sid, BlockIndex=b["BlockIndex"], BlockToken=b["BlockToken"])
                out[b["BlockIndex"]] = got["BlockData"].read()[0]
            token = page.get("NextToken")
            if not token:
                return out

    def code(self, call, **kw) -> str:
        with self.assertRaises(ClientError) as e:
            call(**kw)
        return e.exception.response["Error"]["Code"]

    def test_pending_until_completed_with_512_kib_blocks(self):
        sid = self.start()
        self.assertEqual(self.status(sid), "pending")
        self.assertEqual(self.code(self.ebs.list_snapshot_blocks, SnapshotId=sid), "ValidationException")
        sid = self.write({0: 1})
        self.assertEqual(self.status(sid), "completed")
        self.assertEqual(self.ebs.list_snapshot_blocks(SnapshotId=sid)["BlockSize"], BLOCK)

    def test_children_inherit_and_outlive_their_parent(self):
        a = self.write({0: 1, 5: 2})
        b = self.write({5: 3, 7: 4}, ParentSnapshotId=a)
        self.ec2.delete_snapshot(SnapshotId=a)
        self.assertEqual(self.read(b), {0: 1, 5: 3, 7: 4})
        self.assertEqual(self.code(self.ebs.list_snapshot_blocks, SnapshotId=a), "ResourceNotFoundException")
        # A pending parent cannot be used.
        pending = self.start()
        self.assertEqual(self.code(self.ebs.start_snapshot, VolumeSize=1, ParentSnapshotId=pending), "ValidationException")

    def test_block_checksums_and_sizes_are_checked(self):
        sid = self.start()
        data, sum_, _ = block(9)
        _, wrong, _ = block(8)
        put = self.ebs.put_snapshot_block
        self.assertEqual(self.code(put, SnapshotId=sid, BlockIndex=0, BlockData=data, DataLength=BLOCK,
                                   Checksum=wrong, ChecksumAlgorithm="SHA256"), "ValidationException")
        self.assertEqual(self.code(put, SnapshotId=sid, BlockIndex=0, BlockData=data[:512], DataLength=512,
                                   Checksum=sum_, ChecksumAlgorithm="SHA256"), "ValidationException")
        self.assertEqual(self.code(put, SnapshotId=sid, BlockIndex=2048, BlockData=data, DataLength=BLOCK,
                                   Checksum=sum_, ChecksumAlgorithm="SHA256"), "ValidationException")

    def test_a_wrong_count_or_aggregate_ends_in_error(self):
        for count, aggregate in ((2, None), (1, linear([b"\0" * 32]))):
            sid = self.start()
            data, sum_, d = block(1)
            self.ebs.put_snapshot_block(SnapshotId=sid, BlockIndex=0, BlockData=data, DataLength=BLOCK,
                                        Checksum=sum_, ChecksumAlgorithm="SHA256")
            st = self.ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=count,
                                            Checksum=aggregate or linear([d]), ChecksumAlgorithm="SHA256",
                                            ChecksumAggregationMethod="LINEAR")
            self.assertEqual(st["Status"], "error")
            self.assertEqual(self.status(sid), "error")

    def test_listing_pages_and_honours_max_results(self):
        sid = self.start(VolumeSize=1)
        digests = []
        for i in range(250):
            data, sum_, d = block(i % 251)
            self.ebs.put_snapshot_block(SnapshotId=sid, BlockIndex=i, BlockData=data, DataLength=BLOCK,
                                        Checksum=sum_, ChecksumAlgorithm="SHA256")
            digests.append(d)
        self.ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=250, Checksum=linear(digests),
                                   ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR")
        first = self.ebs.list_snapshot_blocks(SnapshotId=sid, MaxResults=100)
        self.assertEqual(len(first["Blocks"]), 100)
        self.assertIn("NextToken", first)
        self.assertEqual(len(self.read(sid)), 250)
        # (botocore checks the minimum itself: the server's check, without it)
        loose = boto3.client("ebs", region_name="us-east-1", config=Config(parameter_validation=False))
        self.assertEqual(self.code(loose.list_snapshot_blocks, SnapshotId=sid, MaxResults=5), "ValidationException")

    def test_pages_may_hold_fewer_than_max_results(self):
        parent = self.write({0: 1, 1: 1})
        child = self.write({i: 2 for i in range(1, 5)}, ParentSnapshotId=parent)
        cap = pilotlight_moto.PAGE_CAP
        pilotlight_moto.PAGE_CAP = 2
        try:
            page = self.ebs.list_changed_blocks(FirstSnapshotId=parent, SecondSnapshotId=child,
                                                MaxResults=10000)
            self.assertEqual([b["BlockIndex"] for b in page["ChangedBlocks"]], [1, 2])
            page = self.ebs.list_changed_blocks(FirstSnapshotId=parent, SecondSnapshotId=child,
                                                NextToken=page["NextToken"])
            self.assertEqual([b["BlockIndex"] for b in page["ChangedBlocks"]], [3, 4])
            self.assertNotIn("NextToken", page)
            page = self.ebs.list_snapshot_blocks(SnapshotId=child, MaxResults=10000)
            self.assertEqual(len(page["Blocks"]), 2)
            self.assertIn("NextToken", page)
        finally:
            pilotlight_moto.PAGE_CAP = cap

    def test_a_snapshot_of_a_restored_volume_is_of_the_source_lineage(self):
        point = self.write({0: 1, 3: 2})
        vol = self.ec2.create_volume(SnapshotId=point, AvailabilityZone="us-east-1a")["VolumeId"]
        back = self.ec2.create_snapshot(VolumeId=vol)["SnapshotId"]
        changed = self.ebs.list_changed_blocks(FirstSnapshotId=point, SecondSnapshotId=back)
        self.assertEqual(changed["ChangedBlocks"], [])
        listed = self.ebs.list_snapshot_blocks(SnapshotId=back)["Blocks"]
        self.assertEqual([b["BlockIndex"] for b in listed], [0, 3])
        data = self.ebs.get_snapshot_block(SnapshotId=back, BlockIndex=3, BlockToken=listed[1]["BlockToken"])
        self.assertEqual(data["BlockData"].read(), block(2)[0])
        # Its children grow the same lineage; an unrelated snapshot is refused.
        child = self.write({5: 9}, ParentSnapshotId=back)
        changed = self.ebs.list_changed_blocks(FirstSnapshotId=point, SecondSnapshotId=child)
        self.assertEqual([b["BlockIndex"] for b in changed["ChangedBlocks"]], [5])
        other = self.write({0: 1})
        self.assertEqual(self.code(self.ebs.list_changed_blocks, FirstSnapshotId=point, SecondSnapshotId=other),
                         "ValidationException")
        # A volume from nothing: its snapshot is not EBS-direct readable here (no data).
        plain = self.ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
        self.ec2.create_snapshot(VolumeId=plain)

    def test_an_instance_from_a_registered_image_has_its_mappings_and_snapshots_of_its_writes(self):
        point0 = self.write({0: 1, 3: 2})
        point1 = self.write({1: 5})
        ami = self.ec2.register_image(
            Name="failback", RootDeviceName="/dev/xvda", Architecture="x86_64",
            BlockDeviceMappings=[
                {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": point0}},
                {"DeviceName": "/dev/sdf", "Ebs": {"SnapshotId": point1}},
            ])["ImageId"]
        inst = self.ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        desc = self.ec2.describe_instances(InstanceIds=[inst])["Reservations"][0]["Instances"][0]
        devices = {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in desc["BlockDeviceMappings"]}
        self.assertEqual(sorted(devices), ["/dev/sdf", "/dev/xvda"])
        vols = self.ec2.describe_volumes(VolumeIds=list(devices.values()))["Volumes"]
        self.assertEqual({v["VolumeId"]: v["SnapshotId"] for v in vols},
                         {devices["/dev/xvda"]: point0, devices["/dev/sdf"]: point1})
        # The instance "writes" block 3 and block 7 of its boot volume.
        self.ec2.create_tags(Resources=[devices["/dev/xvda"]], Tags=[
            {"Key": "pilotlight-test:write:3", "Value": "9"},
            {"Key": "pilotlight-test:write:7", "Value": "4"}])
        first = self.ec2.create_snapshots(InstanceSpecification={"InstanceId": inst},
                                          TagSpecifications=[{"ResourceType": "snapshot", "Tags": [{"Key": "set", "Value": "1"}]}])
        by_volume = {s["VolumeId"]: s["SnapshotId"] for s in first["Snapshots"]}
        back0 = by_volume[devices["/dev/xvda"]]
        changed = self.ebs.list_changed_blocks(FirstSnapshotId=point0, SecondSnapshotId=back0)
        self.assertEqual([b["BlockIndex"] for b in changed["ChangedBlocks"]], [3, 7])
        self.assertEqual(self.read(back0), {0: 1, 3: 9, 7: 4})
        back1 = by_volume[devices["/dev/sdf"]]
        self.assertEqual(self.ebs.list_changed_blocks(FirstSnapshotId=point1, SecondSnapshotId=back1)["ChangedBlocks"], [])
        # A second set: only what was written since differs from the first.
        self.ec2.create_tags(Resources=[devices["/dev/xvda"]], Tags=[{"Key": "pilotlight-test:write:7", "Value": "6"}])
        second = self.ec2.create_snapshots(InstanceSpecification={"InstanceId": inst})
        again = {s["VolumeId"]: s["SnapshotId"] for s in second["Snapshots"]}[devices["/dev/xvda"]]
        changed = self.ebs.list_changed_blocks(FirstSnapshotId=back0, SecondSnapshotId=again)
        self.assertEqual([b["BlockIndex"] for b in changed["ChangedBlocks"]], [7])
        tagged = self.ec2.describe_snapshots(OwnerIds=["self"], Filters=[{"Name": "tag:set", "Values": ["1"]}])["Snapshots"]
        self.assertEqual(sorted(s["SnapshotId"] for s in tagged), sorted(by_volume.values()))

    def test_client_tokens_make_start_idempotent(self):
        a = self.start(ClientToken="t-1")
        self.assertEqual(self.start(ClientToken="t-1"), a)
        self.assertNotEqual(self.start(ClientToken="t-2"), a)

    def test_the_encryption_outcomes_table(self):
        plain_parent = self.write({0: 1})
        enc_parent = self.write({0: 1}, Encrypted=True, KmsKeyArn=KEY)
        v = "ValidationException"
        # With a parent, neither Encrypted nor KmsKeyArn.
        for kw in ({"Encrypted": True}, {"Encrypted": False}, {"KmsKeyArn": KEY},
                   {"Encrypted": True, "KmsKeyArn": KEY}):
            for parent in (plain_parent, enc_parent):
                self.assertEqual(self.code(self.ebs.start_snapshot, VolumeSize=1, ParentSnapshotId=parent, **kw), v, kw)
        child = self.start(ParentSnapshotId=enc_parent)
        snap = self.ec2.describe_snapshots(SnapshotIds=[child])["Snapshots"][0]
        self.assertTrue(snap["Encrypted"])
        self.assertEqual(snap["KmsKeyId"], KEY)
        self.assertFalse(self.ec2.describe_snapshots(SnapshotIds=[self.start(ParentSnapshotId=plain_parent)])["Snapshots"][0]["Encrypted"])
        # No parent: KmsKeyArn needs Encrypted true.
        self.assertEqual(self.code(self.ebs.start_snapshot, VolumeSize=1, KmsKeyArn=KEY), v)
        self.assertEqual(self.code(self.ebs.start_snapshot, VolumeSize=1, Encrypted=False, KmsKeyArn=KEY), v)
        # Encryption by default: no unencrypted snapshot, no unencrypted parent.
        self.ec2.enable_ebs_encryption_by_default()
        self.assertEqual(self.code(self.ebs.start_snapshot, VolumeSize=1, Encrypted=False), v)
        self.assertEqual(self.code(self.ebs.start_snapshot, VolumeSize=1, ParentSnapshotId=plain_parent), v)
        by_default = self.start()
        self.assertTrue(self.ec2.describe_snapshots(SnapshotIds=[by_default])["Snapshots"][0]["Encrypted"])

    def test_changed_blocks_across_a_lineage(self):
        a = self.write({0: 1, 1: 1, 2: 1})
        b = self.write({1: 2}, ParentSnapshotId=a)
        c = self.write({2: 3}, ParentSnapshotId=b)
        got = self.ebs.list_changed_blocks(FirstSnapshotId=a, SecondSnapshotId=c)["ChangedBlocks"]
        self.assertEqual([x["BlockIndex"] for x in got], [1, 2])
        other = self.write({0: 9})
        self.assertEqual(self.code(self.ebs.list_changed_blocks, FirstSnapshotId=other, SecondSnapshotId=c),
                         "ValidationException")

    def test_limits_on_description_and_tags(self):
        self.assertEqual(self.code(self.ebs.start_snapshot, VolumeSize=1, Description="d" * 256), "ValidationException")
        self.assertEqual(self.code(self.ebs.start_snapshot, VolumeSize=1, Tags=[{"Key": "k", "Value": "v" * 256}]),
                         "ValidationException")


class Ec2(Mocked):

    def test_register_image_keeps_its_mappings_and_its_snapshots_are_in_use(self):
        sid = self.ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
        self.ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=0)
        ami = self.ec2.register_image(
            Name="pilotlight run", RootDeviceName="/dev/xvda", BootMode="uefi", EnaSupport=True,
            Architecture="x86_64", VirtualizationType="hvm",
            BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": sid, "VolumeType": "gp3"}}],
        )["ImageId"]
        image = self.ec2.describe_images(ImageIds=[ami])["Images"][0]
        self.assertEqual(image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"], sid)
        self.assertEqual(image["RootDeviceName"], "/dev/xvda")
        self.assertEqual(image["BootMode"], "uefi")
        with self.assertRaises(ClientError) as e:
            self.ec2.delete_snapshot(SnapshotId=sid)
        self.assertEqual(e.exception.response["Error"]["Code"], "InvalidSnapshot.InUse")
        self.ec2.deregister_image(ImageId=ami)
        self.ec2.delete_snapshot(SnapshotId=sid)

    def test_run_instances_is_idempotent_on_its_client_token(self):
        kw = {"ImageId": "ami-12c6146b", "MinCount": 1, "MaxCount": 1}
        a = self.ec2.run_instances(ClientToken="run-1-launch", **kw)["Instances"][0]["InstanceId"]
        b = self.ec2.run_instances(ClientToken="run-1-launch", **kw)["Instances"][0]["InstanceId"]
        c = self.ec2.run_instances(ClientToken="run-2-launch", **kw)["Instances"][0]["InstanceId"]
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)
        reservations = self.ec2.describe_instances()["Reservations"]
        self.assertEqual(sum(len(r["Instances"]) for r in reservations), 2)


if __name__ == "__main__":
    unittest.main()
