"""A moto extension that makes the emulator's EBS direct APIs follow AWS's documentation.

moto 5.2 answers StartSnapshot, PutSnapshotBlock, CompleteSnapshot, ListSnapshotBlocks,
GetSnapshotBlock and ListChangedBlocks thinly: no parents, no client tokens, no
encryption rules, 512-byte blocks, checksums taken at face value, no paging, and a
snapshot reads `completed` from the start. pilotlight's recovery points depend on each of
those rules, so `scripts/moto-server` loads this module (`install()`) and the emulator
enforces them. Each rule cites the document it follows; `test_pilotlight_moto.py` tests
each one alone.

Sources (EBS direct APIs API reference unless said otherwise):
- StartSnapshot: ParentSnapshotId "You can't specify ParentSnapshotId and Encrypted in
  the same request. If you specify both parameters, the request fails with
  ValidationException"; ClientToken idempotency; "The new snapshot enters the pending
  state after the request completes".
- EBS User Guide, "Encryption outcomes for EBS direct APIs": the outcome tables.
- PutSnapshotBlock: "Data written to a snapshot must be aligned with 512-KiB sectors";
  DataLength 524288; Checksum "the SHA256 checksum ... Base64-encoded"; ChecksumAlgorithm
  SHA256; a block index beyond the volume is refused.
- CompleteSnapshot: ChangedBlocksCount "The number of blocks that were written to the
  snapshot"; Checksum with ChecksumAggregationMethod LINEAR: "the checksum of the
  written blocks' checksums, in ascending block index order"; a mismatch leaves the
  snapshot in the error state.
- ListSnapshotBlocks / ListChangedBlocks: MaxResults 100 to 10000, NextToken paging
  ("the request can return less blocks than MaxResults": at most PAGE_CAP per page here,
  so callers' paging runs on disks of test size);
  BlockSize 524288; the snapshot must be completed; ListChangedBlocks needs two
  snapshots of one lineage.
- A child snapshot holds its parent's blocks as they were when it started, and keeps
  them when the parent is deleted (EBS User Guide, "How incremental snapshots work").

And EC2 calls the DR function relies on (EC2 API reference):
- RegisterImage keeps its BlockDeviceMappings, RootDeviceName, BootMode, EnaSupport and
  Architecture (moto keeps only name and description), and a snapshot an AMI maps is
  in use: DeleteSnapshot answers InvalidSnapshot.InUse until the AMI is deregistered.
- RunInstances ClientToken: "If you repeat the request with the same client token, the
  same response is returned" (EC2 User Guide, "Ensure idempotency"): one instance.
- CreateSnapshot(s) of a volume created from a snapshot: of that snapshot's lineage and
  readable with the EBS direct APIs (failback's return snapshots; see
  install_restored_volume_snapshots).
"""

from __future__ import annotations

import base64
import hashlib

BLOCK_SIZE = 512 * 1024
# Blocks per listing page at most, whatever MaxResults asks (the service may answer fewer).
PAGE_CAP = 1000
BLOCKS_PER_GIB = (1 << 30) // BLOCK_SIZE


def _errors():
    from moto.core.exceptions import JsonRESTError

    class ValidationException(JsonRESTError):
        code = 400

        def __init__(self, message: str, reason: str = "INVALID_PARAMETER_VALUE"):
            super().__init__("ValidationException", message)
            self.description = f'{{"__type": "ValidationException", "Message": "{message}", "Reason": "{reason}"}}'

    class ResourceNotFoundException(JsonRESTError):
        code = 404

        def __init__(self, message: str):
            super().__init__("ResourceNotFoundException", message)

    return ValidationException, ResourceNotFoundException


def _sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def install() -> None:
    """Patches moto's EBS responses (idempotent)."""
    from moto.core.responses import ActionResult
    from moto.ebs import responses as ebs_responses
    from moto.ebs.models import Block, EBSBackend, EBSSnapshot

    cls = ebs_responses.EBSResponse
    if getattr(cls, "_pilotlight", False):
        return
    cls._pilotlight = True
    Invalid, NotFound = _errors()

    def state(backend: EBSBackend) -> dict:
        if not hasattr(backend, "_pl_tokens"):
            backend._pl_tokens = {}
        return backend._pl_tokens

    def snapshot(backend: EBSBackend, sid: str) -> EBSSnapshot:
        """An EBS-direct snapshot that EC2 still has (DeleteSnapshot removes it there)."""
        snap = backend.snapshots.get(sid)
        if snap is None or sid not in backend.ec2_backend.snapshots:
            raise NotFound(f"The snapshot '{sid}' does not exist.")
        return snap

    def ec2_snapshot(backend: EBSBackend, sid: str):
        return backend.ec2_backend.snapshots[sid]

    def param_int(self, name):
        v = self._get_param(name)
        return None if v is None else int(v)

    def start_snapshot(self) -> ActionResult:
        backend = self.ebs_backend
        volume_size = param_int(self, "VolumeSize")
        tags = self._get_param("Tags") or []
        description = self._get_param("Description") or ""
        parent_id = self._get_param("ParentSnapshotId")
        token = self._get_param("ClientToken")
        encrypted = self._get_param("Encrypted")
        kms = self._get_param("KmsKeyArn")
        tokens = state(backend)
        # ClientToken: "Idempotency ensures that an API request completes only once ...
        # subsequent retries with the same client token return the result from the
        # original successful request".
        if token and token in tokens:
            return ActionResult(result(backend.snapshots[tokens[token]]))
        if volume_size is None or not 1 <= volume_size <= 65536:
            raise Invalid("VolumeSize must be 1 to 65536 GiB")
        if len(description) > 255:
            raise Invalid("Description is longer than 255 characters")
        for t in tags:
            if len(t.get("Key", "")) > 127 or len(t.get("Value", "")) > 255:
                raise Invalid("tag keys are at most 127 characters, values 255")
        by_default = backend.ec2_backend.ebs_encryption_by_default
        blocks: dict = {}
        lineage = None
        if parent_id:
            # "You can't specify ParentSnapshotId and Encrypted in the same request."
            if encrypted is not None or kms is not None:
                raise Invalid("You can't specify ParentSnapshotId and Encrypted (or KmsKeyArn) in the same request.")
            parent = snapshot(backend, parent_id)
            if parent.status != "completed":
                raise Invalid(f"The parent snapshot '{parent_id}' is not completed.")
            if volume_size < parent.volume_size:
                raise Invalid("VolumeSize is smaller than the parent snapshot's")
            p_ec2 = ec2_snapshot(backend, parent_id)
            # Unencrypted parent: "If Amazon EBS encryption by default is enabled ... you
            # cannot start a new snapshot using an unencrypted parent snapshot."
            if not p_ec2.encrypted and by_default:
                raise Invalid("encryption by default is enabled: an unencrypted parent cannot be used")
            # Encrypted parent: "The snapshot is encrypted using the same KMS key as the
            # parent snapshot."
            is_encrypted, key = p_ec2.encrypted, p_ec2.kms_key_id
            blocks = dict(parent.blocks)
            lineage = parent._pl_lineage
        else:
            if kms is not None and encrypted is not True:
                raise Invalid("KmsKeyArn requires Encrypted true")
            if encrypted is False and by_default:
                raise Invalid("encryption by default is enabled: unencrypted snapshots cannot be created")
            is_encrypted = bool(encrypted) or (encrypted is None and by_default)
            key = kms
        snap = backend.start_snapshot(volume_size=volume_size, tags=tags, description=description)
        snap.block_size = BLOCK_SIZE
        snap.blocks = blocks
        snap._pl_written = {}
        snap._pl_parent = parent_id
        snap._pl_lineage = lineage or snap.snapshot_id
        snap._pl_kms = key
        snap._pl_encrypted = is_encrypted
        ec2 = ec2_snapshot(backend, snap.snapshot_id)
        ec2.status = "pending"
        ec2.encrypted = is_encrypted
        ec2.kms_key_id = key
        if token:
            tokens[token] = snap.snapshot_id
        return ActionResult(result(snap))

    def result(snap) -> dict:
        out = {
            "SnapshotId": snap.snapshot_id,
            "OwnerId": snap.account_id,
            "Status": snap.status,
            "StartTime": snap.start_time,
            "VolumeSize": snap.volume_size,
            "BlockSize": snap.block_size,
            "Tags": snap.tags,
            "Description": snap.description,
        }
        if snap._pl_parent:
            out["ParentSnapshotId"] = snap._pl_parent
        if snap._pl_kms:
            out["KmsKeyArn"] = snap._pl_kms
        return out

    def put_snapshot_block(self) -> ActionResult:
        backend = self.ebs_backend
        sid = self._get_param("SnapshotId")
        snap = snapshot(backend, sid)
        if snap.status != "pending":
            raise Invalid(f"The snapshot '{sid}' is {snap.status}, not pending.")
        index = param_int(self, "BlockIndex")
        data = self._get_param("BlockData") or b""
        if isinstance(data, str):
            data = data.encode()
        length = param_int(self, "DataLength")
        checksum = self._get_param("Checksum")
        algorithm = self._get_param("ChecksumAlgorithm")
        if index is None or index < 0 or index >= snap.volume_size * BLOCKS_PER_GIB:
            raise Invalid("BlockIndex is beyond the volume size", "INVALID_BLOCK")
        if length != BLOCK_SIZE or len(data) != BLOCK_SIZE:
            raise Invalid("DataLength must be 524288 and match the data", "INVALID_BLOCK")
        if algorithm != "SHA256" or checksum != _sha256_b64(data):
            raise Invalid("The checksum of the block does not match its data", "INVALID_CHECKSUM")
        snap.put_block(index, data, checksum, algorithm, length)
        snap._pl_written[index] = hashlib.sha256(data).digest()
        return ActionResult({"Checksum": checksum, "ChecksumAlgorithm": algorithm})

    def complete_snapshot(self) -> ActionResult:
        backend = self.ebs_backend
        sid = self._get_param("SnapshotId")
        snap = snapshot(backend, sid)
        if snap.status == "completed":
            return ActionResult({"Status": "completed"})
        if snap.status == "error":
            raise Invalid(f"The snapshot '{sid}' is in the error state.")
        count = param_int(self, "ChangedBlocksCount")
        checksum = self._get_param("Checksum")
        method = self._get_param("ChecksumAggregationMethod")
        written = snap._pl_written
        ok = count == len(written)
        if checksum is not None:
            digest = hashlib.sha256(b"".join(written[i] for i in sorted(written))).digest()
            ok = ok and method == "LINEAR" and checksum == base64.b64encode(digest).decode()
        snap.status = "completed" if ok else "error"
        ec2_snapshot(backend, sid).status = snap.status
        return ActionResult({"Status": snap.status})

    def page(self, items: list, token_of) -> tuple[list, str | None]:
        max_results = param_int(self, "MaxResults")
        if max_results is not None and not 100 <= max_results <= 10000:
            raise Invalid("MaxResults must be 100 to 10000")
        size = min(max_results or 10000, PAGE_CAP)
        start = param_int(self, "StartingBlockIndex") or 0
        token = self._get_param("NextToken")
        if token:
            try:
                start = int(base64.b64decode(token).decode())
            except ValueError as e:
                raise Invalid("NextToken is not valid", "INVALID_PAGE_TOKEN") from e
        rest = [i for i in items if token_of(i) >= start]
        chunk = rest[:size]
        more = rest[size:]
        next_token = base64.b64encode(str(token_of(more[0])).encode()).decode() if more else None
        return chunk, next_token

    def readable(backend, sid) -> EBSSnapshot:
        snap = snapshot(backend, sid)
        if snap.status != "completed":
            raise Invalid(f"The snapshot '{sid}' is {snap.status}, not completed.")
        return snap

    def list_snapshot_blocks(self) -> ActionResult:
        snap = readable(self.ebs_backend, self._get_param("SnapshotId"))
        indices = sorted(snap.blocks)
        chunk, next_token = page(self, indices, lambda i: i)
        out = {
            "Blocks": [{"BlockIndex": i, "BlockToken": snap.blocks[i].block_token} for i in chunk],
            "VolumeSize": snap.volume_size,
            "BlockSize": BLOCK_SIZE,
            "ExpiryTime": snap.start_time,
        }
        if next_token:
            out["NextToken"] = next_token
        return ActionResult(out)

    def get_snapshot_block(self) -> ActionResult:
        snap = readable(self.ebs_backend, self._get_param("SnapshotId"))
        index = param_int(self, "BlockIndex")
        token = self._get_param("BlockToken")
        block: Block | None = snap.blocks.get(index)
        if block is None or block.block_token != token:
            raise Invalid("The block token is not valid for this snapshot and index", "INVALID_BLOCK_TOKEN")
        return ActionResult({
            "DataLength": BLOCK_SIZE,
            "BlockData": block.block_data,
            "Checksum": _sha256_b64(block.block_data),
            "ChecksumAlgorithm": "SHA256",
        })

    def list_changed_blocks(self) -> ActionResult:
        backend = self.ebs_backend
        first_id = self._get_param("FirstSnapshotId")
        second = readable(backend, self._get_param("SecondSnapshotId"))
        first = readable(backend, first_id) if first_id else None
        if first is not None and first._pl_lineage != second._pl_lineage:
            raise Invalid("The snapshots are not of the same lineage", "UNRELATED_SNAPSHOTS")
        changed = []
        indices = sorted(set(second.blocks) | (set(first.blocks) if first else set()))
        for i in indices:
            a = first.blocks.get(i) if first else None
            b = second.blocks.get(i)
            if a is b:
                continue
            entry = {"BlockIndex": i}
            if a is not None:
                entry["FirstBlockToken"] = a.block_token
            if b is not None:
                entry["SecondBlockToken"] = b.block_token
            changed.append(entry)
        chunk, next_token = page(self, changed, lambda e: e["BlockIndex"])
        out = {"ChangedBlocks": chunk, "VolumeSize": second.volume_size, "BlockSize": BLOCK_SIZE}
        if next_token:
            out["NextToken"] = next_token
        return ActionResult(out)

    install_ec2()
    cls.start_snapshot = start_snapshot
    cls.put_snapshot_block = put_snapshot_block
    cls.complete_snapshot = complete_snapshot
    cls.list_snapshot_blocks = list_snapshot_blocks
    cls.get_snapshot_block = get_snapshot_block
    cls.list_changed_blocks = list_changed_blocks


def install_ec2() -> None:
    """RegisterImage with its mappings; RunInstances idempotent on ClientToken."""
    from moto.core.responses import ActionResult
    from moto.ec2.models.amis import Ami
    from moto.ec2.models.instances import InstanceBackend
    from moto.ec2.responses.amis import AmisResponse
    from moto.ec2.responses.instances import InstanceResponse

    def register_image(self) -> ActionResult:
        name = self._get_param("Name")
        description = self._get_param("Description", "")
        self.error_on_dryrun()
        mappings = InstanceResponse._parse_block_device_mapping(self)
        image = self.ec2_backend.register_image(name, description)
        image.root_device_name = self._get_param("RootDeviceName") or image.root_device_name
        image.boot_mode = self._get_param("BootMode") or image.boot_mode
        image.architecture = self._get_param("Architecture") or image.architecture
        image._pl_ena = self._get_param("EnaSupport")
        image._pl_mappings = mappings
        for m in mappings:
            sid = (m.get("Ebs") or {}).get("SnapshotId")
            snap = self.ec2_backend.snapshots.get(sid) if sid else None
            if snap is not None:
                # DeleteSnapshot: "InvalidSnapshot.InUse" while an AMI uses it.
                snap.from_ami = image.id
        return ActionResult({"ImageId": image.id})

    original_mappings = Ami.block_device_mappings

    def block_device_mappings(self):
        mine = getattr(self, "_pl_mappings", None)
        return mine if mine else original_mappings.fget(self)

    original_run = InstanceBackend.run_instances

    def run_instances(self, image_id, count, user_data, security_group_names, **kwargs):
        # EC2 User Guide, "Block device mappings for volumes on Amazon EC2 instances":
        # an instance launched from an AMI gets the AMI's block device mappings (a volume
        # per mapping, created from its snapshot); moto gives every instance one blank
        # root volume instead.
        image = self.amis.get(image_id) if hasattr(self, "amis") else None
        mine = getattr(image, "_pl_mappings", None) if image is not None else None
        if mine and "block_device_mappings" not in kwargs:
            kwargs["block_device_mappings"] = [
                {**m, "Ebs": {**(m.get("Ebs") or {})}} for m in mine if m.get("Ebs")
            ]
        token = kwargs.get("client_token")
        # moto's response fills in "ABCDE" when the request has no token.
        if not token or token == "ABCDE":
            return original_run(self, image_id, count, user_data, security_group_names, **kwargs)
        seen = self.__dict__.setdefault("_pl_run_tokens", {})
        if token not in seen:
            seen[token] = original_run(self, image_id, count, user_data, security_group_names, **kwargs)
        return seen[token]

    AmisResponse.register_image = register_image
    Ami.block_device_mappings = property(block_device_mappings)
    InstanceBackend.run_instances = run_instances
    install_restored_volume_snapshots()


def install_restored_volume_snapshots() -> None:
    """CreateSnapshot (and CreateSnapshots) of a volume created from a snapshot: the new
    snapshot is of that snapshot's lineage, readable with the EBS direct APIs.

    EBS direct APIs reference, ListChangedBlocks: "blocks that are different between two
    ... snapshots of the same volume/snapshot lineage"; EBS User Guide, "How incremental
    snapshots work": a snapshot of a volume restored from a snapshot is incremental
    relative to it. moto's volumes hold no data, so the new snapshot holds exactly the
    source's blocks: ListChangedBlocks from the source finds none. (What a recovered
    instance wrote is stood for, in the tests, by snapshots written through EBS direct.)"""
    from moto.ebs.models import EBSSnapshot, ebs_backends
    from moto.ec2.models.elastic_block_store import EBSBackend as Ec2VolumeBackend

    original = Ec2VolumeBackend.create_snapshot

    def create_snapshot(self, volume_id, description, owner_id=None, from_ami=None):
        snap = original(self, volume_id, description, owner_id=owner_id, from_ami=from_ami)
        source_id = getattr(snap.volume, "snapshot_id", None)
        ebs = ebs_backends[self.account_id][self.region_name]
        source = ebs.snapshots.get(source_id) if source_id else None
        if source is not None and hasattr(source, "_pl_lineage") and source.status == "completed":
            child = EBSSnapshot(account_id=self.account_id, snapshot=snap)
            child.status = "completed"
            child.block_size = BLOCK_SIZE
            child.volume_size = max(snap.volume.size, source.volume_size)
            child.blocks = dict(source.blocks)
            child.blocks.update(volume_writes(self, snap.volume))
            child._pl_written = {}
            child._pl_parent = source_id
            child._pl_lineage = source._pl_lineage
            child._pl_kms = getattr(source, "_pl_kms", None)
            child._pl_encrypted = getattr(source, "_pl_encrypted", False)
            ebs.snapshots[snap.id] = child
        return snap

    Ec2VolumeBackend.create_snapshot = create_snapshot


WRITE_TAG = "pilotlight-test:write:"


def volume_writes(backend, volume) -> dict:
    """TEST KIT ONLY: what a recovered instance wrote to its volume, stood for by tags
    on the volume, `pilotlight-test:write:<block index>` = `<byte>`: that 512 KiB block
    now holds the byte repeated (moto's volumes hold no data; real EC2 keeps such tags as
    plain tags). A block keeps its identity across snapshots until it is written again,
    so ListChangedBlocks between two snapshots of the volume finds only what changed
    between them, as on EBS."""
    from moto.ebs.models import Block

    written = volume.__dict__.setdefault("_pl_blocks", {})
    for t in backend.describe_tags(filters={"resource-id": [volume.id]}):
        key = t.get("key", "")
        if not key.startswith(WRITE_TAG):
            continue
        index = int(key[len(WRITE_TAG):])
        byte = int(t.get("value", "0")) & 0xFF
        have = written.get(index)
        if have is None or have[0] != byte:
            data = bytes([byte]) * BLOCK_SIZE
            written[index] = (byte, Block(data, _sha256_b64(data), "SHA256", BLOCK_SIZE))
    return {i: b for i, (_, b) in written.items()}
