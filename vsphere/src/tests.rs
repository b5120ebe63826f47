use super::*;
use crate::vm::parse_snapshots;

/// A `config.hardware.device` value as vCenter returns it (shape from the vSphere
/// API reference): a normal disk, an independent one, a physical RDM, a CD-ROM.
const DEVICES: &str = r#"<val xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="ArrayOfVirtualDevice">
  <VirtualDevice xsi:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label></deviceInfo>
    <backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] web-01/web-01.vmdk</fileName><diskMode>persistent</diskMode><changeId>52 3c 1d/4</changeId></backing>
    <capacityInKB>41943040</capacityInKB><capacityInBytes>42949672960</capacityInBytes></VirtualDevice>
  <VirtualDevice xsi:type="VirtualDisk"><key>2001</key><deviceInfo><label>Hard disk 2</label></deviceInfo>
    <backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] web-01/scratch.vmdk</fileName><diskMode>independent_persistent</diskMode></backing>
    <capacityInKB>1024</capacityInKB></VirtualDevice>
  <VirtualDevice xsi:type="VirtualDisk"><key>2002</key><deviceInfo><label>Hard disk 3</label></deviceInfo>
    <backing xsi:type="VirtualDiskRawDiskMappingVer1BackingInfo"><fileName>[ds1] web-01/lun.vmdk</fileName><compatibilityMode>physicalMode</compatibilityMode><diskMode>persistent</diskMode></backing>
    <capacityInBytes>1073741824</capacityInBytes></VirtualDevice>
  <VirtualDevice xsi:type="VirtualCdrom"><key>3002</key></VirtualDevice>
</val>"#;

#[test]
fn disks_and_what_cannot_be_protected() {
    let disks = parse_disks(&Node::parse(DEVICES).unwrap());
    assert_eq!(disks.len(), 3);
    assert_eq!(disks[0].key, 2000);
    assert_eq!(disks[0].capacity, 40 << 30);
    assert_eq!(disks[0].file_name, "[ds1] web-01/web-01.vmdk");
    assert_eq!(disks[0].change_id.as_deref(), Some("52 3c 1d/4"));
    assert!(disks[0].skip.is_none());
    assert_eq!(disks[1].capacity, 1 << 20, "from capacityInKB");
    assert!(disks[1].skip.as_deref().unwrap().contains("independent"));
    assert!(
        disks[2].skip.as_deref().unwrap().contains("independent")
            || disks[2].skip.as_deref().unwrap().contains("physical")
    );
}

#[test]
fn snapshot_trees_flatten() {
    let v = Node::parse(r#"<val><rootSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-1</snapshot><name>a</name><description>x</description>
        <childSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-2</snapshot><name>pilotlight-1</name><description>created by pilotlight</description></childSnapshotList>
        </rootSnapshotList></val>"#).unwrap();
    let roots = Node {
        children: v.children("rootSnapshotList").cloned().collect(),
        ..Default::default()
    };
    let mut out = Vec::new();
    parse_snapshots(&roots, &mut out);
    let names: Vec<_> = out.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "pilotlight-1"]);
    assert_eq!(
        out[1].snapshot,
        MoRef::new("VirtualMachineSnapshot", "snapshot-2")
    );
}
